"""NaFlex inputs (SigLIP 2, Tschannen et al. 2025): each image at its own aspect ratio, as a patch grid of h x w
patches within a token budget, instead of a fixed square.

The grid is the largest that keeps the image's aspect within the budget, by SigLIP 2's rule (`grid_for_budget`):
the largest scale s for which ceil(H s / p) x ceil(W s / p) patches fit in `max_tokens`, found by bisection; the
image is resized (bilinear, antialiased when shrinking) to that many patches exactly, so its aspect moves by at
most a patch per side. Its patches, row-major, each flattened (row in patch, column in patch, channel) as a
Linear patch embedding reads them, are padded to `max_tokens` rows.

One array per image carries it through the pipeline, the evaluators and the global batch as an image array does:
uint8 (1 + max_tokens, p*p*3) (`pack`), whose row 0 holds the grid (h, w) as two little-endian 16-bit numbers and
whose rows 1.. hold the patches. On the device `normalized` splits it into the model's input: {'patches': the
normalised patches, 'grid': int32 (B, 2)}; the validity of a patch row (`valid`) and its grid position follow from
the grid, the first h*w rows being the image's.
"""

from __future__ import annotations

import math

import grain
import numpy as np
from PIL import Image

from visionfm_jax.data.transforms import host
from visionfm_jax.errors import ConfigError

HEADER_ROWS = 1  # row 0 of a packed image: the grid
MIN_PATCH = 2  # a header row needs 4 bytes: 3 * p * p >= 4


def grid_for_budget(height: int, width: int, patch: int, max_tokens: int, tolerance: float = 1e-5) -> tuple[int, int]:
  """(rows, columns) of patches for a height x width image: the patches per side at the largest scale s (to
  `tolerance`, bisected over (tolerance / 10, 100)) for which max(1, ceil(side * s / patch)) per side multiply to
  at most `max_tokens` (SigLIP 2's rule, as transformers' Siglip2ImageProcessor applies it)."""

  def sides(scale: float) -> tuple[int, int]:
    return max(1, math.ceil(height * scale / patch)), max(1, math.ceil(width * scale / patch))

  low, high = tolerance / 10, 100.0
  while high - low >= tolerance:
    middle = (low + high) / 2
    rows, columns = sides(middle)
    if rows * columns <= max_tokens:
      low = middle
    else:
      high = middle
  return sides(low)


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
  """(h p, w p, C) -> (h w, p p C): patches row-major, each flattened (row in patch, column in patch, channel)."""
  rows, columns = image.shape[0] // patch, image.shape[1] // patch
  grid = image[: rows * patch, : columns * patch].reshape(rows, patch, columns, patch, image.shape[2])
  return grid.transpose(0, 2, 1, 3, 4).reshape(rows * columns, -1)


def packed_shape(patch: int, max_tokens: int) -> tuple[int, int]:
  return (HEADER_ROWS + max_tokens, patch * patch * 3)


def pack(image: np.ndarray, patch: int, max_tokens: int) -> np.ndarray:
  """A uint8 (H, W, 3) image -> its packed NaFlex form (module docstring): resized bilinearly to its grid's
  pixels (`grid_for_budget`)."""
  rows, columns = grid_for_budget(image.shape[0], image.shape[1], patch, max_tokens)
  size = (columns * patch, rows * patch)
  resized = image if image.shape[1::-1] == size else np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
  out = np.zeros(packed_shape(patch, max_tokens), np.uint8)
  out[0, :4] = (rows & 255, rows >> 8, columns & 255, columns >> 8)
  out[HEADER_ROWS : HEADER_ROWS + rows * columns] = patchify(np.ascontiguousarray(resized), patch)
  return out


def grids(packed) -> np.ndarray:
  """The (rows, columns) of packed images (..., 1 + N, P), as int32 (..., 2); numpy or jax in, the same out."""
  header = packed[..., 0, :4].astype(np.int32)
  return (header[..., 0::2] + 256 * header[..., 1::2]).astype(np.int32)


def valid(grid, tokens: int):
  """bool (..., tokens): the patch rows that hold an image's patches, its first rows * columns."""
  xp = np if isinstance(grid, np.ndarray) else _jnp()
  return xp.arange(tokens) < (grid[..., 0] * grid[..., 1])[..., None]


def normalized(packed, mean, std, dtype=np.float32) -> dict:
  """Packed uint8 (B, 1 + N, p*p*3) images -> the model's input: {'patches': (x - mean) / std per channel in
  `dtype` (B, N, p*p*3), computed in fp32, 0 past each image's patches; 'grid': int32 (B, 2)}. `mean`, `std` on
  the 0..255 scale."""
  jnp = _jnp()
  packed = jnp.asarray(packed)
  grid = grids(packed)
  pixels = packed[:, HEADER_ROWS:].astype(jnp.float32)
  shape = pixels.shape
  patches = (pixels.reshape(*shape[:-1], -1, 3) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  patches = jnp.where(valid(grid, shape[1])[..., None], patches.reshape(shape), 0.0)
  return {"patches": patches.astype(dtype), "grid": grid}


def unpacked_image(packed: np.ndarray, patch: int) -> np.ndarray:
  """A packed image as the model sees it: uint8 (rows p, columns p, 3) (panels)."""
  rows, columns = (int(n) for n in grids(np.asarray(packed)))
  patches = np.asarray(packed)[HEADER_ROWS : HEADER_ROWS + rows * columns]
  grid = patches.reshape(rows, columns, patch, patch, 3).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * patch, columns * patch, 3)


def _jnp():
  import jax.numpy as jnp  # the device half only: the host half (grain workers) needs no jax

  return jnp


class Patches(grain.transforms.Map):
  """record['image'] (uint8 H x W x 3, any size) -> its packed NaFlex form (`pack`), at native aspect."""

  def __init__(self, patch: int, max_tokens: int):
    self.patch, self.max_tokens = check(patch, max_tokens)

  def map(self, element: dict) -> dict:
    image = element["image"]
    return element if image is None else {**element, "image": pack(image, self.patch, self.max_tokens)}


def settings(data_cfg) -> tuple[int, int] | None:
  """(patch size, token budget) of config.data.naflex when it is on, else None."""
  naflex = data_cfg.get("naflex")
  if naflex is None or not naflex.max_tokens:
    return None
  return check(naflex.patch_size, naflex.max_tokens)


def train_transforms(data_cfg, example) -> list:
  """The training ops of NaFlex inputs: decode, the packed image at native aspect (flipped on the host when
  config.data.augment.flip), then `example` (the record -> example op)."""
  patch, max_tokens = settings(data_cfg)
  flip = [host.RandomFlip(on_device=False)] if data_cfg.augment.flip else []  # a packed image has no rows to mirror
  return [host.Decode(), host.MarkUndecodable(patch), *flip, Patches(patch, max_tokens), example]


def check(patch: int, max_tokens: int) -> tuple[int, int]:
  if patch < MIN_PATCH:
    raise ConfigError(f"config.data.naflex.patch_size={patch}: expected >= {MIN_PATCH}")
  if max_tokens < 1 or max_tokens >= 2**16:
    raise ConfigError(f"config.data.naflex.max_tokens={max_tokens}: expected 1 .. {2**16 - 1} patches an image")
  return int(patch), int(max_tokens)


def synthetic(batch_size: int, patch: int, max_tokens: int, rng: np.random.Generator) -> np.ndarray:
  """Packed random images that fill the budget (as a square or near-square grid would): the costliest case."""
  rows = max(1, math.isqrt(max_tokens))
  columns = max_tokens // rows
  out = np.zeros((batch_size, *packed_shape(patch, max_tokens)), np.uint8)
  out[:, 0, :4] = (rows & 255, rows >> 8, columns & 255, columns >> 8)
  out[:, HEADER_ROWS : HEADER_ROWS + rows * columns] = rng.integers(
    0, 256, (batch_size, rows * columns, out.shape[-1]), dtype=np.uint8
  )
  return out
