r"""Converts an image-folder tree, img2dataset WebDataset tars or image-text pairs into the ArrayRecord shards of
`data.sources.records`.

  python -m visionfm_jax.datatools.prepare_data \
      --format=folders|webdataset|coco|visual_genome|caption_files|caption_table --input=... \
      --output=DIR [--split=train] [--resize_shorter=N] [--verify] [--num_workers=P] [--records_per_shard=1000]
      [--unlabelled] [--follow_links] [--holdout_per_class=K | --holdout_examples=N] [--holdout_split=validation]
      [--seed=0]
      [--coco_folder=train2017] [--vg_regions=crop|image] [--min_region_size=64] [--exclude_karpathy=JSON]
      [--progress] [--task_index=I --task_count=N | --finalize] [--min_side=M]
      [--min_similarity=S] [--max_pwatermark=W] [--max_punsafe=U | --selection=FILE]
      [--path_column=path] [--caption_column=caption] [--root=DIR]

--format=folders: --input is a classification tree, one folder per class (ImageNet's `n01440764/*.JPEG`);
image files (jpg jpeg png webp bmp, any case) anywhere below a class folder, other files ignored. Labels follow
the sorted folder names. The files, listed in sorted order, are shuffled by --seed (shards mix classes) and cut
into shards of --records_per_shard records {image, label, key: the path under --input}.
--holdout_per_class=K moves K files per class (chosen by --seed) into a second split, --holdout_split; a class
of fewer than 2 K files holds out half of them, rounded down, so that no class trains on fewer files than it holds
out (one warning line names how many classes).
With --unlabelled, --input is a folder (or tree) of images without labels: every image file below it becomes an
image-only record {image, key}. Such a tree (Aurora's 500M images) is never listed whole: each top-level folder
(and the input's own files, as one more) is walked on its own, one directory at a time, in sorted path order, and
cut into shards `<split>-<folder number>-<n>` of --records_per_shard images, with the folder's list of shards in
`<split>-folders/` (image_tree.py); --holdout_examples=N moves N images to --holdout_split, drawn by --seed
from the first 10 N images of the folders taken in a --seed-shuffled order.
A symbolic link to a file is not followed: it is left out and counted as `link` (like a tar's link members), so a
tree's link to a private file never copies it into the shards; --follow_links follows the links that resolve inside
--input (a file or a class folder), never one that leaves it. Linked subfolders are never entered.

--format=webdataset: --input is a glob of tars written by img2dataset: members `<key>.jpg|jpeg|png|webp`,
`<key>.txt` (the caption) and `<key>.json` (metadata, kept verbatim). One output shard per tar, records
{image, caption, key, meta}; an example without a caption (no or an empty .txt) becomes an image-only record
{image, key, meta}, one without an image is skipped and counted. --holdout_examples=N moves N examples to
--holdout_split (one shard per tar they come from): drawn by --seed from the first tars of a --seed-shuffled
order that hold N examples (only those are listed ahead), e.g. a validation split of pairs.
--min_similarity, --max_pwatermark, --max_punsafe keep only the samples whose .json has LAION's `similarity`
(the CLIP ViT-B/32 image-text cosine) at least S, `pwatermark` at most W, `punsafe` at most U (a sample
without a score a condition needs fails it: `data.sources.wds.ScoreFilter`); the rejected ones are counted per score
(the first condition they fail) under 'filtered' in each sidecar and in dataset.json. --selection=FILE takes the
three from the JSON `index_tars --keep=K --selection_out=FILE` wrote (the thresholds that keep K samples).

--format=coco and --format=visual_genome: --input is the data set's root in its released layout (COCO:
annotations/captions_<--coco_folder>.json and <--coco_folder>/; Visual Genome: region_descriptions.json,
image_data.json, VG_100K/ and VG_100K_2/). Every caption (COCO's five per image) or region phrase becomes one
pair record {image, caption, key}; Visual Genome's image is the phrase's region cropped (--vg_regions=crop,
regions under --min_region_size px left out) or the whole image (--vg_regions=image); see data/text/pair_corpora.py
for why. --exclude_karpathy=dataset_coco.json leaves out the images of Karpathy's val and test splits (Visual
Genome's by their coco_id), so that COCO 5k retrieval is not evaluated on training images. Shards of
--records_per_shard pairs in listing order; dataset.json's split entry adds the listing's counts (images,
excluded_images, missing_images, and for Visual Genome small_regions, empty_phrases).

--format=caption_files and --format=caption_table: a researcher's own image-text pairs. caption_files: --input is
a folder whose images (below it, as --unlabelled lists them) each have a caption file of the same name and `.txt`
beside them (`photo.jpg` + `photo.txt`: img2dataset's "files" output, many scrapers'). caption_table: --input is
a table (.csv, .tsv, .jsonl; .parquet through pyarrow) with a row per pair, the image's path (relative ones resolve
against the table's folder) in --path_column and its caption in --caption_column. Shards of --records_per_shard
pairs {image, caption, key: the path under the folder, or as the table gives it} in listing order;
--holdout_examples=N moves the pairs of N images drawn by --seed to --holdout_split. An image without a caption (no
caption file, an empty one, an empty cell: `no_caption`), a table row without a path (`bad_row`), a cell over
data/limits.py's MAX_TEXT_BYTES (`too_large`), a missing or unreadable image (`no_image`) is skipped and counted;
links are treated as --format=folders treats them (--follow_links follows those inside the folder, or the table's
folder). A table's path whose folders resolve outside the table's folder (or --root=DIR: '..', an absolute path, a
linked folder) is skipped as `outside_root`, as is a COCO or Visual Genome image outside --input (or --root). A
pair listed before (the same file by any path, or with --holdout_examples one of equal bytes, with the same
caption) is dropped and counted as `duplicate`, and every pair of one image lands in one split. No usable pair at all is
an error naming --input.

dataset.json says per split which kind its records are: 'labelled' (folders), 'pairs' (captions; with the
count of 'uncaptioned' records among them) or 'images' (image-only).

Images pass through as stored. --verify decodes each one and drops (counts, names) the undecodable ones;
a folder (--format=folders) of which not one image decodes is an error naming it, and writes nothing;
--resize_shorter=N (implies --verify) shrinks images whose shorter side exceeds N to N and stores them as
JPEG quality 95 (turned upright first, as their EXIF orientation says); nothing is ever enlarged. Each shard's
sidecar and each split of dataset.json count, under `small_images`, the images whose shorter side as given (read
from the header when they are not decoded) is below --min_side=M px (default: --resize_shorter; 0: no count); a
nonzero count is also a warning line on the console: a recipe that reads them at M px upsamples them (e.g. LAION
downloaded at img2dataset's default 256 px, for a 640 px stage). --min_side is not part of a shard's fingerprint:
shards finished under another value are kept, and their images counted as `unmeasured`. Samples past data/limits.py's
limits (decompression bombs, oversized files and captions, links (tar members, a tree's files), FIFOs and absolute or
'..' member names) are left out and counted per reason: `skipped_by` in each sidecar and split of dataset.json, and the
summary line. Shards are written in parallel by --num_workers processes (0 or 1: in this process), as
`DIR/<split>-NNNNN-of-NNNNN.array_record`, each with a small `<shard>.json` of its counts, and `DIR/dataset.json`
describes the data set (`records.write_metadata`), with per split written its shard index `DIR/<split>.shards.npy` (each
shard's records, bytes and postscript digest: a training process opens no shard before it reads from it, and names one
that changed since; data/sources/shard_index.py); train with
`--config.data.source='arrayrecord:DIR/{split}-*.array_record'`.

Rerunning resumes: a shard whose file and `.json` exist and were written from the same inputs and options is
kept. One run writes into an --output at a time (a lock file, `.prepare_data.lock`; a cluster task's own one):
a second is an error naming the holder; shards are written via `<shard>.<pid>.tmp`. --format=folders refuses a tree
whose images lie in one class folder. Prints one summary line; errors print one line naming the culprit and exit with
status 2.

Across a cluster: `--task_index=I --task_count=N` (default: from a SLURM job array, `datatools.cluster_task`)
writes only the shards I, I + N, I + 2N, ... of the full list (--unlabelled: those of the top-level folders
I, I + N, ..., the only ones it walks, and of the held-out shards), under the same names a single run writes,
so the tasks' shard sets are disjoint and a task run twice resumes its own share and touches no other task's
files. A task stats, checks and reads only its own share's inputs and shards (the input's listing aside: the glob,
or the tree's top level; a labelled tree is listed whole, since its shards mix all classes); when its shards are
written it leaves a summary of their counts in DIR/tasks/, and the task that finds every task's summary there (the
last to finish) writes dataset.json from them, the others report what other tasks still owe. `--finalize` writes
no shard, only dataset.json from every shard's sidecar (an error while some are missing).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
import sys
import time
from typing import Sequence

from absl import flags
from absl import logging as absl_logging

from visionfm_jax import cli
from visionfm_jax.data.sources import records, wds
from visionfm_jax.data.text import pair_corpora
from visionfm_jax.datatools import cluster_task
from visionfm_jax.datatools.prepare_data import lock, shards
from visionfm_jax.datatools.prepare_data.captioned import PAIR_FORMATS, convert_pairs
from visionfm_jax.datatools.prepare_data.folders import convert_folders
from visionfm_jax.datatools.prepare_data.own_pairs import LISTING_REASONS, OWN_PAIR_FORMATS, convert_own_pairs
from visionfm_jax.datatools.prepare_data.shards import DEFAULT_RECORDS_PER_SHARD
from visionfm_jax.datatools.prepare_data.webdataset import convert_webdataset
from visionfm_jax.errors import UserError
from visionfm_jax.training.infra import console

FORMATS = ("folders", "webdataset", *PAIR_FORMATS, *OWN_PAIR_FORMATS)


def make_flags() -> flags.FlagValues:
  """This tool's flags, on their own FlagValues: importing the module (tests) defines no global flags."""
  fv = flags.FlagValues()
  flags.DEFINE_enum(
    "format",
    None,
    FORMATS,
    "Input kind: a class-folder tree, img2dataset tars, COCO captions, "
    "Visual Genome region descriptions, a folder of images with caption files or a table of path + "
    "caption.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "input",
    None,
    "folders, caption_files: the folder; webdataset: a glob of .tar files; coco, "
    "visual_genome: the data set's root folder; caption_table: the .csv, .tsv, .jsonl or .parquet "
    "file.",
    flag_values=fv,
  )
  flags.DEFINE_string("output", None, "Directory for the shards and dataset.json (created).", flag_values=fv)
  flags.DEFINE_string("split", "train", "Split name of the shards.", flag_values=fv)
  flags.DEFINE_integer("resize_shorter", 0, "Shrink images to this shorter side (JPEG q95); 0: keep.", flag_values=fv)
  flags.DEFINE_bool("verify", False, "Decode every image; drop and count undecodable ones.", flag_values=fv)
  flags.DEFINE_integer(
    "num_workers", None, "Processes writing shards; 0 or 1: inline. Default: the CPU count.", flag_values=fv
  )
  flags.DEFINE_integer(
    "records_per_shard",
    DEFAULT_RECORDS_PER_SHARD,
    "folders, coco, visual_genome: records per output shard.",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "unlabelled", False, "folders: --input is a folder of images without labels (image-only records).", flag_values=fv
  )
  flags.DEFINE_bool(
    "follow_links",
    False,
    "folders: follow the symbolic links that resolve inside --input (else "
    "every link is left out and counted as `link`); a link out of --input is never followed.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "holdout_per_class",
    0,
    "folders: images per class moved to --holdout_split, at most half of a class; 0: none.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "holdout_examples",
    0,
    "webdataset, --unlabelled folders: examples moved to --holdout_split; 0: none.",
    flag_values=fv,
  )
  flags.DEFINE_string("holdout_split", "validation", "Split name of the held-out examples.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the holdout choice (and of the folders' shuffle).", flag_values=fv)
  flags.DEFINE_string(
    "coco_folder", "train2017", "coco: the image folder, and captions_<it>.json under annotations/.", flag_values=fv
  )
  flags.DEFINE_enum(
    "vg_regions",
    "crop",
    pair_corpora.VG_REGION_MODES,
    "visual_genome: pair a phrase with its region's crop or with the whole image.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "min_region_size",
    pair_corpora.DEFAULT_MIN_REGION_SIZE,
    "visual_genome, crop: leave out regions whose shorter side is under this many pixels.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "exclude_karpathy",
    "",
    "coco, visual_genome: Karpathy's dataset_coco.json; leaves out the "
    "images of its val and test splits (the COCO 5k retrieval benchmark).",
    flag_values=fv,
  )
  flags.DEFINE_bool("progress", False, "Show the progress line even when stderr is not a terminal.", flag_values=fv)
  cluster_task.define_flags(fv)
  flags.DEFINE_bool(
    "finalize",
    False,
    "Write no shard: only dataset.json, from every shard's sidecar (all must be written).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "min_similarity",
    None,
    "webdataset: keep samples whose .json 'similarity' (LAION's CLIP score) is at least this.",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "max_pwatermark", None, "webdataset: keep samples whose .json 'pwatermark' is at most this.", flag_values=fv
  )
  flags.DEFINE_float(
    "max_punsafe", None, "webdataset: keep samples whose .json 'punsafe' is at most this.", flag_values=fv
  )
  flags.DEFINE_integer(
    "min_side",
    None,
    "Count (dataset.json) and warn about the images whose shorter side is "
    "below this many px; default: --resize_shorter; 0: none.",
    flag_values=fv,
  )
  flags.DEFINE_string("path_column", "path", "caption_table: the column of the image paths.", flag_values=fv)
  flags.DEFINE_string("caption_column", "caption", "caption_table: the column of the captions.", flag_values=fv)
  flags.DEFINE_string(
    "root",
    "",
    "caption_table, coco, visual_genome: the folder every image path the table or "
    "annotations name must resolve into (links included); default: the table's folder, --input.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "selection",
    None,
    "webdataset: instead of the three flags above, the JSON file "
    "`index_tars --keep=K --selection_out=FILE` wrote: its thresholds keep its count.",
    flag_values=fv,
  )
  return fv


def score_filter_of(fv: flags.FlagValues) -> wds.ScoreFilter:
  """The LAION score conditions: --min_similarity / --max_pwatermark / --max_punsafe, or those of --selection."""
  given = wds.ScoreFilter(fv.min_similarity, fv.max_pwatermark, fv.max_punsafe)
  if not fv.selection:
    return given
  if given:
    raise UserError(f"--selection={fv.selection} and --{', --'.join(given.names)}: give one or the other")
  try:
    selection = json.loads(Path(fv.selection).expanduser().read_text())
    return wds.ScoreFilter(*(selection[f"{limit}_{name}"] for limit, name in zip(("min", "max", "max"), wds.SCORES)))
  except OSError as e:
    raise UserError(f"--selection={fv.selection}: cannot read ({e.strerror or e})") from e
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(
      f"--selection={fv.selection}: not a selection written by `index_tars --keep "
      f"--selection_out` ({type(e).__name__}: {e})"
    ) from e


def min_side_of(fv: flags.FlagValues) -> int:
  """--min_side, by default --resize_shorter (the size the shards are meant for); UserError out of range."""
  min_side = fv.resize_shorter if fv.min_side is None else fv.min_side
  if min_side < 0:
    raise UserError(f"--min_side={min_side}: expected a size in px, or 0 (no count)")
  return min_side


def larger_images_hint(input_format: str, input_path: str) -> str:
  """Where larger images of `input_path` come from, by --format: img2dataset's download for its tars, the
  user's own originals for their files."""
  if input_format == "webdataset":
    return "download larger: img2dataset --resize_mode=keep_ratio --image_size=..."
  if input_format in PAIR_FORMATS:
    return f"or train at a smaller --config.data.image_size on the images of {input_path}"
  return f"convert larger originals of the images of {input_path}, or train at a smaller --config.data.image_size"


def small_image_warnings(metadata: dict, splits: Sequence[str], hint: str) -> list[str]:
  """A warning line per split of `splits` in which dataset.json counts images below --min_side (or some left
  unmeasured), ending in `hint` (`larger_images_hint`)."""
  lines = []
  for split in splits:
    entry = metadata.get("splits", {}).get(split, {})
    small = entry.get("small_images", {})
    if small.get("count") or small.get("unmeasured"):
      unmeasured = (
        f"; {small['unmeasured']:,} more, in shards written without this --min_side, are not measured"
        if small.get("unmeasured")
        else ""
      )
      lines.append(
        f"warning: {small['count']:,} of the {entry['records']:,} {split} images have a shorter side "
        f"below {small['min_side']} px (--min_side): a recipe that reads them at {small['min_side']} px "
        f"upsamples them ({hint}){unmeasured}"
      )
  return lines


def run(fv: flags.FlagValues) -> dict:
  """Runs the conversion the parsed flags describe, holding --output's lock (`lock.held`); the written
  dataset.json dict."""
  if not fv.format or not fv.input:
    raise UserError(f"--format ({' | '.join(FORMATS)}) and --input are required")
  shards.check_common(fv.output, fv.split, fv.records_per_shard, fv.resize_shorter, fv.num_workers or 0)
  if fv.root and fv.format not in ("caption_table", *PAIR_FORMATS):
    raise UserError(
      f"--root: only for --format=caption_table, coco or visual_genome (--format={fv.format} reads no "
      f"path out of a file)"
    )
  task = None if fv.finalize else cluster_task.from_flags(fv)
  with lock.held(fv.output, task):
    metadata = _convert(fv, task)
    if "unfinished" in metadata:  # the last task to finish writes dataset.json, and the index
      return metadata
    for split in written_splits(fv):
      metadata = records.write_index(os.path.expanduser(fv.output), split)
    return metadata


def written_splits(fv: flags.FlagValues) -> list[str]:
  """The splits a run of these flags writes: --split, and --holdout_split with a holdout."""
  return [fv.split] + ([fv.holdout_split] if fv.holdout_per_class or fv.holdout_examples else [])


def _convert(fv: flags.FlagValues, task: cluster_task.Task | None) -> dict:
  common = dict(
    split=fv.split,
    resize_shorter=fv.resize_shorter,
    verify=fv.verify,
    num_workers=fv.num_workers,
    progress=fv.progress or None,
    min_side=min_side_of(fv),
  )
  common.update(holdout_examples=fv.holdout_examples, holdout_split_name=fv.holdout_split, seed=fv.seed, task=task)
  score_filter = score_filter_of(fv)
  if fv.follow_links and fv.format not in ("folders", *OWN_PAIR_FORMATS):
    raise UserError(
      f"--follow_links: only for --format=folders, caption_files or caption_table (--format="
      f"{fv.format} does not walk a tree)"
    )
  table_only = [f"--{name}" for name in ("path_column", "caption_column") if fv[name].present]
  if table_only and fv.format != "caption_table":
    raise UserError(f"{', '.join(table_only)}: only for --format=caption_table")
  if fv.format in OWN_PAIR_FORMATS:
    return _convert_own_pairs(fv, common, score_filter)
  pair_only = [
    f"--{name}" for name in ("coco_folder", "vg_regions", "min_region_size", "exclude_karpathy") if fv[name].present
  ]
  if fv.format in PAIR_FORMATS:
    other = [f"--{name}" for name in ("holdout_per_class", "holdout_examples", "unlabelled") if fv[name].present]
    if other:
      raise UserError(
        f"{', '.join(other)}: not for --format={fv.format} (its pairs train; the held-out pairs "
        f"of a mixture come from another source)"
      )
    foreign = [
      flag
      for flag in pair_only
      if flag in (("--vg_regions", "--min_region_size") if fv.format == "coco" else ("--coco_folder",))
    ]
    if foreign:
      raise UserError(f"{', '.join(foreign)}: not for --format={fv.format}")
    if score_filter or common["task"] is None or common["task"].count > 1:
      raise UserError(
        f"--min_similarity, --max_pwatermark, --max_punsafe, --task_index/--task_count, --finalize: "
        f"not for --format={fv.format} (one process converts a data set of its size)"
      )
    listing = dict(exclude_karpathy=fv.exclude_karpathy, root=fv.root)
    listing.update(
      dict(coco_folder=fv.coco_folder)
      if fv.format == "coco"
      else dict(vg_regions=fv.vg_regions, min_region_size=fv.min_region_size)
    )
    return convert_pairs(
      fv.format,
      fv.input,
      fv.output,
      split=fv.split,
      resize_shorter=fv.resize_shorter,
      verify=fv.verify,
      num_workers=fv.num_workers,
      records_per_shard=fv.records_per_shard,
      progress=fv.progress or None,
      min_side=common["min_side"],
      **listing,
    )
  if pair_only:
    raise UserError(f"{', '.join(pair_only)}: only for --format=coco or visual_genome")
  if fv.format == "folders":
    if score_filter:
      raise UserError(
        "--min_similarity, --max_pwatermark, --max_punsafe: only for --format=webdataset (they read "
        "each sample's .json)"
      )
    return convert_folders(
      fv.input,
      fv.output,
      records_per_shard=fv.records_per_shard,
      holdout_per_class=fv.holdout_per_class,
      unlabelled=fv.unlabelled,
      follow_links=fv.follow_links,
      **common,
    )
  folder_only = [f"--{name}" for name in ("records_per_shard", "holdout_per_class", "unlabelled") if fv[name].present]
  if folder_only:
    raise UserError(f"{', '.join(folder_only)}: only for --format=folders (webdataset: one shard per input tar)")
  return convert_webdataset(fv.input, fv.output, score_filter=score_filter, **common)


def _convert_own_pairs(fv: flags.FlagValues, common: dict, score_filter: wds.ScoreFilter) -> dict:
  """--format=caption_files or caption_table; UserError for the options of other formats, or a cluster task."""
  foreign = [
    f"--{name}"
    for name in (
      "coco_folder",
      "vg_regions",
      "min_region_size",
      "exclude_karpathy",
      "holdout_per_class",
      "unlabelled",
      "task_index",
      "task_count",
      "finalize",
    )
    if fv[name].present
  ]
  if common["task"] is not None and common["task"].count > 1 and not foreign:
    foreign = ["--task_count (a SLURM job array)"]
  if foreign or score_filter:
    raise UserError(
      f"{', '.join(foreign + [f'--{n}' for n in score_filter.names])}: not for --format={fv.format} "
      f"(one process converts a data set of its size; --holdout_examples holds pairs out)"
    )
  return convert_own_pairs(
    fv.format,
    fv.input,
    fv.output,
    split=fv.split,
    resize_shorter=fv.resize_shorter,
    verify=fv.verify,
    num_workers=fv.num_workers,
    records_per_shard=fv.records_per_shard,
    progress=fv.progress or None,
    min_side=common["min_side"],
    holdout_examples=fv.holdout_examples,
    holdout_split_name=fv.holdout_split,
    seed=fv.seed,
    follow_links=fv.follow_links,
    path_column=fv.path_column,
    caption_column=fv.caption_column,
    root=fv.root,
  )


def _reasons_text(counts: dict) -> str:
  """data/limits.py's reasons (wds.reasons_text), then the listing's of the own-pair formats."""
  listing = ", ".join(f"{reason} {counts[reason]}" for reason in LISTING_REASONS if counts.get(reason))
  return ", ".join(part for part in (wds.reasons_text(counts), listing) if part)


def summary_line(metadata: dict, splits: Sequence[str], output_dir: str, seconds: float) -> str:
  """The line a run prints: records per split of `splits`, skipped (per reason), filtered (per score), shards,
  `seconds` and `output_dir`; or, from a task that did not write dataset.json, what other tasks still owe."""
  if "unfinished" in metadata:
    return (
      f"prepare_data: {metadata['task']} done, {metadata['unfinished']} still to be written by other tasks "
      f"(the last one writes dataset.json), {seconds:.1f} s -> {output_dir}"
    )
  entries = [metadata["splits"][s] for s in splits]
  per_split = ", ".join(f"{s} {e['records']}" for s, e in zip(splits, entries))
  filtered = collections.Counter()
  for entry in entries:
    filtered.update(entry.get("filtered", {}))
  by_reason = ", ".join(f"{n} by {reason}" for reason, n in filtered.items())
  skipped_by = collections.Counter()
  for entry in entries:
    skipped_by.update(entry.get("skipped_by", {}))
  skipped = sum(e["skipped"] for e in entries)
  return (
    f"prepare_data: {per_split} records, {skipped} skipped"
    + (f" ({_reasons_text(skipped_by)})" if skipped_by else "")
    + ", "
    + (f"{sum(filtered.values())} filtered ({by_reason}), " if filtered else "")
    + f"{sum(len(e['shards']) for e in entries)} shards, {seconds:.1f} s -> {output_dir}"
  )


def _main(fv, rest: list[str]) -> None:
  start = time.monotonic()
  if rest:
    raise UserError(f"unexpected arguments {rest}; all options are --flags")
  metadata = run(fv)
  splits = written_splits(fv)
  print(summary_line(metadata, splits, fv.output, time.monotonic() - start))
  for line in small_image_warnings(metadata, splits, larger_images_hint(fv.format, fv.input)):
    print(line, file=sys.stderr)


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), converts, prints the summary line; returns the exit status. Its log lines
  (a skipped file, a capped holdout) reach the console as the trainer's do: `HH:MM:SS warning: ...`."""
  _log_to_console()
  return cli.run(argv, make_flags(), __doc__, _main)


def _log_to_console() -> None:
  """This program's log lines through absl's handler in the console's format. It runs without absl.app, whose flag
  parsing absl's handler waits for: marked parsed here (the program's flags are its own), with the lines on
  stderr, or absl would prefix a notice."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
    flags.FLAGS.logtostderr = True
  absl_logging.use_absl_handler()
  console.configure()


if __name__ == "__main__":
  sys.exit(main(sys.argv))
