"""Joining a multi-process run: `jax.distributed.initialize()` from the launch environment (see launch/).

Environment read here (a Kubernetes JobSet's in parallel/cluster_env.py; the rest, e.g. SLURM's, is auto-detected
by jax):
  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator (launch/local.sh)
  JAX_NUM_PROCESSES, JAX_PROCESS_ID  explicit process count and id, both or neither; they win over cluster
                           auto-detection
  VISIONFM_COORDINATION_SERVICE  "launcher": join the coordination service the launcher hosts
                           (parallel/coordination.py), start none in process 0
  VISIONFM_COORDINATION_SERVICE_PID  that service's pid, named when it dies
  JAX_LOCAL_DEVICE_IDS     comma list of the accelerators this process drives, e.g. "0,1,2,3,4,5,6,7". Under SLURM
                           jax otherwise gives each task only the GPU numbered SLURM_LOCALID (one GPU per task);
                           launch/slurm.sbatch sets it to all of the node's GPUs (one task per node).
  VISIONFM_JOIN_TIMEOUT_S  how long a process waits for the whole job to join the coordination service (default
                           300, jax's own: a JobSet's pods start as their nodes pull the image, minutes apart)
A malformed one is a UserError naming it. A join that fails is one `error:` line and exit 75 (the job may succeed if
requeued): the service did not answer within VISIONFM_JOIN_TIMEOUT_S (naming its address and why), not every
process joined by then, or the service refused this process because another registered with its index.
"""

from __future__ import annotations

import atexit
import contextlib
import os

from visionfm_jax.errors import UserError
from visionfm_jax.parallel import cluster_env, coordination, relay


def _env_int(name: str, low: int, default: str | None = None) -> int:
  """The environment variable `name` as an integer >= `low`; UserError naming it otherwise."""
  value = os.environ.get(name, default)
  try:
    number = int(value) if value is not None else None
  except ValueError:
    number = None
  if number is None or number < low:
    raise UserError(f"{name}={value!r}: expected an integer >= {low}")
  return number


JOIN_TIMEOUT_ENV = "VISIONFM_JOIN_TIMEOUT_S"
DEFAULT_JOIN_TIMEOUT_S = 300


def join_timeout_s() -> int:
  return _env_int(JOIN_TIMEOUT_ENV, 1, default=str(DEFAULT_JOIN_TIMEOUT_S))


def _check_coordinator_address() -> None:
  """JAX_COORDINATOR_ADDRESS, where set, as HOST:PORT with a port jax can dial (jax would wait out its join
  timeout on any other)."""
  value = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not value:
    return
  host, _, port = value.rpartition(":")
  if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise UserError(f"JAX_COORDINATOR_ADDRESS={value!r}: expected HOST:PORT with a port from 1 to 65535")


def launched_distributed() -> bool:
  """True when the environment names a coordinator: JAX_COORDINATOR_ADDRESS (launch/local.sh), SLURM with more
  than one task, or a JobSet of more than one pod (parallel/cluster_env.py)."""
  return (
    bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    or _env_int("SLURM_NTASKS", 1, default="1") > 1
    or cluster_env.jobset_kwargs().get("num_processes", 1) > 1
  )


def local_device_ids() -> list[int] | None:
  """JAX_LOCAL_DEVICE_IDS as a list of ints ("0,1,2" -> [0, 1, 2]), or None when unset or empty."""
  value = os.environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
  if not value:
    return None
  try:
    return [int(i) for i in value.split(",")]
  except ValueError as e:
    raise UserError(f"JAX_LOCAL_DEVICE_IDS={value!r}: expected comma-separated device numbers, e.g. '0,1,2,3'") from e


def initialize_kwargs() -> dict:
  """The arguments for jax.distributed.initialize() taken from the environment (unset ones are auto-detected)."""
  _check_coordinator_address()
  kwargs = cluster_env.jobset_kwargs()  # a JobSet's pod (parallel/cluster_env.py); the JAX_* variables win
  explicit = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if name in os.environ]
  if len(explicit) == 1:
    other = "JAX_PROCESS_ID" if explicit == ["JAX_NUM_PROCESSES"] else "JAX_NUM_PROCESSES"
    raise UserError(f"{explicit[0]}={os.environ[explicit[0]]!r} is set but {other} is not: set both or neither")
  if explicit:
    num_processes = _env_int("JAX_NUM_PROCESSES", 1)
    process_id = _env_int("JAX_PROCESS_ID", 0)
    if process_id >= num_processes:
      raise UserError(f"JAX_PROCESS_ID={process_id}: expected below JAX_NUM_PROCESSES={num_processes}")
    kwargs.update(num_processes=num_processes, process_id=process_id)
  ids = local_device_ids()
  if ids is not None:
    kwargs["local_device_ids"] = ids
  return kwargs


def initialize(mode: str = "auto", peer_timeout_s: float = 0.0) -> None:
  """Calls jax.distributed.initialize(**initialize_kwargs()) when `mode` is 'on', or 'auto' and
  `launched_distributed()`, with JAX's heartbeat timeout (100 s) at least 3x `peer_timeout_s`, so that the
  training loop's own watch on its peers (training/infra/faults.py PeerWatch) speaks first. A process that does not
  host the coordination service joins it through a relay (parallel/coordination.py); where the launcher hosts it
  (coordination.SERVICE_ENV), every process does."""
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"mode={mode!r}: expected 'auto', 'on' or 'off'")
  if mode == "off" or (mode == "auto" and not launched_distributed()):
    return
  import jax  # pylint: disable=g-import-not-at-top

  timeout_s = join_timeout_s()
  kwargs = dict(
    initialize_kwargs(), heartbeat_timeout_seconds=max(100, int(3 * peer_timeout_s)), initialization_timeout=timeout_s
  )
  try:
    with _service_placement(jax.__version__):
      jax.distributed.initialize(**kwargs)
  except coordination.JoinFailed as e:
    _exit_for_failed_join(e, timeout_s)
  atexit.register(coordination.ending)  # after jax's own shutdown at exit was registered: runs before it


def _exit_for_failed_join(failed: coordination.JoinFailed, timeout_s: int) -> None:
  """Names why this process did not join the service (JAX's client says nothing that survives) and exits 75."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top

  index, count = jax_distributed.global_state.process_id, jax_distributed.global_state.num_processes
  service, index_name = coordination.describe_service(failed.address), _index_name(index)
  if failed.after_s < 0.9 * timeout_s:  # an answer before the deadline: a refusal
    what = (
      f"{service} refused this process as process {index} of {count} after {failed.after_s:.0f}s: another "
      f"process registered with the same index, {index_name} (or the service runs a job of another size)"
    )
  elif why := relay.refused(relay.address(failed.address)):
    what = f"{service} did not answer within {timeout_s}s ({JOIN_TIMEOUT_ENV}): {why}"
  else:
    what = (
      f"not all {count} processes of the job joined {service} within {timeout_s}s ({JOIN_TIMEOUT_ENV}): one "
      f"did not start or cannot reach it, or two have the same index (this one's {index_name})"
    )
  coordination.exit_for_requeue(what, index)


def _index_name(index: int) -> str:
  """Where this process's index came from, as a line names it."""
  if "JAX_PROCESS_ID" in os.environ:
    return f"JAX_PROCESS_ID={index}"
  if cluster_env.in_jobset():
    return f"JOBSET_JOB_INDEX={index}"
  return f"process index {index}"


def _service_placement(jax_version: str):
  """How jax.distributed.initialize joins the coordination service: through a relay, and the launcher's service
  where there is one; as jax does by itself where this jax cannot."""
  try:
    return coordination.joining_service()
  except ImportError as e:
    if not coordination.hosted_by_launcher():
      return contextlib.nullcontext()
    raise UserError(
      f"{coordination.SERVICE_ENV}=launcher: this jax ({jax_version}) cannot join a coordination "
      f"service its launcher hosts (no {e.name or e}); unset it"
    ) from e
