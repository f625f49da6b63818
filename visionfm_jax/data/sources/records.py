"""Examples in ArrayRecord files (`config.data.source='arrayrecord:<glob>'`), the format `datatools.prepare_data`
writes.

Each record is a msgpack map with an encoded image and its annotation:

  image    bytes   JPEG/PNG/... as stored (required)
  caption  str     image-text pairs (a record with neither caption nor label is image-only)
  label    int     classification; the class names are in the folder's `dataset.json`
  key      str     where the example came from (file name, WebDataset key); optional
  meta     str     the WebDataset `.json` sidecar, verbatim; optional
  score    float   the CLIP score `datatools.filter_clip_score` kept the pair for; optional

`dataset.json`, next to the shards, describes them (see `write_metadata`): the kind, the class names in label
order, and per split its shards, counts, kind (labelled, pairs, or images: image-only) and shard index (each
shard's records, bytes and postscript digest: shard_index.py, `write_index`). `ArrayRecordSource` reads every file
matching a glob as one random-access source, once the shards `dataset.json` lists are all there with the records
it counts (a deleted, truncated or replaced shard is a DataError naming it); a record that is not such a map is
counted (`transforms.count_failure`) and served as an undecodable image, which the pipelines skip.

Shards are written to `<name>.tmp` and renamed when complete (`RecordWriter`), so a finished shard name
always means a complete file, and an interrupted conversion resumes by skipping the shards that exist.

`SOURCE_KIND` is the 'arrayrecord' kind: '{split}' in the glob becomes the split name (config.data.train_split /
eval_split); a glob without it serves every split.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fnmatch
import gc
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import re
from typing import Iterable

from array_record.python import array_record_module
import msgpack
import numpy as np
from PIL import Image

from visionfm_jax import atomic
from visionfm_jax.data.sources import open_shards, shard_index
from visionfm_jax.data.sources.kind import Request, SourceKind, errors_named
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
  """Writes packed records to `path` via `tmp` (default `path.tmp`; a name of its own per writer when several
  may write one path), renamed on a clean `close()` (use as a context manager; an exception discards the partial
  file)."""

  def __init__(self, path, tmp: str = ""):
    self.path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._tmp = tmp or self.path + ".tmp"
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
  """The JSON file next to a records file in which the tool that wrote it (datatools.prepare_data,
  datatools.filter_clip_score) keeps its counts: a rerun takes a records file with its sidecar as finished."""
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
  if metadata and (
    metadata.get("kind") != kind or (classes is not None and metadata.get("classes") not in (None, list(classes)))
  ):
    raise DataError(
      f"{path} describes a different data set (kind {metadata.get('kind')!r} or other classes); "
      f"write to another directory"
    )
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
  root, names = listing(pattern)
  return [os.path.join(root, name) for name in names]


def listing(pattern: str) -> tuple[str, list[str]]:
  """(the folder the files matching `pattern` have in common, their paths under it, sorted): `matching_files` in
  parts. A pattern whose folder holds no wildcard lists that folder once (no path is joined or split per file: at
  232,000 shards glob's per-file work takes seconds). DataError when no file matches."""
  directory, name_glob = os.path.split(pattern)
  if glob.has_magic(directory) or "**" in name_glob:
    files = sorted(f for f in glob.glob(pattern, recursive=True) if not f.endswith(".tmp"))
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0]) if files else ""
    names = [os.path.relpath(f, root) for f in files]
  else:
    try:
      listed = os.listdir(directory or ".")
    except OSError:
      listed = []
    # As glob: a name starting with '.' only for a pattern that does; and no unfinished write (.tmp).
    visible = "" if name_glob.startswith(".") else r"(?!\.)"
    matches = re.compile(visible + r"(?!.*\.tmp\Z)" + fnmatch.translate(name_glob)).match
    root, names = directory, sorted(filter(matches, listed))
  if not names:
    raise DataError(f"arrayrecord source: no files match {pattern!r}; see docs/data_preparation.md")
  return root, names


def listed_numbers(
  pattern: str, metadata: dict | None, directory: str, root: str, names: list[str]
) -> dict[str, np.ndarray]:
  """{split: per shard its dataset.json entry lists, its number in `listing`'s (`root`, `names`), -1 for one not
  among them} of the splits of `metadata` (dataset.json in `directory`) whose shards `pattern` matches."""
  numbers, number_of = {}, None
  for split, entry in _listed_shards(pattern, metadata).items() if metadata else ():
    shards = entry["shards"]
    if root == directory and shards == names:  # as prepare_data writes them: one split, every shard in its order
      numbers[split] = np.arange(len(names))
      continue
    if number_of is None:
      number_of = _numbers_in(directory, root, names)
    numbers[split] = np.fromiter(map(number_of.get, shards, itertools.repeat(-1)), np.int64, len(shards))
  return numbers


def _numbers_in(directory: str, root: str, names: list[str]) -> dict[str, int]:
  """{file name: its number in `names`} of the files of `listing`'s (`root`, `names`) that lie in `directory`."""
  if root == directory:  # a name under a subfolder holds a separator: no dataset.json lists it
    return dict(zip(names, range(len(names))))
  files = (os.path.join(root, name) for name in names)
  return {os.path.basename(f): number for number, f in enumerate(files) if os.path.dirname(f) == directory}


def class_names(pattern: str) -> list[str]:
  """The class names in label order from the `dataset.json` next to the files matching `pattern`, without
  opening the files; DataError when there are none."""
  files = matching_files(pattern)
  metadata = read_metadata(os.path.dirname(files[0]))
  if not metadata or not metadata.get("classes"):
    raise DataError(
      f"arrayrecord source {pattern!r}: no class names (no {METADATA_FILE} with 'classes' "
      f"next to {files[0]}); image-text pairs have no class labels"
    )
  path = os.path.join(os.path.dirname(files[0]), METADATA_FILE)
  problem = classes_problem(metadata)
  if problem:
    raise DataError(f"{path}: {problem}; prepare the data set again (datatools.prepare_data writes its classes)")
  return list(metadata["classes"])


def classes_problem(metadata: dict) -> str:
  """Why dataset.json's `classes` (`metadata`) cannot name the labels, in words: not a list of distinct strings, or
  fewer names than a split's `class_counts` count labels (a label without a name); '' when it can."""
  classes = metadata["classes"]
  if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
    return f"'classes' is {json.dumps(classes)[:80]}, not a list of class names (strings)"
  repeated = [name for name, n in collections.Counter(classes).items() if n > 1]
  if repeated:
    return f"'classes' names {repeated[0]!r} more than once"
  for split, entry in sorted((metadata.get("splits") or {}).items()):
    counts = entry.get("class_counts") if isinstance(entry, dict) else None
    labels = [label for label, n in enumerate(counts) if n] if isinstance(counts, list) else []
    if labels and labels[-1] >= len(classes):
      return (
        f"split {split!r} holds records of label {labels[-1]} ('class_counts'), but 'classes' names "
        f"{len(classes)} (labels 0 to {len(classes) - 1})"
      )
  return ""


def _some(names: list[str], shown: int = 5) -> str:
  return ", ".join(names[:shown]) + (f" ... ({len(names)} in all)" if len(names) > shown else "")


REPREPARE = (
  "prepare it again with the same command (datatools.prepare_data keeps only the shards it wrote, whole, "
  "and rewrites the others)"
)


def _listed_shards(pattern: str, metadata: dict) -> dict[str, dict]:
  """{split: its dataset.json entry} of the splits whose shards the file-name part of `pattern` matches."""
  matches = re.compile(fnmatch.translate(os.path.basename(pattern))).match
  return {
    split: entry for split, entry in metadata.get("splits", {}).items() if any(map(matches, entry.get("shards") or ()))
  }


def check_shards_present(pattern: str, directory: str, numbers: dict[str, np.ndarray], metadata: dict | None) -> None:
  """DataError naming the shards that `dataset.json` in `directory` lists for `pattern` and that are not on disk
  (`numbers`: `listed_numbers`)."""
  if not metadata:
    return
  matches = re.compile(fnmatch.translate(os.path.basename(pattern))).match
  splits = metadata["splits"]
  missing = sorted(
    name
    for split, of_split in numbers.items()
    for at in np.flatnonzero(of_split < 0)
    for name in [splits[split]["shards"][at]]
    if matches(name)
  )
  if missing:
    raise DataError(
      f"arrayrecord source {pattern!r}: {os.path.join(directory, METADATA_FILE)} lists shards that "
      f"are not in {directory}: {_some(missing)}; {REPREPARE}"
    )


def check_record_counts(pattern: str, directory: str, per_file: dict[str, int] | None, metadata: dict | None) -> None:
  """DataError when a split's shards hold another number of records than `dataset.json` in `directory` counts
  (`per_file`: {path: records}), naming the shards whose sidecar (`sidecar_path`) counts differ from their files."""
  if not metadata or per_file is None:
    return
  for split, entry in _listed_shards(pattern, metadata).items():
    paths = [os.path.join(directory, name) for name in entry["shards"]]
    if "records" not in entry or not all(p in per_file for p in paths):
      continue
    on_disk = sum(per_file[p] for p in paths)
    if on_disk != entry["records"]:
      short = [
        f"{p} ({per_file[p]} of {count})"
        for p in paths
        for count in [_sidecar_count(p)]
        if count is not None and count != per_file[p]
      ]
      raise DataError(
        f"arrayrecord source {pattern!r}: split {split!r} holds {on_disk} records, "
        f"{os.path.join(directory, METADATA_FILE)} counts {entry['records']}"
        f"{'; short: ' + _some(short) if short else ''}; {REPREPARE}"
      )


def _sidecar_count(path: str) -> int | None:
  try:
    with open(sidecar_path(path), encoding="utf-8") as f:
      return int(json.load(f)["records"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


class ShardChanged(DataError):
  """A shard that disagrees with its index (or, unindexed, with the footer read when its source opened)."""


class ArrayRecordSource:
  """grain RandomAccessDataSource over the records of every file matching `pattern` (sorted by name).

  `metadata` is the `dataset.json` next to the first file (None without one). The records per shard come from the
  shard index of each split that dataset.json lists them in (shard_index.py): opening the source lists the folder,
  reads dataset.json and the index, and opens no shard. Only the files no index covers have their footers read, on
  threads (a file that cannot be read as ArrayRecord is a DataError naming it). Reads go through a bounded set of
  open shards (`open_shards.OpenShards`: at most `open_shards.LIMIT` idle ones per process, the least recently used
  closed first), so a globally shuffled stream over 232,000 shards holds a handful of descriptors, not one per shard
  it has touched. A process checks a shard against its index row when it first opens it, its records at every open,
  and its size again when a read fails: a shard truncated or replaced is a `ShardChanged` naming it.

  Records come back as `unpack_record` dicts; a corrupt one (a chunk whose checksum fails, bytes that are no
  record) as {'image': None, 'caption': ''}, {'image': None, 'label': 0} when dataset.json says the records are
  labelled, {'image': None} when it says they are images only (counted; the pipelines skip it). A shard that
  can no longer be opened while training is a DataError naming it.
  """

  max_open_files = open_shards.bound()  # per process (data/loader/open_files.py)

  def __init__(self, pattern: str):
    self.pattern = pattern
    self._root, self._names = listing(pattern)
    directory = os.path.dirname(os.path.join(self._root, self._names[0]))
    self.metadata = read_metadata(directory)
    numbers = listed_numbers(pattern, self.metadata, directory, self._root, self._names)
    check_shards_present(pattern, directory, numbers, self.metadata)
    self._table, self._index_of, self._index_paths = shard_table(
      pattern, self._root, self._names, directory, numbers, self.metadata
    )
    self._ends = np.cumsum(self._table["records"], dtype=np.int64)
    kind = (self.metadata or {}).get("kind")
    self._placeholder = {"classification": {"image": None, "label": 0}, "images": {"image": None}}.get(
      kind, {"image": None, "caption": ""}
    )
    self._metadata_digest = _metadata_digest(pattern, self.metadata)
    self._reset_process_state()

  def _reset_process_state(self) -> None:
    self._shards = open_shards.OpenShards(self._open_shard)
    self._checked = np.zeros(len(self._names), bool)  # the shards this process has checked against their rows

  @property
  def files(self) -> list[str]:
    return [os.path.join(self._root, name) for name in self._names]

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getstate__(self):
    # What a grain worker needs to read: not the metadata (dataset.json lists every shard), no open readers.
    return {k: v for k, v in self.__dict__.items() if k not in ("metadata", "_shards", "_checked")}

  def __setstate__(self, state):
    self.__dict__.update(state, metadata=None)
    self._reset_process_state()

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {self.pattern}: the source holds {len(self)}")
    number = int(np.searchsorted(self._ends, index, side="right"))
    return number, index - (int(self._ends[number - 1]) if number else 0)

  def _path(self, number: int) -> str:
    return os.path.join(self._root, self._names[number])

  def _changed(self, number: int, how: str) -> ShardChanged:
    index = int(self._index_of[number])
    against = f"its index {self._index_paths[index]}" if index >= 0 else "the footer read when the source opened"
    return ShardChanged(
      f"arrayrecord source {self.pattern!r}: {self._path(number)} is not the shard {against} "
      f"describes: {how} (truncated or replaced); {REPREPARE}"
    )

  def _open_shard(self, number: int):
    """The reader of shard `number`, checked against its row: its size and postscript at this process's first
    open, its records at every one."""
    row = self._table[number]
    if not self._checked[number]:
      how = shard_index.differs(self._path(number), row)
      if how:
        raise self._changed(number, how)
    reader = shard_index.open_reader(self._path(number))
    records = int(reader.num_records())
    if records != int(row["records"]):
      reader.close()
      raise self._changed(number, f"{records:,} records, not {int(row['records']):,}")
    self._checked[number] = True
    return reader

  def __getitem__(self, index) -> dict:
    number, position = self._locate(int(index))
    try:
      with self._shards.use(number) as reader:
        data = reader.read([position])[0]
      return unpack_record(data)
    except open_shards.Unopenable as e:
      if isinstance(e.__cause__, ShardChanged):
        raise e.__cause__ from None
      how = self._differs(number, vanished=None)
      if how:
        raise self._changed(number, how) from e
      raise DataError(
        f"arrayrecord source {self.pattern!r}: {self._path(number)} cannot be opened any more "
        f"({e.__cause__}); it changed or vanished while training; {REPREPARE}"
      ) from e
    except (ValueError, RuntimeError) as e:  # RuntimeError: riegeli's chunk checksum, a truncated chunk
      how = self._differs(number) if isinstance(e, RuntimeError) else None
      if how:
        raise self._changed(number, how) from e
      transforms.count_failure(f"record {position} of {self._path(number)}", e)
      return dict(self._placeholder)

  def _differs(self, number: int, vanished: str | None = "it cannot be read") -> str | None:
    """How shard `number` differs from its row (shard_index.differs); `vanished` when it cannot be read."""
    try:
      return shard_index.differs(self._path(number), self._table[number])
    except OSError as e:
      return vanished and f"{vanished} ({e.strerror or e})"

  def identity(self) -> dict:
    """What names this data (data/loader/identity.py): every shard's name, records, bytes and postscript digest,
    and a digest of dataset.json."""
    table = self._table
    digests = map(shard_index.hex_digest, table["digest"].tolist())
    with gc_paused():
      shards = list(map(list, zip(self._names, table["records"].tolist(), table["bytes"].tolist(), digests)))
    return {"source": self.pattern, "records": len(self), "metadata_sha256": self._metadata_digest, "shards": shards}

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring an iterator state.
    return f"ArrayRecordSource({self.pattern!r}, files={len(self._names)}, records={len(self)})"


@contextlib.contextmanager
def gc_paused():
  """Pauses the cyclic garbage collector: building a list per shard (232,000) would otherwise run it over every
  object of the process many times, which triples the time it takes."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


FOOTER_THREADS = 32  # files whose footers are read at once when a source opens (I/O bound on shared file systems)


def shard_table(
  pattern: str, root: str, names: list[str], directory: str, numbers: dict[str, np.ndarray], metadata: dict | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(a shard_index.DTYPE row per file of `listing`'s (`root`, `names`), per file the number in the third, the
  paths of the indexes read, of the index its row comes from: -1 for a file no index covers, whose footer is read
  (and checked against dataset.json's counts)). `numbers`: `listed_numbers` of `directory`, whose dataset.json
  `metadata` is. DataError for an index that disagrees with dataset.json (shard_index.load)."""
  table = np.zeros(len(names), shard_index.DTYPE)
  index_of, index_paths = np.full(len(names), -1, np.int32), []
  for split, of_split in numbers.items():
    loaded = shard_index.load(directory, split, metadata["splits"][split])
    if loaded is None:
      continue
    rows, path = loaded
    at = np.flatnonzero(of_split >= 0)
    table[of_split[at]], index_of[of_split[at]] = rows[at], len(index_paths)
    index_paths.append(path)
  rest = np.flatnonzero(index_of < 0)
  if len(rest):
    if metadata:
      logging.info(
        "arrayrecord source %r: %d of %d shards have no shard index; their footers are read (rerun "
        "datatools.prepare_data to write it)",
        pattern,
        len(rest),
        len(names),
      )
    paths = [os.path.join(root, names[number]) for number in rest]
    table[rest] = np.array(read_footers(pattern, paths), shard_index.DTYPE)
    check_record_counts(pattern, directory, dict(zip(paths, table["records"][rest].tolist())), metadata)
  return table, index_of, index_paths


def read_footers(pattern: str, files: list[str]) -> list[tuple[int, int, int]]:
  """`shard_index.measure` of every file, read on FOOTER_THREADS threads; DataError naming the files that cannot
  be read as ArrayRecord (a truncated shard has no footer)."""

  def attempt(path):
    try:
      return shard_index.measure(path)
    except (RuntimeError, OSError, ValueError) as e:
      return e

  with concurrent.futures.ThreadPoolExecutor(min(FOOTER_THREADS, len(files))) as pool:
    results = list(pool.map(attempt, files))
  unreadable = [(path, result) for path, result in zip(files, results) if isinstance(result, Exception)]
  if unreadable:
    reason = unreadable[0][1]
    raise DataError(
      f"arrayrecord source {pattern!r}: cannot read {_some([p for p, _ in unreadable])} as ArrayRecord "
      f"(truncated or not written by datatools.prepare_data?): {reason or type(reason).__name__}; "
      f"{REPREPARE}"
    )
  return results


def write_index(directory, split: str) -> dict:
  """Writes the shard index of split `split` of the data set in `directory` (shard_index.py) from its shards'
  footers and names it in dataset.json; returns the written dataset.json dict. DataError when a shard cannot be
  read or the split's records differ from dataset.json's count."""
  directory = os.fspath(directory)
  metadata = read_metadata(directory)
  entry = dict(metadata["splits"][split])
  files = [os.path.join(directory, name) for name in entry["shards"]]
  table = np.array(read_footers(os.path.join(directory, f"{split}-*"), files) if files else [], shard_index.DTYPE)
  if int(table["records"].sum()) != entry.get("records"):
    raise DataError(
      f"{os.path.join(directory, METADATA_FILE)}: split {split!r} counts {entry.get('records')} records, "
      f"its shards hold {int(table['records'].sum())}; {REPREPARE}"
    )
  entry[shard_index.KEY] = shard_index.save(directory, split, table)
  metadata["splits"][split] = entry
  atomic.write_json(os.path.join(directory, METADATA_FILE), metadata, indent=1)
  return metadata


def _metadata_digest(pattern: str, metadata: dict | None) -> str | None:
  """A digest of what dataset.json says of the shards `pattern` reads (kind, classes, their splits' entries but for
  the counts of small images, which a rerun with another --min_side changes): another split prepared beside them
  leaves it as it is."""
  if not metadata:
    return None
  splits = {
    split: {k: v for k, v in entry.items() if k not in ("small_images", shard_index.KEY)}
    for split, entry in _listed_shards(pattern, metadata).items()
  }
  described = {"kind": metadata.get("kind"), "classes": metadata.get("classes"), "splits": splits}
  return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------ the 'arrayrecord' source kind


def _open(request: Request) -> ArrayRecordSource:
  with request.errors_named():
    return ArrayRecordSource(split_pattern(request.name, request.split))


def _train_class_names(pattern: str, data_cfg, what: str) -> list[str]:
  with errors_named(f"{what} split {data_cfg.train_split!r}"):
    return class_names(split_pattern(pattern, data_cfg.train_split))


SOURCE_KIND = SourceKind(
  "arrayrecord",
  "'arrayrecord:<glob>'",
  _open,
  _train_class_names,
  folder=True,
  disk_path=lambda request: split_pattern(request.name, request.split),
)
