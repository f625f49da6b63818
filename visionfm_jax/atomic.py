"""Atomic file writes: a reader (or a restarted job) sees the old file or the new one, never a part of one."""

from __future__ import annotations

import json
import os
from typing import Any


def write(path: str, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to `path` + '.<pid>.tmp', then renames that over `path` (os.replace, atomic
  on POSIX file systems): writers of the same file in several processes (the tasks of a cluster job) each replace
  it whole. A crash leaves at most a stale '.tmp' next to the old file."""
  tmp = f"{path}.{os.getpid()}.tmp"
  if isinstance(data, bytes):
    with open(tmp, "wb") as f:
      f.write(data)
  else:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(data)
  os.replace(tmp, path)


def write_json(path: str, value: Any, **dumps_kwargs) -> None:
  """`json.dumps(value, **dumps_kwargs)` written to `path` with `write`."""
  write(path, json.dumps(value, **dumps_kwargs))
