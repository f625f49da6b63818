"""The pixel losses: SimMIM's masked L1 and segmentation's per-pixel cross-entropy with an ignore label.

The MIM loss takes an optional `normalizer`: Aurora's split loss (tasks/aurora.py) divides each micro-batch's sum
by the whole batch's count of masked pixels, so under gradient accumulation the micro-batch losses add up to the
loss of the whole batch. Segmentation (and detection, detection.py) divide by the micro-batch's own count, and the
loop averages the micro-batch losses (training/grads.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from visionfm_jax.data.transforms.dense_transforms import IGNORE


def upsample_mask(mask: jax.Array, factor: int) -> jax.Array:
  """(B, gh, gw) -> (B, gh * factor, gw * factor), nearest neighbour."""
  return jnp.repeat(jnp.repeat(mask, factor, axis=1), factor, axis=2)


MIM_EPS = 1e-5  # SimMIM's, added to the masked-pixel count: the loss stays finite when nothing is masked


def mim_l1_loss(pred: jax.Array, target: jax.Array, pixel_mask: jax.Array, normalizer=None) -> jax.Array:
  """SimMIM's loss: L1 over masked pixels, sum(|target - pred| * m) / (sum(m) + MIM_EPS) / 3; fp32.

  `pred`, `target` (B, H, W, 3) in normalised-image space; `pixel_mask` (B, H, W), 1 where masked.
  `normalizer`: divide by this (the global sum(m) + MIM_EPS) instead of this batch's sum(m) + MIM_EPS.
  """
  m = pixel_mask.astype(jnp.float32)
  error = jnp.abs(target.astype(jnp.float32) - pred.astype(jnp.float32))
  total = jnp.sum(error * m[..., None])
  return total / (jnp.sum(m) + MIM_EPS if normalizer is None else normalizer) / 3.0


def segmentation_ce_terms(
  logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE
) -> tuple[jax.Array, jax.Array]:
  """(sum of per-pixel softmax cross-entropies, number of labelled pixels); fp32.

  `logits` (B, H, W, C), `labels` (B, H, W) class ids; pixels labelled `ignore_label` (or any id outside
  [0, C)) count for nothing.
  """
  logits = logits.astype(jnp.float32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < logits.shape[-1])
  target = jnp.where(valid, labels, 0)[..., None]
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target, axis=-1)[..., 0]
  valid = valid.astype(jnp.float32)
  return jnp.sum(nll * valid), jnp.sum(valid)


def segmentation_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE) -> jax.Array:
  """Mean per-pixel cross-entropy over labelled pixels (0 when every pixel is ignored); fp32."""
  total, count = segmentation_ce_terms(logits, labels, ignore_label)
  return total / jnp.maximum(count, 1.0)
