"""Host-local input pipelines: a checkpointable grain loader for training, a padded generator for eval.

Batches are numpy dicts {'image': uint8 (B, S, S, 3), 'label': int32 (B,)} (+ 'mask' for eval), with B the
per-process batch size; the training loop turns them into global arrays. Nothing here touches jax.
"""

from __future__ import annotations

import concurrent.futures
import math

from absl import flags
import grain
import numpy as np

from visionfm_jax.data import transforms
from visionfm_jax.data.sources import build_source
from visionfm_jax.errors import DataError


def _train_decode_side(data_cfg) -> int:
  """JPEG draft size for training: even the smallest random crop keeps ~image_size pixels across."""
  aug = data_cfg.augment
  if not aug.random_resized_crop:
    return round(data_cfg.image_size / transforms.EVAL_CROP_FRACTION)
  return math.ceil(data_cfg.image_size / math.sqrt(aug.crop_scale[0]))


def make_train_loader(data_cfg, *, batch_size: int, seed: int, process_index: int, process_count: int,
                      source=None) -> grain.DataLoader:
  """An infinite, shuffled, augmented grain.DataLoader over this process's shard of the train split.

  `iter(loader)` has get_state/set_state and saves with Orbax through grain.checkpoint.CheckpointSave.
  The augmentations are a pure function of (seed, record position), so a restored iterator replays the
  same batches bitwise. `source` overrides build_source(config.data.source, config.data.train_split).
  """
  if source is None:
    source = build_source(data_cfg.source, data_cfg.train_split, data_cfg)
  if len(source) // process_count < batch_size:
    raise DataError(f"config.data.source={data_cfg.source!r} split {data_cfg.train_split!r} has {len(source)} "
                    f"records: fewer than one batch of {batch_size} for each of {process_count} processes")
  shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard, shuffle=data_cfg.shuffle, num_epochs=None,
      seed=int(seed) % 2**32)  # grain takes 32-bit seeds
  operations = transforms.train_transforms(data_cfg.image_size, data_cfg.augment, _train_decode_side(data_cfg))
  operations.append(grain.transforms.Batch(batch_size, drop_remainder=True))
  if data_cfg.num_workers and not flags.FLAGS.is_parsed():
    # grain's worker processes read its absl flags; outside absl.app (tests, notebooks) use their defaults.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations, shard_options=shard,
                          worker_count=data_cfg.num_workers, worker_buffer_size=data_cfg.prefetch)


def eval_shares(total: int, batch_size: int, process_index: int, process_count: int) -> tuple[range, int]:
  """This process's contiguous share of records [0, total) and the number of batches every process yields."""
  per_process = -(-total // process_count)
  start = min(process_index * per_process, total)
  return range(start, min(start + per_process, total)), max(1, -(-per_process // batch_size))


class _EvalReader:
  """Reads one eval record into (image, label, ok): decode + central crop, no augmentation."""

  def __init__(self, source, image_size: int):
    self.source, self.image_size = source, image_size
    self.ops = [transforms.Decode(round(image_size / transforms.EVAL_CROP_FRACTION)),
                transforms.EvalTransform(image_size)]

  def __call__(self, index: int):
    element = self.source[index]
    for op in self.ops:
      element = op.map(element)
    if element["image"] is None:  # undecodable: a padding row
      return None
    return element["image"], int(element["label"])


def _assemble(rows: list, batch_size: int, image_size: int) -> dict:
  batch = {"image": np.zeros((batch_size, image_size, image_size, 3), np.uint8),
           "label": np.zeros((batch_size,), np.int32),
           "mask": np.zeros((batch_size,), bool)}
  for i, row in enumerate(rows):
    if row is not None:
      batch["image"][i], batch["label"][i], batch["mask"][i] = row[0], row[1], True
  return batch


def _eval_batches(reader: _EvalReader, share: range, num_batches: int, batch_size: int, threads: int):
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    def submit(b):
      return [pool.submit(reader, i) for i in share[b * batch_size:(b + 1) * batch_size]]
    pending = submit(0)
    for b in range(num_batches):
      current, pending = pending, submit(b + 1) if b + 1 < num_batches else []
      yield _assemble([f.result() for f in current], batch_size, reader.image_size)


def make_eval_iterator(data_cfg, *, batch_size: int, process_index: int, process_count: int, source=None):
  """Batches {'image', 'label', 'mask'} over this process's share of the eval split, in order.

  The first config.data.eval_examples records (all if <= 0) are split into contiguous shares, one per
  process; every process yields the same number of batches, padded with mask=False rows, so each example
  appears exactly once with mask=True across processes. `source` overrides the configured eval split.
  """
  if source is None:
    source = build_source(data_cfg.source, data_cfg.eval_split, data_cfg)
  total = len(source) if data_cfg.eval_examples <= 0 else min(int(data_cfg.eval_examples), len(source))
  if total <= 0:
    raise DataError(f"config.data.source={data_cfg.source!r} split {data_cfg.eval_split!r} has no records")
  share, num_batches = eval_shares(total, batch_size, process_index, process_count)
  reader = _EvalReader(source, data_cfg.image_size)
  return _eval_batches(reader, share, num_batches, batch_size, threads=max(2, data_cfg.num_workers))
