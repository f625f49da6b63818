"""A kind of `config.data.source` as a record: `SourceKind`, one per kind in the module of its reader, and
registry.KINDS, the table of them by name. A spec is '<kind>' or '<kind>:<rest>'; the kind's record parses the
rest into (name, split), opens the source, names its classes and says what it reads from disk. A further kind is one
record in a module of its own and one row of registry.KINDS; nothing else of the registry changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator

from visionfm_jax.errors import DataError

PREPARE_HINT = "see docs/data_preparation.md"


@dataclasses.dataclass(frozen=True)
class Request:
  """What the registry asks a kind to open or locate: `name`, the spec's rest as the kind parsed it (a path, a glob,
  a TFDS name; '' for a bare '<kind>'); `split`, the spec's split, else the configured one; `data_cfg`,
  config.data; `what`, the field and spec for messages ("config.data.mixture[1]='coco:/data'"); `training`, for
  a training loader."""

  name: str
  split: str
  data_cfg: Any
  what: str
  training: bool = False

  def errors_named(self, hint: str = ""):
    """`errors_named` by the spec and split: "config.data.source='coco:/d' split 'train': <the error>[; <hint>]"."""
    return errors_named(f"{self.what} split {self.split!r}", hint)


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """One kind of source spec. `name`: the spec's '<kind>' part. `usage`: its forms as a malformed spec's message
  lists them ("'coco:<root>'"); kinds of one usage (the ImageNet variants) are listed once. `open(request)`: the
  RandomAccessDataSource of a split. `class_names(name, data_cfg, what)`: the label names, index = label, of
  config.data.train_split; a DataError naming `what` for a kind without labels. `folder`: a '<kind>:<path>'
  kind, whose rest is any non-empty path, read from that path on disk. `parse(rest)`: (name, split), None for a
  malformed rest, for a kind that is no folder. `disk_path(request)`: what the spec reads from disk (its glob,
  its root folder), when that is not the folder's path itself."""

  name: str
  usage: str
  open: Callable[[Request], Any]
  class_names: Callable[[str, Any, str], list[str]]
  folder: bool = False
  parse: Callable[[str], tuple[str, str] | None] | None = None
  disk_path: Callable[[Request], str | None] | None = None

  def parsed(self, rest: str) -> tuple[str, str] | None:
    """(name, split) of a spec's `rest` after '<kind>:' ('' for a bare '<kind>'); None when it is malformed."""
    if self.parse is not None:
      return self.parse(rest)
    return (rest, "") if self.folder and rest else None

  def path_on_disk(self, request: Request) -> str | None:
    """What `request` reads from disk; None for a source of no files (the embedded sets)."""
    if self.disk_path is not None:
      return self.disk_path(request)
    return os.path.expanduser(request.name) if self.folder else None


@contextlib.contextmanager
def errors_named(prefix: str, hint: str = "") -> Iterator[None]:
  """Raises a DataError of the block again as '<prefix>: <its message>[; <hint>]': a reader's error, named by the
  spec and split it came from."""
  try:
    yield
  except DataError as e:
    raise DataError(f"{prefix}: {e}" + (f"; {hint}" if hint else "")) from e
