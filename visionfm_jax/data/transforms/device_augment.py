"""The per-pixel half of the training augmentation, on the device: colour jitter, flip and normalisation of
uint8 image batches under jit, from the per-example parameters that the host drew (transforms.DEVICE_KEYS).

The host part (transforms.train_transforms) decodes and crops; these functions reproduce what the host
did before to float rounding: the jitter works in float32 on [0, 255], clipped after each adjustment, and rounds
to integer levels once at the end, as torchvision's ColorJitter on uint8 images.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from visionfm_jax.data.transforms import host as transforms

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def _grey(image: jax.Array) -> jax.Array:
  """(..., 3) -> (..., 1) grey levels."""
  return jnp.tensordot(image, jnp.asarray(LUMA, jnp.float32), axes=1)[..., None]


def _blend(image: jax.Array, factor: jax.Array, target) -> jax.Array:
  return jnp.clip(image * factor + target * (1 - factor), 0, 255)


def color_jitter(images: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """Float32 (B, H, W, 3) images in [0, 255]: the three adjustments with (B, 3) `factors` (brightness, contrast,
  saturation) in each image's `order` (B, 3), rounded to integer levels. Each adjustment blends the image with
  a target: black (brightness), the image's mean grey level (contrast), the per-pixel grey level (saturation).

  Batched as one blend per step whose target each image selects, rather than vmap(switch), which would run all
  three adjustments on every image at every step.
  """
  for step in range(3):
    which = order[:, step, None, None, None]
    factor = jnp.take_along_axis(factors, order[:, step : step + 1], axis=1)[:, :, None, None]
    contrast_target = _grey(jnp.mean(images, axis=(1, 2), keepdims=True))
    target = jnp.where(which == 0, 0.0, jnp.where(which == 1, contrast_target, _grey(images)))
    images = _blend(images, factor, target)
  return jnp.floor(images + 0.5)


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 (or float in [0, 255]) NHWC -> (x - mean) / std, computed in fp32; `mean`, `std` on the 0..255 scale."""
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def augment(images: jax.Array, params: Mapping[str, jax.Array], mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 (B, H, W, 3) training images -> normalised `dtype` images, after the colour jitter and the flip of
  the transforms.DEVICE_KEYS found in `params` (a batch: keys that are absent are augmentations left out)."""
  x = images.astype(jnp.float32)
  if transforms.JITTER in params:
    x = color_jitter(x, params[transforms.JITTER], params[transforms.JITTER_ORDER])
  if transforms.FLIP in params:
    x = jnp.where(params[transforms.FLIP].astype(bool)[:, None, None, None], x[:, :, ::-1], x)
  return normalize(x, mean, std, dtype)
