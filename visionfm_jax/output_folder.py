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

MARKER is read only when it is a small regular file (`O_NOFOLLOW`, at most MARKER_BYTES): a link, a FIFO or a
device under its name is no marker (and so a file the tool did not write), never a hang or a read without end. A
temporary folder left beside `out` by a writer that was killed (SIGKILL, a lost node) is removed by the next claim
of `out` on the same host once its process is gone, with one warning naming it (`_remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from typing import Iterator, Sequence

from absl import logging

from visionfm_jax import atomic
from visionfm_jax.errors import UserError

MARKER = ".visionfm_jax.json"
IN_PLACE = "*"  # MARKER's files of a folder claimed in place: everything in it is the tool's
MARKER_BYTES = 1 << 20  # a marker lists the names of one folder: far below this


def _show(names: Sequence[str], limit: int = 5) -> str:
  return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _own_names(out: str, tool: str) -> set[str]:
  """The names MARKER in `out` says `tool` wrote there; empty when there is no such marker of this tool."""
  marker = _read_marker(os.path.join(out, MARKER))
  if not isinstance(marker, dict) or marker.get("tool") != tool:
    return set()
  if marker.get("files") == IN_PLACE:
    return set(os.listdir(out))
  if not isinstance(marker.get("files"), list):
    return set()
  return {name for name in marker["files"] if isinstance(name, str)} | {MARKER}


def _read_marker(path: str):
  """The JSON in the regular file `path` of at most MARKER_BYTES; None for anything else (missing, a link, a FIFO,
  a device, larger, not JSON). O_NONBLOCK: opening a FIFO would otherwise wait for a writer."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
  except OSError:
    return None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MARKER_BYTES:
      return None
    text = os.read(fd, MARKER_BYTES + 1)
    return json.loads(text) if len(text) <= MARKER_BYTES else None
  except (OSError, ValueError):
    return None
  finally:
    os.close(fd)


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder + os.sep)


def check(out: str, tool: str, overwrite: bool | None = False, reads: Sequence[str] = (), flag: str = "--out") -> None:
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
    raise UserError(
      f"{flag}={out}: holds a training workdir (checkpoints/), which {tool} never replaces; choose another folder"
    )
  foreign = sorted(set(names) - _own_names(out, tool))
  if foreign and not overwrite:
    offer = "" if overwrite is None else ", or give --overwrite to replace the folder and everything in it"
    raise UserError(
      f"{flag}={out}: holds {_show(foreign)}, which {tool} did not write; choose a new or empty folder{offer}"
    )


def _host() -> str:
  """This host's name as a temporary folder's name carries it: a pid means nothing on another host."""
  return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _temporary_beside(out: str, kind: str) -> str:
  parent, name = os.path.split(os.path.abspath(out))
  return os.path.join(parent, f".{name}.{os.getpid()}.{_host()}.{secrets.token_hex(4)}.{kind}")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    return True
  return True


def _remove_stale_temporaries(out: str, tool: str) -> None:
  """Removes the temporary folders beside `out` of writers on this host whose process is gone (killed mid-write:
  nothing removed them), one warning naming them; a live writer's, or one of another host, stays."""
  parent, name = os.path.split(os.path.abspath(out))
  own = re.compile(rf"\.{re.escape(name)}\.([0-9]+)\.{re.escape(_host())}\.[0-9a-f]{{8}}\.tmp")
  try:
    entries = os.listdir(parent)
  except OSError:
    return
  stale = [
    os.path.join(parent, entry)
    for entry in sorted(entries)
    if (match := own.fullmatch(entry))
    and not _alive(int(match.group(1)))
    and os.path.isdir(os.path.join(parent, entry))
    and not os.path.islink(os.path.join(parent, entry))
  ]
  for path in stale:
    shutil.rmtree(path, ignore_errors=True)
  if stale:
    logging.warning(
      "removed %s: left by %s, whose process is gone (killed while writing %s)", ", ".join(stale), tool, out
    )


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
  _remove_stale_temporaries(out, tool)
  tmp = _temporary_beside(out, "tmp")
  try:
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    os.mkdir(tmp)  # mode 0o777 less the umask, as every file written into it
  except OSError as e:
    raise UserError(
      f"--out={out}: cannot create {tmp} beside it ({e.strerror}); {tool} writes there first, then "
      "renames it into place"
    ) from e
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
