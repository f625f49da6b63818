"""The image-text losses: contrastive (CLIP's softmax and SigLIP's sigmoid, plain and sharded) and captioning
(token cross-entropy).

Contrastive: the plain B x B form and the sharded form that never builds B x B on one device.

`logit_scale` here is the multiplier s = exp(t) (already exponentiated and clamped), as in CLIP's
pseudo-code: logits = s * I @ T^T. With hard targets the loss is the mean of the image->text and the
text->image cross-entropies against the diagonal; with `mix` (Mixup of image-text pairs) image i is
lam * image_i + (1 - lam) * image_{i-1}, so its text targets are lam on text i and 1 - lam on text i-1,
and text j's image targets are lam on image j and 1 - lam on image j+1. A `valid` mask (the captioned examples of
a batch that mixes in uncaptioned images) takes the other examples out of both the rows and the columns.

SigLIP (Zhai et al. 2023): every (image i, text j) pair of the global batch is a binary problem of its own,
loss = -(1/|B|) sum_i sum_j log sigmoid(z_ij (s x_i . y_j + b)), z_ij = 1 on the diagonal and -1 elsewhere, with a
learnable bias b. Written as a cross-entropy against labels y = (z + 1) / 2, a pair costs softplus(l) - y * l,
which also takes Mixup's soft labels (lam on text i, 1 - lam on text i-1, nothing renormalised: the pairs are
independent). Its sharded form passes the texts around a ring of the data-parallel devices, so that a device
holds its own rows against one other device's columns at a time, never B_local x B_global.

The caption loss takes an optional `normalizer`: Aurora's split loss (tasks/aurora.py) divides each micro-batch's
sum by the whole batch's count of non-pad tokens, so under gradient accumulation the micro-batch losses add up to
the loss of the whole batch (as pixels.py's MIM loss does).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from visionfm_jax import parallel

MASKED_LOGIT = -1e9  # an uncaptioned example's logit: exp underflows to 0 against |logits| <= 100


def _contrastive_terms(logits: jax.Array, targets: jax.Array, valid_cols) -> tuple[jax.Array, jax.Array]:
  """(sum over rows of the cross-entropy against targets renormalised to 1, number of rows with targets).

  Columns outside `valid_cols` leave the softmax and the targets; a row whose targets are all outside (an
  uncaptioned example, or masked by the caller) counts for nothing.
  """
  if valid_cols is not None:
    logits = jnp.where(valid_cols[None, :], logits, MASKED_LOGIT)
    targets = targets * valid_cols[None, :]
  mass = jnp.sum(targets, axis=-1)
  has_targets = mass > 0
  targets = targets / jnp.where(has_targets, mass, 1.0)[:, None]
  rows = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return jnp.sum(jnp.where(has_targets, rows, 0.0)), jnp.sum(has_targets.astype(jnp.float32))


def _targets(rows: int, cols: int, offset, mix, shift: int, valid_rows=None) -> jax.Array:
  """(rows, cols) targets for global rows offset..offset+rows: 1 on the diagonal, or lam / 1 - lam with Mixup;
  rows outside `valid_rows` (this block's rows) get none.

  `shift` is where a row's mixed-in partner sits relative to the diagonal (-1 for images, +1 for texts);
  partners wrap around the global batch.
  """
  row = offset + jnp.arange(rows)[:, None]
  col = jnp.arange(cols)[None, :]
  targets = (col == row).astype(jnp.float32)
  if mix is not None:
    partner = (col == (row + shift) % cols).astype(jnp.float32)
    targets = mix * targets + (1.0 - mix) * partner
  if valid_rows is not None:
    targets = targets * valid_rows[:, None]
  return targets


def _symmetric_terms(image_emb, text_emb, all_images, all_texts, logit_scale, offset, mix, valid, all_valid):
  """Sums and row counts of both directions for this block of rows against all columns."""
  rows, total = image_emb.shape[0], all_texts.shape[0]
  i2t = _contrastive_terms(
    logit_scale * image_emb @ all_texts.T, _targets(rows, total, offset, mix, -1, valid), all_valid
  )
  t2i = _contrastive_terms(
    logit_scale * text_emb @ all_images.T, _targets(rows, total, offset, mix, +1, valid), all_valid
  )
  return i2t, t2i


def _mean_of_directions(i2t, t2i) -> jax.Array:
  (i2t_sum, i2t_rows), (t2i_sum, t2i_rows) = i2t, t2i
  return 0.5 * (i2t_sum / jnp.maximum(i2t_rows, 1.0) + t2i_sum / jnp.maximum(t2i_rows, 1.0))


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale, mix=None, valid=None) -> jax.Array:
  """Symmetric InfoNCE over a (B, D) batch of L2-normalised image and text embeddings; fp32.

  `mix`: the Mixup lambda when images were mixed with their predecessor (None: no Mixup). `valid` (B,) bool:
  the captioned examples (None: all); the loss runs over those only, as if the others were not in the batch
  (with Mixup, a row whose partner is uncaptioned keeps its own target alone). 0 when no example is valid.
  """
  image_emb, text_emb = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  valid = None if valid is None else jnp.asarray(valid, bool)
  return _mean_of_directions(
    *_symmetric_terms(image_emb, text_emb, image_emb, text_emb, logit_scale, 0, mix, valid, valid)
  )


def _local_clip_loss(image_emb, text_emb, logit_scale, mix, valid, axes: tuple[str, ...]):
  """Inside shard_map: this device's rows against the all-gathered columns; returns the global loss."""
  image_emb, text_emb = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  all_images = jax.lax.all_gather(image_emb, axes, tiled=True)  # differentiable: its transpose reduce-scatters
  all_texts = jax.lax.all_gather(text_emb, axes, tiled=True)
  all_valid = None if valid is None else jax.lax.all_gather(valid, axes, tiled=True)
  offset = jax.lax.axis_index(axes) * image_emb.shape[0]
  i2t, t2i = _symmetric_terms(image_emb, text_emb, all_images, all_texts, logit_scale, offset, mix, valid, all_valid)
  return _mean_of_directions(jax.lax.psum(i2t, axes), jax.lax.psum(t2i, axes))


def sharded_clip_loss(
  image_emb: jax.Array, text_emb: jax.Array, logit_scale, mesh: Mesh, mix=None, valid=None
) -> jax.Array:
  """`clip_loss` on global arrays whose batch is split over the data-parallel axes of `mesh`
  (`parallel.batch_axes_of`), with B_local x B_global logits.

  Equal in value and gradient to `clip_loss` on the same global batch. Call it under `jit` on arrays
  sharded (or shardable) as the batch is (`parallel.BATCH_SPEC`).
  """
  axes = parallel.batch_axes_of(mesh)
  mix_arg = jnp.float32(1.0) if mix is None else jnp.asarray(mix, jnp.float32)
  valid_arg = jnp.ones(image_emb.shape[:1], bool) if valid is None else jnp.asarray(valid, bool)
  fn = jax.shard_map(
    lambda i, t, s, m, v: _local_clip_loss(i, t, s, None if mix is None else m, None if valid is None else v, axes),
    mesh=mesh,
    in_specs=(P(axes), P(axes), P(), P(), P(axes)),
    out_specs=P(),
    check_vma=False,
  )
  return fn(image_emb, text_emb, jnp.asarray(logit_scale, jnp.float32), mix_arg, valid_arg)


def _sigmoid_labels(rows: int, cols: int, row_offset, col_offset, total: int, mix) -> jax.Array:
  """(rows, cols) labels of images row_offset.. against texts col_offset.. of a global batch of `total`: 1 on the
  diagonal, 0 elsewhere; with Mixup lam on the diagonal and 1 - lam on the image's partner's text (i - 1, wrapping
  around the global batch)."""
  row = row_offset + jnp.arange(rows)[:, None]
  col = col_offset + jnp.arange(cols)[None, :]
  labels = (col == row).astype(jnp.float32)
  if mix is not None:
    labels = mix * labels + (1.0 - mix) * (col == (row - 1) % total).astype(jnp.float32)
  return labels


def _siglip_block_sum(images, texts, logit_scale, logit_bias, labels, valid_rows, valid_cols) -> jax.Array:
  """sum over the block's valid pairs of -log sigmoid(z_ij l_ij) = softplus(l_ij) - y_ij l_ij; fp32."""
  logits = logit_scale * images @ texts.T + logit_bias
  pairs = jax.nn.softplus(logits) - labels * logits
  return jnp.sum(pairs * (valid_rows[:, None] * valid_cols[None, :]))


def _as_mask(valid, n: int) -> jax.Array:
  return jnp.ones((n,), jnp.float32) if valid is None else jnp.asarray(valid).astype(jnp.float32)


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale, logit_bias, mix=None, valid=None) -> jax.Array:
  """SigLIP's sigmoid loss over a (B, D) batch of L2-normalised embeddings, summed over all B x B pairs and
  divided by the number of images; fp32.

  `logit_scale` is s = exp(t'), `logit_bias` b (both scalars). `mix`: the Mixup lambda (soft labels, module
  docstring). `valid` (B,) bool: the captioned examples (None: all); the others are neither rows nor columns and
  do not count in |B|. 0 when no example is valid.
  """
  image_emb, text_emb = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  n = image_emb.shape[0]
  mask = _as_mask(valid, n)
  total = _siglip_block_sum(
    image_emb, text_emb, logit_scale, logit_bias, _sigmoid_labels(n, n, 0, 0, n, mix), mask, mask
  )
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def _ring_siglip_loss(image_emb, text_emb, logit_scale, logit_bias, mix, valid, axes: tuple[str, ...], devices: int):
  """Inside shard_map: this device's rows against each device's texts in turn, the texts (and their mask)
  passed one device along the ring per hop; returns the global loss.

  Each hop's block is recomputed in the backward pass (`jax.checkpoint`), so that no hop's rows x columns
  logits are kept for it: what the scan saves are the texts each hop received (B_global x D in all).
  """
  image_emb, text_emb = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  rows = image_emb.shape[0]
  total = rows * devices
  me = jax.lax.axis_index(axes)
  to_next = [(d, (d + 1) % devices) for d in range(devices)]

  @jax.checkpoint
  def block(texts, valid_cols, source):
    labels = _sigmoid_labels(rows, rows, me * rows, source * rows, total, mix)
    return _siglip_block_sum(image_emb, texts, logit_scale, logit_bias, labels, valid, valid_cols)

  def source(h):
    return (me - h) % devices  # after h hops a device holds the texts that device me - h started with

  def hop(carry, h):
    texts, valid_cols, loss_sum = carry
    loss_sum = loss_sum + block(texts, valid_cols, source(h))
    # the next texts do not depend on this block: their transfer can overlap its compute
    texts, valid_cols = jax.lax.ppermute((texts, valid_cols), axes, to_next)
    return (texts, valid_cols, loss_sum), None

  (texts, valid_cols, loss_sum), _ = jax.lax.scan(hop, (text_emb, valid, jnp.float32(0.0)), jnp.arange(devices - 1))
  loss_sum = loss_sum + block(texts, valid_cols, source(devices - 1))
  return jax.lax.psum(loss_sum, axes) / jnp.maximum(jax.lax.psum(jnp.sum(valid), axes), 1.0)


def sharded_siglip_loss(
  image_emb: jax.Array, text_emb: jax.Array, logit_scale, logit_bias, mesh: Mesh, mix=None, valid=None
) -> jax.Array:
  """`siglip_loss` on global arrays whose batch is split over the data-parallel axes of `mesh`
  (`parallel.batch_axes_of`), as a ring: B_local x B_local logits per hop, one hop per device.

  Equal in value and gradient to `siglip_loss` on the same global batch (autodiff transposes each ppermute
  into the reverse hop). Call it under `jit` on arrays sharded (or shardable) as the batch is.
  """
  axes = parallel.batch_axes_of(mesh)
  devices = math.prod(mesh.shape[a] for a in axes)
  mix_arg = jnp.float32(1.0) if mix is None else jnp.asarray(mix, jnp.float32)
  fn = jax.shard_map(
    lambda i, t, s, b, m, v: _ring_siglip_loss(i, t, s, b, None if mix is None else m, v, axes, devices),
    mesh=mesh,
    in_specs=(P(axes), P(axes), P(), P(), P(), P(axes)),
    out_specs=P(),
    check_vma=False,
  )
  return fn(
    image_emb,
    text_emb,
    jnp.asarray(logit_scale, jnp.float32),
    jnp.asarray(logit_bias, jnp.float32),
    mix_arg,
    _as_mask(valid, image_emb.shape[0]),
  )


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
