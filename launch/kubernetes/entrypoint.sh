#!/usr/bin/env bash
# The trainer of a JobSet pod (launch/kubernetes/jobset.yaml): one process per node driving all of its GPUs, joined
# by jax.distributed from the JobSet's annotations (visionfm_jax/parallel/cluster_env.py).
#   bash launch/kubernetes/entrypoint.sh --config=configs/vit_huge.py --workdir=/ckpt/vit_huge \
#       --config.mesh.fsdp=8 --config.mesh.data=-1
# GPU (h100, the default, for H100 and H200 nodes; a100) picks launch/xla_flags_$GPU.sh. MODULE (default
# visionfm_jax.main) runs another program the same way.
# Exit status: python's, but 75 when a SIGTERM (the pod evicted, preempted or its node drained) reached this pod and
# python then saved and exited 0: the JobSet's failure policy restarts every pod on 75 and the run resumes from that
# checkpoint, where a pod ending 0 would count as done. Kubernetes signals only this process (PID 1), so the trap
# passes the SIGTERM on.
set -uo pipefail
cd "$(dirname "$0")/../.."
module=${MODULE:-visionfm_jax.main}
gpu_flags=launch/xla_flags_${GPU:-h100}.sh
[[ -f $gpu_flags ]] || { echo "error: GPU=${GPU}: no $gpu_flags (h100 or a100)" >&2; exit 2; }
source "$gpu_flags"
if [[ $module == visionfm_jax.main ]]; then set -- --distributed=on "$@"; fi

notified=0 pid=""
trap 'notified=1; kill -TERM "$pid" 2>/dev/null' TERM
python -m "$module" "$@" &
pid=$!
while true; do
  wait "$pid"
  status=$?
  kill -0 "$pid" 2>/dev/null || break  # else the trap ended the wait, and python still saves
done
if ((notified && status == 0)); then
  echo "warning: $(hostname) saved at a preemption notice; exiting 75 so that the JobSet restarts the run" >&2
  status=75
fi
exit "$status"
