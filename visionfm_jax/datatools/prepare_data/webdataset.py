"""--format=webdataset: img2dataset tars into one shard each of pair records (image-only without a caption), kept
by LAION's scores (`wds.ScoreFilter`), --holdout_examples drawn from the first tars of a shuffled order into a
second split."""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import stat
import tarfile
from typing import Iterator, Sequence

import numpy as np

from visionfm_jax.data import limits
from visionfm_jax.data.sources import records, wds
from visionfm_jax.datatools import cluster_task
from visionfm_jax.datatools.prepare_data import shards
from visionfm_jax.datatools.prepare_data.images import ImageOptions, image_options
from visionfm_jax.datatools.prepare_data.shards import Example, ShardJob, refused
from visionfm_jax.errors import DataError, UserError


def read_tar(job: ShardJob) -> Iterator[Example]:
  """The examples of a webdataset job: those of its tar (its held-out ones, or all but them), or DataError
  naming the tar when it cannot be read."""
  try:
    with tarfile.open(job.tar) as archive:
      yield from _archive_examples(archive, job.tar, frozenset(job.held), job.only_held, job.score_filter)
  except tarfile.TarError as e:  # not a tar, or a truncated one
    raise _unreadable(job.tar, e) from e
  except OSError as e:
    raise DataError(f"cannot read {job.tar}: {e.strerror or e}") from e


def _unreadable(path: str, error: tarfile.TarError) -> DataError:
  """The DataError of a file that is not a tar, or a truncated one."""
  return DataError(f"{path}: unreadable tar file ({str(error).splitlines()[0].rstrip(':')})")


def _archive_examples(
  archive: tarfile.TarFile,
  tar_name: str,
  held: frozenset = frozenset(),
  only_held: bool = False,
  score_filter: wds.ScoreFilter = wds.ScoreFilter(),
) -> Iterator[Example]:
  samples, refused_by = wds.tar_listing(archive)
  if not only_held:  # counted once, with the tar's main shard
    for reason, n in refused_by.items():
      yield from (refused(f"{tar_name} ({reason})", reason) for _ in range(n))
  for key, members in samples.items():
    if (key in held) != only_held:
      continue
    image = wds.image_member(members)
    name = f"{tar_name}:{key}"
    if image is None:
      yield refused(name, limits.NO_IMAGE)
      continue
    caption = _read_text(archive, members["txt"]).strip() if "txt" in members else ""
    meta = _read_text(archive, members["json"]) if "json" in members else None
    if score_filter:
      reason = int(score_filter.reasons(wds.scores_of(meta))[0])
      if reason >= 0:
        yield Example(name, None, {}, rejected=wds.SCORES[reason])
        continue
    yield Example(name, archive.extractfile(image).read(), {"caption": caption or None, "key": key, "meta": meta})


def tar_keys(path: str) -> list[str]:
  """The keys of the examples with an image in the tar `path`, in archive order (reads its headers only)."""
  try:
    with tarfile.open(path) as archive:
      return [key for key, members in wds.tar_listing(archive)[0].items() if wds.image_member(members) is not None]
  except tarfile.TarError as e:
    raise _unreadable(path, e) from e


def _read_text(archive: tarfile.TarFile, member: tarfile.TarInfo) -> str:
  return archive.extractfile(member).read().decode("utf-8", errors="replace")


def choose_holdout(tars: Sequence[str], count: int, seed: int) -> dict[str, list[str]]:
  """{tar: its held-out keys, sorted}: `count` examples (with an image) drawn by `seed` from the first tars of a
  `seed`-shuffled order of `tars` that hold `count` of them (only those tars are listed); UserError when all
  of them together hold no more than `count`."""
  rng = np.random.default_rng(seed)
  pool, listed = [], 0
  for index in rng.permutation(len(tars)).tolist():
    pool += [(tars[index], key) for key in tar_keys(tars[index])]
    listed += 1
    if len(pool) >= count:
      break
  if len(pool) < count or (listed == len(tars) and len(pool) == count):  # (none left to train on)
    raise UserError(f"--holdout_examples={count}: the tars hold only {len(pool)} examples with an image")
  held = collections.defaultdict(list)
  for position in sorted(rng.choice(len(pool), count, replace=False).tolist()):
    tar, key = pool[position]
    held[tar].append(key)
  return {tar: sorted(keys) for tar, keys in held.items()}


def _tar_size(tar: str) -> int:
  """The size of the input `tar` (a fingerprint's part); UserError when it is not a file."""
  try:
    status = os.stat(tar)
  except OSError as e:
    raise UserError(f"--input: cannot read {tar} ({e.strerror or e})") from e
  if not stat.S_ISREG(status.st_mode):
    raise UserError(f"--input: {tar} is not a file (expected a glob of .tar files)")
  return status.st_size


@dataclasses.dataclass(frozen=True)
class TarShard:
  """One output shard of a tar, before its job is made (which stats the tar: only a task's own shards are)."""

  split: str
  number: int
  count: int
  tar: str
  held: tuple = ()  # the tar's held-out keys
  only_held: bool = False  # the holdout split's shard (only the `held` keys), else all but them

  @property
  def name(self) -> str:
    return records.shard_name(self.split, self.number, self.count)

  def job(self, output_dir: str, options: ImageOptions, score_filter: wds.ScoreFilter, min_side: int) -> ShardJob:
    return ShardJob(
      os.path.join(output_dir, self.name),
      shards.fingerprint(
        "webdataset",
        options,
        self.tar,
        _tar_size(self.tar),
        *([list(self.held), self.only_held] if self.held else []),
        *([score_filter] if score_filter else []),
      ),
      options,
      read_tar,
      tar=self.tar,
      held=self.held,
      only_held=self.only_held,
      score_filter=score_filter,
      captioned=True,
      min_side=min_side,
    )


def tar_shards(
  tars: Sequence[str], split: str, held: dict[str, list[str]], holdout_split_name: str
) -> dict[str, list[TarShard]]:
  """{split: its shards}: one per tar, without its `held` keys; with `held`, the holdout split's shards of the tars
  that hold them."""
  plan = {split: [TarShard(split, i, len(tars), tar, tuple(held.get(tar, ()))) for i, tar in enumerate(tars)]}
  if held:
    holdout_tars = [tar for tar in tars if tar in held]
    plan[holdout_split_name] = [
      TarShard(holdout_split_name, i, len(holdout_tars), tar, tuple(held[tar]), True)
      for i, tar in enumerate(holdout_tars)
    ]
  return plan


def convert_webdataset(
  pattern: str,
  output_dir: str,
  *,
  split: str = "train",
  resize_shorter: int = 0,
  verify: bool = False,
  num_workers: int | None = None,
  progress: bool | None = None,
  holdout_examples: int = 0,
  holdout_split_name: str = "validation",
  seed: int = 0,
  task: cluster_task.Task | None = cluster_task.Task(),
  score_filter: wds.ScoreFilter = wds.ScoreFilter(),
  min_side: int = 0,
) -> dict:
  """Converts the img2dataset tars matching `pattern`, one shard each, into `output_dir` (with
  `holdout_examples`, also `holdout_split_name`: see `choose_holdout`), `task`'s share of them (see
  `shards.convert_share`: only its own tars are stat'ed and read), keeping the samples that pass `score_filter`;
  returns the written dataset.json dict (with `min_side`, counting the images smaller), or the report of what
  other tasks still owe (the last task to finish writes dataset.json)."""
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  shards.check_common(output_dir, split, 1, resize_shorter, num_workers)
  shards.check_holdout("--holdout_examples", holdout_examples, holdout_split_name, split)
  pattern, output_dir = os.path.abspath(os.path.expanduser(pattern)), os.path.expanduser(output_dir)
  tars = sorted(glob.glob(pattern, recursive=True))  # names only: a task stats its own share
  if not tars:
    raise UserError(f"--input={pattern}: no files match (expected a glob of .tar shards)")
  options = image_options(resize_shorter, verify)
  held = choose_holdout(tars, holdout_examples, seed) if holdout_examples else {}
  plan = tar_shards(tars, split, held, holdout_split_name)
  shards.check_output(output_dir, "pairs", None, {name: [s.name for s in planned] for name, planned in plan.items()})
  every = [shard for planned in plan.values() for shard in planned]
  conversion = shards.fingerprint("webdataset", options, tars, held, score_filter, list(plan))
  all_counts = shards.convert_share(
    [s.name for s in every],
    lambda i: every[i].job(output_dir, options, score_filter, min_side),
    output_dir,
    conversion,
    num_workers,
    progress,
    task,
  )
  if isinstance(all_counts, dict):
    return all_counts
  counts = iter(all_counts)
  entries = {
    name: shards.split_entry([s.name for s in planned], [next(counts) for _ in planned], pattern, None, min_side)
    for name, planned in plan.items()
  }
  if held:
    entries[holdout_split_name]["holdout_examples"] = holdout_examples
  return records.write_metadata(output_dir, kind="pairs", splits=entries)
