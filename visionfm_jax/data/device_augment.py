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

from visionfm_jax.data import transforms

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def _grey(image: jax.Array) -> jax.Array:
  """(..., 3) -> (..., 1) grey levels."""
  return jnp.tensordot(image, jnp.asarray(LUMA, jnp.float32), axes=1)[..., None]


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends with black."""
  return jnp.clip(image * factor, 0, 255)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends with the mean grey level of the whole (H, W, 3) image."""
  mean = _grey(jnp.mean(image, axis=(0, 1)))
  return jnp.clip(image * factor + mean * (1 - factor), 0, 255)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends with the per-pixel grey level."""
  return jnp.clip(image * factor + _grey(image) * (1 - factor), 0, 255)


ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation)  # the order of transforms.JITTER's factors


def color_jitter(image: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """One float32 (H, W, 3) image in [0, 255]: the three adjustments in `order`, rounded to integer levels."""
  for step in range(len(ADJUSTMENTS)):
    which = order[step]
    image = jax.lax.switch(which, ADJUSTMENTS, image, factors[which])
  return jnp.floor(image + 0.5)


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 (or float in [0, 255]) NHWC -> (x - mean) / std, computed in fp32; `mean`, `std` on the 0..255 scale."""
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def augment(images: jax.Array, params: Mapping[str, jax.Array], mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 (B, H, W, 3) training images -> normalised `dtype` images, after the colour jitter and the flip of
  the transforms.DEVICE_KEYS found in `params` (a batch: keys that are absent are augmentations left out)."""
  x = images.astype(jnp.float32)
  if transforms.JITTER in params:
    x = jax.vmap(color_jitter)(x, params[transforms.JITTER], params[transforms.JITTER_ORDER])
  if transforms.FLIP in params:
    x = jnp.where(params[transforms.FLIP].astype(bool)[:, None, None, None], x[:, :, ::-1], x)
  return normalize(x, mean, std, dtype)
