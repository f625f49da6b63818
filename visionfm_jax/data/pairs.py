"""Image-text pairs in ArrayRecord files (`config.data.source='arrayrecord:<glob>'`).

Each record is a msgpack map {"image": <encoded image bytes, JPEG>, "caption": <str>}; other keys are
ignored. `write_pairs` writes such files; `ArrayRecordPairs` reads every file matching a glob as one
random-access source. A record that is not such a map is skipped and counted like an undecodable image
(`transforms.decode_failures`).
"""

from __future__ import annotations

import glob
import io
import os
from typing import Iterable

from array_record.python import array_record_data_source, array_record_module
import msgpack
import numpy as np
from PIL import Image

from visionfm_jax.data import transforms
from visionfm_jax.errors import DataError

JPEG_QUALITY = 95  # for images given to write_pairs as arrays


def pack_pair(image, caption: str) -> bytes:
  """One record: `image` as encoded bytes (stored as they are) or a uint8 HWC array (stored as JPEG)."""
  if not isinstance(image, (bytes, bytearray)):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    image = buffer.getvalue()
  return msgpack.packb({"image": bytes(image), "caption": str(caption)}, use_bin_type=True)


def unpack_pair(data: bytes) -> dict:
  """{'image': bytes, 'caption': str}; ValueError when `data` is not such a msgpack map."""
  try:
    record = msgpack.unpackb(data, raw=False)
  except (TypeError, msgpack.UnpackException) as e:  # most msgpack errors are ValueErrors already
    raise ValueError(f"undecodable msgpack: {e}") from e
  if not isinstance(record, dict) or not isinstance(record.get("image"), bytes) or not isinstance(
      record.get("caption"), str):
    raise ValueError(f"not a map with bytes 'image' and str 'caption': {str(record)[:100]}")
  return {"image": record["image"], "caption": record["caption"]}


def write_pairs(path: str, pairs: Iterable[tuple]) -> int:
  """Writes (image, caption) pairs (see `pack_pair`) to the ArrayRecord file `path`; returns the count.

  Records are in groups of one, the layout for random access.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
  count = 0
  try:
    for image, caption in pairs:
      writer.write(pack_pair(image, caption))
      count += 1
  finally:
    writer.close()
  return count


def split_pattern(pattern: str, split: str) -> str:
  """The glob for `split`: '{split}' in `pattern` becomes the split name (no placeholder: every split)."""
  return os.path.expanduser(pattern.replace("{split}", split))


class ArrayRecordPairs:
  """grain RandomAccessDataSource over the pairs in every file matching `pattern` (sorted by name)."""

  def __init__(self, pattern: str):
    self.pattern = pattern
    self.files = sorted(glob.glob(pattern, recursive=True))
    if not self.files:
      raise DataError(f"arrayrecord source: no files match {pattern!r}; see BUILD.md, section 'Preparing data'")
    try:
      self._source = array_record_data_source.ArrayRecordDataSource(self.files)
    except (RuntimeError, OSError, ValueError) as e:
      raise DataError(f"arrayrecord source {pattern!r}: cannot read its {len(self.files)} files as ArrayRecord "
                      f"({self.files[0]}, ...): {e}") from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    try:
      return unpack_pair(self._source[int(index)])
    except ValueError as e:
      transforms.count_failure(f"record {int(index)} of {self.pattern}", e)
      return {"image": None, "caption": ""}

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring an iterator state.
    return f"ArrayRecordPairs({self.pattern!r}, files={len(self.files)}, records={len(self)})"
