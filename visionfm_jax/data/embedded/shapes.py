"""An embedded procedural image set: one coloured shape on a plain, graded, striped or noisy background.

Needs no download and is deterministic per (seed, split, index): record `i` is drawn from
`np.random.default_rng([seed, split_id, i])`, so the 'train' and 'validation' splits never share an image.
The class is the shape kind; every record also has a colour index, a caption and a bounding box, so the
same set serves classification, contrastive and captioning demos.

With `mixed_aspect`, each record's square image is widened or heightened to an aspect of its own (ASPECTS, drawn
from the record's generator after the drawing), its edge pixels repeated on both sides of the square (the shape's
position along the long side drawn too): images as they come, for NaFlex towers.

Shapes are signed distance fields (unit = the shape's half extent) evaluated on the pixel centres of a
window around the shape, with a one-pixel antialiased edge. Backgrounds are low-saturation greys so
they are never confused with the saturated shape colours.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from visionfm_jax.errors import DataError

SHAPE_NAMES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "crescent")
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLOURS = ((220, 40, 40), (40, 180, 60), (40, 80, 230), (235, 205, 30), (210, 50, 200), (30, 200, 215))
BACKGROUND_NAMES = ("plain dark", "plain light", "gradient", "striped", "noisy")
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
SEED = 0  # the random seed of the embedded 'shapes' set (and of the demo tokenizer's corpus, its captions)
IMAGES_SEED = 1  # 'shapes:images': other images than 'shapes'

SMALL_RANGE = (0.45, 0.56)  # shape extent as a fraction of the image side
LARGE_RANGE = (0.64, 0.78)
MAX_ROTATION = math.radians(12.0)
COLOUR_JITTER = 20  # per-channel offset, keeps colours saturated and distinct
# How far each shape's own frame sits below its centre: centres the top-heavy triangle and star and the
# bottom-heavy crescent.
SHAPE_SHIFT = (0.0, 0.0, 0.25, 0.1, 0.0, 0.0, 0.0, -0.15)


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
  return np.arange(size, dtype=np.float32) + np.float32(0.5)


@functools.lru_cache(maxsize=None)
def _edge_line(n: int, outer: float, inner: float) -> tuple[np.float32, np.float32]:
  """(beta, c): direction of the outward normal of the tip-notch edge, and the edge's distance from 0."""
  half = math.pi / n
  tip, notch = (outer, 0.0), (inner * math.cos(half), inner * math.sin(half))
  nx, ny = notch[1] - tip[1], tip[0] - notch[0]  # outward: points away from the origin
  norm = math.hypot(nx, ny)
  return np.float32(math.atan2(ny, nx)), np.float32((nx * tip[0] + ny * tip[1]) / norm)


def _folded_polygon(u, v, n: int, outer: float, inner: float):
  """Distance to a star/regular polygon with `n` tips at radius `outer` (one pointing up) and notches at `inner`.

  The angle is folded into half a sector; there the shape is the triangle (origin, tip, notch) and the
  distance is the one to the tip-notch edge line, rho * cos(phi - beta) - c (see `_edge_line`).
  """
  beta, offset = _edge_line(n, outer, inner)
  sector = np.float32(2 * math.pi / n)
  rho = np.sqrt(u * u + v * v)
  phi = np.arctan2(u, -v) * (1 / sector)
  phi = np.abs(phi - np.floor(phi + np.float32(0.5))) * sector
  return rho * np.cos(phi - beta) - offset


def _box(u, v, a: float, b: float):
  return np.maximum(np.abs(u) - np.float32(a), np.abs(v) - np.float32(b))


def _halfplanes(u, v, normals, offset: float):
  """Distance to the convex polygon {p : n.p <= offset for each normal n} (exact inside, close outside)."""
  d = None
  for nx, ny in normals:
    e = np.float32(nx) * u + np.float32(ny) * v
    d = e if d is None else np.maximum(d, e)
  return d - np.float32(offset)


_SIN60, _COS60 = math.sin(math.pi / 3), 0.5
_DIAMOND_NORMAL = (1 / math.hypot(1, 0.62), 0.62 / math.hypot(1, 0.62))  # rhombus of half-width 0.62, height 1


def _shape_distance(kind: int, u, v):
  """Signed distance (negative inside) of shape `kind`; (u, v) = (right, down) in units of its half extent."""
  name = SHAPE_NAMES[kind]
  if name == "circle":
    return np.sqrt(u * u + v * v) - np.float32(0.95)
  if name == "square":
    return _box(u, v, 0.78, 0.78)
  if name == "triangle":  # tip up, circumradius 1
    return _halfplanes(np.abs(u), v, [(_SIN60, -_COS60), (0.0, 1.0)], 0.5)
  if name == "star":
    return _folded_polygon(u, v, 5, 1.0, 0.43)
  if name == "cross":
    return np.minimum(_box(u, v, 0.92, 0.3), _box(u, v, 0.3, 0.92))
  if name == "ring":
    return np.abs(np.sqrt(u * u + v * v) - np.float32(0.7)) - np.float32(0.25)
  if name == "diamond":
    return _halfplanes(np.abs(u), np.abs(v), [_DIAMOND_NORMAL], _DIAMOND_NORMAL[1])
  if name == "crescent":  # a disc minus a smaller disc above its centre: a bowl, horns up
    w = v + np.float32(0.55)
    return np.maximum(np.sqrt(u * u + v * v) - np.float32(0.95), np.float32(0.7) - np.sqrt(u * u + w * w))
  raise ValueError(kind)


@functools.lru_cache(maxsize=8)
def _axis(size: int) -> np.ndarray:
  return np.arange(size, dtype=np.float32) + np.float32(0.5 - size / 2)


def _linear(size: int, a: float, b: float, c: float) -> np.ndarray:
  """a * x + b * y + c over the pixel grid, x and y centred on the image; built as an outer sum."""
  t = _axis(size)
  return (np.float32(a) * t)[None, :] + (np.float32(b) * t + np.float32(c))[:, None]


def background(rng: np.random.Generator, draws, size: int, kind: int) -> np.ndarray:
  """A grey (size, size) float32 background in [10, 245], from the uniform `draws` in [0, 1)."""
  name = BACKGROUND_NAMES[kind]
  d0, d1, d2, d3 = draws
  if name == "plain dark":
    return np.full((size, size), 15 + 65 * d0, np.float32)
  if name == "plain light":
    return np.full((size, size), 160 + 75 * d0, np.float32)
  if name == "noisy":
    noise = np.frombuffer(rng.bytes(size * size), np.uint8).reshape(size, size)
    return noise * np.float32(30 / 255) + np.float32(40 + 140 * d0)
  cos, sin = math.cos(2 * math.pi * d2), math.sin(2 * math.pi * d2)
  if name == "gradient":  # from g0 to g1 across the image along a random direction
    g0, g1 = 15 + 220 * d0, 15 + 220 * d1
    k = (g1 - g0) / (1.42 * size)
    grey = _linear(size, k * cos, k * sin, (g0 + g1) / 2)
    return np.maximum(np.minimum(grey, 245, out=grey), 10, out=grey)
  # striped: a square wave of period 10-25% of the side
  g0, g1 = 20 + 200 * d0, 12 + 18 * d1
  k = 2 * math.pi / ((0.1 + 0.15 * d3) * size)
  wave = np.cos(_linear(size, k * cos, k * sin, 0.0)) > 0
  return wave * np.float32(g1) + np.float32(g0)


def _position_words(cy: float, cx: float, size: int) -> str:
  row = ("top", "middle", "bottom")[min(int(3 * cy / size), 2)]
  col = ("left", "centre", "right")[min(int(3 * cx / size), 2)]
  if row == "middle" and col == "centre":
    return "in the centre"
  if row == "middle":
    return f"on the {col}"
  if col == "centre":
    return f"at the {row}"
  return f"at the {row} {col}"


def shape_alpha(label: int, radius: float, cy: float, cx: float, angle: float, size: int):
  """Antialiased coverage of the shape on the window around it: (alpha, y0, x0)."""
  # Up to MAX_ROTATION, every shape stays within +-1 half extent of its centre along x and y (so it fits
  # the image); the window keeps a margin for the antialiased edge.
  reach = 1.15 * radius + 1
  y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
  x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
  centres, scale = _pixel_centres(size), np.float32(1 / radius)
  ys, xs = (centres[y0:y1] - np.float32(cy)) * scale, (centres[x0:x1] - np.float32(cx)) * scale
  cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
  # The rotation is linear in (x, y), so u and v are outer sums of 1-D terms.
  u = (cos * xs)[None, :] + (sin * ys)[:, None]
  v = (cos * ys - np.float32(SHAPE_SHIFT[label]))[:, None] - (sin * xs)[None, :]
  alpha = np.float32(0.5) - _shape_distance(label, u, v) * np.float32(radius)
  return np.maximum(np.minimum(alpha, 1, out=alpha), 0, out=alpha), y0, x0


def tinted_planes(grey, tint) -> np.ndarray:
  """The grey background with a per-channel `tint`, planar float32 (3, H, W), +0.5 so the uint8 cast rounds.

  Planar because numpy is slow on a trailing axis of 3."""
  return grey[None] + np.array(tint, np.float32)[:, None, None] + np.float32(0.5)


def blend(planes, alpha, y0: int, x0: int, rgb) -> None:
  """Paints colour `rgb` with coverage `alpha` (placed at y0, x0) over `planes` in place."""
  h, w = alpha.shape
  window = planes[:, y0 : y0 + h, x0 : x0 + w]
  window += alpha[None] * (np.array(rgb, np.float32)[:, None, None] + np.float32(0.5) - window)


def _composite(grey, tint, alpha, y0: int, x0: int, rgb) -> np.ndarray:
  """Blends colour `rgb` with coverage `alpha` (placed at y0, x0) over the tinted grey; uint8 HWC."""
  planes = tinted_planes(grey, tint)
  blend(planes, alpha, y0, x0, rgb)
  return planes.transpose(1, 2, 0).astype(np.uint8)


def _tight_box(alpha, y0: int, x0: int, size: int) -> np.ndarray:
  """[ymin, xmin, ymax, xmax] / size of the pixels more than half covered."""
  inside = alpha > 0.5
  rows, cols = inside.any(1), inside.any(0)
  if not rows.any():  # a shape thinner than a pixel: fall back to its window
    rows[:], cols[:] = True, True
  h, w = alpha.shape
  ymin, xmin = y0 + int(rows.argmax()), x0 + int(cols.argmax())
  ymax, xmax = y0 + h - int(rows[::-1].argmax()), x0 + w - int(cols[::-1].argmax())
  return np.array([ymin / size, xmin / size, ymax / size, xmax / size], np.float32)


CAPTION_STYLES = ("full", "short")
ASPECTS = (1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0)  # width / height of the 'shapes:mixed_aspect' images


def widened(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A square image extended along one side to an aspect of ASPECTS drawn with `rng`, by repeating its edge
  pixels, the square at a random place along the long side."""
  aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
  side = image.shape[0]
  extra = round(side * max(aspect, 1 / aspect)) - side
  before = int(rng.integers(extra + 1))
  pad = (before, extra - before)
  widths = ((0, 0), pad, (0, 0)) if aspect > 1 else (pad, (0, 0), (0, 0))
  return np.pad(image, widths, mode="edge")


def render(rng: np.random.Generator, image_size: int, caption_style: str = "full") -> dict:
  """Draws one random record (see module docstring) with `rng`.

  Captions: 'full' names size, colour, shape, position and background; 'short' only size, colour and shape
  (with fewer attributes to tell pairs apart, a small contrastive batch must learn the shapes).
  """
  size = image_size
  r = rng.random(18).tolist()  # python floats: scalar maths on numpy scalars is slow
  label, colour = int(r[0] * len(SHAPE_NAMES)), int(r[1] * len(COLOURS))
  large, bg_kind = r[2] < 0.5, int(r[3] * len(BACKGROUND_NAMES))
  lo, hi = LARGE_RANGE if large else SMALL_RANGE
  radius = (lo + (hi - lo) * r[4]) * size / 2
  cy, cx = (radius + 1 + (size - 2 * radius - 2) * t for t in r[5:7])
  angle = MAX_ROTATION * (2 * r[7] - 1)
  rgb = [min(max(c + round(COLOUR_JITTER * (2 * t - 1)), 0), 255) for c, t in zip(COLOURS[colour], r[8:11])]
  tint = [10 * (2 * t - 1) for t in r[11:14]]

  alpha, y0, x0 = shape_alpha(label, radius, cy, cx, angle, size)
  grey = background(rng, r[14:18], size, bg_kind)
  caption = f"a {'large' if large else 'small'} {COLOUR_NAMES[colour]} {SHAPE_NAMES[label]}"
  if caption_style == "full":
    caption += f" {_position_words(cy, cx, size)} on a {BACKGROUND_NAMES[bg_kind]} background"
  return dict(
    image=_composite(grey, tint, alpha, y0, x0, rgb),
    label=label,
    colour=colour,
    caption=caption,
    box=_tight_box(alpha, y0, x0, size),
  )


class ShapesSource:
  """grain RandomAccessDataSource over `size` procedurally drawn shapes of one split; `annotated=False`: records
  with the 'image' only (image-only data: no caption, no label)."""

  def __init__(
    self,
    split: str,
    size: int,
    image_size: int,
    seed: int = 0,
    caption_style: str = "full",
    annotated: bool = True,
    mixed_aspect: bool = False,
  ):
    if split not in SPLIT_IDS:
      raise DataError(f"shapes: unknown split {split!r}; expected one of {tuple(SPLIT_IDS)}")
    if caption_style not in CAPTION_STYLES:
      raise DataError(f"shapes: caption style {caption_style!r}; expected one of {CAPTION_STYLES}")
    self.caption_style = caption_style
    if size <= 0 or image_size < 8:
      raise DataError(f"shapes: size={size} must be positive and image_size={image_size} at least 8")
    self.split, self.size, self.image_size, self.seed = split, int(size), int(image_size), int(seed)
    self.annotated, self.mixed_aspect = bool(annotated), bool(mixed_aspect)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index) -> dict:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"{self!r}: index {index} out of range")
    rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])
    record = render(rng, self.image_size, self.caption_style)
    if self.mixed_aspect:  # its box would be the square's: left out
      record = {**record, "image": widened(record["image"], rng)}
      del record["box"]
    return record if self.annotated else {"image": record["image"]}

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring an iterator state.
    return (
      f"ShapesSource(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
      f"seed={self.seed}, caption_style={self.caption_style!r}"
      f"{'' if self.annotated else ', annotated=False'}{', mixed_aspect=True' if self.mixed_aspect else ''})"
    )
