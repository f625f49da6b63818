r"""Converts an image-folder tree or img2dataset WebDataset tars into the ArrayRecord shards of `data.records`.

  python -m visionfm_jax.tools.prepare_data --format=folders|webdataset|coco|visual_genome --input=... \
      --output=DIR [--split=train] [--resize_shorter=N] [--verify] [--num_workers=P] [--records_per_shard=1000]
      [--unlabelled] [--holdout_per_class=K | --holdout_examples=N] [--holdout_split=validation] [--seed=0]
      [--coco_folder=train2017] [--vg_regions=crop|image] [--min_region_size=64] [--exclude_karpathy=JSON]
      [--progress] [--task_index=I --task_count=N | --finalize]
      [--min_similarity=S] [--max_pwatermark=W] [--max_punsafe=U | --selection=FILE]

--format=folders: --input is a classification tree, one folder per class (ImageNet's `n01440764/*.JPEG`);
image files (jpg jpeg png webp bmp, any case) anywhere below a class folder, other files ignored. Labels follow
the sorted folder names. The files, listed in sorted order, are shuffled by --seed (shards mix classes) and cut
into shards of --records_per_shard records {image, label, key: the path under --input}.
--holdout_per_class=K moves K files per class (chosen by --seed; a class keeps at least one training file)
into a second split, --holdout_split.
With --unlabelled, --input is a folder (or tree) of images without labels: every image file below it becomes an
image-only record {image, key}. Such a tree (Aurora's 500M images) is never listed whole: each top-level folder
(and the input's own files, as one more) is walked on its own, one directory at a time, in sorted path order, and
cut into shards `<split>-<folder number>-<n>` of --records_per_shard images, with the folder's list of shards in
`<split>-folders/` (tools/image_tree.py); --holdout_examples=N moves N images to --holdout_split, drawn by --seed
from the first 10 N images of the folders taken in a --seed-shuffled order.

--format=webdataset: --input is a glob of tars written by img2dataset: members `<key>.jpg|jpeg|png|webp`,
`<key>.txt` (the caption) and `<key>.json` (metadata, kept verbatim). One output shard per tar, records
{image, caption, key, meta}; an example without a caption (no or an empty .txt) becomes an image-only record
{image, key, meta}, one without an image is skipped and counted. --holdout_examples=N moves N examples to
--holdout_split (one shard per tar they come from): drawn by --seed from the first tars of a --seed-shuffled
order that hold N examples (only those are listed ahead), e.g. a validation split of pairs.
--min_similarity, --max_pwatermark, --max_punsafe keep only the samples whose .json has LAION's `similarity`
(the CLIP ViT-B/32 image-text cosine) at least S, `pwatermark` at most W, `punsafe` at most U (a sample
without a score a condition needs fails it: `data.wds.ScoreFilter`); the rejected ones are counted per score
(the first condition they fail) under 'filtered' in each sidecar and in dataset.json. --selection=FILE takes the
three from the JSON `index_tars --keep=K --selection_out=FILE` wrote (the thresholds that keep K samples).

--format=coco and --format=visual_genome: --input is the data set's root in its released layout (COCO:
annotations/captions_<--coco_folder>.json and <--coco_folder>/; Visual Genome: region_descriptions.json,
image_data.json, VG_100K/ and VG_100K_2/). Every caption (COCO's five per image) or region phrase becomes one
pair record {image, caption, key}; Visual Genome's image is the phrase's region cropped (--vg_regions=crop,
regions under --min_region_size px left out) or the whole image (--vg_regions=image); see data/pair_corpora.py
for why. --exclude_karpathy=dataset_coco.json leaves out the images of Karpathy's val and test splits (Visual
Genome's by their coco_id), so that COCO 5k retrieval is not evaluated on training images. Shards of
--records_per_shard pairs in listing order; dataset.json's split entry adds the listing's counts (images,
excluded_images, missing_images, and for Visual Genome small_regions, empty_phrases).

dataset.json says per split which kind its records are: 'labelled' (folders), 'pairs' (captions; with the
count of 'uncaptioned' records among them) or 'images' (image-only).

Images pass through as stored. --verify decodes each one and drops (counts, names) the undecodable ones;
--resize_shorter=N (implies --verify) shrinks images whose shorter side exceeds N to N and stores them as
JPEG quality 95 (turned upright first, as their EXIF orientation says). Samples past data/limits.py's limits
(decompression bombs, oversized files and captions, tar links, FIFOs and absolute or '..' member names) are
left out and counted per reason: `skipped_by` in each sidecar and split of dataset.json, and the summary line. Shards are written in parallel by --num_workers processes (0 or 1: in this process), as
`DIR/<split>-NNNNN-of-NNNNN.array_record`, each with a small `<shard>.json` of its counts, and
`DIR/dataset.json` describes the data set (`records.write_metadata`); train with
`--config.data.source='arrayrecord:DIR/{split}-*.array_record'`.

Rerunning resumes: a shard whose file and `.json` exist and were written from the same inputs and options is
kept. Prints one summary line; errors print one line naming the culprit and exit with status 2.

Across a cluster: `--task_index=I --task_count=N` (default: from a SLURM job array, `tools.cluster_task`)
writes only the shards I, I + N, I + 2N, ... of the full list (--unlabelled: those of the top-level folders
I, I + N, ..., the only ones it walks, and of the held-out shards), under the same names a single run writes,
so the tasks' shard sets are disjoint and a task run twice resumes its own share and touches no other task's
files. After its shards, a task reads every sidecar (--unlabelled: every folder's list first); the one that
finds them all written (the last to finish) writes dataset.json, the others report what other tasks still
owe. `--finalize` writes no shard, only dataset.json from the sidecars (an error while some are missing).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import stat
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from absl import flags
from PIL import Image

from visionfm_jax import atomic
from visionfm_jax.data import limits, pair_corpora, records, transforms, wds
from visionfm_jax.errors import DataError, UserError
from visionfm_jax.tools import cli, cluster_task, image_tree

FORMATS = ("folders", "webdataset", "coco", "visual_genome")
PAIR_FORMATS = ("coco", "visual_genome")  # captioned data sets in their released layouts (data/pair_corpora.py)
DEFAULT_RECORDS_PER_SHARD = 1000
QUEUED_PER_WORKER = 4  # shards of a stream handed to each worker process ahead (write_stream)
RESIZE_REDUCING_GAP = 3.0  # box-reduce first, then Lanczos: per Pillow, near-identical to plain Lanczos, faster
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  resize_shorter: int = 0  # 0: keep the size
  verify: bool = False  # decode and drop undecodable images (always, when resizing: see `image_options`)


def image_options(resize_shorter: int, verify: bool) -> ImageOptions:
  return ImageOptions(resize_shorter, verify or resize_shorter > 0)


@dataclasses.dataclass(frozen=True)
class ShardJob:
  """One output shard: what goes into it and how. Picklable, for the worker processes."""
  path: str
  fingerprint: str  # the inputs and options it is written from; a shard on disk counts only when they match
  options: ImageOptions
  root: str = ""  # folders: the class tree, and `items` (path under `root`, label)
  items: tuple = ()
  tar: str = ""  # webdataset: the input tar
  held: tuple = ()  # webdataset: keys of the tar held out (--holdout_examples), sorted
  only_held: bool = False  # webdataset: the holdout shard (only the `held` keys), else all but them
  score_filter: wds.ScoreFilter = wds.ScoreFilter()  # webdataset: LAION's scores a sample must pass
  pairs: bool = False  # coco, visual_genome: `items` are pair_corpora.PairItems under `root`

  @property
  def captioned(self) -> bool:
    return bool(self.tar) or self.pairs


class Example(NamedTuple):
  name: str  # for messages: the file, or tar:key
  image: bytes | None  # None: skipped, for the reason `refused`
  fields: dict  # the `records.pack_record` fields
  rejected: str = ""  # the score (wds.SCORES) it failed the filter on; '' when it passed
  refused: str = ""  # why it is left out (a data/limits.py reason); '' when it is not


def _refused(name: str, reason: str) -> Example:
  return Example(name, None, {}, refused=reason)


# ---------------------------------------------------------------------------------------------------- images

def shrink_to_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """`image` with its shorter side scaled down to `size`; as it is when that side is `size` or less."""
  width, height = image.size
  scale = size / min(width, height)
  if scale >= 1:
    return image
  new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
  return image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=RESIZE_REDUCING_GAP)


def prepare_image(data: bytes, options: ImageOptions, name: str) -> tuple[bytes | None, str]:
  """(the bytes to store for one image, ''), or (None, the data/limits.py reason) with a warning naming `name`
  when it must be dropped."""
  if not options.verify:
    return data, ""
  try:
    pixels = transforms.decode_image(data)
  except transforms.DECODE_ERRORS as e:
    logging.warning("prepare_data: skipping %s: undecodable image: %s", name, e)
    return None, transforms.failure_reason(e)
  if options.resize_shorter and min(pixels.shape[:2]) > options.resize_shorter:
    resized = shrink_to_shorter_side(Image.fromarray(pixels), options.resize_shorter)
    return records.encode_jpeg(np.asarray(resized)), ""
  return data, ""  # small enough: the original bytes (and EXIF orientation), no second lossy encoding


# ------------------------------------------------------------------------------------------- shard writing

def read_finished(job: ShardJob) -> dict | None:
  """The counts of `job`'s shard when it is already written from the same inputs and options, else None."""
  return finished_counts(job.path, job.fingerprint)


def finished_counts(path: str, shard_fingerprint: str) -> dict | None:
  """The sidecar counts of the shard `path` when it is written from the inputs and options `shard_fingerprint`
  stands for, else None."""
  if not os.path.exists(path):
    return None
  try:
    with open(records.sidecar_path(path), encoding="utf-8") as f:
      counts = json.load(f)
  except (OSError, ValueError):
    return None
  return counts if isinstance(counts, dict) and counts.get("fingerprint") == shard_fingerprint else None


def _folder_examples(job: ShardJob) -> Iterator[Example]:
  for relpath, label in job.items:
    path = os.path.join(job.root, relpath)
    data, reason = _read_image_file(path)
    yield _refused(path, reason) if reason else Example(path, data, {"label": label, "key": relpath})


def _pair_examples(job: ShardJob) -> Iterator[Example]:
  """The job's pairs: the image file as stored, or (with a box) its region cropped and encoded once (shrunk first
  to --resize_shorter); each file read, and decoded, once for its consecutive pairs."""
  current = data = pixels = None
  decoded, why = False, ""
  for item in job.items:
    if item.path != current:
      current, decoded = item.path, False
      data, reason = _read_image_file(os.path.join(job.root, item.path))
    name, fields = f"{os.path.join(job.root, item.path)}#{item.key}", {"caption": item.caption, "key": item.key}
    if data is None:
      yield _refused(name, reason)
      continue
    if item.box is None:
      yield Example(name, data, fields)
      continue
    if not decoded:
      (pixels, why), decoded = _decode_or_warn(data, current), True
    crop = None if pixels is None else pair_corpora.crop_box(pixels, item.box)
    if crop is None or not crop.size:
      yield _refused(name, why or limits.NO_IMAGE)
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


def _read_image_file(path: str) -> tuple[bytes | None, str]:
  """(the bytes of the image file `path`, ''), or (None, the data/limits.py reason) for a device, a FIFO or a file
  over limits.MAX_IMAGE_BYTES (a link is followed); DataError when it cannot be read."""
  try:
    # Non-blocking: opening a FIFO for reading would wait for a writer.
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0) as f:
      status = os.fstat(f.fileno())
      if not stat.S_ISREG(status.st_mode):
        logging.warning("prepare_data: skipping %s: not a regular file", path)
        return None, limits.NOT_A_FILE
      if status.st_size > limits.MAX_IMAGE_BYTES:
        logging.warning("prepare_data: skipping %s: %d bytes, over limits.MAX_IMAGE_BYTES", path, status.st_size)
        return None, limits.TOO_LARGE
      return f.read(), ""
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def _tar_examples(job: ShardJob) -> Iterator[Example]:
  try:
    with tarfile.open(job.tar) as archive:
      yield from _archive_examples(archive, job.tar, frozenset(job.held), job.only_held, job.score_filter)
  except tarfile.TarError as e:  # not a tar, or a truncated one
    raise DataError(f"{job.tar}: unreadable tar file ({str(e).splitlines()[0].rstrip(':')})") from e
  except OSError as e:
    raise DataError(f"cannot read {job.tar}: {e.strerror or e}") from e


def _archive_examples(archive: tarfile.TarFile, tar_name: str, held: frozenset = frozenset(),
                      only_held: bool = False, score_filter: wds.ScoreFilter = wds.ScoreFilter()
                      ) -> Iterator[Example]:
  samples, refused = wds.tar_listing(archive)
  if not only_held:  # counted once, with the tar's main shard
    for reason, n in refused.items():
      yield from (_refused(f"{tar_name} ({reason})", reason) for _ in range(n))
  for key, members in samples.items():
    if (key in held) != only_held:
      continue
    image = wds.image_member(members)
    name = f"{tar_name}:{key}"
    if image is None:
      yield _refused(name, limits.NO_IMAGE)
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
    raise DataError(f"{path}: unreadable tar file ({str(e).splitlines()[0].rstrip(':')})") from e


def _read_text(archive: tarfile.TarFile, member: tarfile.TarInfo) -> str:
  return archive.extractfile(member).read().decode("utf-8", errors="replace")


def write_shard(job: ShardJob) -> dict:
  """Writes `job`'s shard (via `.tmp`, replacing an older one) and its sidecar, before the shard's rename: a
  finished shard always has the sidecar of its own write. Returns the sidecar's counts {records, skipped,
  skipped_by ({data/limits.py reason: n}, the nonzero ones), class_counts (folders: {label: count}) or uncaptioned
  (webdataset: image-only records), filtered (with a score filter: {score: samples it rejected}), fingerprint}."""
  # The shard first: without it, a stale sidecar counts for nothing.
  for stale in (job.path, records.sidecar_path(job.path)):
    if os.path.exists(stale):
      os.remove(stale)
  examples = _tar_examples(job) if job.tar else _pair_examples(job) if job.pairs else _folder_examples(job)
  class_counts = collections.Counter()
  incomplete = []
  skipped_by = collections.Counter()
  uncaptioned = 0
  filtered = collections.Counter()
  with records.RecordWriter(job.path) as writer:
    for example in examples:
      if example.rejected:
        filtered[example.rejected] += 1
        continue
      image, reason = (None, example.refused) if example.refused else prepare_image(example.image, job.options,
                                                                                   example.name)
      if image is None:
        skipped_by[reason] += 1
        if reason == limits.NO_IMAGE:
          incomplete.append(example.name)
        continue
      writer.write(records.pack_record(image, **example.fields))
      if example.fields.get("label") is not None:
        class_counts[example.fields["label"]] += 1
      if job.captioned and not example.fields.get("caption"):
        uncaptioned += 1
    counts = {"records": writer.count, "skipped": sum(skipped_by.values()),
              "skipped_by": ordered_reasons(skipped_by), "fingerprint": job.fingerprint}
    if job.captioned:
      counts["uncaptioned"] = uncaptioned
    else:
      counts["class_counts"] = {str(label): n for label, n in sorted(class_counts.items())}
    if job.score_filter:
      counts["filtered"] = {name: filtered[name] for name in job.score_filter.names}
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
      print(f"\rshards {self.done}{total}, {self.records} records written, {rate:.0f} records/s",
            end="", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.enabled:
      print(file=sys.stderr, flush=True)


def run_jobs(jobs: Sequence[ShardJob], num_workers: int, progress: bool | None = None,
             task: cluster_task.Task | None = cluster_task.Task()) -> list[dict | None]:
  """Writes `task`'s share of the shards (`cluster_task`; None: none, only read) not yet finished, on
  `num_workers` processes (<= 1: here); the counts of every job, read again after this task's writes, None for
  a shard of another task not finished yet."""
  mine = task.share(range(len(jobs))) if task is not None else []
  results = [read_finished(job) for job in jobs]
  pending = [(i, jobs[i]) for i in mine if results[i] is None]
  if len(pending) < len(mine):
    logging.info("prepare_data: %d of %d shards already written", len(mine) - len(pending), len(mine))
  meter = Progress(len(mine), len(mine) - len(pending), sys.stderr.isatty() if progress is None else progress)
  try:
    if num_workers <= 1 or len(pending) <= 1:
      _collect(map(_write_numbered, pending), results, meter)
    else:
      # spawn, not fork: the parent has imported JAX (via grain), which is multithreaded.
      with multiprocessing.get_context("spawn").Pool(min(num_workers, len(pending))) as pool:
        _collect(pool.imap_unordered(_write_numbered, pending), results, meter)
  finally:
    meter.close()
  return [counts if counts is not None else read_finished(job) for job, counts in zip(jobs, results)]


def _collect(finished, results: list, meter: Progress) -> None:
  for number, counts in finished:
    results[number] = counts
    meter.add(counts)


def write_stream(jobs: Iterable[ShardJob], num_workers: int, progress: bool | None = None) -> None:
  """Writes the shards of a stream of jobs that are not finished yet, on `num_workers` processes (<= 1: here),
  each handed at most QUEUED_PER_WORKER of them ahead: the stream is never held whole."""
  meter = Progress(None, 0, sys.stderr.isatty() if progress is None else progress)
  try:
    if num_workers <= 1:
      for job in jobs:
        meter.add(write_shard(job) if read_finished(job) is None else None)
      return
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:  # spawn: see run_jobs
      queued = collections.deque()
      for job in jobs:
        if read_finished(job) is not None:
          meter.add(None)
          continue
        queued.append(pool.apply_async(write_shard, (job,)))
        if len(queued) >= QUEUED_PER_WORKER * num_workers:
          meter.add(queued.popleft().get())
      while queued:
        meter.add(queued.popleft().get())
  finally:
    meter.close()


def fingerprint(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------ checks

def check_split_name(split: str, flag: str = "--split") -> None:
  if not _SPLIT_NAME.match(split):
    raise UserError(f"{flag}={split!r}: use letters, digits and '_' only (the shards are '<split>-*', so a '-' "
                    f"would let one split's glob match another's)")


def check_output(output_dir: str, kind: str, classes: list[str] | None, expected: dict[str, list[str]]) -> None:
  """UserError when `output_dir` holds another data set: a dataset.json of another kind or classes, or shards of
  a split we write that this conversion would not write (another shard count), which its glob would mix in."""
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output={output_dir}: exists and is not a directory")
  metadata = records.read_metadata(output_dir) if os.path.isdir(output_dir) else None
  if metadata and (metadata.get("kind") != kind or (classes is not None and metadata.get("classes") not in
                                                    (None, list(classes)))):
    what = (f"kind {metadata.get('kind')!r}" if metadata.get("kind") != kind else
            f"{len(metadata.get('classes'))} other classes")
    raise UserError(f"--output={output_dir}: its {records.METADATA_FILE} describes a different data set ({what}); "
                    f"choose another directory")
  for split, names in expected.items():
    _refuse_foreign(output_dir, split, lambda name, names=frozenset(names): name not in names)


def _refuse_foreign(output_dir: str, split: str, is_foreign: Callable[[str], bool]) -> None:
  """UserError when `output_dir` holds `split` shards that `is_foreign` says this conversion does not write."""
  present = (os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(output_dir), f"{split}-*.array_record")))
  foreign = sorted(name for name in present if is_foreign(name))
  if foreign:
    raise UserError(f"--output={output_dir}: holds {len(foreign)} {split!r} shards this conversion does not "
                    f"write ({foreign[0]}, ...: another shard count?); remove them or choose another directory")


def _check_common(output_dir: str, split: str, records_per_shard: int, resize_shorter: int, num_workers: int):
  if not output_dir:
    raise UserError("--output: required (the directory for the shards)")
  check_split_name(split)
  if records_per_shard < 1 or resize_shorter < 0 or num_workers < 0:
    raise UserError(f"--records_per_shard={records_per_shard}, --resize_shorter={resize_shorter}, --num_workers="
                    f"{num_workers}: the shard size must be positive, the others >= 0")


# ------------------------------------------------------------------------------------------------ folders

def _folder_jobs(tree: image_tree.ClassTree, input_dir: str, output_dir: str, split: str, indices: np.ndarray,
                 records_per_shard: int, options: ImageOptions) -> list[ShardJob]:
  count = math.ceil(len(indices) / records_per_shard)
  jobs = []
  for i in range(count):
    chunk = indices[i * records_per_shard:(i + 1) * records_per_shard].tolist()
    items = tuple((tree.paths[j], int(tree.labels[j])) for j in chunk)
    jobs.append(ShardJob(os.path.join(output_dir, records.shard_name(split, i, count)),
                         fingerprint("folders", options, input_dir, items), options, root=input_dir, items=items))
  return jobs


def _split_entry(shards: Sequence[str], counts: Sequence[dict], source: str, num_classes: int | None) -> dict:
  """dataset.json's entry of one split (`shards`: its file names): records, shards, kind (labelled, pairs or
  images), class_counts (labelled) or uncaptioned (webdataset), skipped, source."""
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
  return entry


def _names(jobs: Sequence[ShardJob]) -> list[str]:
  return [os.path.basename(j.path) for j in jobs]


def unfinished(counts: Sequence[dict | None], task: cluster_task.Task | None) -> dict | None:
  """None when every shard is finished (dataset.json can be written), else `unfinished_report`'s."""
  missing = sum(c is None for c in counts)
  return unfinished_report(f"{missing} of {len(counts)} shards", task) if missing else None


def unfinished_report(what: str, task: cluster_task.Task | None) -> dict:
  """What a task reports while other tasks still owe `what` ("2 of 6 shards"): {'unfinished': what, 'task'};
  UserError for the final step (`task` None), which needs them all."""
  if task is None:
    raise UserError(f"--finalize: {what} are not written yet; run the tasks that write them (or rerun without "
                    f"--finalize) first")
  return {"unfinished": what, "task": str(task)}


def _check_holdout(flag: str, count: int, holdout_split_name: str, split: str) -> None:
  if count < 0:
    raise UserError(f"{flag}={count}: expected >= 0 (0: no holdout split)")
  if count:
    check_split_name(holdout_split_name, "--holdout_split")
    if holdout_split_name == split:
      raise UserError(f"--holdout_split={holdout_split_name!r}: must differ from --split")


def convert_folders(input_dir: str, output_dir: str, *, split: str = "train", resize_shorter: int = 0,
                    verify: bool = False, num_workers: int | None = None,
                    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, holdout_per_class: int = 0,
                    holdout_split_name: str = "validation", seed: int = 0, progress: bool | None = None,
                    unlabelled: bool = False, holdout_examples: int = 0,
                    task: cluster_task.Task | None = cluster_task.Task()) -> dict:
  """Converts the class tree `input_dir` (with `unlabelled`: any folder of images, into image-only records:
  `convert_image_tree`) into shards in `output_dir`, `task`'s share of them (see `run_jobs`); returns the
  written dataset.json dict, or `unfinished`'s report when other tasks' shards are still missing (the last
  task to finish writes it)."""
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  _check_common(output_dir, split, records_per_shard, resize_shorter, num_workers)
  if holdout_per_class and unlabelled or holdout_examples and not unlabelled:
    raise UserError(f"--holdout_per_class={holdout_per_class}, --holdout_examples={holdout_examples}: the first for "
                    f"class folders, the second for --unlabelled images")
  _check_holdout("--holdout_per_class", holdout_per_class, holdout_split_name, split)
  _check_holdout("--holdout_examples", holdout_examples, holdout_split_name, split)
  input_dir, output_dir = os.path.abspath(os.path.expanduser(input_dir)), os.path.expanduser(output_dir)
  options = image_options(resize_shorter, verify)
  if unlabelled:
    return convert_image_tree(input_dir, output_dir, split=split, options=options, num_workers=num_workers,
                              records_per_shard=records_per_shard, holdout_examples=holdout_examples,
                              holdout_split_name=holdout_split_name, seed=seed, progress=progress, task=task)
  tree = image_tree.list_class_tree(input_dir)
  order = np.random.default_rng(seed).permutation(len(tree.paths))
  splits = {split: order}
  if holdout_per_class:
    splits[split], splits[holdout_split_name] = image_tree.carve_holdout(tree.labels, order, holdout_per_class)
    if not len(splits[holdout_split_name]):
      raise UserError(f"--holdout_per_class={holdout_per_class}: no class of {input_dir} has more than one image")
  jobs = {name: _folder_jobs(tree, input_dir, output_dir, name, indices, records_per_shard, options)
          for name, indices in splits.items()}
  check_output(output_dir, "classification", tree.classes,
               {name: _names(split_jobs) for name, split_jobs in jobs.items()})
  all_jobs = [job for split_jobs in jobs.values() for job in split_jobs]
  all_counts = run_jobs(all_jobs, num_workers, progress, task)
  report = unfinished(all_counts, task)
  if report:
    return report
  counts = iter(all_counts)
  entries = {}
  for name, split_jobs in jobs.items():
    entries[name] = _split_entry(_names(split_jobs), [next(counts) for _ in split_jobs], input_dir,
                                 len(tree.classes))
  if holdout_per_class:
    entries[holdout_split_name]["holdout_per_class"] = holdout_per_class
  return records.write_metadata(output_dir, kind="classification", classes=tree.classes, splits=entries)


# ------------------------------------------------------------------------------------- unlabelled folders

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

  @functools.cached_property
  def _held_set(self) -> frozenset:
    return frozenset(self.held)

  @functools.cached_property
  def _held_fingerprint(self) -> str:
    return fingerprint(*self.held)

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
    return [self._job(records.shard_name(self.holdout_split, i, count),
                      tuple((path, None) for path in self.held[i * self.records_per_shard:
                                                               (i + 1) * self.records_per_shard]))
            for i in range(count)]

  def _job(self, name: str, items: tuple) -> ShardJob:
    return ShardJob(os.path.join(self.output_dir, name), fingerprint("folders", self.options, self.input_dir, items),
                    self.options, root=self.input_dir, items=items)

  def is_train_shard(self, name: str) -> bool:
    """Whether `name` is a shard name this layout can write for `split` (another folder count's is not)."""
    match = re.fullmatch(rf"{re.escape(self.split)}-(\d{{5,}})-\d{{5,}}\.array_record", name)
    return bool(match) and int(match.group(1)) < len(self.folders)

  def _folder_fingerprint(self, index: int) -> str:
    return fingerprint("image folder", self.options, self.input_dir, self.folders[index], self.split,
                       self.records_per_shard, self._held_fingerprint)

  def _list_path(self, index: int) -> str:
    return os.path.join(self.output_dir, f"{self.split}-folders", f"{index:05d}.json")

  def write_folder_list(self, index: int, shards: list[tuple[str, str]]) -> None:
    """Records folder `index`'s shards [(name, fingerprint)], kept when it says so already."""
    listed = {"folder": self.folders[index], "fingerprint": self._folder_fingerprint(index),
              "shards": [list(shard) for shard in shards]}
    if self.read_folder_list(index) != shards:
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


def convert_image_tree(input_dir: str, output_dir: str, *, split: str, options: ImageOptions, num_workers: int,
                       records_per_shard: int, holdout_examples: int, holdout_split_name: str, seed: int,
                       progress: bool | None, task: cluster_task.Task | None) -> dict:
  """convert_folders' `unlabelled` conversion (`ImageTreeLayout`), never holding the tree's list: `task` converts
  the folders task.share(folders) and its share of the held-out shards, walking only those folders (and the
  few that `image_tree.sample_holdout` lists ahead); then, once every folder's list of shards and every shard
  is written, the task writes dataset.json (else it returns `unfinished_report`'s report)."""
  folders = tuple(image_tree.top_level_folders(input_dir))
  held = image_tree.sample_holdout(input_dir, folders, holdout_examples, seed) if holdout_examples else []
  layout = ImageTreeLayout(input_dir, output_dir, split, folders, records_per_shard, options, tuple(held),
                           holdout_split_name if held else "")
  check_output(output_dir, "images", None, {})
  expected_holdout = _names(layout.holdout_jobs())
  _refuse_foreign(output_dir, split, lambda name: not layout.is_train_shard(name))
  if held:
    _refuse_foreign(output_dir, holdout_split_name, lambda name: name not in expected_holdout)
  if task is not None:
    write_stream(_image_tree_jobs(layout, task), num_workers, progress)
  return _finish_image_tree(layout, task, holdout_examples)


def _image_tree_jobs(layout: ImageTreeLayout, task: cluster_task.Task) -> Iterator[ShardJob]:
  """`task`'s shards: those of its folders, each folder's list written when its walk ends, then its held-out
  ones."""
  for index in task.share(range(len(layout.folders))):
    listed = []
    for job in layout.shard_jobs(index):
      listed.append((os.path.basename(job.path), job.fingerprint))
      yield job
    layout.write_folder_list(index, listed)
  yield from task.share(layout.holdout_jobs())


def _finish_image_tree(layout: ImageTreeLayout, task: cluster_task.Task | None, holdout_examples: int) -> dict:
  """dataset.json from the folders' lists and the shards' sidecars, or the report of what other tasks still owe."""
  lists = [layout.read_folder_list(i) for i in range(len(layout.folders))]
  missing = sum(listed is None for listed in lists)
  if missing:
    return unfinished_report(f"{missing} of {len(lists)} folders", task)
  shards = {layout.split: [shard for listed in lists for shard in listed]}
  if layout.held:
    shards[layout.holdout_split] = [(os.path.basename(j.path), j.fingerprint) for j in layout.holdout_jobs()]
  counts = {split: [finished_counts(os.path.join(layout.output_dir, name), fp) for name, fp in listed]
            for split, listed in shards.items()}
  missing = sum(c is None for split_counts in counts.values() for c in split_counts)
  if missing:
    return unfinished_report(f"{missing} of {sum(map(len, counts.values()))} shards", task)
  if not shards[layout.split]:
    raise image_tree.no_images(layout.input_dir)
  check_output(layout.output_dir, "images", None, {split: [name for name, _ in listed]
                                                   for split, listed in shards.items()})
  entries = {split: _split_entry([name for name, _ in shards[split]], counts[split], layout.input_dir, None)
             for split in shards}
  if layout.held:
    entries[layout.holdout_split]["holdout_examples"] = holdout_examples
  return records.write_metadata(layout.output_dir, kind="images", splits=entries)


# --------------------------------------------------------------------------------------------- webdataset

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


def _tar_job(output_dir: str, split: str, number: int, count: int, tar: str, options: ImageOptions,
             held: Sequence[str] = (), only_held: bool = False,
             score_filter: wds.ScoreFilter = wds.ScoreFilter()) -> ShardJob:
  return ShardJob(os.path.join(output_dir, records.shard_name(split, number, count)),
                  fingerprint("webdataset", options, tar, os.path.getsize(tar), *([held, only_held] if held else []),
                              *([score_filter] if score_filter else [])),
                  options, tar=tar, held=tuple(held), only_held=only_held, score_filter=score_filter)


def convert_webdataset(pattern: str, output_dir: str, *, split: str = "train", resize_shorter: int = 0,
                       verify: bool = False, num_workers: int | None = None, progress: bool | None = None,
                       holdout_examples: int = 0, holdout_split_name: str = "validation", seed: int = 0,
                       task: cluster_task.Task | None = cluster_task.Task(),
                       score_filter: wds.ScoreFilter = wds.ScoreFilter()) -> dict:
  """Converts the img2dataset tars matching `pattern`, one shard each, into `output_dir` (with
  `holdout_examples`, also `holdout_split_name`: see `choose_holdout`), `task`'s share of them (see `run_jobs`),
  keeping the samples that pass `score_filter`; returns the written dataset.json dict, or `unfinished`'s report
  when other tasks' shards are still missing (the last task to finish writes it)."""
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  _check_common(output_dir, split, 1, resize_shorter, num_workers)
  _check_holdout("--holdout_examples", holdout_examples, holdout_split_name, split)
  pattern, output_dir = os.path.abspath(os.path.expanduser(pattern)), os.path.expanduser(output_dir)
  tars = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not tars:
    raise UserError(f"--input={pattern}: no files match (expected a glob of .tar shards)")
  options = image_options(resize_shorter, verify)
  held = choose_holdout(tars, holdout_examples, seed) if holdout_examples else {}
  jobs = {split: [_tar_job(output_dir, split, i, len(tars), tar, options, held.get(tar, ()),
                           score_filter=score_filter) for i, tar in enumerate(tars)]}
  if held:
    holdout_tars = [tar for tar in tars if tar in held]
    jobs[holdout_split_name] = [_tar_job(output_dir, holdout_split_name, i, len(holdout_tars), tar, options,
                                         held[tar], only_held=True, score_filter=score_filter)
                                for i, tar in enumerate(holdout_tars)]
  check_output(output_dir, "pairs", None, {name: _names(split_jobs) for name, split_jobs in jobs.items()})
  all_counts = run_jobs([job for split_jobs in jobs.values() for job in split_jobs], num_workers, progress, task)
  report = unfinished(all_counts, task)
  if report:
    return report
  counts = iter(all_counts)
  entries = {name: _split_entry(_names(split_jobs), [next(counts) for _ in split_jobs], pattern, None)
             for name, split_jobs in jobs.items()}
  if held:
    entries[holdout_split_name]["holdout_examples"] = holdout_examples
  return records.write_metadata(output_dir, kind="pairs", splits=entries)


# ------------------------------------------------------------------------------------- captioned data sets

def list_pairs(input_format: str, input_dir: str, *, coco_folder: str = "train2017", vg_regions: str = "crop",
               min_region_size: int = pair_corpora.DEFAULT_MIN_REGION_SIZE,
               exclude_karpathy: str = "") -> tuple[list, dict]:
  """(pairs, counts) of a captioned data set (`PAIR_FORMATS`; data/pair_corpora.py); UserError naming --input
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


def convert_pairs(input_format: str, input_dir: str, output_dir: str, *, split: str = "train",
                  resize_shorter: int = 0, verify: bool = False, num_workers: int | None = None,
                  records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, progress: bool | None = None,
                  **listing) -> dict:
  """Converts a captioned data set (`list_pairs`; `listing` its options) into shards of `records_per_shard`
  pairs, in the listing's order (training shuffles globally); returns the written dataset.json dict, whose
  split entry also holds the listing's counts."""
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  _check_common(output_dir, split, records_per_shard, resize_shorter, num_workers)
  input_dir, output_dir = os.path.abspath(os.path.expanduser(input_dir)), os.path.expanduser(output_dir)
  pairs, listed = list_pairs(input_format, input_dir, **listing)
  if not pairs:
    raise UserError(f"--input={input_dir}: no pairs to write ({listed})")
  options = image_options(resize_shorter, verify)
  count = math.ceil(len(pairs) / records_per_shard)
  jobs = []
  for i in range(count):
    items = tuple(pairs[i * records_per_shard:(i + 1) * records_per_shard])
    jobs.append(ShardJob(os.path.join(output_dir, records.shard_name(split, i, count)),
                         fingerprint(input_format, options, input_dir, items), options, root=input_dir, items=items,
                         pairs=True))
  check_output(output_dir, "pairs", None, {split: _names(jobs)})
  entry = _split_entry(_names(jobs), run_jobs(jobs, num_workers, progress), input_dir, None)
  entry.update(listed, format=input_format, **{k: v for k, v in listing.items() if v not in ("", None)})
  return records.write_metadata(output_dir, kind="pairs", splits={split: entry})


# ---------------------------------------------------------------------------------------------------- CLI

def make_flags() -> flags.FlagValues:
  """This tool's flags, on their own FlagValues: importing the module (tests) defines no global flags."""
  fv = flags.FlagValues()
  flags.DEFINE_enum("format", None, FORMATS, "Input kind: a class-folder tree, img2dataset tars, COCO captions or "
                    "Visual Genome region descriptions.", flag_values=fv)
  flags.DEFINE_string("input", None, "folders: the class tree; webdataset: a glob of .tar files; coco, "
                      "visual_genome: the data set's root folder.", flag_values=fv)
  flags.DEFINE_string("output", None, "Directory for the shards and dataset.json (created).", flag_values=fv)
  flags.DEFINE_string("split", "train", "Split name of the shards.", flag_values=fv)
  flags.DEFINE_integer("resize_shorter", 0, "Shrink images to this shorter side (JPEG q95); 0: keep.",
                       flag_values=fv)
  flags.DEFINE_bool("verify", False, "Decode every image; drop and count undecodable ones.", flag_values=fv)
  flags.DEFINE_integer("num_workers", None, "Processes writing shards; 0 or 1: inline. Default: the CPU count.",
                       flag_values=fv)
  flags.DEFINE_integer("records_per_shard", DEFAULT_RECORDS_PER_SHARD, "folders, coco, visual_genome: records per "
                       "output shard.",
                       flag_values=fv)
  flags.DEFINE_bool("unlabelled", False, "folders: --input is a folder of images without labels (image-only "
                    "records).", flag_values=fv)
  flags.DEFINE_integer("holdout_per_class", 0, "folders: images per class moved to --holdout_split; 0: none.",
                       flag_values=fv)
  flags.DEFINE_integer("holdout_examples", 0, "webdataset, --unlabelled folders: examples moved to "
                       "--holdout_split; 0: none.", flag_values=fv)
  flags.DEFINE_string("holdout_split", "validation", "Split name of the held-out examples.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the holdout choice (and of the folders' shuffle).", flag_values=fv)
  flags.DEFINE_string("coco_folder", "train2017", "coco: the image folder, and captions_<it>.json under "
                      "annotations/.", flag_values=fv)
  flags.DEFINE_enum("vg_regions", "crop", pair_corpora.VG_REGION_MODES, "visual_genome: pair a phrase with its "
                    "region's crop or with the whole image.", flag_values=fv)
  flags.DEFINE_integer("min_region_size", pair_corpora.DEFAULT_MIN_REGION_SIZE, "visual_genome, crop: leave out "
                       "regions whose shorter side is under this many pixels.", flag_values=fv)
  flags.DEFINE_string("exclude_karpathy", "", "coco, visual_genome: Karpathy's dataset_coco.json; leaves out the "
                      "images of its val and test splits (the COCO 5k retrieval benchmark).", flag_values=fv)
  flags.DEFINE_bool("progress", False, "Show the progress line even when stderr is not a terminal.",
                    flag_values=fv)
  cluster_task.define_flags(fv)
  flags.DEFINE_bool("finalize", False, "Write no shard: only dataset.json, from every shard's sidecar (all must be "
                    "written).", flag_values=fv)
  flags.DEFINE_float("min_similarity", None, "webdataset: keep samples whose .json 'similarity' (LAION's CLIP "
                     "score) is at least this.", flag_values=fv)
  flags.DEFINE_float("max_pwatermark", None, "webdataset: keep samples whose .json 'pwatermark' is at most this.",
                     flag_values=fv)
  flags.DEFINE_float("max_punsafe", None, "webdataset: keep samples whose .json 'punsafe' is at most this.",
                     flag_values=fv)
  flags.DEFINE_string("selection", None, "webdataset: instead of the three flags above, the JSON file "
                      "`index_tars --keep=K --selection_out=FILE` wrote: its thresholds keep its count.", flag_values=fv)
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
    raise UserError(f"--selection={fv.selection}: not a selection written by `index_tars --keep "
                    f"--selection_out` ({type(e).__name__}: {e})") from e


def run(fv: flags.FlagValues) -> dict:
  """Runs the conversion the parsed flags describe; the written dataset.json dict."""
  if not fv.format or not fv.input:
    raise UserError(f"--format ({' | '.join(FORMATS)}) and --input are required")
  common = dict(split=fv.split, resize_shorter=fv.resize_shorter, verify=fv.verify, num_workers=fv.num_workers,
                progress=fv.progress or None)
  common.update(holdout_examples=fv.holdout_examples, holdout_split_name=fv.holdout_split, seed=fv.seed,
                task=None if fv.finalize else cluster_task.from_flags(fv))
  score_filter = score_filter_of(fv)
  pair_only = [f"--{name}" for name in ("coco_folder", "vg_regions", "min_region_size", "exclude_karpathy")
               if fv[name].present]
  if fv.format in PAIR_FORMATS:
    other = [f"--{name}" for name in ("holdout_per_class", "holdout_examples", "unlabelled") if fv[name].present]
    if other:
      raise UserError(f"{', '.join(other)}: not for --format={fv.format} (its pairs train; the held-out pairs "
                      f"of a mixture come from another source)")
    foreign = [flag for flag in pair_only if flag in (("--vg_regions", "--min_region_size") if fv.format == "coco"
                                                      else ("--coco_folder",))]
    if foreign:
      raise UserError(f"{', '.join(foreign)}: not for --format={fv.format}")
    if score_filter or common["task"] is None or common["task"].count > 1:
      raise UserError(f"--min_similarity, --max_pwatermark, --max_punsafe, --task_index/--task_count, --finalize: "
                      f"not for --format={fv.format} (one process converts a data set of its size)")
    listing = dict(exclude_karpathy=fv.exclude_karpathy)
    listing.update(dict(coco_folder=fv.coco_folder) if fv.format == "coco" else
                   dict(vg_regions=fv.vg_regions, min_region_size=fv.min_region_size))
    return convert_pairs(fv.format, fv.input, fv.output, split=fv.split, resize_shorter=fv.resize_shorter,
                         verify=fv.verify, num_workers=fv.num_workers, records_per_shard=fv.records_per_shard,
                         progress=fv.progress or None, **listing)
  if pair_only:
    raise UserError(f"{', '.join(pair_only)}: only for --format=coco or visual_genome")
  if fv.format == "folders":
    if score_filter:
      raise UserError("--min_similarity, --max_pwatermark, --max_punsafe: only for --format=webdataset (they read "
                      "each sample's .json)")
    return convert_folders(fv.input, fv.output, records_per_shard=fv.records_per_shard,
                           holdout_per_class=fv.holdout_per_class, unlabelled=fv.unlabelled, **common)
  folder_only = [f"--{name}" for name in ("records_per_shard", "holdout_per_class", "unlabelled") if fv[name].present]
  if folder_only:
    raise UserError(f"{', '.join(folder_only)}: only for --format=folders (webdataset: one shard per input tar)")
  return convert_webdataset(fv.input, fv.output, score_filter=score_filter, **common)


def summary_line(metadata: dict, splits: Sequence[str], output_dir: str, seconds: float) -> str:
  if "unfinished" in metadata:
    return (f"prepare_data: {metadata['task']} done, {metadata['unfinished']} still to be written by other tasks "
            f"(the last one writes dataset.json), {seconds:.1f} s -> {output_dir}")
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
  return (f"prepare_data: {per_split} records, {skipped} skipped"
          + (f" ({wds.reasons_text(skipped_by)})" if skipped_by else "") + ", "
          + (f"{sum(filtered.values())} filtered ({by_reason}), " if filtered else "")
          + f"{sum(len(e['shards']) for e in entries)} shards, {seconds:.1f} s -> {output_dir}")


def _main(fv, rest: list[str]) -> None:
  start = time.monotonic()
  if rest:
    raise UserError(f"unexpected arguments {rest}; all options are --flags")
  metadata = run(fv)
  splits = [fv.split] + ([fv.holdout_split] if fv.holdout_per_class or fv.holdout_examples else [])
  print(summary_line(metadata, splits, fv.output, time.monotonic() - start))


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), converts, prints the summary line; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
