"""--format=folders --unlabelled: a tree of images without labels (Aurora's 500M images) into image-only shards,
never listed whole: each top-level folder walked on its own into shards of its own, with its list of shards
written when its walk ends (`ImageTreeLayout`), and --holdout_examples drawn from a few folders ahead."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
from typing import Iterator

from visionfm_jax import atomic
from visionfm_jax.data.sources import records
from visionfm_jax.datatools import cluster_task
from visionfm_jax.datatools.prepare_data import image_tree, shards
from visionfm_jax.datatools.prepare_data.images import ImageOptions
from visionfm_jax.datatools.prepare_data.shards import ShardJob


@dataclasses.dataclass(frozen=True)
class ImageTreeLayout:
  """Where the images of an unlabelled tree go. Folder i of `folders` (image_tree.top_level_folders), walked in
  sorted path order without the `held` images, fills the shards `<split>-<i>-<n>` of `records_per_shard` images
  each (numbered 00000, 00001, ... within the folder); its list of shards, written when its walk ends, is
  `<split>-folders/<i>.json`. The `held` images (--holdout_examples, sorted) fill `<holdout_split>-*-of-*`."""

  input_dir: str
  output_dir: str
  split: str
  folders: tuple[str, ...]
  records_per_shard: int
  options: ImageOptions
  held: tuple[str, ...] = ()
  holdout_split: str = ""
  min_side: int = 0  # the shards count their images below it (not part of any fingerprint)
  follow_links: bool = False  # --follow_links: links that resolve inside `input_dir` are followed (shards.ShardJob)

  @functools.cached_property
  def _held_set(self) -> frozenset:
    return frozenset(self.held)

  @functools.cached_property
  def _held_fingerprint(self) -> str:
    return shards.fingerprint(*self.held)

  @functools.cached_property
  def fingerprint(self) -> str:
    """The whole conversion's (what its cluster tasks' summaries are checked against)."""
    return shards.fingerprint(
      "image tree",
      self.options,
      self.input_dir,
      self.folders,
      self.split,
      self.records_per_shard,
      self._held_fingerprint,
      self.holdout_split,
      *(("follow_links",) if self.follow_links else ()),
    )

  def shard_jobs(self, index: int) -> Iterator[ShardJob]:
    """Folder `index`'s shards, as its walk reaches them."""
    paths = (p for p in image_tree.folder_images(self.input_dir, self.folders[index]) if p not in self._held_set)
    for number in itertools.count():
      items = tuple((path, None) for path in itertools.islice(paths, self.records_per_shard))
      if not items:
        return
      yield self._job(f"{self.split}-{index:05d}-{number:05d}.array_record", items)

  def holdout_jobs(self) -> list[ShardJob]:
    count = math.ceil(len(self.held) / self.records_per_shard)
    return [
      self._job(
        records.shard_name(self.holdout_split, i, count),
        tuple((path, None) for path in self.held[i * self.records_per_shard : (i + 1) * self.records_per_shard]),
      )
      for i in range(count)
    ]

  def _job(self, name: str, items: tuple) -> ShardJob:
    return shards.image_files_job(
      os.path.join(self.output_dir, name), self.options, self.input_dir, items, self.min_side, self.follow_links
    )

  def is_train_shard(self, name: str) -> bool:
    """Whether `name` is a shard name this layout can write for `split` (another folder count's is not)."""
    match = re.fullmatch(rf"{re.escape(self.split)}-(\d{{5,}})-\d{{5,}}\.array_record", name)
    return bool(match) and int(match.group(1)) < len(self.folders)

  def _folder_fingerprint(self, index: int) -> str:
    return shards.fingerprint(
      "image folder",
      self.options,
      self.input_dir,
      self.folders[index],
      self.split,
      self.records_per_shard,
      self._held_fingerprint,
    )

  def _list_path(self, index: int) -> str:
    return os.path.join(self.output_dir, f"{self.split}-folders", f"{index:05d}.json")

  def write_folder_list(self, index: int, folder_shards: list[tuple[str, str]]) -> None:
    """Records folder `index`'s shards `folder_shards` [(name, fingerprint)], kept when it says so already."""
    listed = {
      "folder": self.folders[index],
      "fingerprint": self._folder_fingerprint(index),
      "shards": [list(shard) for shard in folder_shards],
    }
    if self.read_folder_list(index) != folder_shards:
      os.makedirs(os.path.dirname(self._list_path(index)), exist_ok=True)
      atomic.write_json(self._list_path(index), listed)

  def read_folder_list(self, index: int) -> list[tuple[str, str]] | None:
    """Folder `index`'s shards [(name, fingerprint)] as its walk under this layout listed them; None before."""
    try:
      with open(self._list_path(index), encoding="utf-8") as f:
        listed = json.load(f)
    except (OSError, ValueError):
      return None
    if not isinstance(listed, dict) or listed.get("fingerprint") != self._folder_fingerprint(index):
      return None
    return [tuple(shard) for shard in listed["shards"]]


def convert_image_tree(
  input_dir: str,
  output_dir: str,
  *,
  split: str,
  options: ImageOptions,
  num_workers: int,
  records_per_shard: int,
  holdout_examples: int,
  holdout_split_name: str,
  seed: int,
  progress: bool | None,
  task: cluster_task.Task | None,
  min_side: int = 0,
  follow_links: bool = False,
) -> dict:
  """convert_folders' `unlabelled` conversion (`ImageTreeLayout`), never holding the tree's list: `task` converts
  the folders task.share(folders) and its share of the held-out shards, walking only those folders (and the
  few that `image_tree.sample_holdout` lists ahead) and reading no other task's lists or sidecars; then, once every
  task's summary (`shards.TaskSummaries`: its folders' lists of shards and their counts) is written, the task
  writes dataset.json (with `min_side`, counting the images smaller), else it returns the report of what other
  tasks still owe. `task` None (--finalize) writes no shard: dataset.json from every folder's list and sidecar."""
  folders = tuple(image_tree.top_level_folders(input_dir))
  held = image_tree.sample_holdout(input_dir, folders, holdout_examples, seed) if holdout_examples else []
  layout = ImageTreeLayout(
    input_dir,
    output_dir,
    split,
    folders,
    records_per_shard,
    options,
    tuple(held),
    holdout_split_name if held else "",
    min_side,
    follow_links,
  )
  shards.check_output(output_dir, "images", None, {})
  expected_holdout = shards.shard_names(layout.holdout_jobs())
  shards.refuse_foreign(output_dir, split, lambda name: not layout.is_train_shard(name))
  if held:
    shards.refuse_foreign(output_dir, holdout_split_name, lambda name: name not in expected_holdout)
  if task is None:
    return _finalize_image_tree(layout, holdout_examples, min_side)
  if task.count == 1:  # a task of a job array walks its own folders only; the last one counts what all wrote
    image_tree.require_decodable(
      input_dir,
      itertools.chain.from_iterable(image_tree.folder_images(input_dir, folder) for folder in folders),
      follow_links,
    )
  listed = {}
  written = shards.write_stream(_image_tree_jobs(layout, task, listed), num_workers, progress)
  counts = {os.path.basename(path): c for path, c in written.items()}
  if task.count > 1:
    summaries = shards.TaskSummaries(output_dir, task.count, layout.fingerprint)
    summaries.write(task.index, {"folders": {str(i): shard_list for i, shard_list in listed.items()}, "counts": counts})
    shares, missing = summaries.gather()
    if shares is None:
      return shards.unfinished_report(f"{missing} of {task.count} tasks' shares", task)
    listed = {
      int(i): [tuple(shard) for shard in shard_list] for share in shares for i, shard_list in share["folders"].items()
    }
    counts = {name: c for share in shares for name, c in share["counts"].items()}
  return _write_image_tree_metadata(
    layout, [listed[i] for i in range(len(folders))], counts, holdout_examples, min_side
  )


def _image_tree_jobs(layout: ImageTreeLayout, task: cluster_task.Task, listed: dict) -> Iterator[ShardJob]:
  """`task`'s shards: those of its folders, each folder's list written (and added to `listed`: {folder index:
  [(name, fingerprint)]}) when its walk ends, then its held-out ones."""
  for index in task.share(range(len(layout.folders))):
    folder_shards = []
    for job in layout.shard_jobs(index):
      folder_shards.append((os.path.basename(job.path), job.fingerprint))
      yield job
    layout.write_folder_list(index, folder_shards)
    listed[index] = folder_shards
  yield from task.share(layout.holdout_jobs())


def _finalize_image_tree(layout: ImageTreeLayout, holdout_examples: int, min_side: int) -> dict:
  """--finalize: dataset.json from every folder's list and every shard's sidecar; UserError while some are
  missing."""
  lists = [layout.read_folder_list(i) for i in range(len(layout.folders))]
  missing = sum(listed is None for listed in lists)
  if missing:
    return shards.unfinished_report(f"{missing} of {len(lists)} folders", None)
  named = [shard for listed in lists for shard in listed]
  named += [(os.path.basename(j.path), j.fingerprint) for j in layout.holdout_jobs()]
  counts = {name: shards.finished_counts(os.path.join(layout.output_dir, name), fp) for name, fp in named}
  missing = sum(c is None for c in counts.values())
  if missing:
    return shards.unfinished_report(f"{missing} of {len(counts)} shards", None)
  return _write_image_tree_metadata(layout, lists, counts, holdout_examples, min_side)


def _write_image_tree_metadata(
  layout: ImageTreeLayout, lists: list, counts: dict, holdout_examples: int, min_side: int
) -> dict:
  """dataset.json from every folder's list of shards `lists` and every shard's `counts` ({name: sidecar
  counts})."""
  listed_shards = {layout.split: [name for listed in lists for name, _ in listed]}
  if layout.held:
    listed_shards[layout.holdout_split] = shards.shard_names(layout.holdout_jobs())
  if not listed_shards[layout.split]:
    raise image_tree.no_images(layout.input_dir)
  shards.check_output(layout.output_dir, "images", None, listed_shards)
  entries = {
    split: shards.split_entry(names, [counts[name] for name in names], layout.input_dir, None, min_side)
    for split, names in listed_shards.items()
  }
  if not any(entry["records"] for entry in entries.values()):
    read = sum(entry["skipped"] for entry in entries.values())
    raise shards.none_read(layout.input_dir, f"its {read} image files", entries[layout.split]["skipped_by"])
  if layout.held:
    entries[layout.holdout_split]["holdout_examples"] = holdout_examples
  return records.write_metadata(layout.output_dir, kind="images", splits=entries)
