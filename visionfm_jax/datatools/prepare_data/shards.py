"""What the formats share: a shard's job (`ShardJob`, whose examples its format's reader yields), its writing with
a sidecar of its counts (records, skipped per data/limits.py reason, class counts or uncaptioned, filtered, images
below a size), the resuming of shards already written, their writing on worker processes in a cluster
task's share (which touches no other task's shards: `TaskSummaries`), the checks of the output directory, and
dataset.json's split entries."""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from visionfm_jax import atomic
from visionfm_jax.data import limits
from visionfm_jax.data.sources import records, shard_index, wds
from visionfm_jax.datatools import cluster_task
from visionfm_jax.datatools.prepare_data.images import ImageOptions, header_side, prepare_image, read_image_file
from visionfm_jax.errors import UserError

DEFAULT_RECORDS_PER_SHARD = 1000
QUEUED_PER_WORKER = 4  # shards of a stream handed to each worker process ahead (write_stream)
TASKS_DIR = "tasks"  # the output folder of a cluster job's task summaries (`TaskSummaries`)
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class Example(NamedTuple):
  name: str  # for messages: the file, or tar:key
  image: bytes | None  # None: skipped, for the reason `refused`
  fields: dict  # the `records.pack_record` fields
  rejected: str = ""  # the score (wds.SCORES) it failed the filter on; '' when it passed
  refused: str = ""  # why it is left out (a data/limits.py reason); '' when it is not


def refused(name: str, reason: str) -> Example:
  """The Example of one left out for `reason` (a data/limits.py reason)."""
  return Example(name, None, {}, refused=reason)


@dataclasses.dataclass(frozen=True)
class ShardJob:
  """One output shard: what goes into it and how. Picklable, for the worker processes."""

  path: str
  fingerprint: str  # the inputs and options it is written from; a shard on disk counts only when they match
  options: ImageOptions
  read: Callable[[ShardJob], Iterator[Example]]  # its format's reader of its examples (module-level: picklable)
  root: str = ""  # folders: the class tree, and `items` (path under `root`, label)
  items: tuple = ()  # coco, visual_genome: pair_corpora.PairItems under `root`
  tar: str = ""  # webdataset: the input tar
  held: tuple = ()  # webdataset: keys of the tar held out (--holdout_examples), sorted
  only_held: bool = False  # webdataset: the holdout shard (only the `held` keys), else all but them
  score_filter: wds.ScoreFilter = wds.ScoreFilter()  # webdataset: LAION's scores a sample must pass
  captioned: bool = False  # webdataset, coco, visual_genome: counts its uncaptioned records, not its classes
  min_side: int = 0  # counts its images whose shorter side (as given) is below this; not part of the fingerprint
  follow_links: bool = False  # folders: follows the links that resolve inside `root` (else refuses every link)
  confine: str = ""  # caption_table, coco, visual_genome: the resolved folder its files must lie in (`confine_to`)


def read_image_files(job: ShardJob) -> Iterator[Example]:
  """The examples of a folders job: its image files `items` (path under `root`, label or None), none read from
  outside `root`; a symbolic link is refused (limits.LINK), or with `follow_links` only one that resolves outside
  `root`."""
  root = os.path.realpath(job.root)
  for relpath, label in job.items:
    path = os.path.join(job.root, relpath)
    data, reason = read_image_file(path, root, job.follow_links)
    yield refused(path, reason) if reason else Example(path, data, {"label": label, "key": relpath})


def image_files_job(
  path: str, options: ImageOptions, root: str, items: tuple, min_side: int = 0, follow_links: bool = False
) -> ShardJob:
  """The job of the shard `path` of the image files `items` (path under `root`, label or None); `follow_links`
  (--follow_links) is part of its fingerprint only when set, so shards written without it keep theirs."""
  parts = ("folders", options, root, items) + (("follow_links",) if follow_links else ())
  return ShardJob(
    path,
    fingerprint(*parts),
    options,
    read_image_files,
    root=root,
    items=items,
    min_side=min_side,
    follow_links=follow_links,
  )


def confine_to(base: str, root: str) -> str:
  """The resolved folder that the paths a file names (a table's rows, annotations) must lie in: `root` (--root)
  when given, else `base` (the input's folder); UserError when --root is no folder."""
  if root:
    base = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(base):
      raise UserError(f"--root={root}: no such directory (the folder the paths of --input may name)")
  return os.path.realpath(base)


def counts_text(skipped: dict) -> str:
  """{reason: n} -> '2 no_caption, 1 link'."""
  return ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "nothing listed"


def none_read(input_path: str, what: str, skipped_by: dict) -> UserError:
  """The error of a conversion that wrote no record: `what` ("its 12 pairs"), the reasons (`skipped_by`), and
  --root when the paths led outside the input's folder."""
  reasons = counts_text(skipped_by)
  hint = (
    "; a folder the paths lead into through a link needs --root=DIR naming a folder that holds it"
    if skipped_by.get(limits.OUTSIDE_ROOT)
    else ""
  )
  return UserError(f"--input={input_path}: none of {what} could be read ({reasons}){hint}")


def fingerprint(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------- shard writing


def read_finished(job: ShardJob) -> dict | None:
  """The counts of `job`'s shard when it is already written from the same inputs and options, else None."""
  return finished_counts(job.path, job.fingerprint)


def finished_counts(path: str, shard_fingerprint: str) -> dict | None:
  """The sidecar counts of the shard `path` when it is written from the inputs and options `shard_fingerprint`
  stands for and is still the file that write wrote (`written_as`: its bytes and postscript digest), else None: a
  shard truncated, or put in its place by another preparation, is written again, never kept as finished."""
  try:
    with open(records.sidecar_path(path), encoding="utf-8") as f:
      counts = json.load(f)
    on_disk = written_as(path)
  except (OSError, ValueError):
    return None
  if not isinstance(counts, dict) or counts.get("fingerprint") != shard_fingerprint:
    return None
  return counts if {key: counts.get(key) for key in on_disk} == on_disk else None


def written_as(path: str) -> dict:
  """What a sidecar records of the shard file `path` as written: {bytes, postscript (its digest)}, as its shard index
  row holds them (data/sources/shard_index.py)."""
  size, digest = shard_index.size_and_digest(path)
  return {"bytes": size, "postscript": shard_index.hex_digest(digest)}


def write_shard(job: ShardJob) -> dict:
  """Writes `job`'s shard (via `<shard>.<pid>.tmp`, a name no other writer shares; replacing an older shard), then
  its sidecar, which records the shard's bytes and digest (`written_as`): a shard without a sidecar, or whose file
  is not the one its sidecar records, is not finished (`finished_counts`). Returns the
  sidecar's counts {records, skipped, skipped_by ({data/limits.py reason: n}, the nonzero ones), class_counts (folders:
  {label: count}) or uncaptioned (webdataset: image-only records), filtered (with a score filter: {score: samples it
  rejected}), small_images (with a min_side: {min_side, count: the stored images whose shorter side as given is below
  it}), fingerprint, bytes and postscript (`written_as`)}."""
  # The shard first: without it, a stale sidecar counts for nothing.
  for stale in (job.path, records.sidecar_path(job.path), job.path + ".tmp"):
    if os.path.exists(stale):
      os.remove(stale)
  examples = job.read(job)
  class_counts = collections.Counter()
  incomplete = []
  skipped_by = collections.Counter()
  uncaptioned = 0
  filtered = collections.Counter()
  small = 0
  with records.RecordWriter(job.path, f"{job.path}.{os.getpid()}.tmp") as writer:
    for example in examples:
      if example.rejected:
        filtered[example.rejected] += 1
        continue
      image, reason, side = (
        (None, example.refused, 0) if example.refused else prepare_image(example.image, job.options, example.name)
      )
      if image is None:
        skipped_by[reason] += 1
        if reason == limits.NO_IMAGE:
          incomplete.append(example.name)
        continue
      writer.write(records.pack_record(image, **example.fields))
      if job.min_side and 0 < (side or header_side(example.image)) < job.min_side:
        small += 1
      if example.fields.get("label") is not None:
        class_counts[example.fields["label"]] += 1
      if job.captioned and not example.fields.get("caption"):
        uncaptioned += 1
    counts = {
      "records": writer.count,
      "skipped": sum(skipped_by.values()),
      "skipped_by": ordered_reasons(skipped_by),
      "fingerprint": job.fingerprint,
    }
    if job.captioned:
      counts["uncaptioned"] = uncaptioned
    else:
      counts["class_counts"] = {str(label): n for label, n in sorted(class_counts.items())}
    if job.score_filter:
      counts["filtered"] = {name: filtered[name] for name in job.score_filter.names}
    if job.min_side:
      counts["small_images"] = {"min_side": job.min_side, "count": small}
  counts.update(written_as(job.path))
  atomic.write_json(records.sidecar_path(job.path), counts)
  if incomplete:
    logging.warning("prepare_data: %d examples without an image skipped, e.g. %s", len(incomplete), incomplete[0])
  return counts


def ordered_reasons(counts: dict) -> dict[str, int]:
  """The nonzero counts of `counts` ({data/limits.py reason: n}) in limits.REASONS order."""
  return {reason: int(counts[reason]) for reason in limits.REASONS if counts.get(reason)}


def _write_numbered(numbered_job: tuple[int, ShardJob]) -> tuple[int, dict]:
  number, job = numbered_job
  return number, write_shard(job)


class Progress:
  """An in-place stderr line: shards done/total (done, when the total is not known ahead), records, records/s
  (of the shards written in this run)."""

  def __init__(self, total: int | None, done: int, enabled: bool):
    self.total, self.done, self.enabled = total, done, enabled
    self.records = 0
    self.start = time.monotonic()
    self._show()

  def add(self, counts: dict | None) -> None:
    """One more shard done: written now (its `counts`) or before (None)."""
    self.done += 1
    self.records += counts["records"] if counts else 0
    self._show()

  def _show(self) -> None:
    if self.enabled:
      rate = self.records / max(time.monotonic() - self.start, 1e-6)
      total = "" if self.total is None else f"/{self.total}"
      print(
        f"\rshards {self.done}{total}, {self.records} records written, {rate:.0f} records/s",
        end="",
        file=sys.stderr,
        flush=True,
      )

  def close(self) -> None:
    if self.enabled:
      print(file=sys.stderr, flush=True)


def run_jobs(jobs: Sequence[ShardJob], num_workers: int, progress: bool | None = None) -> list[dict]:
  """Writes the shards of `jobs` not finished yet, on `num_workers` processes (<= 1: here); the counts of every
  job (of those finished before, from their sidecars)."""
  results = [read_finished(job) for job in jobs]
  pending = [(i, job) for i, job in enumerate(jobs) if results[i] is None]
  if len(pending) < len(jobs):
    logging.info("prepare_data: %d of %d shards already written", len(jobs) - len(pending), len(jobs))
  meter = Progress(len(jobs), len(jobs) - len(pending), sys.stderr.isatty() if progress is None else progress)
  try:
    if num_workers <= 1 or len(pending) <= 1:
      _collect(map(_write_numbered, pending), results, meter)
    else:
      # spawn, not fork: the parent has imported JAX (via grain), which is multithreaded.
      with multiprocessing.get_context("spawn").Pool(min(num_workers, len(pending))) as pool:
        _collect(pool.imap_unordered(_write_numbered, pending), results, meter)
  finally:
    meter.close()
  return results


def _collect(finished, results: list, meter: Progress) -> None:
  for number, counts in finished:
    results[number] = counts
    meter.add(counts)


def write_stream(jobs: Iterable[ShardJob], num_workers: int, progress: bool | None = None) -> dict[str, dict]:
  """Writes the shards of a stream of jobs that are not finished yet, on `num_workers` processes (<= 1: here),
  each handed at most QUEUED_PER_WORKER of them ahead: the stream is never held whole. Returns {shard path: its
  counts} of every job."""
  meter = Progress(None, 0, sys.stderr.isatty() if progress is None else progress)
  done = {}
  try:
    if num_workers <= 1:
      for job in jobs:
        finished = read_finished(job)
        done[job.path] = finished or write_shard(job)
        meter.add(None if finished else done[job.path])
      return done
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:  # spawn: see run_jobs
      queued = collections.deque()
      for job in jobs:
        finished = read_finished(job)
        if finished is not None:
          done[job.path] = finished
          meter.add(None)
          continue
        queued.append((job.path, pool.apply_async(write_shard, (job,))))
        if len(queued) >= QUEUED_PER_WORKER * num_workers:
          _take_oldest(queued, done, meter)
      while queued:
        _take_oldest(queued, done, meter)
  finally:
    meter.close()
  return done


def _take_oldest(queued: collections.deque, done: dict, meter: Progress) -> None:
  path, result = queued.popleft()
  done[path] = result.get()
  meter.add(done[path])


# ------------------------------------------------------------------------------------ a cluster job's tasks


@dataclasses.dataclass(frozen=True)
class TaskSummaries:
  """What the `count` tasks of a cluster job leave for each other: each writes, once its share is done, one summary
  `<output_dir>/tasks/<index>-of-<count>.json` {conversion, share} holding what dataset.json needs of its shards;
  the task that then finds every summary (one listing, then `count` files) writes dataset.json. So no task reads
  another task's sidecars (a thousand tasks of a LAION conversion would read every one of 232,000 each). A summary
  of another `conversion` (the fingerprint of the whole conversion's inputs and options) counts as missing."""

  output_dir: str
  count: int
  conversion: str

  def _path(self, index: int) -> str:
    return os.path.join(self.output_dir, TASKS_DIR, f"{index:05d}-of-{self.count:05d}.json")

  def write(self, index: int, share) -> None:
    """Task `index`'s summary: `share` (JSON)."""
    os.makedirs(os.path.join(self.output_dir, TASKS_DIR), exist_ok=True)
    atomic.write_json(self._path(index), {"conversion": self.conversion, "share": share})

  def gather(self) -> tuple[list | None, int]:
    """(every task's share, in task order; 0) once all are written for this conversion, else (None, how many
    are missing)."""
    suffix = f"-of-{self.count:05d}.json"
    present = sum(name.endswith(suffix) for name in os.listdir(os.path.join(self.output_dir, TASKS_DIR)))
    if present < self.count:
      return None, self.count - present
    shares = [self._read(index) for index in range(self.count)]
    missing = sum(share is None for share in shares)
    return (None, missing) if missing else (shares, 0)

  def _read(self, index: int):
    try:
      with open(self._path(index), encoding="utf-8") as f:
        summary = json.load(f)
    except (OSError, ValueError):
      return None
    return summary.get("share") if isinstance(summary, dict) and summary.get("conversion") == self.conversion else None


def convert_share(
  names: Sequence[str],
  job_of: Callable[[int], ShardJob],
  output_dir: str,
  conversion: str,
  num_workers: int,
  progress: bool | None,
  task: cluster_task.Task | None,
) -> list[dict] | dict:
  """The counts of every shard of a conversion (`names`: their file names; `job_of(i)`: shard i's job, made only
  for the shards this task touches), or `unfinished_report`'s dict while other tasks still owe theirs. `task`
  writes its share (`cluster_task`) of the shards not finished yet, reading and stat'ing no other shard's files:
  the other tasks' counts come from their `TaskSummaries` for `conversion`. `task` None (--finalize) writes no
  shard and reads every shard's sidecar."""
  if task is None:
    counts = [read_finished(job_of(i)) for i in range(len(names))]
    missing = sum(c is None for c in counts)
    return unfinished_report(f"{missing} of {len(counts)} shards", task) if missing else counts
  mine = task.share(range(len(names)))
  counts = run_jobs([job_of(i) for i in mine], num_workers, progress)
  if task.count == 1:
    return counts
  summaries = TaskSummaries(output_dir, task.count, conversion)
  summaries.write(task.index, counts)
  shares, missing = summaries.gather()
  if shares is None:
    return unfinished_report(f"{missing} of {task.count} tasks' shares", task)
  every = [None] * len(names)
  for index, share in enumerate(shares):
    every[index :: task.count] = share
  return every


# ------------------------------------------------------------------------------------------------ checks


def check_split_name(split: str, flag: str = "--split") -> None:
  if not _SPLIT_NAME.match(split):
    raise UserError(
      f"{flag}={split!r}: use letters, digits and '_' only (the shards are '<split>-*', so a '-' "
      f"would let one split's glob match another's)"
    )


def check_output(output_dir: str, kind: str, classes: list[str] | None, expected: dict[str, list[str]]) -> None:
  """UserError when `output_dir` holds another data set: a dataset.json of another kind or classes, or shards of
  a split we write that this conversion would not write (another shard count), which its glob would mix in."""
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output={output_dir}: exists and is not a directory")
  metadata = records.read_metadata(output_dir) if os.path.isdir(output_dir) else None
  if metadata and (
    metadata.get("kind") != kind or (classes is not None and metadata.get("classes") not in (None, list(classes)))
  ):
    what = (
      f"kind {metadata.get('kind')!r}"
      if metadata.get("kind") != kind
      else f"{len(metadata.get('classes'))} other classes"
    )
    raise UserError(
      f"--output={output_dir}: its {records.METADATA_FILE} describes a different data set ({what}); "
      f"choose another directory"
    )
  for split, names in expected.items():
    refuse_foreign(output_dir, split, lambda name, names=frozenset(names): name not in names)


def refuse_foreign(output_dir: str, split: str, is_foreign: Callable[[str], bool]) -> None:
  """UserError when `output_dir` holds `split` shards that `is_foreign` says this conversion does not write."""
  present = (os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(output_dir), f"{split}-*.array_record")))
  foreign = sorted(name for name in present if is_foreign(name))
  if foreign:
    raise UserError(
      f"--output={output_dir}: holds {len(foreign)} {split!r} shards this conversion does not "
      f"write ({foreign[0]}, ...: another shard count?); remove them or choose another directory"
    )


def check_common(output_dir: str, split: str, records_per_shard: int, resize_shorter: int, num_workers: int):
  """UserError for a missing --output, a bad --split name, or a shard size, image size or worker count out of
  range."""
  if not output_dir:
    raise UserError("--output: required (the directory for the shards)")
  check_split_name(split)
  if records_per_shard < 1 or resize_shorter < 0 or num_workers < 0:
    raise UserError(
      f"--records_per_shard={records_per_shard}, --resize_shorter={resize_shorter}, --num_workers="
      f"{num_workers}: the shard size must be positive, the others >= 0"
    )


def check_holdout(flag: str, count: int, holdout_split_name: str, split: str) -> None:
  """UserError for a negative holdout `count` (`flag`'s) or, with one, a bad or the training split's name."""
  if count < 0:
    raise UserError(f"{flag}={count}: expected >= 0 (0: no holdout split)")
  if count:
    check_split_name(holdout_split_name, "--holdout_split")
    if holdout_split_name == split:
      raise UserError(f"--holdout_split={holdout_split_name!r}: must differ from --split")


# ------------------------------------------------------------------------------------------- dataset.json


def split_entry(
  shards: Sequence[str], counts: Sequence[dict], source: str, num_classes: int | None, min_side: int = 0
) -> dict:
  """dataset.json's entry of one split (`shards`: its file names): records, shards, kind (labelled, pairs or
  images), class_counts (labelled) or uncaptioned (webdataset), skipped, source, filtered (with a score filter),
  and with `min_side` small_images (`small_images`)."""
  entry = {"records": sum(c["records"] for c in counts), "shards": list(shards)}
  if counts and "uncaptioned" in counts[0]:
    entry["uncaptioned"] = sum(c["uncaptioned"] for c in counts)
    entry["kind"] = "images" if entry["uncaptioned"] == entry["records"] else "pairs"
  else:
    entry["kind"] = "labelled" if num_classes else "images"
  if num_classes:
    class_counts = [0] * num_classes
    for c in counts:
      for label, n in c["class_counts"].items():
        class_counts[int(label)] += n
    entry["class_counts"] = class_counts
  skipped_by = collections.Counter()
  for c in counts:
    skipped_by.update(c.get("skipped_by", {}))
  entry.update(skipped=sum(c["skipped"] for c in counts), skipped_by=ordered_reasons(skipped_by), source=source)
  if counts and "filtered" in counts[0]:
    entry["filtered"] = {reason: sum(c["filtered"][reason] for c in counts) for reason in counts[0]["filtered"]}
  if min_side:
    entry["small_images"] = small_images(counts, min_side)
  return entry


def small_images(counts: Sequence[dict], min_side: int) -> dict:
  """{min_side, count: the stored images whose shorter side (as given, before any shrinking) is below `min_side`},
  from the sidecars' counts; and unmeasured, the records of shards written without that count (before it, or with
  another --min_side: the option is not part of a shard's fingerprint), when there are any."""
  below = unmeasured = 0
  for c in counts:
    if c.get("small_images", {}).get("min_side") == min_side:
      below += c["small_images"]["count"]
    else:
      unmeasured += c["records"]
  return {"min_side": min_side, "count": below, **({"unmeasured": unmeasured} if unmeasured else {})}


def shard_names(jobs: Sequence[ShardJob]) -> list[str]:
  """The file names of the jobs' shards."""
  return [os.path.basename(j.path) for j in jobs]


def unfinished_report(what: str, task: cluster_task.Task | None) -> dict:
  """What a task reports while other tasks still owe `what` ("2 of 6 shards"): {'unfinished': what, 'task'};
  UserError for the final step (`task` None), which needs them all."""
  if task is None:
    raise UserError(
      f"--finalize: {what} are not written yet; run the tasks that write them (or rerun without --finalize) first"
    )
  return {"unfinished": what, "task": str(task)}
