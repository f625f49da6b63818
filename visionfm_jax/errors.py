"""Errors that name the culprit: bad configs, missing data, unreadable checkpoints or weights, a workdir that
another run holds or that cannot be written.

`main` prints these as one clear line (no traceback); everything else is a bug and keeps its traceback.
"""

import sys


def say(line: str) -> None:
  """Writes `line` and its newline to stderr in one write: a job's processes share one stream, where print's two
  writes (the text, then the newline) let another process's line in between when stderr is unbuffered."""
  sys.stderr.write(line + "\n")
  sys.stderr.flush()


class UserError(Exception):
  """Something the user supplied (config, data, checkpoint, weights) is wrong."""


class ConfigError(UserError, ValueError):
  """A config field is missing, unknown or inconsistent. The message names the field."""


class DataError(UserError, ValueError):
  """A data source cannot be found or read. The message names the source and where it was looked for."""


class CheckpointError(UserError, ValueError):
  """A checkpoint or weight file cannot be used. The message names the file and the offending keys."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be used: another run holds it, or it cannot be written (the message names the path and
  the errno)."""
