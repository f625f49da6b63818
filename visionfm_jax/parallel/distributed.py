"""Joining a multi-process run: `jax.distributed.initialize()` from the launch environment (see launch/).

Environment read here (the rest, e.g. SLURM's, is auto-detected by jax):
  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator (launch/local.sh)
  JAX_NUM_PROCESSES, JAX_PROCESS_ID  explicit process count and id; they win over cluster auto-detection
  JAX_LOCAL_DEVICE_IDS     comma list of the accelerators this process drives, e.g. "0,1,2,3,4,5,6,7". Under SLURM
                           jax otherwise gives each task only the GPU numbered SLURM_LOCALID (one GPU per task);
                           launch/slurm.sbatch sets it to all of the node's GPUs (one task per node).
"""

from __future__ import annotations

import os


def launched_distributed() -> bool:
  """True when the environment names a coordinator: JAX_COORDINATOR_ADDRESS (launch/local.sh), or SLURM with
  more than one task."""
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def local_device_ids() -> list[int] | None:
  """JAX_LOCAL_DEVICE_IDS as a list of ints ("0,1,2" -> [0, 1, 2]), or None when unset or empty."""
  value = os.environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
  if not value:
    return None
  try:
    return [int(i) for i in value.split(",")]
  except ValueError as e:
    raise ValueError(f"JAX_LOCAL_DEVICE_IDS={value!r}: expected comma-separated device numbers, e.g. '0,1,2,3'") from e


def initialize_kwargs() -> dict:
  """The arguments for jax.distributed.initialize() taken from the environment (unset ones are auto-detected)."""
  kwargs = {}
  if "JAX_NUM_PROCESSES" in os.environ:
    kwargs.update(num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
  ids = local_device_ids()
  if ids is not None:
    kwargs["local_device_ids"] = ids
  return kwargs


def initialize(mode: str = "auto") -> None:
  """Calls jax.distributed.initialize(**initialize_kwargs()) when `mode` is 'on', or 'auto' and
  `launched_distributed()`."""
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"mode={mode!r}: expected 'auto', 'on' or 'off'")
  if mode == "off" or (mode == "auto" and not launched_distributed()):
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(**initialize_kwargs())
