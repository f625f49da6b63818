r"""Entry point: `python -m visionfm_jax.main --config=configs/vit_huge.py[:variant] --workdir=DIR`.

Any config field is overridable: `--config.total_steps=100 --config.optim.lr=3e-4`. Multi-host runs call
`jax.distributed.initialize()` first (from the SLURM / coordinator environment, see launch/).

`--dry_run` checks a run without training: the config for `--dry_run_devices` devices in `--dry_run_processes`
processes (default: the devices config.mesh names when no axis is -1, else this process's; one process),
init_from, the workdir's checkpoint and every data source the run opens; it prints params, bytes per device,
steps, examples per epoch and the checkpoint cadence, and exits 0 (training/dry_run.py). It joins no other
process: launch/ runs one process for it.

`--compile_only` compiles the run's init and train step for this job's devices and processes into its compile
cache and exits 0 with one line naming each program, its seconds and the cache's folder (training/compile_only.py):
nothing is trained and no data is read. A job starts it as it starts the run, so that the run loads them.

Bad input (a flag, the config file, a field's value, data, checkpoints, weights) ends the run with one
`error: ...` line naming it and exit status 2; a process that hangs on its peers exits with
`faults.HUNG_EXIT_CODE`. Ctrl-C stops the run after the step in progress, without a save, with one line naming the
step and the newest checkpoint, and exit status 130 (cli.Interrupts; a second Ctrl-C ends it at once).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from visionfm_jax import cli, errors
from visionfm_jax.errors import UserError, WorkdirError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "Call jax.distributed.initialize(): 'auto' does when a coordinator is set in the environment "
  "(JAX_COORDINATOR_ADDRESS, or SLURM with more than one task).",
)
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Also show the INFO lines of the libraries underneath (Orbax, JAX, Grain) on the console."
)
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Check the config, init_from, the workdir and every data source, print the plan (params, bytes "
  "per device, steps, examples per epoch, checkpoints) and exit: nothing is trained, allocated or written.",
)
_DRY_RUN_DEVICES = flags.DEFINE_integer(
  "dry_run_devices",
  0,
  "With --dry_run: plan for this many devices in all (e.g. 128 for 16 nodes of 8 GPUs); 0: "
  "config.mesh's when no axis is -1, else this process's devices.",
)
_DRY_RUN_PROCESSES = flags.DEFINE_integer(
  "dry_run_processes", 1, "With --dry_run: plan for this many processes (one per node under launch/slurm.sbatch)."
)
_COMPILE_ONLY = flags.DEFINE_bool(
  "compile_only",
  False,
  "Compile the run's init and train step for this job's devices and processes into its "
  "compile cache (config.compile_cache: <workdir>/compile_cache by default) and exit: nothing is trained and no "
  "data is read; the run of the same config on the same devices then loads them (training/compile_only.py).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _exit_with(error: UserError, peers=None) -> None:
  """Prints the error line, then tells the job's other processes (`peers`: faults.PeerWatch) and exits 2."""
  from visionfm_jax.training.infra import console  # pylint: disable=g-import-not-at-top

  errors.say(cli.error_line(error) + console.held_back_note())
  if peers is not None:
    peers.close(failed=True)
  if isinstance(error, WorkdirError):
    # A failed save leaves Orbax's threads and asyncio tasks behind, each of whose errors the interpreter's
    # shutdown would print again after this line: the run has stopped, so end the process here.
    sys.stdout.flush()
    os._exit(2)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return cli.parse(flags.FLAGS, argv)
  except UserError as e:
    _exit_with(e)


def main(argv):
  del argv
  cli.interrupts.start(block=True)  # first: the threads and processes started after it leave Ctrl-C to it
  interrupted = False
  try:
    _main()
  except KeyboardInterrupt:  # Ctrl-C, with its one line (cli.Interrupts)
    interrupted = True
    cli.interrupts.say()
  finally:
    if not interrupted:  # an interrupted run keeps it: a second Ctrl-C ends its exit at once
      cli.interrupts.close()
  if interrupted:
    # Out of the handler, the stopped run's frames (its data loader among them) are let go here, so that they
    # close as at a run's end, not at the interpreter's exit.
    sys.exit(cli.INTERRUPTED_EXIT_CODE)


def _main():
  from visionfm_jax.training.infra import console  # pylint: disable=g-import-not-at-top

  console.configure(verbose=_VERBOSE.value)
  cli.ignore_closed_event_loops()
  try:
    from visionfm_jax.training import checks  # pylint: disable=g-import-not-at-top

    # once, before joining the other processes and setting up devices; a dry run may plan before the data exists
    class_names = checks.validate(_CONFIG.value, data=checks.DATA_PLANNED if _DRY_RUN.value else checks.DATA_PRESENT)
    if _DRY_RUN.value:
      _dry_run(class_names)
      return
    _check_no_dry_run_flags()
    from visionfm_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

    distributed.initialize(_DISTRIBUTED.value, _CONFIG.value.peer_timeout_s)
    import jax  # pylint: disable=g-import-not-at-top

    from visionfm_jax.training import train  # pylint: disable=g-import-not-at-top
    from visionfm_jax.training.infra import faults

    logging.info(
      "jax %s, %d processes, %d devices (%s)",
      jax.__version__,
      jax.process_count(),
      jax.device_count(),
      jax.devices()[0].device_kind,
    )
    peers = faults.PeerWatch(_CONFIG.value.peer_timeout_s)
    try:
      if _COMPILE_ONLY.value:
        _compile_only(class_names)
      else:
        train.run(_CONFIG.value, _WORKDIR.value, validated=True, class_names=class_names)
    except UserError as e:
      _exit_with(e, peers)
    except KeyboardInterrupt:  # Ctrl-C: the others learn it, and process 0 (the service's host) outlives them
      peers.close(failed=True)
      raise
    except Exception:  # a collective that failed because a peer died (gloo) names that peer, else it is ours
      peers.name_a_lost_peer()
      peers.close(failed=True)
      raise
    peers.close()
  except UserError as e:
    _exit_with(e)


def _dry_run(class_names: list[str] | None) -> None:
  """training/dry_run.py's checks and plan (of a task given the training `class_names` that sizing read), printed.
  The backend is set up here, after jax's import: it holds no accelerator memory, and none at all when the devices
  are planned as a number."""
  if _COMPILE_ONLY.value:
    raise UserError(
      "--compile_only and --dry_run: the dry run checks a job on one process, the compile-only start "
      "runs as the job; give one"
    )
  if _DRY_RUN_DEVICES.value < 0 or _DRY_RUN_PROCESSES.value < 1:
    raise UserError(
      f"--dry_run_devices={_DRY_RUN_DEVICES.value} --dry_run_processes={_DRY_RUN_PROCESSES.value}: "
      f"expected devices >= 0 (0: this process's) and processes >= 1"
    )
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax  # pylint: disable=g-import-not-at-top

  from visionfm_jax.training import dry_run  # pylint: disable=g-import-not-at-top

  devices = _DRY_RUN_DEVICES.value or dry_run.mesh_devices(_CONFIG.value.mesh)
  if devices:
    jax.config.update("jax_platforms", "cpu")
  else:
    devices = jax.device_count()
  plan = dry_run.plan(_CONFIG.value, _WORKDIR.value, devices, _DRY_RUN_PROCESSES.value, class_names)
  print(f"dry run: {config_flags.get_config_filename(flags.FLAGS['config'])} can start; nothing was trained or written")
  for line in dry_run.report(plan):
    print(line)
  sys.stdout.flush()


def _compile_only(class_names: list[str] | None) -> None:
  """training/compile_only.py's programs compiled into the run's cache, and its one line."""
  import jax  # pylint: disable=g-import-not-at-top

  from visionfm_jax.training import compile_only  # pylint: disable=g-import-not-at-top

  folder, programs = compile_only.run(_CONFIG.value, _WORKDIR.value, class_names)
  if jax.process_index() == 0:  # one line for the job
    print(compile_only.report(folder, programs))
    sys.stdout.flush()


def _check_no_dry_run_flags() -> None:
  for flag in (_DRY_RUN_DEVICES, _DRY_RUN_PROCESSES):
    if flags.FLAGS[flag.name].present:
      raise UserError(f"--{flag.name} plans a --dry_run; without --dry_run the run uses the devices it has")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
