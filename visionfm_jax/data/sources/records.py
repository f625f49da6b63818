"""Examples in ArrayRecord files (`config.data.source='arrayrecord:<glob>'`), the format `tools.prepare_data`
writes.

Each record is a msgpack map with an encoded image and its annotation:

  image    bytes   JPEG/PNG/... as stored (required)
  caption  str     image-text pairs (a record with neither caption nor label is image-only)
  label    int     classification; the class names are in the folder's `dataset.json`
  key      str     where the example came from (file name, WebDataset key); optional
  meta     str     the WebDataset `.json` sidecar, verbatim; optional
  score    float   the CLIP score `tools.filter_clip_score` kept the pair for; optional

`dataset.json`, next to the shards, describes them (see `write_metadata`): the kind, the class names in label
order, and per split its shards, counts and kind (labelled, pairs, or images: image-only). `ArrayRecordSource`
reads every file matching a glob as one random-access source, once the shards `dataset.json` lists are all
there with the records it counts (a deleted or truncated shard is a DataError naming it); a record that is not
such a map is counted (`transforms.count_failure`) and served as an undecodable image, which the pipelines skip.

Shards are written to `<name>.tmp` and renamed when complete (`RecordWriter`), so a finished shard name
always means a complete file, and an interrupted conversion resumes by skipping the shards that exist.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
from typing import Iterable

from array_record.python import array_record_data_source, array_record_module
import msgpack
import numpy as np
from PIL import Image

from visionfm_jax import atomic
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import DataError

JPEG_QUALITY = 95  # for images given as arrays
METADATA_FILE = "dataset.json"
FORMAT = "visionfm_jax.records/1"
KINDS = ("classification", "pairs", "images")  # labelled folders, WebDataset tars, unlabelled folders
_OPTIONAL = {"caption": str, "label": int, "key": str, "meta": str, "score": float}


def encode_jpeg(image, quality: int = JPEG_QUALITY) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def pack_record(image, **fields) -> bytes:
  """One record: `image` as encoded bytes (stored as they are) or a uint8 HWC array (stored as JPEG), plus
  the optional fields of the module docstring (others are a ValueError)."""
  unknown = sorted(set(fields) - set(_OPTIONAL))
  if unknown:
    raise ValueError(f"unknown record fields {unknown}; known: image, {', '.join(_OPTIONAL)}")
  if not isinstance(image, (bytes, bytearray)):
    image = encode_jpeg(image)
  record = {"image": bytes(image)}
  record.update({k: _OPTIONAL[k](v) for k, v in fields.items() if v is not None})
  return msgpack.packb(record, use_bin_type=True)


def unpack_record(data: bytes) -> dict:
  """The record as a dict; ValueError when `data` is not a msgpack map with bytes 'image' and well-typed
  optional fields."""
  try:
    record = msgpack.unpackb(data, raw=False)
  except (TypeError, msgpack.UnpackException) as e:  # most msgpack errors are ValueErrors already
    raise ValueError(f"undecodable msgpack: {e}") from e
  if not isinstance(record, dict) or not isinstance(record.get("image"), bytes):
    raise ValueError(f"not a map with bytes 'image': {str(record)[:100]}")
  for key, kind in _OPTIONAL.items():
    if key in record and not isinstance(record[key], (int, float) if kind is float else kind):
      raise ValueError(f"field {key!r} is {type(record[key]).__name__}, not {kind.__name__}")
  return {k: record[k] for k in ("image", *_OPTIONAL) if k in record}


class RecordWriter:
  """Writes packed records to `path` via `path.tmp`, renamed on a clean `close()` (use as a context manager;
  an exception discards the partial file)."""

  def __init__(self, path):
    self.path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._tmp = self.path + ".tmp"
    self._writer = array_record_module.ArrayRecordWriter(self._tmp, "group_size:1")  # random-access layout
    self.count = 0

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self.count += 1

  def close(self) -> None:
    self._writer.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    self._writer.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_records(path, records: Iterable[dict]) -> int:
  """Writes dicts {'image': bytes or array, **fields} (see `pack_record`) to `path`; returns the count."""
  with RecordWriter(path) as writer:
    for record in records:
      record = dict(record)
      writer.write(pack_record(record.pop("image"), **record))
  return writer.count


def write_pairs(path, pairs: Iterable[tuple]) -> int:
  """Writes (image, caption) pairs to the ArrayRecord file `path`; returns the count."""
  return write_records(path, ({"image": image, "caption": caption} for image, caption in pairs))


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def sidecar_path(records_path: str) -> str:
  """The JSON file next to a records file in which the tool that wrote it (tools.prepare_data,
  tools.filter_clip_score) keeps its counts: a rerun takes a records file with its sidecar as finished."""
  return records_path + ".json"


def write_metadata(directory, *, kind: str, splits: dict, classes: list[str] | None = None, **extra) -> dict:
  """Writes `<directory>/dataset.json`: {'format', 'kind' (KINDS: of the conversion), 'classes' (label
  order), 'splits': {split: {'records', 'shards', 'kind' (labelled, pairs or images: its records hold labels,
  captions (some may lack one) or neither), ...}}, **extra}, atomically, merged with what is there (another
  split written earlier). Returns the written dict."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
  os.makedirs(os.fspath(directory), exist_ok=True)
  path = os.path.join(os.fspath(directory), METADATA_FILE)
  metadata = read_metadata(directory) or {}
  if metadata and (metadata.get("kind") != kind or (classes is not None and metadata.get("classes") not in
                                                    (None, list(classes)))):
    raise DataError(f"{path} describes a different data set (kind {metadata.get('kind')!r} or other classes); "
                    f"write to another directory")
  metadata.update(format=FORMAT, kind=kind, **extra)
  if classes is not None:
    metadata["classes"] = list(classes)
  metadata.setdefault("splits", {}).update(splits)
  atomic.write_json(path, metadata, indent=1)
  return metadata


def read_metadata(directory) -> dict | None:
  """`<directory>/dataset.json` as a dict, None when absent; DataError when unreadable."""
  path = os.path.join(os.fspath(directory), METADATA_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable data set metadata: {e}") from e
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
    raise DataError(f"{path}: not a {FORMAT} metadata file")
  return metadata


def split_pattern(pattern: str, split: str) -> str:
  """The glob for `split`: '{split}' in `pattern` becomes the split name (no placeholder: every split)."""
  return os.path.expanduser(pattern.replace("{split}", split))


def matching_files(pattern: str) -> list[str]:
  """The record files matching `pattern`, sorted (temporary `.tmp` files of unfinished writes left out);
  DataError when there are none."""
  files = sorted(f for f in glob.glob(pattern, recursive=True) if not f.endswith(".tmp"))
  if not files:
    raise DataError(f"arrayrecord source: no files match {pattern!r}; see docs/data_preparation.md")
  return files


def class_names(pattern: str) -> list[str]:
  """The class names in label order from the `dataset.json` next to the files matching `pattern`, without
  opening the files; DataError when there are none."""
  files = matching_files(pattern)
  metadata = read_metadata(os.path.dirname(files[0]))
  if not metadata or not metadata.get("classes"):
    raise DataError(f"arrayrecord source {pattern!r}: no class names (no {METADATA_FILE} with 'classes' "
                    f"next to {files[0]}); image-text pairs have no class labels")
  return list(metadata["classes"])


def _open_shards(pattern: str, files: list[str]):
  """The ArrayRecordDataSource of `files`; DataError naming the files that cannot be opened (a truncated shard
  has no footer)."""
  try:
    return array_record_data_source.ArrayRecordDataSource(files)
  except (RuntimeError, OSError, ValueError) as e:
    unreadable = [f for f in files if not _opens(f)]
    raise DataError(f"arrayrecord source {pattern!r}: cannot read {_some(unreadable or files)} as ArrayRecord "
                    f"(truncated or not written by tools.prepare_data?): {e or type(e).__name__}; {REPREPARE}") from e


def _opens(path: str) -> bool:
  try:
    array_record_data_source.ArrayRecordDataSource([path])
    return True
  except (RuntimeError, OSError, ValueError):
    return False


def _records_per_file(source) -> dict[str, int] | None:
  """{file: records} from the source's index (read from every file's footer when it opened them); None when
  this array_record version keeps it elsewhere."""
  instructions = getattr(source, "_read_instructions", None)
  if instructions is None:
    return None
  return {os.fspath(i.filename): int(i.num_records) for i in instructions}


def _some(names: list[str], shown: int = 5) -> str:
  return ", ".join(names[:shown]) + (f" ... ({len(names)} in all)" if len(names) > shown else "")


REPREPARE = "prepare it again (tools.prepare_data rewrites only the shards that are missing)"


def _listed_shards(pattern: str, metadata: dict) -> dict[str, dict]:
  """{split: its dataset.json entry} of the splits whose shards the file-name part of `pattern` matches."""
  name_glob = os.path.basename(pattern)
  return {split: entry for split, entry in metadata.get("splits", {}).items()
          if any(fnmatch.fnmatch(name, name_glob) for name in entry.get("shards") or ())}


def check_shards_present(pattern: str, files: list[str], metadata: dict | None) -> None:
  """DataError naming the shards that `dataset.json` lists for `pattern` and that are not on disk (a set
  difference of names: cheap at 100k shards)."""
  if not metadata:
    return
  directory = os.path.dirname(files[0])
  present = {os.path.basename(f) for f in files if os.path.dirname(f) == directory}
  name_glob = os.path.basename(pattern)
  missing = sorted(name for entry in _listed_shards(pattern, metadata).values() for name in entry["shards"]
                   if fnmatch.fnmatch(name, name_glob) and name not in present)
  if missing:
    raise DataError(f"arrayrecord source {pattern!r}: {os.path.join(directory, METADATA_FILE)} lists shards that "
                    f"are not in {directory}: {_some(missing)}; {REPREPARE}")


def check_record_counts(pattern: str, files: list[str], per_file: dict[str, int] | None,
                        metadata: dict | None) -> None:
  """DataError when a split's shards hold another number of records than `dataset.json` counts, naming the
  shards whose sidecar (`sidecar_path`) counts differ from their files."""
  if not metadata or per_file is None:
    return
  directory = os.path.dirname(files[0])
  for split, entry in _listed_shards(pattern, metadata).items():
    paths = [os.path.join(directory, name) for name in entry["shards"]]
    if "records" not in entry or not all(p in per_file for p in paths):
      continue
    on_disk = sum(per_file[p] for p in paths)
    if on_disk != entry["records"]:
      short = [f"{p} ({per_file[p]} of {count})" for p in paths
               for count in [_sidecar_count(p)] if count is not None and count != per_file[p]]
      raise DataError(f"arrayrecord source {pattern!r}: split {split!r} holds {on_disk} records, "
                      f"{os.path.join(directory, METADATA_FILE)} counts {entry['records']}"
                      f"{'; short: ' + _some(short) if short else ''}; {REPREPARE}")


def _sidecar_count(path: str) -> int | None:
  try:
    with open(sidecar_path(path), encoding="utf-8") as f:
      return int(json.load(f)["records"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


class ArrayRecordSource:
  """grain RandomAccessDataSource over the records of every file matching `pattern` (sorted by name).

  `metadata` is the `dataset.json` next to the first file (None without one). Records come back as
  `unpack_record` dicts; a corrupt one as {'image': None, 'caption': ''}, {'image': None, 'label': 0} when
  dataset.json says the records are labelled, {'image': None} when it says they are images only (counted; the
  pipelines skip it).
  """

  def __init__(self, pattern: str):
    self.pattern = pattern
    self.files = matching_files(pattern)
    self.metadata = read_metadata(os.path.dirname(self.files[0]))
    check_shards_present(pattern, self.files, self.metadata)
    self._source = _open_shards(pattern, self.files)
    check_record_counts(pattern, self.files, _records_per_file(self._source), self.metadata)
    kind = (self.metadata or {}).get("kind")
    self._placeholder = {"classification": {"image": None, "label": 0}, "images": {"image": None}}.get(
        kind, {"image": None, "caption": ""})

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    try:
      return unpack_record(self._source[int(index)])
    except ValueError as e:
      transforms.count_failure(f"record {int(index)} of {self.pattern}", e)
      return dict(self._placeholder)

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring an iterator state.
    return f"ArrayRecordSource({self.pattern!r}, files={len(self.files)}, records={len(self)})"
