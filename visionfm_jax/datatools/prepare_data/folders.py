"""--format=folders: a class tree (one folder per class, ImageNet's layout) into labelled shards of its files in a
--seed-shuffled order, --holdout_per_class of each class in a second split; with --unlabelled, any tree of
images into image-only shards (unlabelled.py)."""

from __future__ import annotations

import math
import os

import numpy as np

from visionfm_jax.data.sources import records
from visionfm_jax.datatools import cluster_task
from visionfm_jax.datatools.prepare_data import image_tree, shards
from visionfm_jax.datatools.prepare_data.images import ImageOptions, image_options
from visionfm_jax.datatools.prepare_data.shards import ShardJob
from visionfm_jax.datatools.prepare_data.unlabelled import convert_image_tree
from visionfm_jax.errors import UserError


def _folder_jobs(
  tree: image_tree.ClassTree,
  input_dir: str,
  output_dir: str,
  split: str,
  indices: np.ndarray,
  records_per_shard: int,
  options: ImageOptions,
  min_side: int,
  follow_links: bool,
) -> list[ShardJob]:
  count = math.ceil(len(indices) / records_per_shard)
  jobs = []
  for i in range(count):
    chunk = indices[i * records_per_shard : (i + 1) * records_per_shard].tolist()
    items = tuple((tree.paths[j], int(tree.labels[j])) for j in chunk)
    jobs.append(
      shards.image_files_job(
        os.path.join(output_dir, records.shard_name(split, i, count)), options, input_dir, items, min_side, follow_links
      )
    )
  return jobs


def _check_classes(tree: image_tree.ClassTree, input_dir: str) -> None:
  """UserError when the images of `tree` are in fewer than two class folders: nothing to classify."""
  filled = np.unique(tree.labels)
  if len(filled) < 2:
    raise UserError(
      f"--input={input_dir}: images in one class folder only ({tree.classes[filled[0]]}), and "
      f"classification needs two or more (one folder of images per class); for images without labels, "
      f"add --unlabelled"
    )


def convert_folders(
  input_dir: str,
  output_dir: str,
  *,
  split: str = "train",
  resize_shorter: int = 0,
  verify: bool = False,
  num_workers: int | None = None,
  records_per_shard: int = shards.DEFAULT_RECORDS_PER_SHARD,
  holdout_per_class: int = 0,
  holdout_split_name: str = "validation",
  seed: int = 0,
  progress: bool | None = None,
  unlabelled: bool = False,
  holdout_examples: int = 0,
  task: cluster_task.Task | None = cluster_task.Task(),
  min_side: int = 0,
  follow_links: bool = False,
) -> dict:
  """Converts the class tree `input_dir` (with `unlabelled`: any folder of images, into image-only records:
  `convert_image_tree`) into shards in `output_dir`, `task`'s share of them (see `shards.convert_share`);
  returns the written dataset.json dict (with `min_side`, counting the images smaller), or the report of what
  other tasks still owe (the last task to finish writes dataset.json). Every task lists the whole class tree
  (one listing per folder, no file stat'ed): its shards mix all classes in one shuffled order, numbered out of
  the whole. A symbolic link in the tree is not followed, and its file counted under limits.LINK; with
  `follow_links`, only one that resolves outside `input_dir` (a file read from elsewhere, e.g. a private key,
  would land in the shards)."""
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  shards.check_common(output_dir, split, records_per_shard, resize_shorter, num_workers)
  if holdout_per_class and unlabelled or holdout_examples and not unlabelled:
    raise UserError(
      f"--holdout_per_class={holdout_per_class}, --holdout_examples={holdout_examples}: the first for "
      f"class folders, the second for --unlabelled images"
    )
  shards.check_holdout("--holdout_per_class", holdout_per_class, holdout_split_name, split)
  shards.check_holdout("--holdout_examples", holdout_examples, holdout_split_name, split)
  input_dir, output_dir = os.path.abspath(os.path.expanduser(input_dir)), os.path.expanduser(output_dir)
  options = image_options(resize_shorter, verify)
  if unlabelled:
    return convert_image_tree(
      input_dir,
      output_dir,
      split=split,
      options=options,
      num_workers=num_workers,
      records_per_shard=records_per_shard,
      holdout_examples=holdout_examples,
      holdout_split_name=holdout_split_name,
      seed=seed,
      progress=progress,
      task=task,
      min_side=min_side,
      follow_links=follow_links,
    )
  tree = image_tree.list_class_tree(input_dir, follow_links)
  _check_classes(tree, input_dir)
  order = np.random.default_rng(seed).permutation(len(tree.paths))
  splits = {split: order}
  if holdout_per_class:
    splits[split], splits[holdout_split_name] = image_tree.carve_holdout(tree.labels, order, holdout_per_class)
    if not len(splits[holdout_split_name]):
      raise UserError(f"--holdout_per_class={holdout_per_class}: no class of {input_dir} has more than one image")
  jobs = {
    name: _folder_jobs(tree, input_dir, output_dir, name, indices, records_per_shard, options, min_side, follow_links)
    for name, indices in splits.items()
  }
  shards.check_output(
    output_dir,
    "classification",
    tree.classes,
    {name: shards.shard_names(split_jobs) for name, split_jobs in jobs.items()},
  )
  all_jobs = [job for split_jobs in jobs.values() for job in split_jobs]
  mine = task.share(all_jobs) if task is not None else []  # --finalize writes no shard
  if mine:  # a task reads only its own shards' images: the first of them decodes, or nothing would
    image_tree.require_decodable(input_dir, (path for job in mine for path, _ in job.items), follow_links)
  conversion = shards.fingerprint("folders", *(job.fingerprint for job in all_jobs))
  all_counts = shards.convert_share(
    shards.shard_names(all_jobs), all_jobs.__getitem__, output_dir, conversion, num_workers, progress, task
  )
  if isinstance(all_counts, dict):
    return all_counts
  counts = iter(all_counts)
  entries = {}
  for name, split_jobs in jobs.items():
    entries[name] = shards.split_entry(
      shards.shard_names(split_jobs), [next(counts) for _ in split_jobs], input_dir, len(tree.classes), min_side
    )
  if holdout_per_class:
    entries[holdout_split_name]["holdout_per_class"] = holdout_per_class
  return records.write_metadata(output_dir, kind="classification", classes=tree.classes, splits=entries)
