"""The shared `main` of the CLIs (main, bench, tools, datatools): help, flag parsing, and one `error:` line with exit
status 2 for bad input."""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import flags

from visionfm_jax import config_lib, errors
from visionfm_jax.errors import ConfigError, UserError

HELP_FLAGS = ("-h", "--help", "--helpshort")


def last_line(error: Exception) -> str:
  """absl and ml_collections put tracebacks in their messages: the last line names the problem."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def error_line(error: Exception) -> str:
  """The `error: ...` line printed for a UserError: its message on one line."""
  return "error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def parse(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """`fv(argv)`, and the config file of a `--config` flag loaded with its overrides. A bad flag, a config file
  that does not load, an unknown variant or an override of a field the config lacks is a UserError whose one
  line names it (absl and ml_collections report these with tracebacks and without the culprit)."""
  try:
    rest = fv(list(argv))
    if "config" in fv and fv["config"].present:
      fv.config.keys()  # a config file that failed to load raises here
    return rest
  except (flags.Error, AttributeError, KeyError, OSError, ConfigError) as e:
    raise UserError(_explain(e, argv)) from e


def _explain(error: Exception, argv: Sequence[str]) -> str:
  """The culprit of a failed parse: the config file or the override that does not fit it, found by loading the
  file again; else the last line of the error."""
  args = list(argv[1:])
  spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  if spec is None and "--config" in args[:-1]:
    spec = args[args.index("--config") + 1]
  if spec:
    try:
      config = config_lib.load(spec)
      for arg in args:
        if arg.startswith("--config."):
          config_lib.check_override(config, arg)
    except ConfigError as e:
      return str(e)
  return last_line(error)


def check_args(fv: flags.FlagValues, rest: Sequence[str], required: Sequence[str] = ()) -> None:
  """UserError for positional arguments (`rest`, the program name left out) or a `required` flag left unset."""
  if rest:
    raise UserError(f"unexpected arguments {list(rest)}")
  for name in required:
    if fv[name].value in (None, ""):
      raise UserError(f"--{name}: required")


def run(argv: Sequence[str], fv: flags.FlagValues, doc: str,
        body: Callable[[flags.FlagValues, list[str]], None]) -> int:
  """Parses `argv` (program name first) into `fv` and calls `body(fv, positional arguments)`, which prints the
  results. `--help` prints `doc` and the flags; a bad flag or a UserError prints one `error:` line. Returns the
  exit status: 0, or 2 for bad input."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(doc)
    print(fv.get_help())
    return 0
  try:
    rest = parse(fv, argv)[1:]
    body(fv, rest)
  except UserError as e:
    errors.say(error_line(e))
    return 2
  return 0


CHECKPOINT_FLAGS = ("--checkpoint", "--workdir")


def checkpoint_arg(argv: Sequence[str]) -> str | None:
  """The --checkpoint (or --workdir) value in `argv`, read before the flags exist: its config decides which
  --config.<field> flags there are."""
  for i, arg in enumerate(argv):
    for name in CHECKPOINT_FLAGS:
      if arg.startswith(name + "="):
        return arg[len(name) + 1:]
      if arg == name and i + 1 < len(argv):
        return argv[i + 1]
  return None


def run_with_config(argv: Sequence[str], load_config: Callable[[str], Any],
                    make_flags: Callable[[Any, Sequence[str]], flags.FlagValues], doc: str,
                    body: Callable[[flags.FlagValues, list[str]], None]) -> int:
  """`run` for a tool whose `--config.<field>` overrides apply to the config of its --checkpoint:
  `load_config(path)` reads it, `make_flags(config or None, argv)` defines the flags. A bad checkpoint or an
  override of a field the config lacks prints one `error:` line (status 2)."""
  path = checkpoint_arg(argv[1:])
  try:
    fv = make_flags(load_config(path) if path else None, argv)
  except UserError as e:
    errors.say(error_line(e))
    return 2
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config does not have
    errors.say(f"error: --config: {last_line(e)}")
    return 2
  return run(argv, fv, doc, body)


def ignore_closed_event_loops() -> None:
  """Wraps sys.unraisablehook (once) to drop asyncio's 'Event loop is closed': after an Orbax save or restore has
  failed (a full disk, a deleted chunk), tensorstore's callbacks of the reads and writes still in flight post to the
  event loop Orbax has closed, and each would print a traceback under the error line that already named the fault.
  Every other unraisable error goes to the hook there was."""
  previous = sys.unraisablehook
  if getattr(previous, "ignores_closed_event_loops", False):
    return

  def hook(unraisable) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  hook.ignores_closed_event_loops = True
  sys.unraisablehook = hook
