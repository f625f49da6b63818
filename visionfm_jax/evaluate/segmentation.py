"""Semantic segmentation metrics from a confusion matrix accumulated on device: mIoU, per-class IoU, accuracy.

`confusion_matrix` counts (ground truth, prediction) pairs of the labelled pixels (rows: ground truth);
`segmentation_metrics` finishes the summed matrix as mmseg does: IoU_c = TP / (TP + FP + FN) for the classes
that occur in the ground truth or the prediction (others are NaN), mIoU = the mean over those (nanmean), pixel
accuracy = correct / labelled pixels, mean accuracy = nanmean over ground-truth classes of TP / (TP + FN).
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from visionfm_jax.data.transforms.dense_transforms import IGNORE


def confusion_matrix(pred: jax.Array, labels: jax.Array, num_classes: int, ignore_label: int = IGNORE) -> jax.Array:
  """(C, C) int32 counts of pixels with ground truth i predicted as j; pixels labelled `ignore_label` (or any
  id outside [0, C)) are skipped. `pred`, `labels` are class-id arrays of one shape. Jittable."""
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + pred.astype(jnp.int32), 0).reshape(-1)
  counts = jnp.bincount(index, weights=valid.reshape(-1).astype(jnp.int32), length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, float | np.ndarray]:
  """{"miou", "pixel_acc", "mean_acc", "per_class_iou" (C,) with NaN for absent classes} of a summed matrix."""
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  gt, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
  union = gt + predicted - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    class_acc = np.where(gt > 0, tp / gt, np.nan)
  present = ~np.isnan(iou)
  total = confusion.sum()
  return {
    "miou": float(np.mean(iou[present])) if present.any() else float("nan"),
    "pixel_acc": float(tp.sum() / total) if total else float("nan"),
    "mean_acc": float(np.nanmean(class_acc)) if (gt > 0).any() else float("nan"),
    "per_class_iou": iou,
  }


class SegmentationEvaluator:
  """mIoU / accuracies over an evaluation split: `predict(params, images) -> (B, H, W, C)` logits at the
  labels' resolution. Batches hold "image", "mask" (255 = ignore) and optionally "valid" (B,) (padded examples
  of a final batch count for nothing). Sums are global: every process gets the same numbers."""

  def __init__(self, predict: Callable, ctx, num_classes: int, ignore_label: int = IGNORE):
    self.ctx, self.num_classes = ctx, num_classes

    def counts(params, batch):
      labels = batch["mask"]
      if "valid" in batch:
        labels = jnp.where(batch["valid"].reshape((-1,) + (1,) * (labels.ndim - 1)), labels, ignore_label)
      pred = jnp.argmax(predict(params, batch["image"]), axis=-1)
      return confusion_matrix(pred, labels, num_classes, ignore_label)

    self._counts = jax.jit(counts, out_shardings=NamedSharding(ctx.mesh, P()))

  def __call__(self, params, local_batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    total = None
    for local in local_batches:
      c = np.asarray(jax.device_get(self._counts(params, self.ctx.to_global(local))), np.int64)  # int32 overflows
      total = c if total is None else total + c
    if total is None:
      raise ValueError("the evaluation split yielded no batches")
    metrics = segmentation_metrics(total)
    metrics.pop("per_class_iou")
    return metrics
