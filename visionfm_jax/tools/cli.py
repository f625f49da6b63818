"""The shared `main` of the tools: help, flag parsing, and one `error:` line with exit status 2 for bad input."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags

from visionfm_jax.errors import UserError

HELP_FLAGS = ("-h", "--help", "--helpshort")


def last_line(error: Exception) -> str:
  """absl and ml_collections put tracebacks in their messages: the last line names the problem."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


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
    rest = fv(list(argv))[1:]
    body(fv, rest)
  except flags.Error as e:
    print(f"error: {last_line(e)}", file=sys.stderr)
    return 2
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
