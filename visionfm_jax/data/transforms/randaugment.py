"""RandAugment (Cubuk et al., 2020): `num_ops` operations drawn uniformly (with replacement) from a list of
14, each applied at one fixed magnitude M. Pillow on uint8 HWC images.

M follows the paper and its reference implementation: M / 10 is the fraction of AutoAugment's maximum
strength (rotate 30 degrees, shear 0.3, translate 45% of the side, enhancement factors 1 +- 0.9, posterize
to 4 bits, solarize every pixel); the paper uses M in 5..30 (9 for ResNet-50, 28 for EfficientNet-B7),
values above 10 extrapolate, clamped to what each operation can express. Signed operations (rotate, shear,
translate, the enhancements) take a random sign. M = 0 makes every operation with a magnitude an identity
(autocontrast and equalize have none).

Geometric operations move the content: leave them out (`ops` without GEOMETRIC_OPS) when captions name
positions, as the shapes captions do ("at the top left").
"""

from __future__ import annotations

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from visionfm_jax.config_lib import RANDAUGMENT_MAX_MAGNITUDE

FILL = (128, 128, 128)  # what rotations, shears and translations uncover


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, coeffs) -> Image.Image:
  """Output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f)."""
  return image.transform(image.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=FILL)


def _shear(image, level, rng, axis):
  s = _signed(0.3 * level, rng)
  w, h = image.size
  # Sheared about the centre line, so the image does not slide sideways as a whole.
  return _affine(image, (1, s, -s * h / 2, 0, 1, 0) if axis == 0 else (1, 0, 0, s, 1, -s * w / 2))


def _translate(image, level, rng, axis):
  fraction = _signed(min(0.45 * level, 1.0), rng)
  w, h = image.size
  return _affine(image, (1, 0, fraction * w, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, fraction * h))


def _enhance(enhancer):
  def op(image, level, rng):
    return enhancer(image).enhance(max(0.0, 1.0 + _signed(0.9 * level, rng)))

  return op


OPERATIONS = {
  "identity": lambda image, level, rng: image,
  "autocontrast": lambda image, level, rng: ImageOps.autocontrast(image),
  "equalize": lambda image, level, rng: ImageOps.equalize(image),
  "rotate": lambda image, level, rng: image.rotate(_signed(30.0 * level, rng), Image.BILINEAR, fillcolor=FILL),
  "solarize": lambda image, level, rng: ImageOps.solarize(image, max(0, round(256 * (1 - level)))),
  "color": _enhance(ImageEnhance.Color),
  "posterize": lambda image, level, rng: ImageOps.posterize(image, min(8, max(1, 8 - int(4 * level)))),
  "contrast": _enhance(ImageEnhance.Contrast),
  "brightness": _enhance(ImageEnhance.Brightness),
  "sharpness": _enhance(ImageEnhance.Sharpness),
  "shear_x": lambda image, level, rng: _shear(image, level, rng, 0),
  "shear_y": lambda image, level, rng: _shear(image, level, rng, 1),
  "translate_x": lambda image, level, rng: _translate(image, level, rng, 0),
  "translate_y": lambda image, level, rng: _translate(image, level, rng, 1),
}
OPS = tuple(OPERATIONS)
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


class RandAugment(grain.transforms.RandomMap):
  """Applies `num_ops` operations drawn from `ops` (names in OPS) at magnitude M to record['image'].

  Deterministic per (seed, record): the draws come from grain's per-record generator.
  """

  def __init__(self, num_ops: int, magnitude: float, ops=OPS):
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown or not ops:
      raise ValueError(f"RandAugment ops {tuple(ops)}: unknown {unknown}; choose from {OPS}")
    if num_ops < 0 or not 0 <= magnitude <= RANDAUGMENT_MAX_MAGNITUDE:
      raise ValueError(
        f"RandAugment num_ops={num_ops} must be >= 0 and magnitude={magnitude} in [0, {RANDAUGMENT_MAX_MAGNITUDE}]"
      )
    self.num_ops, self.magnitude, self.ops = int(num_ops), float(magnitude), tuple(ops)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if not self.num_ops:
      return element
    image = Image.fromarray(element["image"])
    for i in rng.integers(0, len(self.ops), self.num_ops):
      image = OPERATIONS[self.ops[i]](image, self.magnitude / 10, rng)
    return {**element, "image": np.asarray(image)}
