"""--format=caption_files and --format=caption_table: a researcher's own image-text pairs, as a folder of images
with a caption file beside each (`photo.jpg` + `photo.txt`, img2dataset's "files" output and many scrapers') or as
a table of path + caption (CSV, TSV, JSONL or parquet), into shards of pair records in listing order, with
--holdout_examples drawn by --seed into a second split.

The listing reads the captions (small text files) in this process; the shards' writers read the images. What
cannot make a pair is skipped and counted: an image without a caption file or with an empty one, a table row
without a path or caption (`NO_CAPTION`, `BAD_ROW`, counted at listing), a table row or cell over data/limits.py's
text limit (limits.TOO_LARGE), a table's path that resolves outside its folder (or --root; limits.OUTSIDE_ROOT,
checked at listing and again when the image is read), a pair listed before (`DUPLICATE`: the same image, by its
resolved path or, with --holdout_examples, among files of equal size by its content digest, with the same
caption), an image file that is
missing or unreadable (limits.NO_IMAGE), a link (limits.LINK, as --format=folders: not followed unless
--follow_links, and then only inside the input's folder). The pairs of one image always land in one split, so a
held-out image is never trained on."""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import stat
from typing import IO, Iterator, NamedTuple

import numpy as np

from visionfm_jax.data import limits
from visionfm_jax.data.sources import records
from visionfm_jax.datatools.prepare_data import image_tree, shards
from visionfm_jax.datatools.prepare_data.images import image_options, read_image_file
from visionfm_jax.datatools.prepare_data.shards import Example, ShardJob, refused
from visionfm_jax.errors import DataError, UserError

OWN_PAIR_FORMATS = ("caption_files", "caption_table")
CAPTION_SUFFIX = ".txt"
TABLE_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
# Listing-time reasons (beside data/limits.py's, which the shards' writers count): no caption file, an empty one or
# an empty caption cell; a table row without a path, or with a value that is not text.
NO_CAPTION = "no_caption"
BAD_ROW = "bad_row"
DUPLICATE = "duplicate"  # the pair of an image and a caption listed before (scraped tables repeat rows)
LISTING_REASONS = (NO_CAPTION, BAD_ROW, DUPLICATE)
# A CSV, TSV or JSONL line is read at most this many characters at a time: a longer one (a record over the text
# limit) is skipped to its end piece by piece, never held whole.
MAX_LINE_CHARS = 4 * limits.MAX_TEXT_BYTES


class Listing(NamedTuple):
  root: str  # the folder the pairs' paths are under (relative ones resolve against it)
  pairs: list  # [(path under root, caption)], in listing order
  skipped: collections.Counter  # {a LISTING_REASONS or data/limits.py reason: count}


# ------------------------------------------------------------------------------------------------- reading


def read_pair_files(job: ShardJob) -> Iterator[Example]:
  """The pairs of a job: its `items` (path under `root`, caption), each image read within data/limits.py's
  bounds; a missing or unreadable file is refused as limits.NO_IMAGE, a link as limits.LINK (with
  `follow_links`, only one that resolves outside `confine`), a path whose folders resolve outside `confine`
  (default: `root`) as limits.OUTSIDE_ROOT."""
  confine = job.confine or os.path.realpath(job.root)
  for path, caption in job.items:
    full = os.path.join(job.root, path)
    try:
      data, reason = read_image_file(full, confine, job.follow_links)
    except DataError as e:
      logging.warning("prepare_data: skipping %s: %s", full, e)
      data, reason = None, limits.NO_IMAGE
    yield refused(full, reason) if reason else Example(full, data, {"caption": caption, "key": path})


def _read_caption(path: str, root: str, follow_links: bool) -> tuple[str, str]:
  """(the stripped text of the caption file `path`, ''), or ('', why it gives no caption: NO_CAPTION when it is
  missing, unreadable or empty, limits.TOO_LARGE over limits.MAX_TEXT_BYTES, limits.LINK for a link not followed,
  by the links policy of `read_pair_files`, limits.OUTSIDE_ROOT outside the resolved folder `root`)."""
  try:
    data, reason = read_image_file(path, root, follow_links)
  except DataError:
    return "", NO_CAPTION
  if not reason and len(data) > limits.MAX_TEXT_BYTES:
    reason = limits.TOO_LARGE
  caption = "" if reason else data.decode("utf-8", errors="replace").strip()
  return caption, reason or ("" if caption else NO_CAPTION)


# ------------------------------------------------------------------------------------------------- listing


def list_caption_files(input_dir: str, follow_links: bool) -> Listing:
  """The images anywhere below `input_dir` (sorted; hidden folders and linked folders not entered), each paired
  with the caption file of its name and `.txt` beside it."""
  if not os.path.isdir(input_dir):
    raise UserError(
      f"--input={input_dir}: no such directory (--format=caption_files: a folder of images, each "
      f"with a caption file of its name and {CAPTION_SUFFIX} beside it)"
    )
  root = os.path.realpath(input_dir)
  pairs, skipped = [], collections.Counter()
  for path in image_tree.walk_images(input_dir, ""):
    caption, reason = _read_caption(
      os.path.join(input_dir, os.path.splitext(path)[0] + CAPTION_SUFFIX), root, follow_links
    )
    if reason:
      skipped[reason] += 1
    else:
      pairs.append((path, caption))
  return Listing(input_dir, pairs, skipped)


def table_kind(path: str) -> str:
  """csv, tsv, jsonl or parquet, by the table's extension; UserError for another."""
  kind = TABLE_KINDS.get(os.path.splitext(path)[1].lower())
  if kind is None:
    raise UserError(f"--input={path}: not a table this format reads (expected {', '.join(TABLE_KINDS)})")
  return kind


class _LineTooLong(Exception):
  """A line of more than MAX_LINE_CHARS characters."""


class _RecordLines:
  """The lines of a CSV or TSV file for csv.reader, each of at most MAX_LINE_CHARS characters (a longer one
  raises _LineTooLong); keeps the parity of the quote characters read since the record began (a quoted cell may
  span lines; a quote inside one is doubled), so that a record over the limits can be skipped to its end."""

  def __init__(self, f: IO[str]):
    self.f = f
    self.in_quotes = self.in_line = False

  def __iter__(self):
    return self

  def _read(self) -> str:
    piece = self.f.readline(MAX_LINE_CHARS)
    self.in_quotes ^= piece.count('"') % 2 == 1
    self.in_line = bool(piece) and not piece.endswith(("\n", "\r"))
    return piece

  def __next__(self) -> str:
    line = self._read()
    if not line:
      raise StopIteration
    if self.in_line and len(line) >= MAX_LINE_CHARS:
      raise _LineTooLong
    return line

  def skip_record(self) -> None:
    """Reads on to the end of the record being read: the end of the line where its quotes close."""
    while (self.in_quotes or self.in_line) and self._read():
      pass
    self.in_quotes = self.in_line = False


def _field_limit_error(error: csv.Error) -> bool:
  return str(error).startswith("field larger than field limit")


def _csv_rows(path: str, delimiter: str) -> Iterator[dict | str]:
  """Each record as {column: cell} (None for the cells a short record lacks), or limits.TOO_LARGE for one with a
  cell over limits.MAX_TEXT_BYTES characters (csv's own field limit, 128 KiB, raised to that) or a line over
  MAX_LINE_CHARS."""
  csv.field_size_limit(max(csv.field_size_limit(), limits.MAX_TEXT_BYTES))
  with open(path, encoding="utf-8-sig", newline="") as f:
    lines = _RecordLines(f)
    reader, header = csv.reader(lines, delimiter=delimiter), None
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except (csv.Error, _LineTooLong) as e:
        if isinstance(e, csv.Error) and not _field_limit_error(e):
          raise
        lines.skip_record()
        if header is None:
          raise UserError(
            f"--input={path}: its header line is over the limit of {MAX_LINE_CHARS:,} characters "
            f"(data/limits.py MAX_TEXT_BYTES)"
          ) from e
        yield limits.TOO_LARGE
        continue
      if not row:
        continue
      if header is None:
        header = row
        continue
      yield {name: row[i] if i < len(row) else None for i, name in enumerate(header)}


def _jsonl_rows(path: str) -> Iterator[dict | str]:
  """Each non-blank line's object; BAD_ROW for a line that is not a JSON object, limits.TOO_LARGE for one over
  MAX_LINE_CHARS characters."""
  with open(path, encoding="utf-8") as f:
    lines = _RecordLines(f)
    while True:
      try:
        line = next(lines)
      except StopIteration:
        return
      except _LineTooLong:
        lines.skip_record()
        yield limits.TOO_LARGE
        continue
      lines.in_quotes = False  # a JSON line ends its record, whatever its quotes
      if line.strip():
        try:
          row = json.loads(line)
        except ValueError:
          row = None
        yield row if isinstance(row, dict) else BAD_ROW


def _parquet_rows(path: str, columns: tuple[str, str]) -> Iterator[dict]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"--input={path}: reading parquet needs the package pyarrow (pip install pyarrow)") from e
  try:
    table = pq.read_table(path, columns=list(columns))
  except KeyError as e:
    raise UserError(f"--input={path}: no column {e} (--path_column, --caption_column)") from e
  except Exception as e:  # pyarrow raises its own ArrowInvalid, OSError, ...: an unreadable table
    raise UserError(f"--input={path}: cannot read as parquet ({type(e).__name__}: {e})") from e
  yield from table.to_pylist()


def _table_rows(path: str, kind: str, columns: tuple[str, str]) -> Iterator[dict | str]:
  if kind == "parquet":
    return _parquet_rows(path, columns)
  if kind == "jsonl":
    return _jsonl_rows(path)
  return _csv_rows(path, "\t" if kind == "tsv" else ",")


def _check_columns(path: str, row: dict, columns: tuple[str, str]) -> None:
  missing = [name for name in columns if name not in row]
  if missing:
    raise UserError(
      f"--input={path}: no column {', '.join(map(repr, missing))} (its columns: "
      f"{', '.join(map(str, row))}); name them with --path_column and --caption_column"
    )


def list_caption_table(table: str, path_column: str, caption_column: str, confine: str) -> Listing:
  """The rows of the table `table` (`table_kind`) as pairs: the path (relative ones resolve against the table's
  folder) and the stripped caption; a row without either (BAD_ROW, NO_CAPTION), with a text over the limit
  (limits.TOO_LARGE) or a path whose folders resolve outside the resolved folder `confine` (limits.OUTSIDE_ROOT)
  counted."""
  kind, columns = table_kind(table), (path_column, caption_column)
  if not os.path.isfile(table):
    raise UserError(f"--input={table}: no such file (--format=caption_table: a {', '.join(TABLE_KINDS)} table)")
  folder, resolved_folders = os.path.dirname(table), {}
  pairs, skipped, checked = [], collections.Counter(), False
  try:
    for row in _table_rows(table, kind, columns):
      if isinstance(row, dict) and not checked:
        _check_columns(table, row, columns)
        checked = True
      pair, reason = _row_pair(row, columns)
      if not reason and limits.resolve_inside(os.path.join(folder, pair[0]), confine, resolved_folders) is None:
        logging.warning(
          "prepare_data: skipping the row of %s: outside %s (--root names the folder the table's paths may lie in)",
          pair[0],
          confine,
        )
        reason = limits.OUTSIDE_ROOT
      if reason:
        skipped[reason] += 1
      else:
        pairs.append(pair)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise UserError(f"--input={table}: cannot read ({getattr(e, 'strerror', None) or e})") from e
  return Listing(folder, pairs, skipped)


def _row_pair(row: dict | str, columns: tuple[str, str]) -> tuple[tuple | None, str]:
  """((path, caption), '') of a table row, or (None, why it makes no pair)."""
  if isinstance(row, str):
    return None, row
  path, caption = (row.get(name) for name in columns)
  if not isinstance(path, str) or not path.strip() or "\0" in path or not isinstance(caption, (str, type(None))):
    return None, BAD_ROW  # a NUL byte: a path no file system takes
  caption = (caption or "").strip()
  if limits.text_too_large(caption):
    return None, limits.TOO_LARGE
  return ((path.strip(), caption), "") if caption else (None, NO_CAPTION)


# ---------------------------------------------------------------------------------------------- duplicates


def _file_size(path: str, follow_links: bool, real_root: str) -> int | None:
  """The size of the regular file `path`; None for one that is missing or no regular file, or a link that the
  writers refuse (`read_pair_files`), whose target is not even stat'ed."""
  try:
    status = os.lstat(path)
    if stat.S_ISLNK(status.st_mode):
      target = os.path.realpath(path)
      if not follow_links or os.path.commonpath((target, real_root)) != real_root:
        return None
      status = os.stat(target)
  except OSError:
    return None
  return status.st_size if stat.S_ISREG(status.st_mode) else None


def _digest(path: str, follow_links: bool, real_root: str) -> str | None:
  """The SHA-256 of the file `path` as the writers read it; None when they would not read it."""
  try:
    data, _ = read_image_file(path, real_root, follow_links)
  except DataError:
    return None
  return None if data is None else "sha256:" + hashlib.sha256(data).hexdigest()


def _image_identities(listing: Listing, follow_links: bool, confine: str, by_content: bool) -> list[str]:
  """Per pair of `listing`, what its image is: its resolved path, or with `by_content`, among files of equal size
  (the only ones that can be copies of each other, so the others are never read here) the digest of its content
  (of the files inside the resolved folder `confine` only)."""
  folders = {}
  paths = [
    limits.resolve_inside(os.path.join(listing.root, path), confine, folders) or path for path, _ in listing.pairs
  ]
  if not by_content:
    return paths
  by_size = collections.defaultdict(list)
  for path in dict.fromkeys(paths):
    size = _file_size(path, follow_links, confine)
    if size is not None:
      by_size[size].append(path)
  digests = {}
  for group in by_size.values():
    if len(group) > 1:
      digests.update((path, _digest(path, follow_links, confine)) for path in group)
  return [digests.get(path) or path for path in paths]


def distinct_pairs(listing: Listing, follow_links: bool, confine: str, by_content: bool) -> tuple[list, list[int], int]:
  """(the pairs of `listing` but those of an image and caption listed before, the number of each one's image
  (`_image_identities`: the pairs of one image share it), how many pairs were dropped as DUPLICATE)."""
  images, seen, pairs, image_of = {}, set(), [], []
  for pair, identity in zip(listing.pairs, _image_identities(listing, follow_links, confine, by_content)):
    if (identity, pair[1]) not in seen:
      seen.add((identity, pair[1]))
      pairs.append(pair)
      image_of.append(images.setdefault(identity, len(images)))
  return pairs, image_of, len(listing.pairs) - len(pairs)


# ---------------------------------------------------------------------------------------------- converting


def _held_positions(count: int, image_of: list[int], seed: int) -> set[int]:
  """The positions of the pairs of `count` images (numbered per pair by `image_of`) drawn by `seed`: every pair of
  a held-out image is held out. UserError when no image would be left to train on."""
  images = max(image_of) + 1
  if count >= images:
    raise UserError(
      f"--holdout_examples={count}: the input holds only {images} distinct images ({len(image_of)} usable pairs)"
    )
  held = set(np.random.default_rng(seed).choice(images, count, replace=False).tolist())
  return {position for position, image in enumerate(image_of) if image in held}


def _split_jobs(
  like: ShardJob, input_format: str, root: str, output_dir: str, split: str, pairs: list, records_per_shard: int
) -> list[ShardJob]:
  """The jobs of a split's shards of `records_per_shard` `pairs`, as `like` but for their path and items; --follow_links
  and --root (`root`) are part of their fingerprints only when given, so shards written without them keep theirs."""
  count = math.ceil(len(pairs) / records_per_shard)
  jobs = []
  for i in range(count):
    items = tuple(pairs[i * records_per_shard : (i + 1) * records_per_shard])
    parts = (
      (input_format, like.options, like.root, items)
      + (("follow_links",) if like.follow_links else ())
      + ((("root", like.confine),) if root else ())
    )
    jobs.append(
      dataclasses.replace(
        like,
        path=os.path.join(output_dir, records.shard_name(split, i, count)),
        fingerprint=shards.fingerprint(*parts),
        items=items,
      )
    )
  return jobs


def convert_own_pairs(
  input_format: str,
  input_path: str,
  output_dir: str,
  *,
  split: str = "train",
  resize_shorter: int = 0,
  verify: bool = False,
  num_workers: int | None = None,
  records_per_shard: int = shards.DEFAULT_RECORDS_PER_SHARD,
  progress: bool | None = None,
  min_side: int = 0,
  holdout_examples: int = 0,
  holdout_split_name: str = "validation",
  seed: int = 0,
  follow_links: bool = False,
  path_column: str = "path",
  caption_column: str = "caption",
  root: str = "",
) -> dict:
  """Converts a folder of captioned images or a table of path + caption (`OWN_PAIR_FORMATS`) into shards of
  `records_per_shard` distinct pairs (`distinct_pairs`) in listing order, those of `holdout_examples` images (drawn
  by `seed`) into `holdout_split_name`; a table's paths must lie in `root` (--root; default: the table's folder).
  Returns the written dataset.json dict, whose training split also counts the pairs the listing skipped.
  UserError naming the input when no pair is usable."""
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  shards.check_common(output_dir, split, records_per_shard, resize_shorter, num_workers)
  shards.check_holdout("--holdout_examples", holdout_examples, holdout_split_name, split)
  input_path, output_dir = os.path.abspath(os.path.expanduser(input_path)), os.path.expanduser(output_dir)
  confine = shards.confine_to(input_path if input_format == "caption_files" else os.path.dirname(input_path), root)
  listing = (
    list_caption_files(input_path, follow_links)
    if input_format == "caption_files"
    else list_caption_table(input_path, path_column, caption_column, confine)
  )
  if not listing.pairs:
    raise UserError(f"--input={input_path}: no image with a caption ({shards.counts_text(listing.skipped)})")
  # Copies under other names matter where they would leak held-out images into training: only then are the
  # files of equal sizes read here (the writers read every file again).
  pairs, image_of, listing.skipped[DUPLICATE] = distinct_pairs(listing, follow_links, confine, holdout_examples > 0)
  held = _held_positions(holdout_examples, image_of, seed) if holdout_examples else set()
  split_pairs = {split: [p for i, p in enumerate(pairs) if i not in held]}
  if held:
    split_pairs[holdout_split_name] = [pairs[i] for i in sorted(held)]
  like = ShardJob(
    "",
    "",
    image_options(resize_shorter, verify),
    read_pair_files,
    root=listing.root,
    captioned=True,
    min_side=min_side,
    follow_links=follow_links,
    confine=confine,
  )
  jobs = {
    name: _split_jobs(like, input_format, root, output_dir, name, pairs, records_per_shard)
    for name, pairs in split_pairs.items()
  }
  shards.check_output(output_dir, "pairs", None, {name: shards.shard_names(js) for name, js in jobs.items()})
  entries = {
    name: shards.split_entry(
      shards.shard_names(js), shards.run_jobs(js, num_workers, progress), input_path, None, min_side
    )
    for name, js in jobs.items()
  }
  if not sum(entry["records"] for entry in entries.values()):
    raise shards.none_read(input_path, f"its {len(pairs)} captioned images", _merged_skips(entries))
  _add_listing_skips(entries[split], listing.skipped)
  entries[split]["format"] = input_format
  if held:
    entries[holdout_split_name]["holdout_examples"] = holdout_examples
  return records.write_metadata(output_dir, kind="pairs", splits=entries)


def _add_listing_skips(entry: dict, skipped: collections.Counter) -> None:
  """Adds what the listing skipped to a split entry's `skipped` and `skipped_by` (after data/limits.py's)."""
  entry["skipped"] += sum(skipped.values())
  merged = skipped + collections.Counter(entry["skipped_by"])
  entry["skipped_by"] = {**shards.ordered_reasons(merged), **{r: merged[r] for r in LISTING_REASONS if merged[r]}}


def _merged_skips(entries: dict) -> collections.Counter:
  merged = collections.Counter()
  for entry in entries.values():
    merged.update(entry["skipped_by"])
  return merged
