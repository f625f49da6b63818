"""Host-local input pipelines: a checkpointable grain loader for training, a padded generator for eval.

Batches are numpy dicts with B, the per-process batch size, leading: classification {'image': uint8
(B, S, S, 3), 'label': int32 (B,)}; image-text pairs {'image', 'text': int32 (B, L) tokens (all PAD for an
image-only record), 'has_text': bool (B,), 'label' when every source has labels, 'mim_mask': uint8 (B, g, g)
SimMIM masks when asked for}; eval batches add 'mask'. Training reads config.data.source or the weighted
mixture config.data.mixture (data/loader/mixture.py), evaluation one source (`sources.eval_source_spec`). One
mechanism serves both: a record -> example op (transforms.SelectKeys or transforms.SelectPair), then optional
extra ops (transforms.AddMimMask), end the same decode/augment chain. The training loop turns the batches into
global arrays. Nothing here touches jax.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os

from absl import flags, logging
import grain
import numpy as np

from visionfm_jax.data.loader import checks, identity, open_files, reaping, shm_room, skipping
from visionfm_jax.data.loader import mixture as mixture_lib
from visionfm_jax.data.sources import open_shards
from visionfm_jax.data.sources.registry import build_source, eval_source_spec, eval_source_what
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.data.transforms import naflex
from visionfm_jax.errors import DataError

# config.data.num_workers=-1 takes one worker per CPU beyond the trainer's, up to this many: past it a node's share
# of the step rarely needs more, and each worker holds its own copy of the source's index and buffers.
MAX_AUTO_WORKERS = 32
# Records each worker's reading threads keep read ahead: 4 per thread keeps every thread busy. grain's default, 500,
# costs CPU for each example handed on (its prefetch walks the ready part of that buffer to record its depth): the
# tests' ViT pipeline took 25 CPU ms a batch of 16 with 500, 15.7 with 64, 14.1 with 32 (one process, no workers).
READ_AHEAD = 4 * open_shards.READ_THREADS


def usable_cpus() -> int:
  """The CPUs this process may run on: its affinity mask (what SLURM's --cpus-per-task binds), else the machine's."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def worker_count(num_workers: int) -> int:
  """config.data.num_workers resolved: a count >= 0 as it is; -1: usable_cpus() less one for the trainer, at most
  MAX_AUTO_WORKERS (0 on one CPU: read in the main process)."""
  if num_workers >= 0:
    return int(num_workers)
  return max(0, min(usable_cpus() - 1, MAX_AUTO_WORKERS))


def eval_threads(data_cfg) -> int:
  """Threads that read evaluation records ahead: as many as the training loader's workers, at least 2."""
  return max(2, worker_count(data_cfg.num_workers))


def train_decode_side(data_cfg) -> int:
  """JPEG draft size for training (training alone decodes in draft: evaluation decodes in full, see
  transforms.decode_image): even the smallest random crop keeps ~image_size pixels across."""
  aug = data_cfg.augment
  if not aug.random_resized_crop:
    return transforms.eval_resize_side(data_cfg.image_size)
  return math.ceil(data_cfg.image_size / math.sqrt(aug.crop_scale[0]))


def make_train_loader(
  data_cfg, *, batch_size: int, seed: int, process_index: int, process_count: int, source=None, num_classes: int = 0
) -> skipping.SkippingLoader:
  """An infinite, shuffled, augmented loader over this process's shard of the train split.

  All processes read one global stream, every record of a source once per its epoch in an order that is a pure
  function of (seed, epoch) (a mixture: each entry's, see data/loader/mixture.py); process i of P takes the positions
  i, i + P, i + 2P, ... (disjoint shares of each epoch). A mixture's labels are remapped into the union of its
  entries' classes (`sources.train_class_names`).
  `iter(loader)` has get_state/set_state and saves with Orbax through grain.checkpoint.CheckpointSave. The
  augmentations are a pure function of (seed, stream position), so a restored iterator replays the same
  batches bitwise; restored onto another number of processes or workers it continues the stream's position
  (`resume`). Undecodable records, and with `num_classes` labels outside [0, num_classes), are skipped and
  counted (`skipping.SkippingIterator`). `source` (a source, or a mixture_lib.Mixture) overrides the configured
  training data.
  """
  mixture = train_mixture(data_cfg, source)
  for entry in mixture.entries:
    require_key(entry.source, "label", entry.field, data_cfg.train_split, "classification needs labelled images")
  mixture = mixture_lib.with_union_labels(mixture, data_cfg)
  return _train_loader(
    data_cfg,
    mixture,
    transforms.SelectKeys(num_classes),
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )


def train_mixture(data_cfg, source=None) -> mixture_lib.Mixture:
  """The training data: `source` (a source or a Mixture) when given, else config.data.source or
  config.data.mixture in config.data.train_split, opened."""
  if source is None:
    return mixture_lib.open_train(data_cfg, data_cfg.train_split)
  return mixture_lib.as_mixture(source, data_cfg, data_cfg.train_split)


def make_pair_train_loader(
  data_cfg, tokenizer, *, batch_size: int, seed: int, process_index: int, process_count: int, source=None, mim=None
) -> skipping.SkippingLoader:
  """make_train_loader for image-text pairs: batches {'image', 'text', 'has_text', 'label' if every source has
  labels (remapped into their union in a mixture), 'mim_mask' with `mim`}.

  `tokenizer` (tokenizer.Tokenizer) turns each record's caption into `tokenizer.max_len` int32 tokens; a record
  without a caption (image-only data) gets all PAD and has_text=False. A mixture may mix pairs and image-only
  sources, but at least one of its sources must have captions.
  `mim` (None, or anything with `mask_patch_size` and `mask_ratio`) adds SimMIM masks drawn in the loader
  (see `_mim_ops`), so a batch determines its loss.
  """
  mixture = train_mixture(data_cfg, source)
  example = _pair_example(mixture, tokenizer, data_cfg.train_split)
  if example.with_label:
    mixture = mixture_lib.with_union_labels(mixture, data_cfg)
  return _train_loader(
    data_cfg,
    mixture,
    example,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    extras=_mim_ops(data_cfg, mim),
  )


def _mim_ops(data_cfg, mim) -> list:
  """[transforms.AddMimMask] for `mim` (fields mask_patch_size, mask_ratio), [] for None.

  Batches get 'mim_mask' uint8 (B, g, g), g = image_size // mask_patch_size, ceil(g * g * mask_ratio) ones
  each: random per (seed, record position) in training, per record index in evaluation.
  """
  if mim is None:
    return []
  return [transforms.AddMimMask(data_cfg.image_size, mim.mask_patch_size, mim.mask_ratio)]


def first_readable_record(source, tries: int = 64) -> dict | None:
  """The first of the first `tries` records whose source could read it (image not None), else None."""
  for index in range(min(len(source), tries)):
    record = source[index]
    if record.get("image") is not None:
      return record
  return None


def require_key(source, key: str, what: str, split: str, hint: str) -> dict:
  """The first readable record of `source` ({} when none is); DataError naming `what` (e.g.
  "config.data.source='shapes'") when it lacks `key`."""
  record = first_readable_record(source)
  if record is not None and key not in record:
    raise DataError(f"{what} split {split!r}: records have no {key!r} (keys {sorted(record)}); {hint}")
  return record or {}


@dataclasses.dataclass(frozen=True)
class _Sample:
  """What the first readable records of a source hold (a source of pairs may hold some image-only records)."""

  keys: frozenset[str]  # of the readable records sampled; record 0's (a placeholder, say) when none is readable
  readable: bool  # some sampled record has an image
  labelled: bool  # the first readable record has a label

  @property
  def captioned(self) -> bool:
    """A readable record has a caption; True when none is readable: the loader's skip count reports that."""
    return "caption" in self.keys or not self.readable


def _sample(source, tries: int = 16) -> _Sample:
  """Reads records until one has a caption or `tries` readable ones have not (at most 4 * `tries` records)."""
  first, keys = None, set()
  for index in range(min(len(source), 4 * tries)):
    record = source[index]
    if record.get("image") is None:
      continue
    first = record if first is None else first
    keys |= set(record)
    tries -= 1
    if not tries or "caption" in keys:
      break
  if first is None:
    return _Sample(frozenset(source[0]), readable=False, labelled=False)
  return _Sample(frozenset(keys), readable=True, labelled="label" in first)


PAIRS_HINT = "image-text training needs 'shapes', or 'arrayrecord:<glob>' or 'wds:<glob>' of pairs"


def _pair_example(mixture: mixture_lib.Mixture, tokenizer, split: str) -> transforms.SelectPair:
  """The pair example op for `mixture`'s sources, with labels when all their records have them; DataError when a
  source's records have no image, or none of the sources has captions (checked on the first readable records:
  a corrupt record 0 is a placeholder).

  Captions are tokenised per record in the grain map: it runs in the worker processes next to the image
  work (a caption costs ~20 us, a decoded and augmented image ~1 ms), and keeps every op record -> example,
  so the eval iterator reuses the same op.
  """
  samples = []
  for entry in mixture.entries:
    sample = _sample(entry.source)
    if "image" not in sample.keys:
      neither = "" if "caption" in sample.keys else " nor a 'caption'"
      raise DataError(
        f"{entry.field} split {split!r}: records have no 'image'{neither} (keys {sorted(sample.keys)}); {PAIRS_HINT}"
      )
    samples.append(sample)
  if not any(sample.captioned for sample in samples):
    if len(samples) == 1:
      raise DataError(
        f"{mixture.entries[0].field} split {split!r}: records have no 'caption' (keys "
        f"{sorted(samples[0].keys)}); {PAIRS_HINT} (to train: or a config.data.mixture with at least "
        f"one; to evaluate: set config.data.eval_source to one)"
      )
    raise DataError(
      f"{mixture.what}: none of its sources has captions ({', '.join(e.field for e in mixture.entries)}"
      f"); image-text training needs at least one source of pairs"
    )
  return transforms.SelectPair(tokenizer, with_label=all(sample.labelled for sample in samples))


def _train_loader(
  data_cfg, mixture, example, *, batch_size: int, seed: int, process_index: int, process_count: int, extras=()
) -> skipping.SkippingLoader:
  if naflex.settings(data_cfg):
    operations = naflex.train_transforms(data_cfg, example)
  else:
    operations = transforms.train_transforms(
      data_cfg.image_size, data_cfg.augment, train_decode_side(data_cfg), example
    )
  operations.extend(extras)
  return grain_train_loader(
    data_cfg,
    mixture,
    operations,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )


def grain_train_loader(
  data_cfg, source, operations: list, *, batch_size: int, seed: int, process_index: int, process_count: int
) -> skipping.SkippingLoader:
  """The sharded, shuffled, checkpointable grain loader of make_train_loader over `source` (a source: the
  mixture of one, or a mixture_lib.Mixture), with the record -> example `operations` (they end in examples with
  'valid', see transforms.MarkUndecodable) then batching. First removes what runs that died on this node left in
  /dev/shm; its worker processes end with this one (data/loader/reaping.py); a /dev/shm without room for their
  batches stops it here (data/loader/shm_room.py)."""
  reaping.remove_what_dead_runs_left()
  mixture = mixture_lib.as_mixture(source, data_cfg, data_cfg.train_split)
  what = f"{mixture.what} split {data_cfg.train_split!r}"
  checks.check_one_batch(mixture, batch_size, process_count, what)
  # One global stream for all processes (data/loader/resume.py): the mixture orders every entry's records per its
  # epoch and interleaves the entries, the sampler reads that stream in order (its seed: the augmentations'
  # per-position generators), and the loader's shard options give process i the positions i, i + P, i + 2P, ...
  seed = int(seed) % 2**32  # grain takes 32-bit seeds
  stream = mixture_lib.MixtureSource(mixture, seed, shuffle=data_cfg.shuffle)
  sampler = grain.samplers.IndexSampler(
    num_records=len(stream), shard_options=grain.sharding.NoSharding(), shuffle=False, num_epochs=None, seed=seed
  )
  shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  workers = worker_count(data_cfg.num_workers)
  if data_cfg.num_workers < 0:
    logging.info(
      "input: %d grain worker processes (config.data.num_workers=-1, %d CPUs for this process)", workers, usable_cpus()
    )
  if workers and not flags.FLAGS.is_parsed():
    # grain's worker processes read its absl flags; outside absl.app (tests, notebooks) use their defaults.
    flags.FLAGS.mark_as_parsed()
  need = open_files.needed(mixture, workers)
  open_files.ensure(need)  # before grain starts its workers, which inherit the limit
  shm_need = _check_shm_room(data_cfg, mixture, operations, batch_size, workers)
  operations = [*operations, grain.transforms.Batch(batch_size, drop_remainder=True)]
  if workers:  # they end with this process, and what they leave in /dev/shm is named after it
    operations = [*reaping.tie_workers_to_this_process(), *operations]
  loader = grain.DataLoader(
    data_source=stream,
    sampler=sampler,
    operations=operations,
    shard_options=shard,
    worker_count=workers,
    worker_buffer_size=data_cfg.prefetch,
    read_options=grain.ReadOptions(num_threads=open_shards.READ_THREADS, prefetch_buffer_size=READ_AHEAD),
  )
  return skipping.SkippingLoader(
    loader,
    batch_size,
    max_fraction=data_cfg.max_skipped_fraction,
    check_after=data_cfg.skip_check_after,
    what=what,
    process_index=process_index,
    process_count=process_count,
    open_files=need,
    shm_need=shm_need,
    identity=identity.of_mixture(mixture),
  )


def _check_shm_room(data_cfg, mixture, operations: list, batch_size: int, workers: int) -> str:
  """shm_room.ensure for the batches of `operations` (record -> example); returns what the pipeline holds in
  /dev/shm, in words ('' without workers, or without a readable record among the first ones to size a batch by)."""
  record = first_readable_record(mixture.entries[0].source) if workers else None
  if record is None:
    return ""
  one_batch = shm_room.batch_bytes(record, operations, batch_size)
  shm_room.ensure(data_cfg, workers, one_batch)
  return shm_room.describe_need(data_cfg, workers, one_batch)


def eval_shares(total: int, batch_size: int, process_index: int, process_count: int) -> tuple[range, int]:
  """This process's contiguous share of records [0, total) and the number of batches every process yields."""
  per_process = -(-total // process_count)
  start = min(process_index * per_process, total)
  return range(start, min(start + per_process, total)), max(1, -(-per_process // batch_size))


class EvalReader:
  """Reads one eval record into an example dict (None when undecodable): full decode + central crop (`preprocess`:
  config.data.eval_preprocess, transforms.EvalTransform) + `example`, then the `extras` (RandomMaps with `spec`,
  e.g. AddMimMask), which draw from np.random.default_rng(index): an eval example is a pure function of its
  record index, whatever the batch size or process count. With `naflex` ((patch size, token budget):
  naflex.settings) the image is the whole one at its aspect, packed (data/transforms/naflex.py), not a crop."""

  def __init__(
    self,
    source,
    image_size: int,
    example,
    extras=(),
    preprocess: str = "inception",
    naflex_budget: tuple[int, int] | None = None,
  ):
    self.source, self.image_size, self.example, self.extras = source, image_size, example, tuple(extras)
    self.naflex_budget = naflex_budget
    if naflex_budget:
      self.ops = [transforms.Decode(), naflex.Patches(*naflex_budget)]
    else:
      self.ops = [transforms.Decode(), transforms.EvalTransform(image_size, preprocess)]  # in full, as transformers

  def __call__(self, index: int):
    element = self.source[index]
    for op in self.ops:
      element = op.map(element)
    if element["image"] is None:  # undecodable: a padding row
      return None
    element = self.example.map(element)
    if not element.pop("valid", True):  # refused by the example op, e.g. a caption over data/limits.py's limit
      return None
    if self.extras:
      rng = np.random.default_rng(index)
      for op in self.extras:
        element = op.random_map(element, rng)
    return element

  def spec(self) -> dict:
    """{key: (shape, dtype)} of one example: the example op's spec and the extras'."""
    spec = dict(self.example.spec(self.image_size))
    if self.naflex_budget:
      spec["image"] = (naflex.packed_shape(*self.naflex_budget), np.uint8)
    for op in self.extras:
      spec.update(op.spec(self.image_size))
    return spec


def _assemble(rows: list, batch_size: int, spec: dict, valid_key: str) -> dict:
  """Stacks `rows` (None: padding) into a batch; spec values are (shape, dtype) or (shape, dtype, padding
  value), 0 by default."""
  batch = {
    key: np.full((batch_size, *shape), fill[0] if fill else 0, dtype) for key, (shape, dtype, *fill) in spec.items()
  }
  batch[valid_key] = np.zeros((batch_size,), bool)
  for i, row in enumerate(rows):
    if row is not None:
      for key, value in row.items():
        batch[key][i] = value
      batch[valid_key][i] = True
  return batch


def eval_batches(reader, share: range, num_batches: int, batch_size: int, threads: int, valid_key: str = "mask"):
  """Batches of `reader(index)` (an example dict, None when undecodable) over `share`, read ahead by
  `threads`; `reader.spec()` gives the padding rows, and `valid_key` marks the real ones."""
  spec = reader.spec()
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:

    def submit(b):
      return [pool.submit(reader, i) for i in share[b * batch_size : (b + 1) * batch_size]]

    pending = submit(0)
    for b in range(num_batches):
      current, pending = pending, submit(b + 1) if b + 1 < num_batches else []
      yield _assemble([f.result() for f in current], batch_size, spec, valid_key)


def open_eval_source(data_cfg, what: str | None = None):
  """The eval source (`sources.eval_source_spec`) and split, opened: evaluators open
  theirs when they are built, at start-up, so that a missing dataset stops the run before it trains. `what`
  names it in errors (default: `sources.eval_source_what`), for an evaluator whose source comes from another field.
  An empty source is a DataError as a missing one is."""
  what = what or eval_source_what(data_cfg)
  source = build_source(eval_source_spec(data_cfg), data_cfg.eval_split, data_cfg, what=what)
  if len(source) <= 0:
    raise DataError(f"{what} split {data_cfg.eval_split!r} has no records")
  return source


def make_eval_iterator(data_cfg, *, batch_size: int, process_index: int, process_count: int, source=None):
  """Batches {'image', 'label', 'mask'} over this process's share of the eval split, in order.

  The first config.data.eval_examples records (all if <= 0) are split into contiguous shares, one per
  process; every process yields the same number of batches, padded with mask=False rows, so each example
  appears exactly once with mask=True across processes (undecodable ones: mask=False). `source` overrides
  the configured eval source (`sources.eval_source_spec`) and split.
  """
  if source is None:
    source = open_eval_source(data_cfg)
  require_key(source, "label", eval_source_what(data_cfg), data_cfg.eval_split, "classification needs labelled images")
  return _eval_iterator(
    data_cfg,
    source,
    transforms.SelectKeys(),
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
  )


def make_pair_eval_iterator(
  data_cfg, tokenizer, *, batch_size: int, process_index: int, process_count: int, source=None, mim=None
):
  """make_eval_iterator for image-text pairs: batches {'image', 'text', 'has_text', 'label' if the source has
  labels, 'mim_mask' with `mim`, 'mask'}; padding rows are all zeros (their 'text' is all PAD, 'has_text'
  False, their 'mim_mask' empty), and so are image-only records' 'text' and 'has_text'. The source must have
  captions (a mixture's first entry, read when config.data.eval_source is empty, may not: set it).

  With `mim` (see make_pair_train_loader) each record's mask depends on its index only, so held-out MIM losses
  are comparable across evaluations.
  """
  if source is None:
    source = open_eval_source(data_cfg)
  what = eval_source_what(data_cfg)
  example = _pair_example(mixture_lib.Mixture((mixture_lib.Entry(what, source),), what), tokenizer, data_cfg.eval_split)
  return _eval_iterator(
    data_cfg,
    source,
    example,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    extras=_mim_ops(data_cfg, mim),
  )


def eval_total(data_cfg, num_records: int) -> int:
  """How many records evaluation reads: the first config.data.eval_examples (all if <= 0)."""
  total = num_records if data_cfg.eval_examples <= 0 else min(int(data_cfg.eval_examples), num_records)
  if total <= 0:
    raise DataError(f"{eval_source_what(data_cfg)} split {data_cfg.eval_split!r} has no records")
  return total


def _eval_iterator(data_cfg, source, example, *, batch_size: int, process_index: int, process_count: int, extras=()):
  share, num_batches = eval_shares(eval_total(data_cfg, len(source)), batch_size, process_index, process_count)
  reader = EvalReader(source, data_cfg.image_size, example, extras, data_cfg.eval_preprocess, naflex.settings(data_cfg))
  return eval_batches(reader, share, num_batches, batch_size, threads=eval_threads(data_cfg))
