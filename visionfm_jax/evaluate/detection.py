"""COCO box mAP through pycocotools, and the evaluator that feeds it a detector's top-k outputs.

`coco_map(ground_truth, detections)`: ground truth as a COCO-format dict ({'images', 'annotations',
'categories'}; missing annotation 'id' / 'area' / 'iscrowd' are filled with 1.., w * h, 0), detections as
COCO results [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}] in original pixels. Returns
pycocotools' summary numbers: map (AP@[.5:.95], area all, 100 detections), ap50, ap75, ap_small, ap_medium,
ap_large, ar100 (-1 where pycocotools has nothing to average, e.g. no ground truth of that size). pycocotools'
prints are captured, not shown.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from visionfm_jax.errors import DataError

STAT_NAMES = {"map": 0, "ap50": 1, "ap75": 2, "ap_small": 3, "ap_medium": 4, "ap_large": 5, "ar100": 8}


def top_k_detections(logits: jax.Array, boxes: jax.Array, k: int) -> dict[str, jax.Array]:
  """The k best (location, class) pairs per image by sigmoid score (no NMS), boxes clipped to [0, 1].

  logits (B, Q, C), boxes (B, Q, 4) -> {"scores": (B, k), "classes": (B, k) int32, "boxes": (B, k, 4)}.
  """
  batch, queries, num_classes = logits.shape
  k = min(k, queries * num_classes)
  scores, flat = jax.lax.top_k(jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(batch, -1), k)
  picked = jnp.take_along_axis(boxes.astype(jnp.float32), (flat // num_classes)[..., None], axis=1)
  return {"scores": scores, "classes": (flat % num_classes).astype(jnp.int32), "boxes": jnp.clip(picked, 0.0, 1.0)}


def _complete_ground_truth(gt: dict) -> dict:
  """A copy with the fields pycocotools needs; raises DataError naming what is missing."""
  for key in ("images", "annotations", "categories"):
    if key not in gt:
      raise DataError(f"COCO ground truth has no {key!r} list (keys: {sorted(gt)})")
  gt = copy.deepcopy(gt)
  gt.setdefault("info", {})
  gt.setdefault("licenses", [])
  for i, ann in enumerate(gt["annotations"]):
    missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
    if missing:
      raise DataError(f"COCO ground truth annotation {i} lacks {missing}")
    ann.setdefault("id", i + 1)
    ann.setdefault("iscrowd", 0)
    ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
  return gt


def coco_map(
  ground_truth: dict, detections: Sequence[dict], image_ids: Sequence[int] | None = None, log: list[str] | None = None
) -> dict[str, float]:
  """COCO bbox metrics of `detections` against `ground_truth` (over `image_ids`, default all its images).

  `log`: a list that receives pycocotools' captured output.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top

  if not detections:  # pycocotools cannot load an empty result list; nothing found scores 0
    return {name: 0.0 for name in STAT_NAMES}
  captured = io.StringIO()
  with contextlib.redirect_stdout(captured):
    gt = COCO()
    gt.dataset = _complete_ground_truth(ground_truth)
    gt.createIndex()
    results = gt.loadRes([dict(d, bbox=[float(v) for v in d["bbox"]], score=float(d["score"])) for d in detections])
    evaluation = COCOeval(gt, results, iouType="bbox")
    if image_ids is not None:
      evaluation.params.imgIds = sorted(int(i) for i in image_ids)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  if log is not None:
    log.append(captured.getvalue())
  return {name: float(evaluation.stats[i]) for name, i in STAT_NAMES.items()}


def coco_detections(
  scores: np.ndarray,
  classes: np.ndarray,
  boxes: np.ndarray,
  image_ids: np.ndarray,
  to_pixels: np.ndarray,
  valid: np.ndarray | None = None,
  orig_size: np.ndarray | None = None,
) -> list[dict]:
  """COCO results from top-k outputs: scores (B, K), classes (B, K), boxes (B, K, 4) normalised xyxy.

  `to_pixels` (B,) multiplies normalised coordinates into original pixels (S / scale for the dense eval
  batches); boxes are clipped to `orig_size` (B, 2) (h, w) when given; rows with `valid` False are skipped.
  Category ids are the classes, as the ground truth of the dense sources has them (data/loader/dense.py
  `coco_ground_truth`: COCO's ids in its categories' 'coco_id').
  """
  scores, classes, boxes = np.asarray(scores), np.asarray(classes), np.asarray(boxes, np.float64)
  out = []
  for b in range(scores.shape[0]):
    if valid is not None and not valid[b]:
      continue
    xyxy = boxes[b] * float(to_pixels[b])
    if orig_size is not None:
      h, w = (float(v) for v in orig_size[b])
      xyxy = np.clip(xyxy, 0.0, [w, h, w, h])
    for score, cls, (x1, y1, x2, y2) in zip(scores[b].tolist(), classes[b].tolist(), xyxy.tolist()):
      out.append(
        {"image_id": int(image_ids[b]), "category_id": int(cls), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
      )
  return out


class DetectionEvaluator:
  """COCO mAP of `predict(params, images) -> {"logits", "boxes"}` over the dense eval batches ('image',
  'image_id', 'orig_size', 'scale', 'valid'; see data/loader/dense.py) against `ground_truth` (the COCO dict of
  exactly those examples). Keeps the `top_k` best (location, class) pairs per image. Every process gathers
  all processes' detections and gets the same numbers."""

  def __init__(self, predict: Callable, ctx, ground_truth: dict, top_k: int = 100):
    self.ctx, self.ground_truth = ctx, ground_truth

    def detect(params, batch):
      out = predict(params, batch["image"])
      top = top_k_detections(out["logits"], out["boxes"], top_k)
      top["to_pixels"] = batch["image"].shape[1] / batch["scale"]
      return dict(top, **{k: batch[k] for k in ("image_id", "orig_size", "valid")})

    self._detect = jax.jit(detect, out_shardings=NamedSharding(ctx.mesh, P()))

  def __call__(self, params, local_batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    detections, seen = [], 0
    for local in local_batches:
      out = jax.device_get(self._detect(params, self.ctx.to_global(local)))
      seen += 1
      detections += coco_detections(
        out["scores"], out["classes"], out["boxes"], out["image_id"], out["to_pixels"], out["valid"], out["orig_size"]
      )
    if not seen:
      raise ValueError("the evaluation split yielded no batches")
    return coco_map(self.ground_truth, detections)
