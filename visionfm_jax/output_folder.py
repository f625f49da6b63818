"""The folder a tool writes whole (export_hf's and import_hf's --out): claimed only when it is new, empty, or one
the same tool wrote before and nobody added to since, unless the user says --overwrite; written atomically.

`claim(out, tool, overwrite, reads)` checks `out` first (before any slow work), then yields a fresh folder beside
it (`.<name>.<pid>.<random>.tmp`, created with the user's umask) for the tool to fill; on success it adds MARKER
(the tool and the names it wrote) and renames the folder into place, the old one (empty, the tool's own, or
replaced by --overwrite) set aside first and deleted after. A failure or an interrupt removes the temporary folder
and leaves `out` as it was. A training workdir (checkpoints/) is never replaced, nor a folder holding what the tool
reads (`reads`), the working directory or the home directory.

A tool that fills its folder file by file over several runs or processes (filter_clip_score's --output) claims
it in place instead (`claim_in_place`): the same check, then a marker that owns whatever the folder holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import Iterator, Sequence

from visionfm_jax import atomic
from visionfm_jax.errors import UserError

MARKER = ".visionfm_jax.json"
IN_PLACE = "*"  # MARKER's files of a folder claimed in place: everything in it is the tool's


def _show(names: Sequence[str], limit: int = 5) -> str:
  return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _own_names(out: str, tool: str) -> set[str]:
  """The names MARKER in `out` says `tool` wrote there; empty when there is no such marker of this tool."""
  try:
    with open(os.path.join(out, MARKER), encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return set()
  if not isinstance(marker, dict) or marker.get("tool") != tool:
    return set()
  if marker.get("files") == IN_PLACE:
    return set(os.listdir(out))
  if not isinstance(marker.get("files"), list):
    return set()
  return {name for name in marker["files"] if isinstance(name, str)} | {MARKER}


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder + os.sep)


def check(out: str, tool: str, overwrite: bool | None = False, reads: Sequence[str] = (),
          flag: str = "--out") -> None:
  """UserError, naming the culprit (`flag`, the tool's option for `out`), unless `tool` may write the folder `out`
  (module docstring); `overwrite` None: the tool has no --overwrite to offer."""
  for source in reads:
    if _inside(source, out):
      raise UserError(f"{flag}={out}: holds {source}, which {tool} reads; choose another folder")
  for place, what in ((os.getcwd(), "the working directory"), (os.path.expanduser("~"), "the home directory")):
    if _inside(place, out):
      raise UserError(f"{flag}={out}: holds {what} ({place}); choose a folder of its own")
  if not os.path.lexists(out):
    return
  if os.path.islink(out):
    raise UserError(f"{flag}={out}: a symbolic link; name the folder itself")
  if not os.path.isdir(out):
    raise UserError(f"{flag}={out}: a file, not a folder; choose a new or empty folder")
  names = sorted(os.listdir(out))
  if "checkpoints" in names:
    raise UserError(f"{flag}={out}: holds a training workdir (checkpoints/), which {tool} never replaces; "
                    "choose another folder")
  foreign = sorted(set(names) - _own_names(out, tool))
  if foreign and not overwrite:
    offer = "" if overwrite is None else ", or give --overwrite to replace the folder and everything in it"
    raise UserError(f"{flag}={out}: holds {_show(foreign)}, which {tool} did not write; choose a new or empty "
                    f"folder{offer}")


def _temporary_beside(out: str, kind: str) -> str:
  parent, name = os.path.split(os.path.abspath(out))
  return os.path.join(parent, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _move_into_place(tmp: str, out: str) -> None:
  if not os.path.lexists(out):
    os.rename(tmp, out)
    return
  old = _temporary_beside(out, "old")
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except OSError:
    os.rename(old, out)
    raise
  shutil.rmtree(old)


@contextlib.contextmanager
def claim(out: str, tool: str, overwrite: bool = False, reads: Sequence[str] = ()) -> Iterator[str]:
  """Checks `out` (`check`), yields the temporary folder to write, then puts it in place (module docstring)."""
  check(out, tool, overwrite, reads)
  tmp = _temporary_beside(out, "tmp")
  try:
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    os.mkdir(tmp)  # mode 0o777 less the umask, as every file written into it
  except OSError as e:
    raise UserError(f"--out={out}: cannot create {tmp} beside it ({e.strerror}); {tool} writes there first, then "
                    "renames it into place") from e
  try:
    yield tmp
    atomic.write_json(os.path.join(tmp, MARKER), {"tool": tool, "files": sorted(os.listdir(tmp))}, indent=2)
    check(out, tool, overwrite, reads)  # again: something may have been written into `out` meanwhile
    _move_into_place(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def claim_in_place(out: str, tool: str, reads: Sequence[str] = (), flag: str = "--out") -> None:
  """Checks `out` (`check`, no --overwrite), creates it, and marks it as `tool`'s whole (IN_PLACE): the tool fills
  it file by file, and a rerun, or another process of the job, may go on in it."""
  check(out, tool, None, reads, flag)
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise UserError(f"{flag}={out}: cannot create ({e.strerror or e})") from e
  if not _own_names(out, tool):
    atomic.write_json(os.path.join(out, MARKER), {"tool": tool, "files": IN_PLACE}, indent=2)
