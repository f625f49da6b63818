"""Joining a multi-process run: `jax.distributed.initialize()` from the launch environment (see launch/)."""

from __future__ import annotations

import os


def launched_distributed() -> bool:
  """True when the environment names a coordinator: JAX_COORDINATOR_ADDRESS (launch/local.sh), or SLURM with
  more than one task."""
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(mode: str = "auto") -> None:
  """Calls jax.distributed.initialize() when `mode` is 'on', or 'auto' and `launched_distributed()`.

  Explicit JAX_NUM_PROCESSES / JAX_PROCESS_ID (launch/local.sh) win over cluster auto-detection (SLURM).
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"mode={mode!r}: expected 'auto', 'on' or 'off'")
  if mode == "off" or (mode == "auto" and not launched_distributed()):
    return
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if "JAX_NUM_PROCESSES" in os.environ:
    kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
