"""A SLURM stand-in that runs jobs here, at once, in the foreground, on CPU: `sbatch`, `srun` and `scontrol` in
this folder (put it first on PATH). Tests run the documented launch lines through it as they are written.

sbatch [--nodes=N] [--array=SPEC] [options] SCRIPT ARGS... | sbatch [options] --wrap=CMD
  prints `Submitted batch job <id>` (`<id>` alone with --parsable), then becomes `bash SCRIPT ARGS...` (`bash -c
  CMD`) in the allocation's environment; with --array (ids and ranges `0-99`, `1,3,5-9:2`, `%LIMIT` ignored) it runs
  the script once per task, one after another, and exits with the highest status of them, as `sbatch --wait` does;
  each task gets SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_MIN and
  SLURM_ARRAY_TASK_MAX, and a SLURM_JOB_ID of its own. The allocation's environment: SLURM_JOB_ID (unique),
  SLURM_JOB_NUM_NODES = SLURM_NNODES = min(N, $FAKE_SLURM_MAX_NODES, default 2), SLURMD_NODENAME=localhost (the
  node the script runs on), SLURM_GPUS_ON_NODE =
  $FAKE_SLURM_DEVICES_PER_NODE (default 4), SLURM_CPUS_PER_TASK (--cpus-per-task, capped to the CPUs here; only when
  asked for), SLURM_NTASKS_PER_NODE and SLURM_NTASKS when asked for, SLURM_SUBMIT_DIR = the current directory; a
  requeued job's attempt with $FAKE_SLURM_JOB_ID and $FAKE_SLURM_RESTART_COUNT: that SLURM_JOB_ID and
  SLURM_RESTART_COUNT (which Slurm sets from a job's first requeue on).
  Options come from the script's #SBATCH lines and the command line (which wins); the others are accepted and ignored
  (no queue, no output file: the job writes to this terminal). The caller's environment passes through, less its
  SLURM_* and SRUN_* variables. Its exit status is the script's, and signals sent to it reach the script (it is the
  script's process).
srun [-N/--nodes=N] [-n/--ntasks=T] [--ntasks-per-node=K] [-c/--cpus-per-task=C] [-K/--kill-on-bad-exit[=1]]
     [options] CMD...
  starts T tasks (else N x K, else one per node: N, else the allocation's nodes, else 1) as local processes and
  waits for all. Each gets SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_NNODES,
  SLURM_STEP_NUM_TASKS, SLURM_STEP_NUM_NODES, and for jax.distributed: JAX_PLATFORMS=cpu,
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo, JAX_COORDINATOR_ADDRESS (the caller's, else localhost:<free port>, as
  jax picks the job's first node), JAX_NUM_PROCESSES,
  JAX_PROCESS_ID, no JAX_LOCAL_DEVICE_IDS, and XLA_FLAGS (the caller's) with
  --xla_force_host_platform_device_count=$FAKE_SLURM_DEVICES_PER_NODE. As Slurm 22.05 and later do, a task is
  bound to C CPUs (-c, else $SRUN_CPUS_PER_TASK, else 1; never the job's --cpus-per-task), task i to the CPUs
  after task i - 1's, wrapping around. Each task runs in a process group of its own, and signals reach all of
  it, as Slurm signals every process of a step. As real srun does, a SIGTERM or SIGHUP to srun itself SIGKILLs
  the tasks ("forcing job termination": a step is asked to save with `scancel --signal=TERM`, below); SIGINT is
  passed on; with --kill-on-bad-exit a task's non-zero exit SIGKILLs the others. Exit status: the first non-zero
  one of a task (128 + N for a task killed by signal N), else 0. (Real srun reports a task killed by a signal
  over any exit status: when one task exits 75 and srun kills a wedged peer, it returns 128 + the signal, not
  75.) Outside an sbatch job it makes a job id of its own.
scontrol requeue ID
  appends ID (a line) to $FAKE_SLURM_LOG (default /dev/null); every scontrol call exits 0.
scancel [-s/--signal=SIG] ID...
  sends SIG (a name such as TERM, or a number; SIGKILL without --signal) to every task of the job's running steps,
  not to its batch script (Slurm's rule for a signal other than KILL without --batch or --full). srun lists its
  tasks' process groups under $FAKE_SLURM_STATE (default <tmp>/fake_slurm_<uid>)/<job id>/ while they run.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

SBATCH_SHORT_FLAGS = set("hHOQsvVW")
SBATCH_LONG_FLAGS = {
  "contiguous",
  "exclusive",
  "get-user-env",
  "help",
  "hold",
  "ignore-pbs",
  "no-kill",
  "no-requeue",
  "overcommit",
  "oversubscribe",
  "parsable",
  "quiet",
  "reboot",
  "requeue",
  "spread-job",
  "test-only",
  "usage",
  "use-min-nodes",
  "verbose",
  "version",
  "wait",
}
SRUN_SHORT_FLAGS = set("EHhIKlOQsuvVXZ")
SRUN_LONG_FLAGS = {
  "contiguous",
  "disable-status",
  "exact",
  "exclusive",
  "help",
  "kill-on-bad-exit",
  "label",
  "no-kill",
  "overcommit",
  "overlap",
  "oversubscribe",
  "preserve-env",
  "pty",
  "quiet",
  "spread-job",
  "test-only",
  "unbuffered",
  "usage",
  "use-min-nodes",
  "verbose",
  "version",
  "whole",
}
# Short option letter -> the long name that this stand-in reads.
ALIASES = {"N": "nodes", "n": "ntasks", "c": "cpus-per-task", "J": "job-name", "K": "kill-on-bad-exit", "s": "signal"}


def split_options(argv: list[str], short_flags: set, long_flags: set) -> tuple[dict, list[str]]:
  """({long name: value}, the rest) for `argv`'s leading options; a flag without a value maps to ''. An option
  not among the flags takes a value, attached (`--nodes=2`, `-N2`) or as the next argument."""
  options, i = {}, 0
  while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
    arg = argv[i]
    i += 1
    if arg == "--":
      break
    if arg.startswith("--"):
      name, has_value, value = arg[2:].partition("=")
      if not has_value and name not in long_flags:
        value, i = _next_value(argv, i, arg)
    else:
      name, value = arg[1], arg[2:]
      if not value and name not in short_flags:
        value, i = _next_value(argv, i, arg)
    options[ALIASES.get(name, name)] = value
  return options, argv[i:]


def _next_value(argv: list[str], i: int, option: str) -> tuple[str, int]:
  if i >= len(argv):
    fail(f"option {option} needs a value")
  return argv[i], i + 1


def fail(message: str) -> None:
  print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
  sys.exit(1)


def script_options(path: str) -> dict:
  """The options of a batch script's #SBATCH lines (those before its first command, as sbatch reads them)."""
  words = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      stripped = line.strip()
      if stripped.startswith("#SBATCH"):
        words += shlex.split(stripped[len("#SBATCH") :], comments=True)
      elif stripped and not stripped.startswith("#"):
        break
  options, rest = split_options(words, SBATCH_SHORT_FLAGS, SBATCH_LONG_FLAGS)
  if rest:
    fail(f"{path}: not an #SBATCH option: {rest[0]}")
  return options


def usable_cpus() -> list[int]:
  return sorted(os.sched_getaffinity(0))


def count(options: dict, name: str, default=None) -> int | None:
  """An integer option (for a range such as `--nodes=2-4`, its lower end); `default` when absent."""
  value = options.get(name)
  if value is None:
    return default
  try:
    return int(str(value).split("-")[0])
  except ValueError:
    fail(f"--{name}={value}: expected a number")


def new_job_id() -> str:
  """Unique among jobs running here (the pid) and over time (the clock's seconds)."""
  return str(int(time.time()) % 100_000 * 1_000_000 + os.getpid() % 1_000_000)


def devices_per_node() -> int:
  return int(os.environ.get("FAKE_SLURM_DEVICES_PER_NODE", "4"))


# --------------------------------------------------------------------------------------------------- sbatch


def sbatch(argv: list[str]) -> None:
  options, rest = split_options(argv, SBATCH_SHORT_FLAGS, SBATCH_LONG_FLAGS)
  if "wrap" in options:
    command, name = ["bash", "-c", options["wrap"]], "wrap"
  elif rest:
    options = {**script_options(rest[0]), **options}
    command, name = ["bash", *rest], os.path.basename(rest[0])
  else:
    fail("no batch script (sbatch [options] SCRIPT [ARGS...], or --wrap=CMD)")
  env = allocation_env(options, options.get("job-name", name))
  print(env["SLURM_JOB_ID"] if "parsable" in options else f"Submitted batch job {env['SLURM_JOB_ID']}", flush=True)
  if "array" in options:
    sys.exit(run_array(command, env, array_task_ids(options["array"])))
  os.execvpe(command[0], command, env)


def array_task_ids(spec: str) -> list[int]:
  """The task ids of `--array=SPEC`: comma-separated ids and ranges `A-B[:STEP]`, then an optional `%LIMIT`."""
  ids = []
  for part in spec.split("%")[0].split(","):
    first, _, rest = part.partition("-")
    last, _, step = rest.partition(":")
    try:
      ids += range(int(first), int(last or first) + 1, int(step or 1))
    except ValueError:
      fail(f"--array={spec}: expected ids and ranges such as 0-99 or 1,3,5-9:2")
  return sorted(set(ids))


def run_array(command: list[str], env: dict, task_ids: list[int]) -> int:
  """Runs the job once per array task, one after another, each as a job of its own (SLURM_JOB_ID) of the array
  (SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_*); the highest exit status of them, as `sbatch --wait` returns."""
  array = dict(
    env,
    SLURM_ARRAY_JOB_ID=env["SLURM_JOB_ID"],
    SLURM_ARRAY_TASK_COUNT=str(len(task_ids)),
    SLURM_ARRAY_TASK_MIN=str(task_ids[0]),
    SLURM_ARRAY_TASK_MAX=str(task_ids[-1]),
  )
  worst = 0
  for task_id in task_ids:
    job_id = str(int(env["SLURM_JOB_ID"]) + 1 + task_id)
    task_env = dict(array, SLURM_ARRAY_TASK_ID=str(task_id), SLURM_JOB_ID=job_id, SLURM_JOBID=job_id)
    worst = max(worst, shell_status(subprocess.run(command, env=task_env, check=False).returncode))
  return worst


def allocation_env(options: dict, job_name: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
  nodes = min(count(options, "nodes", 1), int(os.environ.get("FAKE_SLURM_MAX_NODES", "2")))
  job_id = os.environ.get("FAKE_SLURM_JOB_ID") or new_job_id()
  if "FAKE_SLURM_RESTART_COUNT" in os.environ:
    env["SLURM_RESTART_COUNT"] = os.environ["FAKE_SLURM_RESTART_COUNT"]
  env.update(
    SLURM_JOB_ID=job_id,
    SLURM_JOBID=job_id,
    SLURM_JOB_NAME=job_name,
    SLURM_JOB_NUM_NODES=str(nodes),
    SLURMD_NODENAME="localhost",
    SLURM_NNODES=str(nodes),
    SLURM_GPUS_ON_NODE=str(devices_per_node()),
    SLURM_SUBMIT_DIR=os.getcwd(),
  )
  if "cpus-per-task" in options:
    env["SLURM_CPUS_PER_TASK"] = str(min(count(options, "cpus-per-task"), len(usable_cpus())))
  if "ntasks-per-node" in options:
    env["SLURM_NTASKS_PER_NODE"] = str(count(options, "ntasks-per-node"))
  if "ntasks" in options:
    env["SLURM_NTASKS"] = str(count(options, "ntasks"))
  return env


# ----------------------------------------------------------------------------------------------------- srun


def srun(argv: list[str]) -> None:
  options, command = split_options(argv, SRUN_SHORT_FLAGS, SRUN_LONG_FLAGS)
  if not command:
    fail("no command (srun [options] CMD [ARGS...])")
  nodes, tasks = step_layout(options)
  asked = count(options, "cpus-per-task", count(os.environ, "SRUN_CPUS_PER_TASK"))
  cpus_per_task = min(asked or 1, len(usable_cpus()))
  base = step_env(nodes, tasks)
  if asked:
    base["SLURM_CPUS_PER_TASK"] = str(cpus_per_task)
  per_node = -(-tasks // nodes)
  procs = []
  for i in range(tasks):
    env = dict(
      base, SLURM_PROCID=str(i), SLURM_NODEID=str(i // per_node), SLURM_LOCALID=str(i % per_node), JAX_PROCESS_ID=str(i)
    )
    cpus = task_cpus(i, cpus_per_task)
    try:
      procs.append(
        subprocess.Popen(command, env=env, process_group=0, preexec_fn=lambda cpus=cpus: os.sched_setaffinity(0, cpus))
      )
    except OSError as e:
      for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
      fail(f"{command[0]}: {e.strerror}")
  kill_on_bad_exit = options.get("kill-on-bad-exit", "0") in ("", "1")
  listing = list_step(base["SLURM_JOB_ID"], procs)
  try:
    status = wait_all(procs, kill_on_bad_exit)
  finally:
    os.unlink(listing)
    try:
      os.rmdir(os.path.dirname(listing))  # the job's folder, once its last running step is gone
    except OSError:
      pass
  sys.exit(status)


def shell_status(returncode: int) -> int:
  """A process's exit status as a shell reports it: 128 + N for one killed by signal N (Python's -N)."""
  return 128 - returncode if returncode < 0 else returncode


def state_dir() -> str:
  return os.environ.get("FAKE_SLURM_STATE", os.path.join(tempfile.gettempdir(), f"fake_slurm_{os.getuid()}"))


def list_step(job_id: str, procs: list[subprocess.Popen]) -> str:
  """Writes the step's task process groups where `scancel` finds them; returns the file."""
  folder = os.path.join(state_dir(), job_id)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"step_{os.getpid()}")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(str(p.pid) for p in procs) + "\n")
  return path


def step_layout(options: dict) -> tuple[int, int]:
  """(nodes, tasks) of the step: within a job at most the job's nodes, outside one FAKE_SLURM_MAX_NODES."""
  in_job = "SLURM_JOB_ID" in os.environ
  limit = count(os.environ, "SLURM_NNODES", 1) if in_job else int(os.environ.get("FAKE_SLURM_MAX_NODES", "2"))
  nodes = min(count(options, "nodes", limit if in_job else 1), limit)
  per_node = count(options, "ntasks-per-node", count(os.environ, "SLURM_NTASKS_PER_NODE") if in_job else None)
  default_tasks = nodes * per_node if per_node else nodes
  if in_job and "nodes" not in options and "ntasks-per-node" not in options:
    default_tasks = count(os.environ, "SLURM_NTASKS", default_tasks)
  tasks = count(options, "ntasks", default_tasks)
  return max(1, min(nodes, tasks)), max(1, tasks)


def step_env(nodes: int, tasks: int) -> dict:
  env = dict(os.environ)
  env.pop("JAX_LOCAL_DEVICE_IDS", None)
  if "SLURM_JOB_ID" not in env:
    env["SLURM_JOB_ID"] = env["SLURM_JOBID"] = new_job_id()
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_node()}")
  env.update(
    SLURM_NTASKS=str(tasks),
    SLURM_NPROCS=str(tasks),
    SLURM_NNODES=str(nodes),
    SLURM_STEP_NUM_TASKS=str(tasks),
    SLURM_STEP_NUM_NODES=str(nodes),
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    JAX_COORDINATOR_ADDRESS=env.get("JAX_COORDINATOR_ADDRESS") or f"localhost:{free_port()}",
    JAX_NUM_PROCESSES=str(tasks),
    XLA_FLAGS=" ".join(flags),
  )
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def task_cpus(task: int, cpus_per_task: int) -> list[int]:
  cpus = usable_cpus()
  return sorted({cpus[(task * cpus_per_task + j) % len(cpus)] for j in range(cpus_per_task)})


def wait_all(procs: list[subprocess.Popen], kill_on_bad_exit: bool) -> int:
  """Waits for every task, SIGKILLing them all on SIGTERM or SIGHUP (srun's "forcing job termination") and passing
  SIGINT on to each task's process group; the first non-zero status, else 0."""
  running = {p.pid for p in procs}  # reaped here by os.wait, so a pid in it is ours to signal

  def signal_running(signum, _=None):
    for pid in list(running):
      try:
        os.killpg(pid, signum)
      except ProcessLookupError:  # the group's processes have all exited
        pass

  for forcing_termination in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(forcing_termination, lambda *_: signal_running(signal.SIGKILL))
  signal.signal(signal.SIGINT, signal_running)
  first_bad = 0
  while running:
    pid, status = os.wait()
    running.discard(pid)
    code = shell_status(os.waitstatus_to_exitcode(status))
    if code and not first_bad:
      first_bad = code
      if kill_on_bad_exit:
        signal_running(signal.SIGKILL)
  return first_bad


# ------------------------------------------------------------------------------------------------- scontrol


def scontrol(argv: list[str]) -> None:
  if argv[:1] == ["requeue"]:
    with open(os.environ.get("FAKE_SLURM_LOG", os.devnull), "a", encoding="utf-8") as log:
      for job_id in argv[1:]:
        log.write(job_id + "\n")
  sys.exit(0)


# -------------------------------------------------------------------------------------------------- scancel


def scancel(argv: list[str]) -> None:
  options, job_ids = split_options(argv, set("bfiQv"), {"batch", "full", "interactive", "quiet", "verbose"})
  name = options.get("signal", "KILL").upper()
  try:
    signum = int(name) if name.isdigit() else signal.Signals[name if name.startswith("SIG") else "SIG" + name]
  except (KeyError, ValueError):
    fail(f"--signal={options['signal']}: not a signal")
  for job_id in job_ids:
    folder = os.path.join(state_dir(), job_id)
    for step in os.listdir(folder) if os.path.isdir(folder) else ():
      with open(os.path.join(folder, step), encoding="utf-8") as f:
        for pgid in f.read().split():
          try:
            os.killpg(int(pgid), signum)
          except ProcessLookupError:
            pass
  sys.exit(0)
