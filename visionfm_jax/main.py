r"""Entry point: `python -m visionfm_jax.main --config=configs/vit_huge.py[:variant] --workdir=DIR`.

Any config field is overridable: `--config.total_steps=100 --config.optim.lr=3e-4`. Multi-host runs call
`jax.distributed.initialize()` first (from the SLURM / coordinator environment, see launch/).
"""

from __future__ import annotations

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


def main(argv):
  del argv
  from visionfm_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_DISTRIBUTED.value)
  import jax  # pylint: disable=g-import-not-at-top
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
