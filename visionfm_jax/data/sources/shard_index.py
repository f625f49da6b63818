"""A split's shard index: every shard's records, bytes and postscript digest, written once beside dataset.json, so
that a process opens no shard before it reads from it.

The index of split S is `<directory>/S.shards.npy` (DTYPE: one row per shard, in the order dataset.json lists them;
24 bytes a shard, 5.6 MB at LAION's 232,000), named in S's dataset.json entry with its digest:
{'shard_index': {'file': 'S.shards.npy', 'sha256': ...}} (`records.write_index`, which datatools.prepare_data calls).
A conversion that rewrites S's entry without one leaves S unindexed: its shards' footers are read at every start.

The index is checked whole when a source loads it (its digest, its rows against the entry's shards and records), and
each shard against its row when a process first opens it (`differs`: its size and postscript digest; its records at
every open): a shard truncated or replaced since it was indexed is named, not read.
"""

from __future__ import annotations

import hashlib
import io
import os

from array_record.python import array_record_module
import numpy as np

from visionfm_jax import atomic
from visionfm_jax.errors import DataError

KEY = "shard_index"  # the field of a dataset.json split entry that names its index
SUFFIX = ".shards.npy"
DTYPE = np.dtype([("records", "<i8"), ("bytes", "<i8"), ("digest", "<u8")])

# Random access: read a record's chunk, nothing ahead, and of the footer only what the index needs (array_record's
# default prefetches the last 1 MiB of the file at every open, and at 232,000 shards nearly every read opens one).
_READER_OPTIONS = "readahead_buffer_size:0,footer_prefetch_bytes:0"
_READER_BUFFER = 32768
# Riegeli pads a file to its blocks of 64 KiB and starts the last one with the postscript, which holds the offset of
# the record index (the footer): a digest of the postscript moves with the shard's total encoded bytes.
_BLOCK = 1 << 16
_POSTSCRIPT = 512


def open_reader(path: str):
  """An ArrayRecordReader of `path`; OSError with the reader's own reason when it could not open it (the reader is
  made in a failed state, and says why only when closed)."""
  reader = array_record_module.ArrayRecordReader(path, options=_READER_OPTIONS, file_reader_buffer_size=_READER_BUFFER)
  if reader.ok():
    return reader
  try:
    reader.close()
  except RuntimeError as e:
    raise OSError(str(e)) from None
  raise OSError(f"{path}: not an ArrayRecord file")


def size_and_digest(path: str) -> tuple[int, int]:
  """(bytes, the digest of the postscript as an integer) of the file `path`."""
  fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # not a Python file object: a third of the time, at every first open
  try:
    size = os.fstat(fd).st_size
    postscript = os.pread(fd, _POSTSCRIPT, max(0, size - _BLOCK))
  finally:
    os.close(fd)
  return size, int.from_bytes(hashlib.blake2b(postscript, digest_size=8).digest(), "big")


def measure(path: str) -> tuple[int, int, int]:
  """A DTYPE row of the ArrayRecord file `path`: (records, bytes, postscript digest)."""
  reader = open_reader(path)
  try:
    records = int(reader.num_records())
  finally:
    reader.close()
  return (records, *size_and_digest(path))


hex_digest = "{:016x}".format  # a row's digest (an int) as identity records it (data/loader/identity.py)


def differs(path: str, row) -> str | None:
  """How the shard at `path` differs from its DTYPE `row` in size or postscript, in words; None when it does not
  (OSError when it cannot be read)."""
  size, digest = size_and_digest(path)
  if size != int(row["bytes"]):
    return f"{size:,} bytes, not {int(row['bytes']):,}"
  if digest != int(row["digest"]):
    return f"its postscript {hex_digest(digest)}, not {hex_digest(int(row['digest']))}"
  return None


def save(directory: str, split: str, table: np.ndarray) -> dict:
  """Writes `table` (DTYPE rows) as split `split`'s index in `directory`, atomically; the entry field naming it."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(table, DTYPE), allow_pickle=False)
  data = buffer.getvalue()
  name = f"{split}{SUFFIX}"
  atomic.write(os.path.join(directory, name), data)
  return {"file": name, "sha256": hashlib.sha256(data).hexdigest()}


def load(directory: str, split: str, entry: dict) -> tuple[np.ndarray, str] | None:
  """(the DTYPE rows of split `split`'s index, its path) when its dataset.json `entry` names one, else None.
  DataError naming the index when it is missing, another file than the one indexed, or disagrees with the entry's
  shards or records."""
  named = entry.get(KEY)
  if not named:
    return None
  path = os.path.join(directory, os.path.basename(str(named.get("file", ""))))
  hint = f"prepare split {split!r} again (datatools.prepare_data writes the index)"
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(
      f"{path}: the shard index {os.path.join(directory, 'dataset.json')} names cannot be read "
      f"({e.strerror or e}); {hint}"
    ) from e
  if hashlib.sha256(data).hexdigest() != named.get("sha256"):
    raise DataError(
      f"{path}: not the shard index dataset.json records (another digest): written by another "
      f"preparation, or damaged; {hint}"
    )
  table = np.load(io.BytesIO(data), allow_pickle=False)
  shards = entry.get("shards") or []
  records = int(table["records"].sum()) if table.dtype == DTYPE else None
  if records is None or len(table) != len(shards) or records != entry.get("records"):
    raise DataError(
      f"{path}: indexes {len(table)} shards of {records} records, dataset.json lists {len(shards)} of "
      f"{entry.get('records')}; {hint}"
    )
  return table, path
