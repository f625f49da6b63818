"""--format=coco and --format=visual_genome: captioned data sets in their released layouts (listed by
data/text/pair_corpora.py) into shards of pair records in listing order, an image per caption or region phrase (the
region cropped, for Visual Genome's --vg_regions=crop)."""

from __future__ import annotations

import logging
import math
import os
from typing import Iterator

import numpy as np
from PIL import Image

from visionfm_jax.data import limits
from visionfm_jax.data.sources import records
from visionfm_jax.data.text import pair_corpora
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.datatools.prepare_data import shards
from visionfm_jax.datatools.prepare_data.images import image_options, read_image_file, shrink_to_shorter_side
from visionfm_jax.datatools.prepare_data.shards import Example, ShardJob, refused
from visionfm_jax.errors import DataError, UserError

PAIR_FORMATS = ("coco", "visual_genome")  # captioned data sets in their released layouts (data/text/pair_corpora.py)


def read_pairs(job: ShardJob) -> Iterator[Example]:
  """The job's pairs: the image file as stored, or (with a box) its region cropped and encoded once (shrunk first
  to --resize_shorter); each file read, and decoded, once for its consecutive pairs. A file name from the
  annotations whose folders resolve outside `confine` is refused (limits.OUTSIDE_ROOT), and a link followed only
  when its file lies inside it (else limits.LINK)."""
  current = data = pixels = None
  decoded, why = False, ""
  for item in job.items:
    if item.path != current:
      current, decoded = item.path, False
      data, reason = read_image_file(os.path.join(job.root, item.path), job.confine, follow_links=True)
    name, fields = f"{os.path.join(job.root, item.path)}#{item.key}", {"caption": item.caption, "key": item.key}
    if data is None:
      yield refused(name, reason)
      continue
    if item.box is None:
      yield Example(name, data, fields)
      continue
    if not decoded:
      (pixels, why), decoded = _decode_or_warn(data, current), True
    crop = None if pixels is None else pair_corpora.crop_box(pixels, item.box)
    if crop is None or not crop.size:
      yield refused(name, why or limits.NO_IMAGE)
      continue
    if job.options.resize_shorter:
      crop = np.asarray(shrink_to_shorter_side(Image.fromarray(crop), job.options.resize_shorter))
    yield Example(name, records.encode_jpeg(crop), fields)


def _decode_or_warn(data: bytes, name: str) -> tuple[np.ndarray | None, str]:
  """(the decoded image, ''), or (None, the data/limits.py reason)."""
  try:
    return transforms.decode_image(data), ""
  except transforms.DECODE_ERRORS as e:
    logging.warning("prepare_data: skipping the regions of %s: undecodable image: %s", name, e)
    return None, transforms.failure_reason(e)


def list_pairs(
  input_format: str,
  input_dir: str,
  *,
  coco_folder: str = "train2017",
  vg_regions: str = "crop",
  min_region_size: int = pair_corpora.DEFAULT_MIN_REGION_SIZE,
  exclude_karpathy: str = "",
) -> tuple[list, dict]:
  """(pairs, counts) of a captioned data set (`PAIR_FORMATS`; data/text/pair_corpora.py); UserError naming --input
  or --exclude_karpathy when its files are missing or malformed."""
  try:
    excluded = pair_corpora.karpathy_eval_ids(exclude_karpathy) if exclude_karpathy else frozenset()
  except DataError as e:
    raise UserError(f"--exclude_karpathy: {e}") from e
  if not os.path.isdir(input_dir):
    raise UserError(f"--input={input_dir}: no such directory")
  try:
    if input_format == "coco":
      return pair_corpora.coco_pairs(input_dir, coco_folder, excluded)
    return pair_corpora.visual_genome_pairs(input_dir, vg_regions, min_region_size, excluded)
  except DataError as e:
    raise UserError(f"--input={input_dir} (--format={input_format}): {e}") from e


def convert_pairs(
  input_format: str,
  input_dir: str,
  output_dir: str,
  *,
  split: str = "train",
  resize_shorter: int = 0,
  verify: bool = False,
  num_workers: int | None = None,
  records_per_shard: int = shards.DEFAULT_RECORDS_PER_SHARD,
  progress: bool | None = None,
  min_side: int = 0,
  root: str = "",
  **listing,
) -> dict:
  """Converts a captioned data set (`list_pairs`; `listing` its options) into shards of `records_per_shard`
  pairs, in the listing's order (training shuffles globally), each image file inside `root` (--root; default:
  `input_dir`) or refused; returns the written dataset.json dict, whose split entry also holds the listing's
  counts (and with `min_side`, the count of images smaller)."""
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  shards.check_common(output_dir, split, records_per_shard, resize_shorter, num_workers)
  input_dir, output_dir = os.path.abspath(os.path.expanduser(input_dir)), os.path.expanduser(output_dir)
  confine = shards.confine_to(input_dir, root)
  pairs, listed = list_pairs(input_format, input_dir, **listing)
  if not pairs:
    raise UserError(f"--input={input_dir}: no pairs to write ({listed})")
  options = image_options(resize_shorter, verify)
  count = math.ceil(len(pairs) / records_per_shard)
  jobs = []
  for i in range(count):
    items = tuple(pairs[i * records_per_shard : (i + 1) * records_per_shard])
    fingerprint = shards.fingerprint(input_format, options, input_dir, items, *(("root", confine),) * bool(root))
    jobs.append(
      ShardJob(
        os.path.join(output_dir, records.shard_name(split, i, count)),
        fingerprint,
        options,
        read_pairs,
        root=input_dir,
        items=items,
        captioned=True,
        min_side=min_side,
        confine=confine,
      )
    )
  shards.check_output(output_dir, "pairs", None, {split: shards.shard_names(jobs)})
  entry = shards.split_entry(
    shards.shard_names(jobs), shards.run_jobs(jobs, num_workers, progress), input_dir, None, min_side
  )
  if not entry["records"]:
    raise shards.none_read(input_dir, f"its {len(pairs)} pairs' images", entry["skipped_by"])
  entry.update(
    listed, format=input_format, **{k: v for k, v in {**listing, "root": root}.items() if v not in ("", None)}
  )
  return records.write_metadata(output_dir, kind="pairs", splits={split: entry})
