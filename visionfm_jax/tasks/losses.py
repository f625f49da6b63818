"""Losses: contrastive (CLIP, plain and sharded), captioning (token cross-entropy), SimMIM's masked L1, and the
segmentation's per-pixel cross-entropy with an ignore label (detection's losses live in `detection/losses.py`).

Contrastive: the plain B x B form and the sharded form that never builds B x B on one device.

`logit_scale` here is the multiplier s = exp(t) (already exponentiated and clamped), as in CLIP's
pseudo-code: logits = s * I @ T^T. With hard targets the loss is the mean of the image->text and the
text->image cross-entropies against the diagonal; with `mix` (Mixup of image-text pairs) image i is
lam * image_i + (1 - lam) * image_{i-1}, so its text targets are lam on text i and 1 - lam on text i-1,
and text j's image targets are lam on image j and 1 - lam on image j+1.

Captioning, MIM, segmentation and detection losses take an optional `normalizer`: with gradient accumulation
each micro-batch divides its sum by the global count (non-pad tokens, masked pixels, labelled pixels, target
boxes), so the micro-batch losses add up to the loss of the whole batch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P



def _soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over rows of -sum(targets * log_softmax(logits))."""
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def _targets(rows: int, cols: int, offset, mix, shift: int) -> jax.Array:
  """(rows, cols) targets for global rows offset..offset+rows: 1 on the diagonal, or lam / 1 - lam with Mixup.

  `shift` is where a row's mixed-in partner sits relative to the diagonal (-1 for images, +1 for texts);
  partners wrap around the global batch.
  """
  row = offset + jnp.arange(rows)[:, None]
  col = jnp.arange(cols)[None, :]
  diagonal = (col == row).astype(jnp.float32)
  if mix is None:
    return diagonal
  partner = (col == (row + shift) % cols).astype(jnp.float32)
  return mix * diagonal + (1.0 - mix) * partner


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale, mix=None) -> jax.Array:
  """Symmetric InfoNCE over a (B, D) batch of L2-normalised image and text embeddings; fp32.

  `mix`: the Mixup lambda when images were mixed with their predecessor (None: no Mixup).
  """
  image_emb, text_emb = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  logits = logit_scale * image_emb @ text_emb.T
  n = logits.shape[0]
  i2t = _soft_cross_entropy(logits, _targets(n, n, 0, mix, -1))
  t2i = _soft_cross_entropy(logits.T, _targets(n, n, 0, mix, +1))
  return 0.5 * (i2t + t2i)


def _local_clip_loss(image_emb, text_emb, logit_scale, mix, axes: tuple[str, ...]):
  """Inside shard_map: this device's rows against the all-gathered columns; returns the global mean loss."""
  image_emb, text_emb = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  all_images = jax.lax.all_gather(image_emb, axes, tiled=True)  # differentiable: its transpose reduce-scatters
  all_texts = jax.lax.all_gather(text_emb, axes, tiled=True)
  rows, total = image_emb.shape[0], all_texts.shape[0]
  offset = jax.lax.axis_index(axes) * rows
  i2t = _soft_cross_entropy(logit_scale * image_emb @ all_texts.T, _targets(rows, total, offset, mix, -1))
  t2i = _soft_cross_entropy(logit_scale * text_emb @ all_images.T, _targets(rows, total, offset, mix, +1))
  return jax.lax.pmean(0.5 * (i2t + t2i), axes)


def sharded_clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale, mesh: Mesh,
                      batch_axes: Sequence[str] = ("data", "fsdp"), mix=None) -> jax.Array:
  """`clip_loss` on global arrays whose batch is split over `batch_axes`, with B_local x B_global logits.

  Equal in value and gradient to `clip_loss` on the same global batch. Call it under `jit` on arrays
  sharded (or shardable) as P(batch_axes).
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  mix_arg = jnp.float32(1.0) if mix is None else jnp.asarray(mix, jnp.float32)
  fn = jax.shard_map(
      lambda i, t, s, m: _local_clip_loss(i, t, s, None if mix is None else m, axes),
      mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P(), check_vma=False)
  return fn(image_emb, text_emb, jnp.asarray(logit_scale, jnp.float32), mix_arg)


def caption_loss_terms(logits: jax.Array, labels: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropies, number of tokens) over the positions whose label is not `pad_id`; fp32.

  `logits` (B, L, V) and `labels` (B, L) are already aligned: the caller passes logits[:, :-1] and
  text[:, 1:].
  """
  logits = logits.astype(jnp.float32)
  valid = labels != pad_id
  target = jnp.where(valid, labels, 0)[..., None]  # any in-range index: those positions are masked out
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target, axis=-1)[..., 0]
  valid = valid.astype(jnp.float32)
  return jnp.sum(nll * valid), jnp.sum(valid)


def caption_loss(logits: jax.Array, labels: jax.Array, pad_id: int = 0, normalizer=None) -> jax.Array:
  """Mean token cross-entropy over non-pad labels (see `caption_loss_terms`); fp32.

  `normalizer`: divide the sum by this (e.g. the global token count) instead of this batch's max(count, 1).
  """
  total, count = caption_loss_terms(logits, labels, pad_id)
  return total / (jnp.maximum(count, 1.0) if normalizer is None else normalizer)


def upsample_mask(mask: jax.Array, factor: int) -> jax.Array:
  """(B, gh, gw) -> (B, gh * factor, gw * factor), nearest neighbour."""
  return jnp.repeat(jnp.repeat(mask, factor, axis=1), factor, axis=2)


def mim_l1_loss(pred: jax.Array, target: jax.Array, pixel_mask: jax.Array, normalizer=None) -> jax.Array:
  """SimMIM's loss: L1 over masked pixels, sum(|target - pred| * m) / (sum(m) + 1e-5) / 3; fp32.

  `pred`, `target` (B, H, W, 3) in normalised-image space; `pixel_mask` (B, H, W), 1 where masked.
  `normalizer`: divide by this (the global sum(m) + 1e-5) instead of this batch's sum(m) + 1e-5.
  """
  m = pixel_mask.astype(jnp.float32)
  error = jnp.abs(target.astype(jnp.float32) - pred.astype(jnp.float32))
  total = jnp.sum(error * m[..., None])
  return total / (jnp.sum(m) + 1e-5 if normalizer is None else normalizer) / 3.0


def segmentation_ce_terms(logits: jax.Array, labels: jax.Array, ignore_label: int = 255) -> tuple[jax.Array, jax.Array]:
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


def segmentation_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = 255,
                               normalizer=None) -> jax.Array:
  """Mean per-pixel cross-entropy over labelled pixels (0 when every pixel is ignored); fp32.

  `normalizer`: divide the sum by this (the global labelled-pixel count) instead of max(count, 1).
  """
  total, count = segmentation_ce_terms(logits, labels, ignore_label)
  return total / (jnp.maximum(count, 1.0) if normalizer is None else normalizer)
