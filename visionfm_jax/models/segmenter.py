"""Semantic segmentation: one of our backbones + (for ViT) a simple feature pyramid + the UPerNet head.

`Segmenter.__call__(images, train)` -> (B, H, W, num_classes) fp32 logits at the input resolution (bilinear
upsampling of the head's stride-4 logits). Params: `backbone` (named exactly as the pretraining ViT / SwinV2,
so a pretraining checkpoint's backbone loads by path prefix), `neck` (a plain, one-map backbone such as ViT
only: `SimpleFeaturePyramid`), `head` (`UPerHead`; on a hierarchy such as SwinV2 it normalises each stage
output first).

`sliding_window_logits` runs a fixed-size model over larger images (mmseg's 'slide' inference).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.models import dense_heads


class Segmenter(dense_heads.DenseModel):
  num_classes: int
  neck_channels: int = 256  # ViT's simple feature pyramid
  head_channels: int = 512
  ppm_scales: tuple[int, ...] = (1, 2, 3, 6)
  neck_strides: tuple[int, ...] = (4, 8, 16, 32)  # ViT: nominal strides of the pyramid
  dropout: float = 0.1  # before the classifier
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    maps, strides = dense_heads.backbone_maps(self.backbone, images, train)
    plain = len(maps) == 1  # one normalised map (ViT): the simple pyramid; stage outputs: a norm per level
    if plain:
      maps, _ = dense_heads.SimpleFeaturePyramid(
        int(strides[0]), self.neck_channels, self.neck_strides, self.dtype, name="neck"
      )(maps[0])
    logits = dense_heads.UPerHead(
      self.num_classes,
      self.head_channels,
      self.ppm_scales,
      input_norms=not plain,
      dropout=self.dropout,
      dtype=self.dtype,
      name="head",
    )(maps, train)
    return dense_heads.resize_bilinear(logits, images.shape[1:3])


def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Offsets of windows covering [0, size): every `stride`, the last one flush with the end (mmseg)."""
  if window <= 0 or stride <= 0:
    raise ValueError(f"window {window} and stride {stride} must be positive")
  count = max(size - window + stride - 1, 0) // stride + 1
  return sorted({max(min(i * stride, size - window), 0) for i in range(count)})


def sliding_window_logits(
  apply_fn: Callable[[jax.Array], jax.Array],
  images: jax.Array,
  window: int | tuple[int, int],
  stride: int | tuple[int, int],
  num_classes: int,
) -> jax.Array:
  """Logits (B, H, W, num_classes) fp32 of images (B, H, W, 3) from `apply_fn(crops) -> (B, wh, ww,
  num_classes)` on window crops, averaged where windows overlap.

  Windows start every `stride` pixels, the last flush with the image edge; an image smaller than the window is
  zero-padded at the bottom/right (its padded logits are dropped). An image equal to the window is one call.
  Works eagerly (a jitted `apply_fn` compiles once: every crop has the window's shape) and under `jit`.
  """
  wh, ww = (window, window) if isinstance(window, int) else window
  sh, sw = (stride, stride) if isinstance(stride, int) else stride
  batch, height, width = images.shape[:3]
  pad_h, pad_w = max(wh - height, 0), max(ww - width, 0)
  if pad_h or pad_w:
    images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  full_h, full_w = height + pad_h, width + pad_w
  total = jnp.zeros((batch, full_h, full_w, num_classes), jnp.float32)
  counts = np.zeros((full_h, full_w, 1), np.float32)
  for y in window_starts(full_h, wh, sh):
    for x in window_starts(full_w, ww, sw):
      logits = apply_fn(images[:, y : y + wh, x : x + ww]).astype(jnp.float32)
      if logits.shape != (batch, wh, ww, num_classes):
        raise ValueError(f"apply_fn returned {logits.shape}, expected {(batch, wh, ww, num_classes)}")
      total = total.at[:, y : y + wh, x : x + ww].add(logits)
      counts[y : y + wh, x : x + ww] += 1
  return (total / counts)[:, :height, :width]
