"""Object detection (COCO; the embedded 'scenes' for the demo): a OneNet-style dense set predictor.

Design: every location of a feature pyramid predicts sigmoid class logits and one box (models/detector.py);
training matches predictions to the ground-truth boxes one-to-one (OneNet, Sun et al. 2021; the Hungarian
matching of DETR, Carion et al. 2020) with the cost class_weight * focal + l1_weight * L1 + giou_weight * -GIoU,
and the set loss (focal over all locations x classes, L1 + 1 - GIoU on the matched pairs, each / the number of
boxes) uses the same weights. Because each object has exactly one positive prediction, inference needs no NMS:
the `top_k` best (location, class) scores are the detections. The pyramid is ViTDet's simple feature pyramid
from the last ViT block (Li et al. 2022) or an FPN over the SwinV2 stages. We chose this over a two-stage
(Mask R-CNN / Cascade) ViTDet: it has no proposals, RoIAlign, anchors or NMS to write and shard, keeps the whole
model a jit-able function of fixed shapes, and its matching is one host call per example (sharded over the
data-parallel devices with `matching.sharded_hungarian_match` under a mesh). The cost is accuracy: published
OneNet numbers are a few AP below a Cascade R-CNN on the same backbone.

Model: `Detector(backbone=models.build(config.model, dtype, platform), ...)`, config.model the backbone family's
config with num_classes=0 (its params under `backbone/`, named as in pretraining, so `init_from_prefix='backbone'` loads
a pretraining checkpoint), `neck/` and `head/` from config.head:

  num_classes     detection classes (no background class)
  levels          nominal strides of the predicting levels (ViT: pyramid steps from the patch stride; SwinV2:
                  the stages with these strides)
  neck_channels, head_channels, num_convs, prior_prob   the neck / head widths, tower depth, initial sigmoid
  class_weight, l1_weight, giou_weight, focal_alpha, focal_gamma   matching cost = loss weights
  top_k           detections kept per image at evaluation

Batches: data/loader/dense.py's detection layout. Metrics: train/loss_class, train/loss_l1, train/loss_giou (unweighted
parts), eval/det/{map, ap50, ap75, ap_small, ap_medium, ap_large, ar100} (pycocotools, evaluate/detection.py).
`train_flops_per_example` is None: there is no analytic counter for the neck, the head and the matching, so the
loop logs no train/mfu for detection runs.
"""

from __future__ import annotations

import functools

import numpy as np

from visionfm_jax import data
from visionfm_jax.data.loader import dense as dense_data
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate import detection as detection_eval
from visionfm_jax.losses import detection as detection_losses
from visionfm_jax.losses import matching
from visionfm_jax.models import detector
from visionfm_jax.tasks.base import EvalContext, Task, check_dense_config


def check_config(config) -> None:
  """ConfigError for a missing or inconsistent `config.head` / backbone setting."""
  check_dense_config(config, "detection")
  if config.head.top_k < 1:
    raise ConfigError(f"config.head.top_k={config.head.top_k}: must be positive")


class DetectionTask(Task):
  augments_on_device = False  # data/transforms/dense_transforms.py flips on the host, with the labels

  def __init__(self, config, mesh=None):
    check_config(config)
    super().__init__(config, mesh)
    head = config.head
    levels = tuple(int(s) for s in head.levels)
    try:
      detector.check_levels(self.model, levels, "config.head.levels")
    except ValueError as e:
      raise ConfigError(str(e)) from e
    self.model = detector.Detector(
      backbone=self.model,
      num_classes=head.num_classes,
      levels=levels,
      neck_channels=head.neck_channels,
      head_channels=head.head_channels,
      num_convs=head.num_convs,
      prior_prob=head.prior_prob,
      dtype=self.dtype,
    )
    self.weights = dict(
      class_weight=head.class_weight,
      l1_weight=head.l1_weight,
      giou_weight=head.giou_weight,
      alpha=head.focal_alpha,
      gamma=head.focal_gamma,
    )

  def predict(self, params, images, *, train: bool, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params}, self.normalize(images), train=train, rngs=rngs)

  def match(self, logits, pred_boxes, target_classes, target_boxes):
    """(B, M) index of the prediction matched to each target box (-1: padding)."""
    cost = matching.batched_match_cost(logits, pred_boxes, target_classes, target_boxes, **self.weights)
    valid = target_classes >= 0
    if self.mesh is not None:
      return matching.sharded_hungarian_match(cost, valid, self.mesh)
    return matching.hungarian_match(cost, valid)

  def loss(self, params, batch, rng):
    out = self.predict(params, batch["image"], train=True, rng=rng)
    index = self.match(out["logits"], out["boxes"], batch["classes"], batch["boxes"])
    loss, parts = detection_losses.detection_set_loss(
      out["logits"], out["boxes"], batch["classes"], batch["boxes"], index, **self.weights
    )
    return loss, {f"train/loss_{name}": value for name, value in parts.items()}

  @functools.cached_property
  def class_names(self) -> list[str]:
    return dense_data.class_names(self.config.data, "detection")

  def train_loader(self, *, batch_size: int, seed: int, process_index: int, process_count: int):
    self.check_class_count("config.head.num_classes", self.config.head.num_classes)
    return data.make_dense_train_loader(
      self.config.data,
      "detection",
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
    )

  def evaluators(self, ctx: EvalContext):
    source = ctx.open_eval_source(self.config.data)
    ground_truth = data.coco_ground_truth(self.config.data, source=source)

    def predict(params, images):
      return self.predict(params, images, train=False)

    evaluator = detection_eval.DetectionEvaluator(predict, ctx, ground_truth, top_k=self.config.head.top_k)

    def run_det(params):
      batches = data.make_dense_eval_iterator(
        self.config.data,
        "detection",
        batch_size=ctx.local_batch_size,
        process_index=ctx.process_index,
        process_count=ctx.process_count,
        source=source,
      )
      return evaluator(params, batches)

    return {"det": run_det}

  def synthetic_batch(self, batch_size, rng):
    """Images plus up to config.data.max_boxes random boxes (normalised xyxy) per image, the rest padding."""
    m, num_classes = self.config.data.max_boxes, self.config.head.num_classes
    corners = rng.uniform(0.0, 1.0, (batch_size, m, 2, 2)).astype(np.float32)
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2) + 1e-3], axis=-1).clip(0.0, 1.0)
    count = rng.integers(1, m + 1, (batch_size, 1))
    classes = np.where(np.arange(m)[None] < count, rng.integers(0, num_classes, (batch_size, m)), -1)
    return {
      **super().synthetic_batch(batch_size, rng),
      "boxes": boxes.astype(np.float32),
      "classes": classes.astype(np.int32),
    }
