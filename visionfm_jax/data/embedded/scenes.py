"""An embedded procedural multi-object set for segmentation and detection, built on the shapes renderers.

Each image has 1..max_objects shapes (the 8 kinds of `shapes.SHAPE_NAMES`, the 6 colours with jitter, a small
rotation) of random size and position, painted in order over one of the shapes backgrounds (later shapes on
top; they may overlap). Record `i` of a split is drawn from np.random.default_rng([seed, split_id, i,
SCENES_STREAM]): deterministic, disjoint from the shapes records and across splits.

A record holds
  image    uint8 (S, S, 3)
  mask     uint8 (S, S) semantic labels: 0 background, 1 + kind where a shape is visible, IGNORE (255) where
           no layer covers at least MASK_CERTAIN of the pixel (the antialiased edges) and on the visible
           pixels of a dropped object
  boxes    float32 (K, 4) xyxy in pixels (pixel edges): the extent of the object's labelled pixels, those
           where its visible coverage is at least MASK_CERTAIN (so a box is exactly the extent of its
           object's mask pixels; antialiased slivers of a shape peeking out under another do not count)
  classes  int32 (K,) the kind (0..7); detection has no background class
  image_id int, the record index
Visible coverage of a shape = its antialiased alpha times (1 - alpha) of every shape painted over it. An
object with fewer labelled pixels than MIN_VISIBLE of its own (unoccluded) area, or than MIN_VISIBLE_PIXELS,
is dropped: too little of it shows to tell its kind.
"""

from __future__ import annotations

import numpy as np

from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.transforms.dense_transforms import IGNORE
from visionfm_jax.errors import DataError

SCENES_STREAM = 1  # an extra seed word: scenes never share a random stream with shapes records
SIZE_RANGE = (0.22, 0.5)  # object extent as a fraction of the image side
MASK_CERTAIN = 0.75  # a pixel gets a label when one layer (or the background) covers this much of it
MIN_VISIBLE = 0.2  # drop objects showing less than this fraction of their own area ...
MIN_VISIBLE_PIXELS = 6  # ... or fewer pixels
CLASS_NAMES = shapes.SHAPE_NAMES  # detection classes; segmentation adds 'background' as class 0
SEGMENTATION_CLASS_NAMES = ("background",) + tuple(shapes.SHAPE_NAMES)


class _Layer:
  """One painted shape: its coverage `vis` on the window at (y0, x0), reduced as later shapes cover it."""

  def __init__(self, kind: int, alpha: np.ndarray, y0: int, x0: int):
    self.kind, self.vis, self.y0, self.x0 = kind, alpha.copy(), y0, x0
    self.area = float((alpha >= MASK_CERTAIN).sum())

  def cover(self, alpha: np.ndarray, y0: int, x0: int) -> None:
    """Multiplies `vis` by (1 - alpha) where the window of `alpha` at (y0, x0) overlaps this one."""
    h, w = self.vis.shape
    ah, aw = alpha.shape
    top, bottom = max(self.y0, y0), min(self.y0 + h, y0 + ah)
    left, right = max(self.x0, x0), min(self.x0 + w, x0 + aw)
    if top < bottom and left < right:
      self.vis[top - self.y0 : bottom - self.y0, left - self.x0 : right - self.x0] *= (
        1 - alpha[top - y0 : bottom - y0, left - x0 : right - x0]
      )

  def window(self) -> tuple[slice, slice]:
    h, w = self.vis.shape
    return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)

  def visible(self) -> np.ndarray:
    """The object's labelled pixels (on its window): no other layer can cover as much of them."""
    return self.vis >= MASK_CERTAIN

  def kept(self) -> bool:
    seen = float(self.visible().sum())
    return seen >= MIN_VISIBLE_PIXELS and seen >= MIN_VISIBLE * self.area

  def box(self) -> list[float]:
    """xyxy (pixel edges) of the labelled pixels."""
    inside = self.visible()
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    return [self.x0 + cols[0], self.y0 + rows[0], self.x0 + cols[-1] + 1, self.y0 + rows[-1] + 1]


def _draw_object(rng: np.random.Generator, size: int):
  """(kind, rgb, alpha, y0, x0) of one random shape that fits inside the image."""
  r = rng.random(9).tolist()
  kind, colour = int(r[0] * len(shapes.SHAPE_NAMES)), int(r[1] * len(shapes.COLOURS))
  radius = (SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * r[2]) * size / 2
  cy, cx = (radius + 1 + (size - 2 * radius - 2) * t for t in r[3:5])
  angle = shapes.MAX_ROTATION * (2 * r[5] - 1)
  jitter = shapes.COLOUR_JITTER
  rgb = [min(max(c + round(jitter * (2 * t - 1)), 0), 255) for c, t in zip(shapes.COLOURS[colour], r[6:9])]
  alpha, y0, x0 = shapes.shape_alpha(kind, radius, cy, cx, angle, size)
  return kind, rgb, alpha, y0, x0


def _label_map(layers: list, background: np.ndarray) -> np.ndarray:
  """The semantic mask: per pixel the layer (or background) of largest visible coverage, IGNORE below
  MASK_CERTAIN and on dropped layers."""
  best = background
  mask = np.zeros(best.shape, np.uint8)
  for layer in layers:
    rows, cols = layer.window()
    best_window, mask_window = best[rows, cols], mask[rows, cols]
    wins = layer.vis > best_window
    best_window[wins] = layer.vis[wins]
    mask_window[wins] = 1 + layer.kind if layer.kept() else IGNORE
  mask[best < MASK_CERTAIN] = IGNORE
  return mask


def render_scene(rng: np.random.Generator, image_size: int, max_objects: int) -> dict:
  """One random record (see the module docstring) drawn with `rng`."""
  size = image_size
  r = rng.random(9).tolist()
  count = 1 + int(r[0] * max_objects)
  bg_kind = int(r[1] * len(shapes.BACKGROUND_NAMES))
  tint = [10 * (2 * t - 1) for t in r[2:5]]
  planes = shapes.tinted_planes(shapes.background(rng, r[5:9], size, bg_kind), tint)
  background = np.ones((size, size), np.float32)  # the background's visible coverage
  layers = []
  for _ in range(count):
    kind, rgb, alpha, y0, x0 = _draw_object(rng, size)
    shapes.blend(planes, alpha, y0, x0, rgb)
    for layer in layers:
      layer.cover(alpha, y0, x0)
    h, w = alpha.shape
    background[y0 : y0 + h, x0 : x0 + w] *= 1 - alpha
    layers.append(_Layer(kind, alpha, y0, x0))
  kept = [layer for layer in layers if layer.kept()]
  return dict(
    image=planes.transpose(1, 2, 0).astype(np.uint8),
    mask=_label_map(layers, background),
    boxes=np.array([layer.box() for layer in kept], np.float32).reshape(-1, 4),
    classes=np.array([layer.kind for layer in kept], np.int32),
  )


class ScenesSource:
  """grain RandomAccessDataSource over `size` procedural scenes of one split (see the module docstring)."""

  def __init__(self, split: str, size: int, image_size: int, seed: int = 0, max_objects: int = 4):
    if split not in shapes.SPLIT_IDS:
      raise DataError(f"scenes: unknown split {split!r}; expected one of {tuple(shapes.SPLIT_IDS)}")
    if size <= 0 or image_size < 16:
      raise DataError(f"scenes: size={size} must be positive and image_size={image_size} at least 16")
    if max_objects < 1:
      raise DataError(f"scenes: max_objects={max_objects} must be at least 1 (config.data.scenes_max_objects)")
    self.split, self.size, self.image_size = split, int(size), int(image_size)
    self.seed, self.max_objects = int(seed), int(max_objects)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index) -> dict:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"{self!r}: index {index} out of range")
    rng = np.random.default_rng([self.seed, shapes.SPLIT_IDS[self.split], index, SCENES_STREAM])
    return {**render_scene(rng, self.image_size, self.max_objects), "image_id": index}

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring an iterator state.
    return (
      f"ScenesSource(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
      f"seed={self.seed}, max_objects={self.max_objects})"
    )
