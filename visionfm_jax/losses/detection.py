"""Detection losses: sigmoid focal loss and the set loss of dense detections given a one-to-one matching.

The set loss is normalised by the batch's own number of target boxes: with gradient accumulation the loop
averages the micro-batch losses (training/grads.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from visionfm_jax.losses import boxes as box_lib


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """Elementwise focal loss (Lin et al. 2017) of binary `targets` in [0, 1]; fp32, same shape as `logits`.

  FL = alpha_t (1 - p_t)^gamma BCE(logits, targets), p_t = p t + (1 - p)(1 - t), alpha_t = alpha t +
  (1 - alpha)(1 - t); alpha < 0 turns the weighting off.
  """
  logits, targets = logits.astype(jnp.float32), targets.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  bce = -(targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits))
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = bce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
  return loss


def detection_set_loss(
  logits: jax.Array,
  pred_boxes: jax.Array,
  target_classes: jax.Array,
  target_boxes: jax.Array,
  pred_index: jax.Array,
  *,
  class_weight: float = 2.0,
  l1_weight: float = 5.0,
  giou_weight: float = 2.0,
  alpha: float = 0.25,
  gamma: float = 2.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Set loss of dense detections given a one-to-one matching; fp32.

  logits (B, Q, C), pred_boxes (B, Q, 4) xyxy; target_classes (B, M) with -1 = padding, target_boxes (B, M, 4)
  in the same units; pred_index (B, M): the prediction matched to each target (-1: none), as from
  `matching.hungarian_match`. Focal loss over all B x Q x C outputs with the matched (prediction, class) pairs
  as positives, L1 (summed over the 4 coordinates) and 1 - GIoU over matched pairs; each part is summed and
  divided by the number of target boxes (at least 1).
  Returns (class_weight * focal + l1_weight * l1 + giou_weight * giou, {"class", "l1", "giou"} unweighted).
  """
  batch, queries, num_classes = logits.shape
  matched = (target_classes >= 0) & (pred_index >= 0)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], pred_index.shape)
  # Unmatched targets scatter out of bounds and are dropped.
  onehot = (
    jnp.zeros((batch, queries, num_classes), jnp.float32)
    .at[rows, jnp.where(matched, pred_index, queries), jnp.maximum(target_classes, 0)]
    .set(1.0, mode="drop")
  )
  normalizer = jnp.maximum(jnp.sum((target_classes >= 0).astype(jnp.float32)), 1.0)
  focal = jnp.sum(sigmoid_focal_loss(logits, onehot, alpha, gamma)) / normalizer
  picked = jnp.take_along_axis(pred_boxes.astype(jnp.float32), jnp.maximum(pred_index, 0)[..., None], axis=1)
  weight = matched.astype(jnp.float32)
  target_boxes = target_boxes.astype(jnp.float32)
  l1 = jnp.sum(jnp.sum(jnp.abs(picked - target_boxes), axis=-1) * weight) / normalizer
  giou = jnp.sum((1.0 - box_lib.giou(picked, target_boxes)) * weight) / normalizer
  loss = class_weight * focal + l1_weight * l1 + giou_weight * giou
  return loss, {"class": focal, "l1": l1, "giou": giou}
