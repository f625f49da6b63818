"""Swin Transformer V2 (Liu et al. 2022): the hierarchical backbone of SwinV2-G-CLIP and Aurora-Vision-XL.

Per stage, blocks attend within (shifted) windows:

  x = x + droppath(LN1(window_attention(x)))      # res-post-norm: the norm closes the residual branch
  x = x + droppath(LN2(mlp(x)))

Window attention is scaled cosine attention, cos(q, k) * exp(min(logit_scale_h, log 100)), plus a continuous
position bias 16 * sigmoid(MLP(log-spaced offsets)); q and v have biases, k does not. Odd blocks of a stage
roll the map by window // 2 and mask pairs from different regions with -100; a scanned stage repeats a (plain,
shifted) pair of blocks (params `blocks/plain`, `blocks/shifted`), so each block's shift is static and every
stage depth even. Between stages, V2 patch
merging concatenates each 2x2 neighbourhood, projects 4C -> 2C and then normalises. The end is LN(8C), a
mean over tokens and an optional head. H and G add a parameter-free LayerNorm on the main branch every
`extra_norm_period` blocks, counted within each stage (`extra_norm_scope='stage'`, the public ports) or
across the network (`'global'`).

Resolution transfer: the parameters do not depend on the image or window size (the position bias is an
MLP over normalised offsets), so a model trained at 224 px / window 14 loads into 640 px / window 40 as is;
`pretrained_window_sizes` names the windows it was trained with (`pretrained_windows(224, 14)` ->
(14, 14, 14, 7)) so that offsets are normalised as in training. A fine-tuning config states them; init_from
refuses a checkpoint trained with other windows, naming the value to set (`checkpoint_conflicts`).

Masked training (`token_subgrid` = k > 1; FLIP's masked tower, Li et al. 2023, in a form that keeps windows
whole): in training each image keeps every k-th patch along both axes, from a random phase (dy, dx) of its own,
i.e. 1 / k^2 of its patches, and the tower runs on that smaller whole map; evaluation sees every patch. A kept
token at (i, j) is patch (k i + dy, k j + dx) of the image, so two kept tokens Delta apart sit k Delta apart on
the full map: a stage whose full map has windows of W keeps windows of W / k kept tokens (the same windows of the
image, each with 1 / k^2 of its tokens; shifted by (W / k) // 2), and the position bias is the MLP at the offsets
k Delta normalised by W (or its pretrained window), the values the unmasked tower gives those pairs. A stage whose
full map is one window keeps one window. Patch merging joins 2x2 kept tokens, so every later stage's map is again
every k-th token of the full one. The parameters are those of the unmasked tower.

As a backbone (models/backbone.py): feature maps are the stages' outputs at strides patch * 2**s. The class
holds the math; its family (`FAMILY`, the module functions at the end) numbers the layers patch embedding /
patch norm / mask token 0, block i (counted across stages) i + 1, a patch merging the id of the block before
it, the rest sum(depths) + 1, and loads checkpoints of another resolution unchanged.

The shift mask adds -100 once, as the official code and REFERENCE.md specify. transformers'
`Swinv2SelfAttention` adds its mask twice (-200): the outputs differ only when a masked pair would score
within ~100 of the best unmasked one (logit scale near 100 with adversarial inputs), never in the parity tests.

Window sizes are clamped per stage: a feature map not larger than the window becomes one window, unshifted.
Feature maps that do not divide into windows are zero-padded on the bottom/right (as HF `Swinv2Model`).
Patch embedding and merging norms use eps 1e-5, blocks and the final norm `layer_norm_eps` (as the
reference). Cosine normalisation, norms, the position bias and softmax run in fp32 whatever `dtype` is.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.config_lib import EXTRA_NORM_SCOPES, model_rows, staged_size
from visionfm_jax.models import backbone, kernels, layers
from visionfm_jax.models.layers import ACT_EMBED, BATCH, EMBED, HEADS, KV
from visionfm_jax.parallel import sharding

# name: (embed_dim C, depths, heads); stage s has width C * 2**s.
SIZES: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
  "pico": (16, (2, 2), (2, 4)),  # unit tests
  "femto": (16, (2,), (2,)),  # the tests' image-text towers: pico's first stage alone
  "mu": (48, (2, 2, 2), (3, 6, 12)),  # CPU demos
  "T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
  "S": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
  "B": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
  "L": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
  "H": (352, (2, 2, 18, 2), (8, 16, 32, 64)),
  "G": (512, (2, 2, 42, 4), (16, 32, 64, 128)),
}
# Sizes that add a main-branch LayerNorm every 6 blocks (the paper's recipe for H and G).
EXTRA_NORM_PERIOD = {"H": 6, "G": 6}
CPB_HIDDEN = 512
PATCH_NORM_EPS = 1e-5
MASK_VALUE = -100.0
MAX_LOGIT_SCALE = math.log(100.0)
EMBEDDING_PARAMS = ("patch_embed", "patch_norm", "mask_token")  # layer 0 of the layer-wise decay
PAIR = ("plain", "shifted")  # a scanned stage's pair of blocks (SwinBlockPair): blocks 2j and 2j + 1


def parse_variant(variant: str) -> dict[str, Any]:
  """'G' -> embed_dim, depths, num_heads and the size's default extra_norm_period; the sizes may be spelled out as
  '<embed_dim>x<depth,...>x<heads,...>' ('8x2,2x2,4': `config_lib.staged_size`, no extra norms)."""
  sizes = SIZES.get(variant) or staged_size(variant)
  if sizes is None:
    raise ValueError(
      f"SwinV2 variant {variant!r}: expected one of {list(SIZES)} or "
      "'<embed_dim>x<depth,...>x<heads,...>' (one a stage)"
    )
  embed_dim, depths, heads = sizes
  return dict(embed_dim=embed_dim, depths=depths, num_heads=heads, extra_norm_period=EXTRA_NORM_PERIOD.get(variant, 0))


def per_stage(value: int | Sequence[int], num_stages: int, field: str) -> tuple[int, ...]:
  values = (value,) * num_stages if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
  if len(values) != num_stages:
    raise ValueError(f"{field}={value!r}: expected one int or {num_stages} (one per stage)")
  return values


def stage_window(feature: tuple[int, int], window: int) -> tuple[int, int]:
  """(window, shift) of a stage: a map not larger than the window is one unshifted window."""
  if max(feature) <= window:
    if feature[0] != feature[1]:
      raise ValueError(f"feature map {feature} is smaller than window {window} but not square")
    return feature[0], 0
  if min(feature) <= window:
    raise ValueError(f"feature map {feature} is larger than window {window} along one side only")
  return window, window // 2


def subgrid_window(
  feature: tuple[int, int], full_feature: tuple[int, int], window: int, stride: int
) -> tuple[int, int]:
  """(window, shift) of a stage seeing every `stride`-th token of a `full_feature` map (`token_subgrid`): the full
  map's windows with 1 / stride^2 of their tokens, shifted by half of that; one window where the full map is."""
  full_window, _ = stage_window(full_feature, window)
  if max(full_feature) <= window:
    return stage_window(feature, max(feature))
  if full_window % stride:
    raise ValueError(
      f"window {full_window} of a {full_feature} map does not split into every {stride}-th token "
      f"(token_subgrid={stride} needs windows divisible by it)"
    )
  kept = full_window // stride
  return kept, kept // 2


def keep_patch_subgrid(images: jax.Array, patch: int, stride: int, rng: jax.Array) -> jax.Array:
  """(B, H, W, c) -> (B, H / stride, W / stride, c): per image the patches (stride i + dy, stride j + dx) for a
  random phase (dy, dx) of its own, as one smaller image (`token_subgrid`); the others are never embedded."""
  batch, height, width, _ = images.shape
  if (height // patch) % stride or (width // patch) % stride:
    raise ValueError(
      f"a {height // patch}x{width // patch} patch map does not split into every {stride}-th patch "
      f"(token_subgrid={stride})"
    )
  phases = einops.rearrange(
    images, "b (h dh p) (w dw q) c -> b (dh dw) (h p) (w q) c", dh=stride, dw=stride, p=patch, q=patch
  )
  phase = jax.random.randint(rng, (batch,), 0, stride * stride)
  return jnp.take_along_axis(phases, phase[:, None, None, None, None], axis=1)[:, 0]


def stage_features(image_hw: tuple[int, int], patch_size: int, num_stages: int) -> list[tuple[int, int]]:
  """Feature map size of every stage (merging pads odd sizes by one)."""
  h, w = image_hw[0] // patch_size, image_hw[1] // patch_size
  out = []
  for _ in range(num_stages):
    out.append((h, w))
    h, w = (h + 1) // 2, (w + 1) // 2
  return out


def stage_windows(
  image_size: int, window_size: int | Sequence[int], num_stages: int = 4, patch_size: int = 4
) -> list[tuple[int, int, int]]:
  """(feature size, window, shift) per stage; 640 px, window 40 -> (160,40,20), (80,40,20), (40,40,0), (20,20,0)."""
  windows = per_stage(window_size, num_stages, "window_size")
  feats = stage_features((image_size, image_size), patch_size, num_stages)
  return [(f[0], *stage_window(f, w)) for f, w in zip(feats, windows)]


def pretrained_windows(
  image_size: int, window_size: int | Sequence[int], num_stages: int = 4, patch_size: int = 4
) -> tuple[int, ...]:
  """The per-stage windows a model trained at `image_size` used: its `pretrained_window_sizes` elsewhere."""
  return tuple(w for _, w, _ in stage_windows(image_size, window_size, num_stages, patch_size))


def normalising_windows(fields: dict[str, Any]) -> tuple[int, ...] | None:
  """The per-stage windows a SwinV2 described by config fields (model.json or config.model as a dict) normalises
  its position-bias offsets by; None when the fields are not a SwinV2's or do not say."""
  if fields.get("name") != "swinv2":
    return None
  depths = fields.get("depths") or SIZES.get(fields.get("variant"), (0, ()))[1]
  patch = fields.get("patch") or fields.get("patch_size")
  if not depths or not patch:
    return None
  try:
    windows = pretrained_windows(int(fields["image_size"]), fields["window_size"], len(depths), int(patch))
    pretrained = tuple(fields.get("pretrained_window_sizes") or ()) or (0,) * len(windows)
    return tuple(int(p) if p else w for p, w in zip(per_stage(pretrained, len(windows), "p"), windows))
  except (KeyError, TypeError, ValueError):
    return None


def checkpoint_conflicts(fields: dict[str, Any], checkpoint: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """{'pretrained_window_sizes': the windows the checkpoint (described by its config fields `checkpoint`) normalised
  its position bias by} when the SwinV2 configured by `fields` normalises by others; {} when they agree or either
  is not a SwinV2."""
  had, has = normalising_windows(checkpoint), normalising_windows(fields)
  return {"pretrained_window_sizes": had} if had and has and had != has else {}


def relative_coords_table(window: int, pretrained_window: int, stride: int = 1) -> np.ndarray:
  """((2W-1)^2, 2) log-spaced offsets (dh, dw): *stride (the kept tokens' spacing on the full map,
  `token_subgrid`), /(pretrained or own window - 1), *8, sign * log2(|t|+1) / 3."""
  offsets = np.arange(-(window - 1), window, dtype=np.float64) * stride
  table = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 2)
  base = pretrained_window if pretrained_window > 0 else window
  if base > 1:  # a 1x1 window has only the zero offset: nothing to normalise
    table = table / (base - 1)
  table = table * 8.0
  return (np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8.0)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def relative_position_index(window: int) -> np.ndarray:
  """(N, N) index into the offset table for query i, key j of a window: (dh + W-1)(2W-1) + (dw + W-1). Made once
  per window size (every block of a stage traces it; at a 640 px window of 40 it is 2.56M entries), read-only."""
  pos = np.arange(window * window)
  rows, cols = pos // window, pos % window
  dh = rows[:, None] - rows[None, :] + window - 1
  dw = cols[:, None] - cols[None, :] + window - 1
  index = (dh * (2 * window - 1) + dw).astype(np.int32)
  index.flags.writeable = False
  return index


def shift_regions(height: int, width: int, window: int, shift: int) -> jax.Array:
  """(num_windows, N) region id of every token of the rolled map; tokens of different regions may not attend."""

  def axis_regions(size):
    idx = jnp.arange(size)
    return (idx >= size - window).astype(jnp.int32) + (idx >= size - shift).astype(jnp.int32)

  ids = axis_regions(height)[:, None] * 3 + axis_regions(width)[None, :]
  return partition_windows(ids[None, :, :, None], window)[0, :, :, 0]


def partition_windows(x: jax.Array, window: int) -> jax.Array:
  """(B, H, W, C) -> (B, num_windows, window * window, C), windows in row-major order."""
  return einops.rearrange(x, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=window, ww=window)


def merge_windows(x: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """Inverse of `partition_windows`."""
  return einops.rearrange(
    x, "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=height // window, nw=width // window, wh=window, ww=window
  )


class ContinuousPositionBias(nn.Module):
  """16 * sigmoid(MLP(offset table)) for one window size, per head and offset: (heads, (2W-1)^2), fp32;
  `bias_of_offsets` makes it the (heads, N, N) bias. `stride`: the offsets' spacing on the full map."""

  num_heads: int
  window: int
  pretrained_window: int
  stride: int = 1

  @nn.compact
  def __call__(self):
    table = jnp.asarray(relative_coords_table(self.window, self.pretrained_window, self.stride))
    hidden = layers.dense(
      CPB_HIDDEN, (None, None), jnp.float32, name="fc1", kernel_init=nn.initializers.truncated_normal(0.02)
    )(table)
    per_offset = layers.dense(
      self.num_heads,
      (None, HEADS),
      jnp.float32,
      use_bias=False,
      name="fc2",
      kernel_init=nn.initializers.truncated_normal(0.02),
    )(nn.relu(hidden))
    # The sigmoid runs on the (2W-1)^2 offsets before the gather, not on the N^2 pairs after it.
    return 16.0 * jax.nn.sigmoid(per_offset.T)


def bias_of_offsets(per_offset: jax.Array, window: int) -> jax.Array:
  """(heads, (2W-1)^2) per offset -> (heads, N, N) per pair of a window's tokens."""
  n = window * window
  return per_offset[:, relative_position_index(window).reshape(-1)].reshape(-1, n, n)


class WindowAttention(nn.Module):
  """Scaled cosine attention within windows, with the continuous position bias and the shift mask."""

  num_heads: int
  window: int
  pretrained_window: int
  dtype: Any = jnp.float32
  attention: str = "softmax"  # kernels.WINDOW_ATTENTION; cudnn and jax: `fused_window_attention`
  stride: int = 1  # the tokens' spacing on the full map (`token_subgrid` in training)

  @nn.compact
  def __call__(self, windows, regions=None):
    """windows (B, nW, N, C); regions (nW, N) ids of a shifted map (None: no mask)."""
    width = windows.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    init = nn.initializers.truncated_normal(0.02)
    qkv = layers.dense(
      (3, self.num_heads, head_dim),
      (EMBED, None, HEADS, KV),
      self.dtype,
      use_bias=False,
      kernel_init=init,
      name="qkv",
      fp8=True,
    )(windows)
    q_bias = self.param("q_bias", layers.logical(nn.initializers.zeros, (HEADS, KV)), (self.num_heads, head_dim))
    v_bias = self.param("v_bias", layers.logical(nn.initializers.zeros, (HEADS, KV)), (self.num_heads, head_dim))
    q = qkv[..., 0, :, :] + q_bias.astype(qkv.dtype)
    k = qkv[..., 1, :, :]
    v = qkv[..., 2, :, :] + v_bias.astype(qkv.dtype)

    # Cosine similarity with the normalisation in fp32 (fp16 norms overflow), matmul in the compute dtype.
    q = layers.l2_normalize(q).astype(self.dtype)
    k = layers.l2_normalize(k).astype(self.dtype)
    logit_scale = self.param(
      "logit_scale", layers.logical(nn.initializers.constant(math.log(10.0)), (HEADS,)), (self.num_heads,)
    )
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    per_offset = ContinuousPositionBias(
      self.num_heads, self.window, self.pretrained_window, self.stride, name="cpb_mlp"
    )()
    attention = kernels.resolved_attention(self.attention, kernels.WINDOW_ATTENTION)
    if attention == kernels.WINDOW_KERNEL or regions is None:  # the kernel masks by the regions itself
      mask = regions
    else:
      mask = jnp.where(regions[:, :, None] == regions[:, None, :], 0.0, MASK_VALUE)

    def attend(q, k, v, scale, per_offset, *mask):
      mask = mask[0] if mask else None
      if attention == kernels.WINDOW_KERNEL:  # gathers the bias from the table itself
        return kernels.window_attention(q, k, v, scale, per_offset, mask, mask_value=MASK_VALUE)
      bias = bias_of_offsets(per_offset, self.window)
      if attention == "softmax":
        return window_attention(q, k, v, scale, bias, mask)
      return fused_window_attention(q, k, v, scale, bias, mask, attention)

    # Each device's rows: the position bias's gradient crosses devices as the (heads, (2W-1)^2) table, not as
    # the (windows x heads, N, N) bias (sharding.batch_local).
    shared = (scale, per_offset) + (() if mask is None else (mask,))
    out = sharding.batch_local(attend, (q, k, v.astype(self.dtype)), shared)
    return layers.dense(width, (HEADS, KV, EMBED), self.dtype, axis=(-2, -1), kernel_init=init, name="out", fp8=True)(
      out
    )


def window_attention(q, k, v, scale, bias, mask):
  """`kernels.softmax_attention` over windows: q, k (cosine-normalised), v (B, nW, N, heads, D); scale (heads,);
  bias (heads, N, N); mask (nW, N, N) or None. The per-head scale multiplies q (N x D numbers, not N x N); the
  position bias is broadcast over the windows with `kernels.broadcast_leading`."""
  q = (q.astype(jnp.float32) * scale[:, None]).astype(q.dtype)
  full_bias = bias
  if mask is not None:
    full_bias = kernels.broadcast_leading(bias, (mask.shape[0],) + bias.shape) + mask[:, None]
  out = kernels.softmax_attention(
    kernels.heads_first(q), kernels.heads_first(k), kernels.heads_first(v), bias=full_bias
  )
  return kernels.heads_first(out)


def fused_window_attention(q, k, v, scale, bias, mask, attention: str):
  """Window attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU with 'cudnn'; 'jax'
  lets JAX choose, XLA on CPU). q, k (cosine-normalised), v: (B, nW, N, heads, D); scale (heads,); bias (heads,
  N, N); mask (nW, N, N) or None.

  The windows are folded into the head axis, (B, N, nW * heads, D), so that the bias, which differs per window
  (shift mask) and per head (position bias) but not per image, broadcasts over the batch as (1, nW * heads, N, N)
  instead of being tiled B times. The per-head scale is folded into q. The bias is passed in the compute dtype
  (the kernels take one dtype): in bf16 a position bias near its maximum of 16 rounds by up to 0.06.
  """
  _, windows, tokens, heads, _ = q.shape
  fold = lambda t: einops.rearrange(t, "b w n h d -> b n (w h) d")
  full_bias = bias[None] if mask is None else bias[None] + mask[:, None]
  full_bias = einops.rearrange(jnp.broadcast_to(full_bias, (windows, heads, tokens, tokens)), "w h q k -> 1 (w h) q k")
  q = (q.astype(jnp.float32) * scale[:, None]).astype(q.dtype)
  out = kernels.fused_attention(
    fold(q), fold(k), fold(v), bias=full_bias.astype(q.dtype), scale=1.0, implementation=attention
  )
  return einops.rearrange(out, "b n (w h) d -> b w n h d", w=windows)


class SwinBlock(nn.Module):
  """One res-post-norm block on a (B, H, W, C) map; `shifted` blocks roll the map by the stage's `shift`.
  `per_block` = (drop rate, extra norm?): data, since scanned blocks share one body."""

  num_heads: int
  window: int
  shift: int  # the stage's shift; blocks with `shifted` apply it
  pretrained_window: int
  shifted: bool = False
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-5
  dropout: float = 0.0
  extra_norm: bool = False  # whether any block of the stage takes an extra norm (per_block[1] says which)
  stochastic_depth: bool = False
  deterministic: bool = True
  dtype: Any = jnp.float32
  attention: str = "softmax"
  stride: int = 1  # the tokens' spacing on the full map (`token_subgrid` in training)

  @nn.compact
  def __call__(self, x, per_block):
    drop_rate, extra_norm = per_block
    skip_drop_path = self.deterministic or not self.stochastic_depth
    x = layers.constrain(x, (BATCH, None, None, ACT_EMBED))
    y = self.attend(x)
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, zero_init=True, name="norm1")(y)
    x = x + layers.drop_path(self, y, drop_rate, skip_drop_path)
    y = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, self.dropout, self.deterministic, name="mlp")(x)
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, zero_init=True, name="norm2")(y)
    x = x + layers.drop_path(self, y, drop_rate, skip_drop_path)
    if self.extra_norm:
      normed = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, use_bias=False, use_scale=False)(
        x.astype(jnp.float32)
      )
      static = isinstance(extra_norm, (bool, np.bool_))  # unrolled blocks know theirs
      x = (normed.astype(x.dtype) if extra_norm else x) if static else jnp.where(extra_norm, normed.astype(x.dtype), x)
    return x, None

  def attend(self, x):
    _, height, width, _ = x.shape
    w = self.window
    shift = self.shift if self.shifted else 0
    pad_h, pad_w = -height % w, -width % w
    y = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else x
    regions = None
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      regions = shift_regions(y.shape[1], y.shape[2], w, shift)
    window_attention = WindowAttention(
      self.num_heads, w, self.pretrained_window, self.dtype, self.attention, self.stride, name="attn"
    )
    y = window_attention(partition_windows(y, w), regions)
    y = merge_windows(y, w, height + pad_h, width + pad_w)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    return y[:, :height, :width]


class SwinBlockPair(nn.Module):
  """A plain block then a shifted one (PAIR names their params): what a scanned stage repeats, so that the shift
  is static. `per_pair` = (drop rates (2,), extra norms (2,)). Each block is rematerialised on its own, behind
  an optimisation barrier (prevent_cse): without it XLA hoists the plain block's recomputation above the shifted
  block's backward pass and holds both blocks' activations at once (deviceless H100 plan of SwinV2-T b8: 1.21
  GiB with, 0.648 GiB without the hoist, 0.681 GiB for the one-block scan before the pairs)."""

  block_kwargs: dict
  block_remat: str = "none"

  @nn.compact
  def __call__(self, x, per_pair):
    block = layers.remat(SwinBlock, self.block_remat, prevent_cse=True)
    for i, name in enumerate(PAIR):
      x, _ = block(**self.block_kwargs, shifted=name == "shifted", name=name)(
        x, jax.tree.map(lambda a, i=i: a[i], per_pair)
      )
    return x, None


class PatchMerging(nn.Module):
  """V2 merging: concat 2x2 neighbours (row offset fastest), Linear 4C -> 2C without bias, then LN(2C)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = einops.rearrange(x, "b (h dh) (w dw) c -> b h w (dw dh c)", dh=2, dw=2)
    x = layers.dense(
      2 * c,
      (EMBED, None),
      self.dtype,
      use_bias=False,
      name="reduction",
      kernel_init=nn.initializers.truncated_normal(0.02),
    )(x)
    return layers.LayerNorm(PATCH_NORM_EPS, self.dtype, name="norm")(x)


class SwinV2(nn.Module):
  embed_dim: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: int | tuple[int, ...] = 8
  pretrained_window_sizes: tuple[int, ...] = ()  # per stage; 0 or (): the window itself
  patch_size: int = 4
  image_size: int = 224
  num_classes: int = 0  # 0: no head
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dropout: float = 0.0
  layer_norm_eps: float = 1e-5
  extra_norm_period: int = 0  # 0: none; H and G use 6
  extra_norm_scope: str = "stage"  # stage | global: how blocks are counted for the extra norm
  head_bias_init: float = 0.0
  dtype: Any = jnp.float32
  scan: bool = True
  scan_unroll: int = 1  # block pairs per iteration of a stage's scanned loop; 0: all (layers.stack_blocks)
  stage_scan_unrolls: tuple[int, ...] = ()  # per stage in place of scan_unroll; (): scan_unroll everywhere
  remat_policy: str = "none"
  stage_remat_policies: tuple[str, ...] = ()  # per stage in place of remat_policy; (): remat_policy everywhere
  mask_token: bool = False  # a learned token for masked patches (SimMIM); `mask` picks the patches
  attention: str = "softmax"  # softmax (einsums) | cudnn | jax (`fused_window_attention`) | pallas (kernels)
  token_subgrid: int = 1  # k > 1: in training every k-th patch along each axis, a random phase per image (docstring)

  def stage_settings(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Checks the stage fields; returns the per-stage windows and pretrained windows."""
    stages = len(self.depths)
    if self.stage_remat_policies and len(self.stage_remat_policies) != stages:
      raise ValueError(
        f"stage_remat_policies={tuple(self.stage_remat_policies)}: expected one per stage "
        f"({stages}), or () for remat_policy in every stage"
      )
    if self.stage_scan_unrolls and len(self.stage_scan_unrolls) != stages:
      raise ValueError(
        f"stage_scan_unrolls={tuple(self.stage_scan_unrolls)}: expected one per stage ({stages}), "
        f"or () for scan_unroll in every stage"
      )
    if len(self.num_heads) != stages:
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
    if self.extra_norm_scope not in EXTRA_NORM_SCOPES:
      raise ValueError(f"extra_norm_scope={self.extra_norm_scope!r}: expected one of {EXTRA_NORM_SCOPES}")
    if self.extra_norm_period < 0:
      raise ValueError(f"extra_norm_period={self.extra_norm_period}: expected >= 0")
    if self.token_subgrid < 1:
      raise ValueError(f"token_subgrid={self.token_subgrid}: expected k >= 1 (every k-th patch per axis in training)")
    if self.scan and any(depth % 2 for depth in self.depths):
      raise ValueError(
        f"depths {tuple(self.depths)}: a scanned stage repeats a (plain, shifted) pair of blocks, "
        f"so every depth must be even (or scan=False)"
      )
    windows = per_stage(self.window_size, stages, "window_size")
    pretrained = per_stage(self.pretrained_window_sizes or 0, stages, "pretrained_window_sizes")
    return windows, pretrained

  def extra_norm_flags(self) -> list[np.ndarray]:
    """Per stage, which blocks end with the extra main-branch norm."""
    flags, start = [], 0
    for depth in self.depths:
      index = np.arange(depth) + (start if self.extra_norm_scope == "global" else 0)
      flags.append(((index + 1) % self.extra_norm_period == 0) if self.extra_norm_period else np.zeros(depth, bool))
      start += depth
    return flags

  @nn.compact
  def __call__(self, images, train: bool = False, mask=None, return_stages: bool = False):
    """`mask` (B, H/patch, W/patch) of 0/1 replaces the patches marked 1 by the mask token after the patch
    norm (SimMIM): x = x * (1 - m) + token * m. It needs `mask_token`.

    `return_stages` adds `stages`: per stage its blocks' output (B, H_s, W_s, C * 2**s) before the next patch
    merging, without any norm (dense heads add their own LayerNorm per level; the last entry is the input of
    the final norm). Off by default so that the output matches transformers' `Swinv2Model` key for key."""
    deterministic = not train
    windows, pretrained = self.stage_settings()
    full = stage_features(images.shape[1:3], self.patch_size, len(self.depths))
    stride = self.token_subgrid if train else 1
    if stride > 1:
      if mask is not None:
        raise ValueError(f"token_subgrid={self.token_subgrid} and a SimMIM mask: a tower trains with one or the other")
      images = keep_patch_subgrid(images, self.patch_size, stride, self.make_rng("dropout"))
    x = layers.patch_embed(images, self.embed_dim, self.patch_size, self.dtype)
    x = layers.LayerNorm(PATCH_NORM_EPS, self.dtype, name="patch_norm")(x)
    if self.mask_token:
      token = self.param(
        "mask_token", layers.logical(nn.initializers.truncated_normal(0.02), (EMBED,)), (self.embed_dim,)
      )
      if mask is not None:
        m = mask.astype(x.dtype)[..., None]
        x = x * (1 - m) + token.astype(x.dtype) * m
    elif mask is not None:
      raise ValueError("a mask was given to a SwinV2 built without mask_token")
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)

    rates = np.linspace(0.0, self.drop_path, sum(self.depths), dtype=np.float32)  # first block 0, last drop_path
    extra = self.extra_norm_flags()
    start, stages = 0, []
    for s, depth in enumerate(self.depths):
      window, shift = stage_window(full[s], windows[s])
      base = pretrained[s]
      if stride > 1:  # the full map's windows, each with every stride-th token (the module docstring)
        base = base or window
        window, shift = subgrid_window(tuple(x.shape[1:3]), full[s], windows[s], stride)
      per_block = (rates[start : start + depth], extra[s])
      x, stage_out = SwinStage(
        depth=depth,
        downsample=s < len(self.depths) - 1,
        scan=self.scan,
        unroll=self.stage_scan_unrolls[s] if self.stage_scan_unrolls else self.scan_unroll,
        remat_policy=self.stage_remat_policies[s] if self.stage_remat_policies else self.remat_policy,
        block_kwargs=dict(
          num_heads=self.num_heads[s],
          window=window,
          shift=shift,
          pretrained_window=base,
          stride=stride,
          mlp_ratio=self.mlp_ratio,
          layer_norm_eps=self.layer_norm_eps,
          dropout=self.dropout,
          extra_norm=bool(extra[s].any()),
          stochastic_depth=self.drop_path > 0,
          deterministic=deterministic,
          dtype=self.dtype,
          attention=self.attention,
        ),
        name=f"stage_{s}",
      )(x, per_block)
      stages.append(stage_out)
      start += depth

    x = layers.LayerNorm(self.layer_norm_eps, jnp.float32, name="norm")(x)
    tokens = einops.rearrange(x, "b h w c -> b (h w) c")
    pooled = jnp.mean(tokens, axis=1)
    out = {"tokens": tokens, "pooled": pooled}
    if self.num_classes:
      out["logits"] = layers.classifier_head(pooled, self.num_classes, self.head_bias_init)
    if return_stages:
      out["stages"] = stages
    return out

  # ------------------------------------------------------------- the backbone's computation (backbone.py)
  @property
  def num_features(self) -> int:
    return self.embed_dim * 2 ** (len(self.depths) - 1)

  @property
  def output_stride(self) -> int:
    """Pixels per final-stage token along each side (32 for 4 stages of patch 4)."""
    return self.patch_size * 2 ** (len(self.depths) - 1)

  def feature_maps(self, images, train: bool = False) -> list[jax.Array]:
    """Every stage's output before the next patch merging, without a norm (`return_stages`)."""
    if train and self.token_subgrid > 1:
      raise ValueError(
        f"token_subgrid={self.token_subgrid}: a SwinV2 that keeps a subgrid of tokens in training "
        "has no full feature map there (dense heads need token_subgrid=1)"
      )
    return list(self(images, train=train, return_stages=True)["stages"])

  def feature_strides(self) -> tuple[float, ...]:
    return tuple(float(self.patch_size * 2**s) for s in range(len(self.depths)))


class SwinStage(nn.Module):
  """`depth` blocks, alternately plain and shifted, then, except for the last stage, patch merging. Scanned, the
  blocks are `depth / 2` SwinBlockPairs (params under `blocks/plain` and `blocks/shifted`, each with a leading
  axis of depth / 2); unrolled, block i is `blocks_i`. Returns (the next stage's input, the blocks' output)."""

  depth: int
  downsample: bool
  scan: bool
  remat_policy: str
  block_kwargs: dict
  unroll: int = 1

  @nn.compact
  def __call__(self, x, per_block):
    if self.scan:
      run_pairs = layers.stack_blocks(
        SwinBlockPair,
        depth=self.depth // 2,
        scan=True,
        unroll=self.unroll,
        remat_policy="none",
        name="blocks",
        block_kwargs=self.block_kwargs,
        block_remat=self.remat_policy,
      )
      x = run_pairs(x, jax.tree.map(lambda a: a.reshape(self.depth // 2, 2), per_block))
    else:
      block = layers.remat(SwinBlock, self.remat_policy)
      for i in range(self.depth):
        x, _ = block(**self.block_kwargs, shifted=i % 2 == 1, name=f"blocks_{i}")(
          x, jax.tree.map(lambda a, i=i: a[i], per_block)
        )
    if not self.downsample:
      return x, x
    return PatchMerging(self.block_kwargs["dtype"], name="downsample")(x), x


def build(model_cfg, dtype) -> SwinV2:
  """Builds a SwinV2 from `config.model`: its rows' fields as they are, the stages of its variant ('T' ... 'G') and,
  at extra_norm_period=-1, the variant's period."""
  sizes = parse_variant(model_cfg.variant)
  if model_cfg.extra_norm_period >= 0:
    sizes["extra_norm_period"] = model_cfg.extra_norm_period
  kernels.check_attention(model_cfg.attention, choices=kernels.WINDOW_ATTENTION)
  model = SwinV2(**{**backbone.config_kwargs(SwinV2, model_rows("swinv2"), model_cfg), **sizes}, dtype=dtype)
  model.stage_settings()  # config errors at build time, not at the first trace
  return model


# --------------------------------------------------------------------------- the family (backbone.py)


def train_flops_per_example(model: SwinV2) -> float:
  """3 x (patch embedding + window attention blocks + merging + head). Per block on n tokens of width C in
  windows of N tokens: qkv + out projections 8nC^2, MLP 4 * mlp_ratio * nC^2, scores and mixing 4nNC.
  Padding to whole windows counts as the model computes it; with `token_subgrid` k, the kept maps and windows."""
  stages = training_stages(model)
  width = model.embed_dim
  forward = 2.0 * stages[0][0] ** 2 * model.patch_size**2 * 3 * width
  for s, ((feature, window), depth) in enumerate(zip(stages, model.depths)):
    padded = -(-feature // window) * window
    tokens = padded * padded
    per_block = (8 + 4 * model.mlp_ratio) * tokens * width * width + 4 * tokens * window * window * width
    forward += depth * per_block
    if s < len(model.depths) - 1:
      half = -(-feature // 2)
      forward += 2 * half * half * (4 * width) * (2 * width)
      width *= 2
  forward += 2 * width * model.num_classes
  return 3.0 * forward


def training_stages(model: SwinV2) -> list[tuple[int, int]]:
  """(feature size, window) of every stage in training (`token_subgrid`: the kept maps and their windows)."""
  stages, k = len(model.depths), model.token_subgrid
  full = stage_features((model.image_size, model.image_size), model.patch_size, stages)
  windows = per_stage(model.window_size, stages, "window_size")
  if k == 1:
    return [(f[0], stage_window(f, w)[0]) for f, w in zip(full, windows)]
  kept = stage_features((model.image_size // k, model.image_size // k), model.patch_size, stages)
  return [(f[0], subgrid_window(f, g, w, k)[0]) for f, g, w in zip(kept, full, windows)]


def num_layer_ids(model: SwinV2) -> int:
  """sum(depths) + 2: the embeddings, the blocks of every stage, then the final norm and the head."""
  return sum(model.depths) + 2


def layer_id(model: SwinV2, param_path: str) -> int | np.ndarray:
  """The layer id of the param at `param_path` (the module docstring's numbering)."""
  parts = param_path.split("/")
  if parts[0] in EMBEDDING_PARAMS:
    return 0
  stage = parts[0][len("stage_") :] if parts[0].startswith("stage_") else ""
  if not stage.isdigit() or len(parts) < 2:
    return num_layer_ids(model) - 1
  s = int(stage)
  first = sum(model.depths[:s]) + 1
  if parts[1] == "blocks" and len(parts) > 2 and parts[2] in PAIR:  # scanned pairs: blocks 2j, 2j + 1
    return first + PAIR.index(parts[2]) + 2 * np.arange(model.depths[s] // 2)
  block = backbone.block_layer_ids(parts[1], first, model.depths[s])
  # A patch merging takes the id of its stage's last block, as the official SimMIM/Swin fine-tuning code.
  return first + model.depths[s] - 1 if block is None else block


def description(model: SwinV2) -> str:
  """One line naming `model`'s stages, window, patch, resolution and classes."""
  return (
    f"SwinV2 embed_dim {model.embed_dim}, depths {tuple(model.depths)}, heads {tuple(model.num_heads)}, "
    f"window {model.window_size}, patch {model.patch_size}, {model.image_size} px, "
    f"{model.num_classes or 'no'} classes"
  )


def variant(model: SwinV2) -> str:
  """The key of SIZES with `model`'s stages, else its stages spelled out (`parse_variant`)."""
  dims = (model.embed_dim, tuple(model.depths), tuple(model.num_heads))
  named = next((size for size, sizes in SIZES.items() if sizes == dims), None)
  return named or f"{model.embed_dim}x{','.join(map(str, model.depths))}x{','.join(map(str, model.num_heads))}"


FAMILY = backbone.Family(
  module=SwinV2,
  name="swinv2",
  build=build,
  hf_converter="hf_swinv2",
  train_flops_per_example=train_flops_per_example,
  num_layer_ids=num_layer_ids,
  layer_id=layer_id,
  description=description,
  variant=variant,
  checkpoint_conflicts=checkpoint_conflicts,
)
