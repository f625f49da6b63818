"""img2dataset WebDataset tars read in place (`config.data.source='wds:<glob>[;option=value...]'`).

An img2dataset tar holds per sample `<key>.jpg|jpeg|png|webp` (the image), `<key>.txt` (the caption) and
`<key>.json` (metadata: LAION's `similarity`, and where present `pwatermark` and `punsafe`). Grain's global
shuffle and exact resume need random access, so each tar gets a small index, `<tar>.index.npz` next to it or,
for a corpus that is read-only, under another folder that mirrors the tars' absolute paths (`index_path`; written
for a glob, shardable over a cluster, by `python -m visionfm_jax.datatools.index_tars [--index_dir=DIR]`):
per sample with an image its key, the (offset, size) of its image, caption and metadata members, and its three
scores. `WdsSource` serves sample i as the record dict `datatools.prepare_data` would have written for it
({image, caption (when non-empty), key, meta}), reading the bytes at the indexed offsets, so the pipelines
decode, crop, skip and count, mix and resume exactly as for `arrayrecord:` (a corrupt image is skipped and
counted by the decoder; a member that cannot be read is counted here and served as an undecodable record).

Options after the glob, ';'-separated (not glob characters): min_similarity, max_pwatermark, max_punsafe
(`ScoreFilter`), and index_dir (the folder `index_tars --index_dir` wrote the indexes under), e.g.
`wds:/data/laion/{split}/*.tar;min_similarity=0.28;max_punsafe=0.5;index_dir=/scratch/laion_index`. '{split}' in
the glob becomes the split name, as for `arrayrecord:`.

`tar_samples` and `tar_captions` stream one tar's samples without an index (captions: never the images).
`SOURCE_KIND` is the 'wds' kind.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import json
import logging
import math
import os
import tarfile
import threading
from typing import Iterator

import numpy as np

from visionfm_jax.data import limits
from visionfm_jax.data.sources.kind import Request, SourceKind
from visionfm_jax.data.sources.records import split_pattern
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a key has several
TEXT_EXTENSIONS = ("txt", "json")  # the caption and the metadata
INDEX_SUFFIX = ".index.npz"
INDEX_FORMAT = "visionfm_jax.wds_index/2"
SCORES = ("similarity", "pwatermark", "punsafe")  # the index's score columns, NaN where a sample has none
MEMBERS = ("image", "caption", "meta")  # the index's (offset, size) columns; (-1, 0): no such member
INDEX_HINT = (
  "index the tars with python -m visionfm_jax.datatools.index_tars --input=GLOB [--index_dir=DIR] (see "
  "docs/data_preparation.md)"
)


# ------------------------------------------------------------------------------------------ score filter


@dataclasses.dataclass(frozen=True)
class ScoreFilter:
  """LAION's scores from each sample's .json: keep similarity >= min_similarity, pwatermark <= max_pwatermark,
  punsafe <= max_punsafe (None: no such condition). A sample without a score a condition needs fails it. A
  rejected sample counts under the first condition it fails, in SCORES order."""

  min_similarity: float | None = None
  max_pwatermark: float | None = None
  max_punsafe: float | None = None

  def __bool__(self) -> bool:
    return bool(self.names)

  @property
  def names(self) -> tuple[str, ...]:
    """The scores (SCORES order) that a set condition reads."""
    return tuple(name for name, limit in zip(SCORES, dataclasses.astuple(self)) if limit is not None)

  def reasons(self, scores: np.ndarray) -> np.ndarray:
    """Per row of `scores` (n, 3 in SCORES order, NaN: absent), the index in SCORES of the first failed
    condition, -1 when kept."""
    scores = np.asarray(scores, np.float64).reshape(-1, len(SCORES))
    failed = np.zeros(scores.shape, bool)
    for column, (limit, keep) in enumerate(
      ((self.min_similarity, np.greater_equal), (self.max_pwatermark, np.less_equal), (self.max_punsafe, np.less_equal))
    ):
      if limit is not None:
        with np.errstate(invalid="ignore"):
          failed[:, column] = ~keep(scores[:, column], limit)  # NaN compares False: fails
    return np.where(failed.any(axis=1), failed.argmax(axis=1), -1)

  def count(self, reasons: np.ndarray) -> dict[str, int]:
    """{score: rejected samples} of `reasons`, for the conditions that are set."""
    tally = np.bincount(reasons[reasons >= 0], minlength=len(SCORES))
    return {name: int(tally[SCORES.index(name)]) for name in self.names}


def scores_of(meta: str | bytes | None) -> tuple[float, float, float]:
  """(similarity, pwatermark, punsafe) of a sample's .json text; NaN for each absent, null or non-numeric one
  (and all three when the text is not a JSON object)."""
  try:
    values = json.loads(meta) if meta else {}
  except ValueError:
    values = {}
  if not isinstance(values, dict):
    values = {}

  def number(name):
    value = values.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

  return tuple(number(name) for name in SCORES)


SCORE_OPTIONS = ("min_similarity", "max_pwatermark", "max_punsafe")  # ScoreFilter's fields, the spec's options


def parse_spec(spec: str, what: str) -> tuple[str, ScoreFilter, str | None]:
  """'GLOB;min_similarity=0.28;index_dir=DIR' -> (GLOB, ScoreFilter(0.28), DIR); DataError naming `what` for a bad
  option. The index folder is None when the spec names none (the indexes lie next to the tars)."""
  pattern, *options = spec.split(";")
  values, index_dir = {}, None
  for option in options:
    name, _, value = option.partition("=")
    if name not in (*SCORE_OPTIONS, "index_dir") or name in values or (name == "index_dir" and index_dir):
      raise DataError(
        f"{what}: unknown or repeated wds option {name!r}; options: {', '.join(SCORE_OPTIONS)}, "
        f"index_dir (e.g. 'wds:/data/*.tar;min_similarity=0.28;index_dir=/scratch/index')"
      )
    if name == "index_dir":
      if not value:
        raise DataError(f"{what}: wds option {option!r}: expected a folder")
      index_dir = value
      continue
    try:
      values[name] = float(value)
    except ValueError:
      raise DataError(f"{what}: wds option {option!r}: expected a number") from None
  if not pattern:
    raise DataError(f"{what}: expected 'wds:<glob of .tar files>[;option=value...]'")
  return pattern, ScoreFilter(**values), index_dir


# ----------------------------------------------------------------------------------------- tar members


def split_member_name(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the WebDataset key (up to the first '.' of the basename) and
  the lower-cased extension."""
  directory, base = os.path.split(name)
  stem, _, extension = base.partition(".")
  return os.path.join(directory, stem) if directory else stem, extension.lower()


def tar_listing(archive: tarfile.TarFile) -> tuple[dict[str, dict[str, tarfile.TarInfo]], collections.Counter]:
  """(key -> {extension: member}, keys in archive order; {limits reason: samples left out}). A sample is left out
  whole when one of its members is a link, a device or a FIFO, has an absolute or '..' name, or is an image over
  limits.MAX_IMAGE_BYTES or a caption or metadata over limits.MAX_TEXT_BYTES (read from the headers only)."""
  by_key, refused = collections.defaultdict(dict), {}
  for member in archive.getmembers():
    if member.isdir():
      continue
    key, extension = split_member_name(member.name)
    reason = _refusal(member, extension)
    if reason:
      refused.setdefault(key, reason)
    else:
      by_key[key][extension] = member
  for key in refused:
    by_key.pop(key, None)
  return by_key, collections.Counter(refused.values())


def _refusal(member: tarfile.TarInfo, extension: str) -> str | None:
  """The limits reason `member` makes its sample unreadable for, None when it is fine."""
  if limits.unsafe_name(member.name):
    return limits.UNSAFE_NAME
  if member.islnk() or member.issym():
    return limits.LINK
  if not member.isfile():
    return limits.NOT_A_FILE
  limit = (
    limits.MAX_IMAGE_BYTES
    if extension in IMAGE_EXTENSIONS
    else limits.MAX_TEXT_BYTES
    if extension in TEXT_EXTENSIONS
    else None
  )
  return limits.TOO_LARGE if limit is not None and member.size > limit else None


def image_member(members: dict) -> tarfile.TarInfo | None:
  return next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)


def _open_tar(path: str) -> tarfile.TarFile:
  try:
    return tarfile.open(path)
  except tarfile.TarError as e:  # not a tar, or a truncated one
    raise DataError(f"{path}: unreadable tar file ({str(e).splitlines()[0].rstrip(':')})") from e
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def _text(archive: tarfile.TarFile, member: tarfile.TarInfo | None) -> str | None:
  return None if member is None else archive.extractfile(member).read().decode("utf-8", errors="replace")


def reasons_text(counts: dict) -> str:
  """{reason: n} -> 'link 2, unsafe_name 1' (limits.REASONS order)."""
  return ", ".join(f"{reason} {counts[reason]}" for reason in limits.REASONS if counts.get(reason))


def tar_samples(path: str, images: bool = True, left_out: collections.Counter | None = None) -> Iterator[dict]:
  """The samples of the tar `path` in archive order, as {key, image (bytes, None when the sample has none; left
  out when not `images`), caption (stripped; '' when none), meta (the .json text, None when none)}; DataError
  for an unreadable tar. The samples `tar_listing` leaves out are added to `left_out` by reason."""
  with _open_tar(path) as archive:
    try:
      samples, refused = tar_listing(archive)
      if left_out is not None:
        left_out.update(refused)
      for key, members in samples.items():
        sample = {
          "key": key,
          "caption": (_text(archive, members.get("txt")) or "").strip(),
          "meta": _text(archive, members.get("json")),
        }
        if images:
          image = image_member(members)
          sample["image"] = None if image is None else archive.extractfile(image).read()
        yield sample
    except (tarfile.TarError, OSError) as e:
      raise DataError(f"{path}: unreadable tar file ({e})") from e


def tar_captions(path: str, left_out: collections.Counter | None = None) -> Iterator[tuple[str, str]]:
  """(key, caption) of every sample of the tar `path` with a non-empty caption, in archive order; the image
  members are never read."""
  for sample in tar_samples(path, images=False, left_out=left_out):
    if sample["caption"]:
      yield sample["key"], sample["caption"]


# ------------------------------------------------------------------------------------------------ index


def index_path(tar: str, index_dir: str | None = None) -> str:
  """Where the index of `tar` lies: next to it, or under `index_dir` at the tar's absolute path (so that tars of
  the same name in different folders keep apart: /raw/a/0.tar -> DIR/raw/a/0.tar.index.npz)."""
  if not index_dir:
    return tar + INDEX_SUFFIX
  return os.path.join(os.path.expanduser(index_dir), os.path.abspath(tar).lstrip(os.sep)) + INDEX_SUFFIX


def index_tar(path: str) -> dict:
  """The index of the tar `path`: {keys (str array), image/caption/meta (int64 (n, 2): offset, size; (-1, 0)
  absent), scores (float64 (n, 3), SCORES order: the .json values exactly), incomplete (samples without an
  image, left out), left_out (JSON {limits reason: samples}: those `tar_listing` refuses), tar_size}."""
  keys, spans, scores, incomplete = [], [], [], 0
  with _open_tar(path) as archive:
    samples, refused = tar_listing(archive)
    for key, members in samples.items():
      image = image_member(members)
      if image is None:
        incomplete += 1
        continue
      found = (image, members.get("txt"), members.get("json"))
      keys.append(key)
      spans.append([(m.offset_data, m.size) if m is not None else (-1, 0) for m in found])
      scores.append(scores_of(_text(archive, members.get("json"))))
  spans = np.asarray(spans, np.int64).reshape(-1, len(MEMBERS), 2)
  return {
    "keys": np.asarray(keys, dtype=str),
    **{m: spans[:, i] for i, m in enumerate(MEMBERS)},
    "scores": np.asarray(scores, np.float64).reshape(-1, len(SCORES)),
    "incomplete": incomplete,
    "left_out": np.asarray(json.dumps(dict(sorted(refused.items())))),
    "tar_size": os.path.getsize(path),
  }


def write_index(path: str, index_dir: str | None = None) -> dict:
  """Indexes the tar `path` into `index_path(path, index_dir)` (its folder created; via a temporary file, renamed
  when complete, removed when the write fails); returns {samples, incomplete, left_out ({reason: samples})}.
  OSError when the index cannot be written."""
  index = index_tar(path)
  target = index_path(path, index_dir)
  tmp = target + ".tmp"
  if index_dir:
    os.makedirs(os.path.dirname(target), exist_ok=True)
  try:
    with open(tmp, "wb") as f:
      np.savez(f, format=np.asarray(INDEX_FORMAT), **index)
    os.replace(tmp, target)
  except OSError:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return {
    "samples": len(index["keys"]),
    "incomplete": index["incomplete"],
    "left_out": json.loads(str(index["left_out"])),
  }


def read_index(tar: str, fields: tuple = ("keys", *MEMBERS, "scores"), index_dir: str | None = None) -> dict | None:
  """The index of `tar` (its `fields`, and incomplete; only those are read from the file) when it is there (next to
  the tar, or under `index_dir`: `index_path`) and was written for this tar's size, else None."""
  try:
    with np.load(index_path(tar, index_dir), allow_pickle=False) as data:
      index = {name: data[name] for name in ("format", "tar_size", "incomplete", "left_out", *fields)}
  except (OSError, ValueError, KeyError, EOFError):
    return None
  if str(index.get("format")) != INDEX_FORMAT or int(index.get("tar_size", -1)) != _size(tar):
    return None
  return index


def _size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:
    return -2


# ----------------------------------------------------------------------------------------------- source


def tar_names(pattern: str) -> list[str]:
  """The names ending in .tar that match `pattern`, sorted, from the listing alone (nothing is stat'ed: a cluster
  task checks only its own share); DataError when there is none."""
  tars = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if p.endswith(".tar"))
  if not tars:
    raise DataError(f"wds source: no .tar files match {pattern!r}")
  return tars


def matching_tars(pattern: str) -> list[str]:
  """The .tar files matching `pattern`, sorted; DataError when there is none."""
  tars = [p for p in tar_names(pattern) if os.path.isfile(p)]
  if not tars:
    raise DataError(f"wds source: no .tar files match {pattern!r}")
  return tars


class WdsSource:
  """grain RandomAccessDataSource over the samples with an image of every tar matching `pattern` (sorted by
  name, archive order within a tar) that pass `score_filter`, through the tars' indexes (next to the tars, or under
  `index_dir`: `index_path`; DataError naming the tars without a current one). Opening reads every index once and
  keeps only per-tar counts; a read loads its tar's index again (the last few, and their open files, are kept per
  process; grain and the eval reader read on threads, so a lock guards them)."""

  CACHED_INDEXES = 8
  max_open_files = CACHED_INDEXES  # per process: reads hold the lock (data/loader/open_files.py)

  def __init__(self, pattern: str, score_filter: ScoreFilter = ScoreFilter(), index_dir: str | None = None):
    self.pattern, self.score_filter, self.index_dir = pattern, score_filter, index_dir
    self.tars = matching_tars(pattern)
    counts, self.filtered, self.incomplete, missing, self._sizes = [], collections.Counter(), 0, [], []
    self.left_out = collections.Counter()  # limits reason -> samples the indexes left out
    for tar in self.tars:
      index = read_index(tar, fields=("scores",), index_dir=index_dir)
      if index is None:
        missing.append(tar)
        continue
      reasons = score_filter.reasons(index["scores"])
      self.filtered.update(score_filter.count(reasons))
      self.incomplete += int(index["incomplete"])
      self.left_out.update(json.loads(str(index["left_out"])))
      counts.append(int(np.sum(reasons < 0)))
      self._sizes.append(int(index["tar_size"]))
    if missing:
      raise DataError(
        f"wds source {pattern!r}: {len(missing)} of {len(self.tars)} tars have no current index "
        f"({missing[0]}{', ...' if len(missing) > 1 else ''}: looked for "
        f"{index_path(missing[0], index_dir)}); {INDEX_HINT}"
      )
    self._ends = np.cumsum(counts).tolist()
    if self.left_out:
      logging.warning(
        "wds source %s: %d samples left out by their tars' indexes (%s; data/limits.py)",
        pattern,
        sum(self.left_out.values()),
        reasons_text(self.left_out),
      )
    if score_filter:
      logging.info(
        "wds source %s: %d samples of %d tars kept, filtered out by %s",
        pattern,
        len(self),
        len(self.tars),
        ", ".join(f"{reason} {n}" for reason, n in self.filtered.items()),
      )
    self._cache = collections.OrderedDict()  # tar number -> its kept rows; per process (not pickled)
    self._files = {}  # tar number -> an open file descriptor
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getstate__(self):
    return {name: value for name, value in self.__dict__.items() if name not in ("_cache", "_files", "_lock", "_sizes")}

  def __setstate__(self, state):
    self.__dict__.update(state, _cache=collections.OrderedDict(), _files={}, _lock=threading.Lock())

  def _kept(self, number: int) -> dict:
    if number in self._cache:
      self._cache.move_to_end(number)
      return self._cache[number]
    index = read_index(self.tars[number], index_dir=self.index_dir)
    if index is None:
      raise DataError(
        f"wds source {self.pattern!r}: the index of {self.tars[number]} changed or vanished while "
        f"training; {INDEX_HINT}"
      )
    keep = self.score_filter.reasons(index["scores"]) < 0
    kept = {name: index[name][keep] for name in ("keys", *MEMBERS)}
    self._cache[number] = kept
    if len(self._cache) > self.CACHED_INDEXES:
      self._cache.popitem(last=False)
    return kept

  def _read(self, number: int, span) -> bytes | None:
    offset, size = int(span[0]), int(span[1])
    if offset < 0:
      return None
    handle = self._files.get(number)
    if handle is None:
      if len(self._files) >= self.CACHED_INDEXES:
        os.close(self._files.pop(next(iter(self._files))))
      handle = self._files[number] = os.open(self.tars[number], os.O_RDONLY)
    data = os.pread(handle, size, offset)
    if len(data) != size:
      raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
    return data

  def __getitem__(self, index) -> dict:
    index = int(index)
    number = bisect.bisect_right(self._ends, index)
    row = index - (self._ends[number - 1] if number else 0)
    try:
      with self._lock:
        kept = self._kept(number)
        key = str(kept["keys"][row])
        record = {"image": self._read(number, kept["image"][row]), "key": key}
        caption = self._read(number, kept["caption"][row])
        meta = self._read(number, kept["meta"][row])
    except OSError as e:
      transforms.count_failure(f"sample {key} of {self.tars[number]}", e)
      return {"image": None, "caption": ""}
    caption = (caption or b"").decode("utf-8", errors="replace").strip()
    if caption:
      record["caption"] = caption
    if meta is not None:
      record["meta"] = meta.decode("utf-8", errors="replace")
    return record

  def identity(self) -> dict:
    """What names this data (data/loader/identity.py): every tar's name, samples kept and bytes (its index is
    written for that size)."""
    kept = np.diff(self._ends, prepend=0).tolist()
    return {
      "source": f"{self.pattern};{self.score_filter}",
      "records": len(self),
      "shards": [[tar, n, size] for tar, n, size in zip(self.tars, kept, self._sizes)],
    }

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring an iterator state.
    return f"WdsSource({self.pattern!r}, {self.score_filter}, tars={len(self.tars)}, records={len(self)})"


# ------------------------------------------------------------------------------------- the 'wds' source kind


def _open(request: Request) -> WdsSource:
  pattern, score_filter, index_dir = parse_spec(request.name, request.what)
  with request.errors_named():
    return WdsSource(split_pattern(pattern, request.split), score_filter, index_dir)


def _no_class_names(name: str, data_cfg, what: str) -> list[str]:
  raise DataError(f"{what}: image-text tars have no class names")


SOURCE_KIND = SourceKind(
  "wds",
  "'wds:<glob>'",
  _open,
  _no_class_names,
  folder=True,
  disk_path=lambda request: split_pattern(parse_spec(request.name, request.what)[0], request.split),
)
