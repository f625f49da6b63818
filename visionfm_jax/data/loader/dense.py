"""Input pipelines of the dense tasks: semantic segmentation and object detection.

Sources: 'scenes' (both tasks), 'ade20k:<root>' (segmentation), 'coco:<root>' (detection); see sources/registry.py.
The machinery is pipeline.py's: per-process shards, (seed, epoch) shuffles, per-record random streams, a
checkpointable iterator that skips and counts undecodable records, and padded eval batches. S is
config.data.image_size. Batches (numpy, host-local, B the per-process batch size):

segmentation  {'image': uint8 (B, S, S, 3), 'mask': int32 (B, S, S) class ids, 255 = ignore}
  train: short side to S * r, r ~ U(config.data.seg_scale_range) (mmseg's ADE20K resize to (4S, S) with
         ratio_range, for aspect ratios up to 4), a random S x S window (smaller images at the top-left,
         padded with image 0 / mask 255), a horizontal flip (config.data.augment.flip)
  eval:  short side to S, centred on an S x W canvas, W = config.data.seg_eval_width or S: the long side is
         centre-cropped to W, or padded (mask 255); mIoU is then measured on this canvas. Scenes images are
         S x S: unchanged. Adds 'valid' bool (B,).
detection     {'image': uint8 (B, S, S, 3), 'boxes': float32 (B, M, 4) xyxy / S, 'classes': int32 (B, M),
               -1 = padding}, M = config.data.max_boxes (more objects: the first M kept, the rest counted)
  train: long side to S * r, r ~ U(config.data.det_scale_range), at a random offset on the S x S canvas
         (a random crop for r > 1), a horizontal flip; boxes under a pixel wide or high afterwards dropped
  eval:  long side to S at the top-left; adds 'image_id' int64, 'orig_size' int32 (h, w), 'scale' float32
         (original xyxy = normalised xyxy * S / scale) and 'valid' bool (B,)

Eval iterators mark real rows with 'valid' (the classification iterator's 'mask' is a label map here);
padding rows are zeros with mask 255 and classes -1. `coco_ground_truth` gives the COCO-format ground truth
of exactly the examples the detection eval iterator yields, category ids the contiguous classes 0..C-1.
"""

from __future__ import annotations

import math

import numpy as np

from visionfm_jax.data.embedded import scenes
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources.registry import build_source, eval_source_spec, eval_source_what, source_kind
from visionfm_jax.data.sources.registry import class_names as source_class_names
from visionfm_jax.data.transforms import dense_transforms
from visionfm_jax.errors import ConfigError, DataError

KINDS = ("segmentation", "detection")
_NEEDS = {"segmentation": "mask", "detection": "boxes"}
_HINT = {
  "segmentation": "segmentation reads 'scenes' or 'ade20k:<root>'",
  "detection": "detection reads 'scenes' or 'coco:<root>'",
}


def _check(data_cfg, kind: str) -> None:
  if kind not in KINDS:
    raise ConfigError(f"dense task kind {kind!r}: expected one of {KINDS}")
  if data_cfg.mixture:
    raise ConfigError(
      f"config.data.mixture ({len(data_cfg.mixture)} entries): {kind} trains on one source, "
      f"config.data.source ({_HINT[kind]}); mixtures feed classification, "
      f"contrastive and aurora runs"
    )


def class_names(data_cfg, kind: str) -> list[str]:
  """Class names in class-id order: segmentation mask ids (scenes: 'background' then the 8 kinds; ADE20K:
  its 150 classes) or detection classes (scenes: the 8 kinds; COCO: its categories in id order)."""
  _check(data_cfg, kind)
  if kind == "segmentation" and source_kind(data_cfg.source) == "scenes":
    return list(scenes.SEGMENTATION_CLASS_NAMES)
  return source_class_names(data_cfg.source, data_cfg)


def _train_ops(data_cfg, kind: str) -> list:
  size = data_cfg.image_size
  if kind == "segmentation":
    decode_side = math.ceil(size * data_cfg.seg_scale_range[1])
    transform = dense_transforms.SegmentationTrain(size, data_cfg.seg_scale_range, data_cfg.augment.flip)
  else:
    decode_side = math.ceil(size * data_cfg.det_scale_range[1])
    transform = dense_transforms.DetectionTrain(
      size, data_cfg.det_scale_range, data_cfg.augment.flip, data_cfg.max_boxes
    )
  return [dense_transforms.DecodeDense(decode_side), dense_transforms.MarkInvalid(size), transform]


def make_dense_train_loader(
  data_cfg, kind: str, *, batch_size: int, seed: int, process_index: int, process_count: int, source=None
):
  """An infinite, shuffled, augmented, checkpointable loader of `kind` batches (module docstring) over this
  process's shard of config.data.source, split config.data.train_split (`source` overrides it); see
  pipeline.make_train_loader for sharding, determinism and skipping."""
  _check(data_cfg, kind)
  if source is None:
    source = build_source(data_cfg.source, data_cfg.train_split, data_cfg, training=True)
  pipeline.require_key(
    source, _NEEDS[kind], f"config.data.source={data_cfg.source!r}", data_cfg.train_split, _HINT[kind]
  )
  return pipeline.grain_train_loader(
    data_cfg,
    source,
    _train_ops(data_cfg, kind),
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )


class DenseEvalReader:
  """Reads one eval record into an example (None when undecodable), a pure function of the index."""

  def __init__(self, data_cfg, kind: str, source):
    self.source, size = source, data_cfg.image_size
    self.decode = dense_transforms.DecodeDense()  # in full: training alone decodes JPEGs in draft
    if kind == "segmentation":
      width = data_cfg.seg_eval_width or size
      self.transform = dense_transforms.SegmentationEval(size, width)
      self._spec = {"image": ((size, width, 3), np.uint8), "mask": ((size, width), np.int32, dense_transforms.IGNORE)}
    else:
      m = data_cfg.max_boxes
      self.transform = dense_transforms.DetectionEval(size, m)
      self._spec = {
        "image": ((size, size, 3), np.uint8),
        "boxes": ((m, 4), np.float32),
        "classes": ((m,), np.int32, -1),
        "image_id": ((), np.int64),
        "orig_size": ((2,), np.int32),
        "scale": ((), np.float32),
      }

  def __call__(self, index: int):
    element = self.decode.map(self.source[index])
    return None if element["image"] is None else self.transform.map(element)

  def spec(self) -> dict:
    return dict(self._spec)


def _eval_source(data_cfg, source, split=None):
  if source is not None:
    return source
  return build_source(
    eval_source_spec(data_cfg), split or data_cfg.eval_split, data_cfg, what=eval_source_what(data_cfg)
  )


def make_dense_eval_iterator(
  data_cfg, kind: str, *, batch_size: int, process_index: int, process_count: int, source=None
):
  """`kind` eval batches (module docstring) over this process's contiguous share of the first
  config.data.eval_examples records of the eval source (config.data.eval_source, else source; split
  config.data.eval_split), padded so every process yields as many batches; real rows have valid=True."""
  _check(data_cfg, kind)
  source = _eval_source(data_cfg, source)
  pipeline.require_key(source, _NEEDS[kind], eval_source_what(data_cfg), data_cfg.eval_split, _HINT[kind])
  total = pipeline.eval_total(data_cfg, len(source))
  share, num_batches = pipeline.eval_shares(total, batch_size, process_index, process_count)
  return pipeline.eval_batches(
    DenseEvalReader(data_cfg, kind, source),
    share,
    num_batches,
    batch_size,
    threads=pipeline.eval_threads(data_cfg),
    valid_key="valid",
  )


def coco_ground_truth(data_cfg, split: str | None = None, num_examples: int | None = None, source=None) -> dict:
  """COCO-format {'images', 'annotations', 'categories'} of the first `num_examples` eval records (None:
  config.data.eval_examples, <= 0: all; the records the detection eval iterator reads), in original pixels.

  Category ids are the contiguous classes 0..C-1 (each category also names its 'coco_id'); image ids are
  the batches' 'image_id'. coco: from the annotation file, crowd annotations kept with iscrowd=1, areas
  from the file. scenes: from the records, area = box area, no crowd.
  """
  source = _eval_source(data_cfg, source, split)
  if num_examples is None:
    count = pipeline.eval_total(data_cfg, len(source))
  else:
    count = len(source) if num_examples <= 0 else min(int(num_examples), len(source))
  if hasattr(source, "ground_truth"):
    return source.ground_truth(count)
  if isinstance(source, scenes.ScenesSource):
    return _scenes_ground_truth(source, count)
  raise DataError(f"{eval_source_what(data_cfg)}: COCO ground truth needs 'coco:<root>' or 'scenes'")


def _scenes_ground_truth(source: scenes.ScenesSource, count: int) -> dict:
  images, annotations = [], []
  for index in range(count):
    record = source[index]
    images.append({"id": index, "height": source.image_size, "width": source.image_size})
    for (x0, y0, x1, y1), kind in zip(record["boxes"].tolist(), record["classes"].tolist()):
      annotations.append(
        {
          "id": len(annotations) + 1,
          "image_id": index,
          "category_id": kind,
          "bbox": [x0, y0, x1 - x0, y1 - y0],
          "area": (x1 - x0) * (y1 - y0),
          "iscrowd": 0,
        }
      )
  categories = [{"id": c, "name": name} for c, name in enumerate(scenes.CLASS_NAMES)]
  return {"images": images, "annotations": annotations, "categories": categories}
