"""--format=caption_files and --format=caption_table: a researcher's own image-text pairs, as a folder of images
with a caption file beside each (`photo.jpg` + `photo.txt`, img2dataset's "files" output and many scrapers') or as
a table of path + caption (CSV, TSV, JSONL or parquet), into shards of pair records in listing order, with
--holdout_examples drawn by --seed into a second split.

The listing reads the captions (small text files) in this process; the shards' writers read the images. What
cannot make a pair is skipped and counted: an image without a caption file or with an empty one, a table row
without a path or caption (`NO_CAPTION`, `BAD_ROW`, counted at listing), an image file that is missing or
unreadable (limits.NO_IMAGE), a link (limits.LINK, as --format=folders: not followed unless --follow_links, and
then only inside the input's folder)."""

from __future__ import annotations

import collections
import csv
import json
import logging
import math
import os
from typing import Iterator, NamedTuple

import numpy as np

from visionfm_jax.data import limits
from visionfm_jax.data.sources import records
from visionfm_jax.errors import DataError, UserError
from visionfm_jax.tools import image_tree
from visionfm_jax.tools.prepare_data import shards
from visionfm_jax.tools.prepare_data.images import image_options, read_image_file
from visionfm_jax.tools.prepare_data.shards import Example, ShardJob, refused

OWN_PAIR_FORMATS = ("caption_files", "caption_table")
CAPTION_SUFFIX = ".txt"
TABLE_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
# Listing-time reasons (beside data/limits.py's, which the shards' writers count): no caption file, an empty one or
# an empty caption cell; a table row without a path, or with a value that is not text.
NO_CAPTION = "no_caption"
BAD_ROW = "bad_row"
LISTING_REASONS = (NO_CAPTION, BAD_ROW)


class Listing(NamedTuple):
  root: str  # the folder the pairs' paths are under (relative ones resolve against it)
  pairs: list  # [(path under root, caption)], in listing order
  skipped: collections.Counter  # {a LISTING_REASONS or data/limits.py reason: count}


# ------------------------------------------------------------------------------------------------- reading

def read_pair_files(job: ShardJob) -> Iterator[Example]:
  """The pairs of a job: its `items` (path under `root`, caption), each image read within data/limits.py's
  bounds; a missing or unreadable file is refused as limits.NO_IMAGE, a link as limits.LINK (with
  `follow_links`, only one that resolves outside `root`)."""
  inside = os.path.realpath(job.root) if job.follow_links else ""
  for path, caption in job.items:
    full = os.path.join(job.root, path)
    try:
      data, reason = read_image_file(full, refuse_links=True, inside=inside)
    except DataError as e:
      logging.warning("prepare_data: skipping %s: %s", full, e)
      data, reason = None, limits.NO_IMAGE
    yield refused(full, reason) if reason else Example(full, data, {"caption": caption, "key": path})


def _read_caption(path: str, inside: str) -> tuple[str, str]:
  """(the stripped text of the caption file `path`, ''), or ('', why it gives no caption: NO_CAPTION when it is
  missing, unreadable or empty, limits.TOO_LARGE over limits.MAX_TEXT_BYTES, limits.LINK for a link not followed,
  by the links policy of `read_pair_files`)."""
  try:
    data, reason = read_image_file(path, refuse_links=True, inside=inside)
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
    raise UserError(f"--input={input_dir}: no such directory (--format=caption_files: a folder of images, each "
                    f"with a caption file of its name and {CAPTION_SUFFIX} beside it)")
  inside = os.path.realpath(input_dir) if follow_links else ""
  pairs, skipped = [], collections.Counter()
  for path in image_tree.walk_images(input_dir, ""):
    caption, reason = _read_caption(os.path.join(input_dir, os.path.splitext(path)[0] + CAPTION_SUFFIX), inside)
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


def _csv_rows(path: str, delimiter: str) -> Iterator[dict]:
  with open(path, encoding="utf-8-sig", newline="") as f:
    yield from csv.DictReader(f, delimiter=delimiter)


def _jsonl_rows(path: str) -> Iterator[dict | None]:
  """Each non-blank line's object; None for a line that is not a JSON object (a bad row)."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        try:
          row = json.loads(line)
        except ValueError:
          row = None
        yield row if isinstance(row, dict) else None


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


def _table_rows(path: str, kind: str, columns: tuple[str, str]) -> Iterator[dict | None]:
  if kind == "parquet":
    return _parquet_rows(path, columns)
  if kind == "jsonl":
    return _jsonl_rows(path)
  return _csv_rows(path, "\t" if kind == "tsv" else ",")


def _check_columns(path: str, row: dict, columns: tuple[str, str]) -> None:
  missing = [name for name in columns if name not in row]
  if missing:
    raise UserError(f"--input={path}: no column {', '.join(map(repr, missing))} (its columns: "
                    f"{', '.join(map(str, row))}); name them with --path_column and --caption_column")


def list_caption_table(table: str, path_column: str, caption_column: str) -> Listing:
  """The rows of the table `table` (`table_kind`) as pairs: the path (relative ones resolve against the table's
  folder) and the stripped caption; a row without either counted (BAD_ROW, NO_CAPTION)."""
  kind, columns = table_kind(table), (path_column, caption_column)
  if not os.path.isfile(table):
    raise UserError(f"--input={table}: no such file (--format=caption_table: a {', '.join(TABLE_KINDS)} table)")
  pairs, skipped, checked = [], collections.Counter(), False
  try:
    for row in _table_rows(table, kind, columns):
      if row is not None and not checked:
        _check_columns(table, row, columns)
        checked = True
      pair, reason = _row_pair(row, columns)
      if reason:
        skipped[reason] += 1
      else:
        pairs.append(pair)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise UserError(f"--input={table}: cannot read ({getattr(e, 'strerror', None) or e})") from e
  return Listing(os.path.dirname(table), pairs, skipped)


def _row_pair(row: dict | None, columns: tuple[str, str]) -> tuple[tuple | None, str]:
  """((path, caption), '') of a table row, or (None, why it makes no pair)."""
  if row is None:
    return None, BAD_ROW
  path, caption = (row.get(name) for name in columns)
  if not isinstance(path, str) or not path.strip() or not isinstance(caption, (str, type(None))):
    return None, BAD_ROW
  caption = (caption or "").strip()
  if limits.text_too_large(caption):
    return None, limits.TOO_LARGE
  return ((path.strip(), caption), "") if caption else (None, NO_CAPTION)


# ---------------------------------------------------------------------------------------------- converting

def _holdout_positions(count: int, pairs: int, seed: int) -> np.ndarray:
  """The sorted positions of `count` pairs of `pairs` drawn by `seed`; UserError when none would be left to
  train on."""
  if count >= pairs:
    raise UserError(f"--holdout_examples={count}: the input holds only {pairs} usable pairs")
  return np.sort(np.random.default_rng(seed).choice(pairs, count, replace=False))


def _split_jobs(listing: Listing, output_dir: str, split: str, pairs: list, records_per_shard: int, options,
                min_side: int, follow_links: bool, input_format: str) -> list[ShardJob]:
  count = math.ceil(len(pairs) / records_per_shard)
  jobs = []
  for i in range(count):
    items = tuple(pairs[i * records_per_shard:(i + 1) * records_per_shard])
    parts = (input_format, options, listing.root, items) + (("follow_links",) if follow_links else ())
    jobs.append(ShardJob(os.path.join(output_dir, records.shard_name(split, i, count)), shards.fingerprint(*parts),
                         options, read_pair_files, root=listing.root, items=items, captioned=True,
                         min_side=min_side, follow_links=follow_links))
  return jobs


def convert_own_pairs(input_format: str, input_path: str, output_dir: str, *, split: str = "train",
                      resize_shorter: int = 0, verify: bool = False, num_workers: int | None = None,
                      records_per_shard: int = shards.DEFAULT_RECORDS_PER_SHARD, progress: bool | None = None,
                      min_side: int = 0, holdout_examples: int = 0, holdout_split_name: str = "validation",
                      seed: int = 0, follow_links: bool = False, path_column: str = "path",
                      caption_column: str = "caption") -> dict:
  """Converts a folder of captioned images or a table of path + caption (`OWN_PAIR_FORMATS`) into shards of
  `records_per_shard` pairs in listing order, `holdout_examples` of them (drawn by `seed`) into
  `holdout_split_name`; returns the written dataset.json dict, whose training split also counts the pairs the
  listing skipped. UserError naming the input when no pair is usable."""
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  shards.check_common(output_dir, split, records_per_shard, resize_shorter, num_workers)
  shards.check_holdout("--holdout_examples", holdout_examples, holdout_split_name, split)
  input_path, output_dir = os.path.abspath(os.path.expanduser(input_path)), os.path.expanduser(output_dir)
  listing = (list_caption_files(input_path, follow_links) if input_format == "caption_files" else
             list_caption_table(input_path, path_column, caption_column))
  if not listing.pairs:
    raise UserError(f"--input={input_path}: no image with a caption ({_skipped_text(listing.skipped)})")
  held = set(_holdout_positions(holdout_examples, len(listing.pairs), seed).tolist()) if holdout_examples else set()
  split_pairs = {split: [p for i, p in enumerate(listing.pairs) if i not in held]}
  if held:
    split_pairs[holdout_split_name] = [listing.pairs[i] for i in sorted(held)]
  options = image_options(resize_shorter, verify)
  jobs = {name: _split_jobs(listing, output_dir, name, pairs, records_per_shard, options, min_side, follow_links,
                            input_format) for name, pairs in split_pairs.items()}
  shards.check_output(output_dir, "pairs", None, {name: shards.shard_names(js) for name, js in jobs.items()})
  entries = {name: shards.split_entry(shards.shard_names(js), shards.run_jobs(js, num_workers, progress), input_path,
                                      None, min_side) for name, js in jobs.items()}
  if not sum(entry["records"] for entry in entries.values()):
    raise UserError(f"--input={input_path}: none of its {len(listing.pairs)} captioned images could be read "
                    f"({_skipped_text(_merged_skips(entries))})")
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


def _skipped_text(skipped: collections.Counter) -> str:
  return ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "nothing listed"
