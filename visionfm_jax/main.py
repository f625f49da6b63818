r"""Entry point: `python -m visionfm_jax.main --config=configs/vit_huge.py[:variant] --workdir=DIR`.

Any config field is overridable: `--config.total_steps=100 --config.optim.lr=3e-4`. Multi-host runs call
`jax.distributed.initialize()` first (from the SLURM / coordinator environment, see launch/).

Bad input (a flag, the config file, a field's value, data, checkpoints, weights) ends the run with one
`error: ...` line naming it and exit status 2; a process that hangs on its peers exits with
`faults.HUNG_EXIT_CODE`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from visionfm_jax import config_lib
from visionfm_jax.errors import UserError, WorkdirError
from visionfm_jax.tools import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' does when a coordinator is set in the environment "
    "(JAX_COORDINATOR_ADDRESS, or SLURM with more than one task).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Also show the INFO lines of the libraries underneath (Orbax, JAX, Grain) on the console.")
flags.mark_flags_as_required(["config", "workdir"])


def _exit_with(error: UserError) -> None:
  print(cli.error_line(error), file=sys.stderr, flush=True)
  if isinstance(error, WorkdirError):
    # A failed save leaves Orbax's threads and asyncio tasks behind, each of whose errors the interpreter's
    # shutdown would print again after this line: the run has stopped, so end the process here.
    sys.stdout.flush()
    os._exit(2)
  sys.exit(2)


def _ignore_closed_event_loops(unraisable) -> None:
  """sys.unraisablehook: after a save has failed, tensorstore's callbacks still post to the event loops Orbax has
  closed, and each would print a traceback; other unraisable errors print as usual."""
  if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return cli.parse(flags.FLAGS, argv)
  except UserError as e:
    _exit_with(e)


def main(argv):
  del argv
  from visionfm_jax.training import console  # pylint: disable=g-import-not-at-top
  console.configure(verbose=_VERBOSE.value)
  sys.unraisablehook = _ignore_closed_event_loops
  try:
    config_lib.validate(_CONFIG.value)  # before joining the other processes and setting up the devices
    from visionfm_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(_DISTRIBUTED.value)
    import jax  # pylint: disable=g-import-not-at-top
    from visionfm_jax.training import train  # pylint: disable=g-import-not-at-top
    logging.info("jax %s, %d processes, %d devices (%s)", jax.__version__, jax.process_count(), jax.device_count(),
                 jax.devices()[0].device_kind)
    train.run(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    _exit_with(e)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
