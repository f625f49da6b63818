"""Axis-aligned boxes: format conversions, areas, IoU and generalised IoU (Rezatofighi et al. 2019).

Boxes are (..., 4) arrays, `xyxy` = (x1, y1, x2, y2) or `cxcywh` = (centre x, centre y, width, height).
A box with x2 < x1 (or y2 < y1) counts as empty: widths and heights are clamped at 0. IoU divides by
max(union, eps) and GIoU by max(enclosing area, eps), so empty or point-like boxes give finite values and
finite gradients: two identical points have IoU 0 and GIoU 0. All computations run in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-7


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def area(boxes: jax.Array) -> jax.Array:
  """(...) areas of (..., 4) xyxy boxes; inverted boxes have area 0."""
  boxes = boxes.astype(jnp.float32)
  return jnp.maximum(boxes[..., 2] - boxes[..., 0], 0) * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)


def _intersection_union_hull(a: jax.Array, b: jax.Array):
  """Intersection, union and enclosing-box areas of xyxy boxes `a`, `b` that broadcast against each other."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  lo = jnp.maximum(a[..., :2], b[..., :2])
  hi = jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.maximum(hi - lo, 0), axis=-1)
  union = area(a) + area(b) - inter
  hull_lo = jnp.minimum(a[..., :2], b[..., :2])
  hull_hi = jnp.maximum(a[..., 2:], b[..., 2:])
  hull = jnp.prod(jnp.maximum(hull_hi - hull_lo, 0), axis=-1)
  return inter, union, hull


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise IoU of matching xyxy boxes (..., 4) -> (...)."""
  inter, union, _ = _intersection_union_hull(a, b)
  return inter / jnp.maximum(union, EPS)


def giou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise generalised IoU in [-1, 1]: IoU - (hull - union) / hull."""
  inter, union, hull = _intersection_union_hull(a, b)
  return inter / jnp.maximum(union, EPS) - (hull - union) / jnp.maximum(hull, EPS)


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """(N, 4), (M, 4) xyxy -> (N, M) IoU of every pair."""
  return iou(a[:, None, :], b[None, :, :])


def pairwise_giou(a: jax.Array, b: jax.Array) -> jax.Array:
  """(N, 4), (M, 4) xyxy -> (N, M) generalised IoU of every pair."""
  return giou(a[:, None, :], b[None, :, :])
