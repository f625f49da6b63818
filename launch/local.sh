#!/usr/bin/env bash
# N processes of visionfm_jax.main on this machine, joined by jax.distributed.
#   launch/local.sh N [main flags...]
# CPU: each process gets $DEVICES_PER_PROCESS (default 1) host devices; collectives go through gloo.
# GPU: the visible GPUs are split evenly between the processes (JAX_PLATFORMS=cpu forces CPU where GPUs exist).
# --dry_run: one process checks and plans the N-process job (visionfm_jax/training/dry_run.py); it joins no
# collective and its checks depend on the device and process counts alone, so the other N - 1 would repeat it.
set -euo pipefail
n=${1:?usage: launch/local.sh N [flags for visionfm_jax.main]}
shift
export JAX_NUM_PROCESSES=$n
gpus=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L | wc -l || echo 0)
if [ "${JAX_PLATFORMS:-}" = cpu ]; then gpus=0; fi
if [[ " $* " =~ " --dry_run "|" --dry_run=true "|" --dry_run=True " ]]; then
  devices=$(( gpus > 0 ? gpus : n * ${DEVICES_PER_PROCESS:-1} ))
  if [ "$gpus" -eq 0 ]; then export JAX_PLATFORMS=cpu; fi
  exec python -m visionfm_jax.main --dry_run_devices="$devices" --dry_run_processes="$n" "$@"
fi
# GPU: each process gets its own slice of this machine's CPUs (when there are at least as many as processes), so that
# config.data.num_workers=-1 sizes its data workers from its share, not from every CPU of the machine. (CPU runs
# share the cores: their processes wait on each other's collectives, and the CPU demos read in the main process.)
cpus=($(python -c "import os; print(*sorted(os.sched_getaffinity(0)))"))
per_cpus=$(( ${#cpus[@]} / n ))
pin() {  # pin I: the taskset prefix binding process I to its slice, or nothing
  if (( per_cpus >= 1 )) && command -v taskset >/dev/null; then
    local slice=("${cpus[@]:$(( $1 * per_cpus )):$per_cpus}")
    echo "taskset -c $(IFS=,; echo "${slice[*]}")"
  fi
}
# JAX's coordination service runs here, in a process of its own (visionfm_jax/parallel/coordination.py), not in
# process 0: when process 0 dies the others then name it and exit 75 instead of aborting; when the service dies, each
# process names it and exits 75, and so does this launcher. Where this jax cannot, process 0 hosts it.
ready=$(mktemp -u "${TMPDIR:-/tmp}/visionfm_service.XXXXXX")
JAX_PLATFORMS=cpu python -m visionfm_jax.parallel.coordination --processes="$n" --ready_file="$ready" \
  --port="${PORT:-0}" &
service=$!
waited=0
while [ ! -e "$ready" ] && kill -0 "$service" 2>/dev/null && ((waited++ < 600)); do sleep 0.1; done
if [ -e "$ready" ]; then
  port=$(cat "$ready") && rm -f "$ready"
  export VISIONFM_COORDINATION_SERVICE=launcher VISIONFM_COORDINATION_SERVICE_PID=$service
else
  kill -KILL "$service" 2>/dev/null && echo "warning: the coordination service did not start in 60 s:" \
    "process 0 hosts it" >&2
  port=${PORT:-$((20000 + RANDOM % 20000))}
fi
export JAX_COORDINATOR_ADDRESS="localhost:${port}"
stop_service() { kill -TERM "$service" 2>/dev/null || true; wait "$service" 2>/dev/null || true; }
pids=()
# TERM: pass it on (a preemption: each process checkpoints at its next step and exits), wait for all, then exit.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}"; stop_service; exit 143' TERM
# Ctrl-C: a terminal's SIGINT reaches every process of the foreground group, the trainers included (background jobs
# ignore it, but VISIONFM_TAKE_SIGINT=1 has them take it: each ends with its one line and status 130); a SIGINT sent
# to the launcher alone reaches them 12 s later, passed on. The service serves until they have ended.
export VISIONFM_TAKE_SIGINT=1
interrupted() {
  local waited=0 pid running
  while ((waited++ < 120)); do
    running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    ((running)) || break
    sleep 0.1
  done
  kill -INT "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  stop_service
  exit 130
}
trap interrupted INT
for ((i = 0; i < n; i++)); do
  if [ "$gpus" -gt 0 ]; then
    per=$((gpus / n))
    devices=$(seq -s, $((i * per)) $((i * per + per - 1)))
    # Local ids count within CUDA_VISIBLE_DEVICES; explicit so a SLURM allocation cannot narrow them to one GPU.
    CUDA_VISIBLE_DEVICES=$devices JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((per - 1))) JAX_PROCESS_ID=$i \
      $(pin "$i") python -m visionfm_jax.main --distributed=on "$@" &
  else
    JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo JAX_PROCESS_ID=$i \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
      python -m visionfm_jax.main --distributed=on "$@" &
  fi
  pids+=($!)
done
# The first process to fail is named: killed outright (SIGKILL: the OOM killer, a lost node) it says nothing
# itself; one that exits 75 (a peer, the coordination service or its relay to it stopped answering or ended) has
# its own error line naming that first cause.
# A process still running GRACE_S seconds after the first failure (frozen, or waiting on a peer that is gone) is
# killed and named: the launcher never waits on a process that cannot finish. Polled each second.
grace=${GRACE_S:-120}
status=0
failed_at=""
index_of() { for i in "${!pids[@]}"; do if [ "${pids[$i]}" = "$1" ]; then echo "$i"; fi; done; }
say_failed() {  # pid, status: the line for the job's first failure
  local i code=$2
  i=$(index_of "$1")
  if (( code > 128 )); then
    echo "error: process $i of $n (pid $1) ended first, by signal $(kill -l $((code - 128))) (status $code), at" \
         "$(date +%H:%M:%S): it died, or its node did; the other processes ended after it" >&2
  elif (( code == 75 )); then
    echo "error: process $i of $n (pid $1) ended first, with status 75 (requeue), at $(date +%H:%M:%S): its own" \
         "error line names the cause (a peer, the coordination service or its relay to it)" >&2
  fi
}
service_ended() {  # the line and status 75 when the launcher's service has ended before the job
  [ -n "${VISIONFM_COORDINATION_SERVICE:-}" ] && [ -z "$failed_at" ] && ! kill -0 "$service" 2>/dev/null || return 0
  local code=0 how
  wait "$service" || code=$?
  how="with status $code"
  if (( code > 128 )); then how="by signal $(kill -l $((code - 128))) (status $code)"; fi
  failed_at=$SECONDS
  status=75
  echo "error: JAX's coordination service (pid $service, $JAX_COORDINATOR_ADDRESS) ended first, $how, at" \
    "$(date +%H:%M:%S): every process lost its peers with it (exit 75: requeue the job; it resumes from the newest" \
    "complete checkpoint)" >&2
}
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  service_ended
  left=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then left+=("$pid"); continue; fi
    code=0
    wait "$pid" || code=$?
    (( code == 0 )) && continue
    (( status == 0 )) && status=$code
    [ -z "$failed_at" ] && { failed_at=$SECONDS; say_failed "$pid" "$code"; }
  done
  remaining=("${left[@]}")
  ((${#remaining[@]})) || break
  if [ -n "$failed_at" ] && (( SECONDS - failed_at >= grace )); then
    for pid in "${remaining[@]}"; do
      echo "error: process $(index_of "$pid") of $n (pid $pid) still ran $grace s (GRACE_S) after the first" \
           "failure: killed; it was frozen, or waiting on a peer that is gone" >&2
      kill -KILL "$pid" 2>/dev/null || true
    done
    wait "${remaining[@]}" 2>/dev/null || true
    break
  fi
  sleep 1
done
stop_service
exit $status
