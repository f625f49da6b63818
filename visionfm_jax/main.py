r"""Entry point: `python -m visionfm_jax.main --config=configs/vit_huge.py[:variant] --workdir=DIR`.

Any config field is overridable: `--config.total_steps=100 --config.optim.lr=3e-4`. Multi-host runs call
`jax.distributed.initialize()` first (from the SLURM / coordinator environment, see launch/).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' does when a coordinator is set in the environment "
    "(JAX_COORDINATOR_ADDRESS, or SLURM with more than one task).")
flags.mark_flags_as_required(["config", "workdir"])


def _want_distributed() -> bool:
  if _DISTRIBUTED.value != "auto":
    return _DISTRIBUTED.value == "on"
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _initialize_distributed(jax) -> None:
  """Explicit JAX_NUM_PROCESSES / JAX_PROCESS_ID (launch/local.sh) or cluster auto-detection (SLURM)."""
  kwargs = {}
  if "JAX_NUM_PROCESSES" in os.environ:
    kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if _want_distributed():
    _initialize_distributed(jax)
  from visionfm_jax import train  # pylint: disable=g-import-not-at-top
  from visionfm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  logging.info("jax %s, %d processes, %d devices (%s)", jax.__version__, jax.process_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
