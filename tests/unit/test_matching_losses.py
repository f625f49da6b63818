"""Boxes (IoU, GIoU), Hungarian matching against brute force, focal / ignore-label cross-entropy / detection set
losses against direct numpy formulas and hand computations."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from visionfm_jax.losses import boxes, matching, pixels
from visionfm_jax.losses import detection as detection_losses

# ---------------------------------------------------------------------------------------------------- boxes


def test_format_conversions_round_trip():
  xyxy = np.array([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]], np.float32)
  cxcywh = boxes.xyxy_to_cxcywh(xyxy)
  np.testing.assert_allclose(cxcywh[0], [0.3, 0.55, 0.4, 0.7], atol=1e-6)
  np.testing.assert_allclose(boxes.cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-6)


@pytest.mark.parametrize(
  "a, b, iou, giou",
  [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0, 1.0),  # identical
    ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16, 4 / 16),  # nested: the hull is the outer box
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),  # disjoint: union 2, hull 3
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),  # overlap 1, union 7, hull 9
    ([1, 1, 1, 1], [1, 1, 1, 1], 0.0, 0.0),  # identical points
    ([1, 1, 1, 1], [0, 0, 2, 2], 0.0, 0.0),  # a point inside a box: union = hull = 4
    ([2, 2, 1, 1], [0, 0, 2, 2], 0.0, 0.0),  # an inverted box counts as empty
    ([0, 0, 0, 2], [1, 0, 1, 2], 0.0, -1.0),  # two parallel lines: union 0, hull 2
  ],
)
def test_iou_and_giou_by_hand(a, b, iou, giou):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  got_iou, got_giou, swapped, grads = _iou_giou_and_grad(a, b)
  np.testing.assert_allclose(got_iou, iou, atol=1e-6)
  np.testing.assert_allclose(got_giou, giou, atol=1e-6)
  np.testing.assert_allclose(swapped, giou, atol=1e-6)
  assert np.all(np.isfinite(grads))


@jax.jit
def _iou_giou_and_grad(a, b):
  return boxes.iou(a, b), boxes.giou(a, b), boxes.giou(b, a), jax.grad(boxes.giou)(a, b)


def _np_giou(a, b):
  """GIoU of two valid xyxy boxes, straight from the definition, in float64."""
  area = lambda x: (x[2] - x[0]) * (x[3] - x[1])
  inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
  union = area(a) + area(b) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (hull - union) / hull


def _random_boxes(rng, n):
  corners = rng.random((n, 2, 2))
  return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).astype(np.float32)


def test_pairwise_matches_definition():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 3), _random_boxes(rng, 5)
  pairwise = boxes.pairwise_giou(a, b)
  assert pairwise.shape == (3, 5)
  for i, j in itertools.product(range(3), range(5)):
    np.testing.assert_allclose(
      pairwise[i, j], _np_giou(a[i].astype(np.float64), b[j].astype(np.float64)), rtol=1e-5, atol=1e-6
    )
  assert np.all(boxes.pairwise_iou(a, b) >= pairwise - 1e-6)


# ---------------------------------------------------------------------------------------------------- matching


def _brute_force(cost: np.ndarray, valid: np.ndarray) -> float:
  """Minimum total cost of assigning every valid target (column) a distinct prediction (row)."""
  columns = np.flatnonzero(valid)
  return min(
    sum(cost[r, c] for r, c in zip(rows, columns))
    for rows in itertools.permutations(range(cost.shape[0]), len(columns))
  )


def _total(cost, valid, index) -> float:
  return sum(cost[index[j], j] for j in np.flatnonzero(valid))


_match = jax.jit(matching.hungarian_match)


def test_matching_equals_brute_force_and_skips_padding():
  rng = np.random.default_rng(0)
  for trial in range(6):
    cost = rng.normal(size=(5, 4)).astype(np.float32)
    valid = np.array([True, trial % 2 == 0, True, trial % 3 != 0])
    index = np.asarray(_match(cost, valid))
    assert np.all(index[~valid] == -1)
    used = index[valid]
    assert len(set(used.tolist())) == len(used) and np.all((used >= 0) & (used < 5))
    np.testing.assert_allclose(_total(cost, valid, index), _brute_force(cost, valid), rtol=1e-5)


def test_matching_by_hand_and_with_fewer_predictions_than_targets():
  cost = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], np.float32)  # the cheap pairs are the off-diagonal ones
  np.testing.assert_array_equal(_match(cost, np.array([True, True])), [1, 0])
  np.testing.assert_array_equal(_match(cost, np.array([False, True])), [-1, 0])
  few = np.array([[3.0, 1.0, 2.0]], np.float32)  # one prediction, three targets: the cheapest target wins
  np.testing.assert_array_equal(_match(few, np.ones(3, bool)), [-1, 0, -1])
  nan = np.array([[np.nan, 1.0], [0.0, np.inf]], np.float32)  # non-finite costs are never preferred
  np.testing.assert_array_equal(_match(nan, np.ones(2, bool)), [1, 0])


def test_matching_under_vmap_equals_per_example():
  rng = np.random.default_rng(1)
  cost = rng.normal(size=(4, 6, 3)).astype(np.float32)
  valid = rng.random((4, 3)) > 0.3
  batched = jax.jit(jax.vmap(matching.hungarian_match))(cost, valid)
  direct = matching.hungarian_match(cost, valid)  # leading batch axes are solved one by one
  chex.assert_trees_all_equal(batched, direct)
  for b in range(4):
    np.testing.assert_array_equal(batched[b], _match(cost[b], valid[b]))


def test_sharded_matching_equals_unsharded():
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
  rng = np.random.default_rng(2)
  cost = rng.normal(size=(8, 5, 3)).astype(np.float32)
  valid = rng.random((8, 3)) > 0.3
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  fn = jax.jit(lambda c, v: matching.sharded_hungarian_match(c, v, mesh))
  out = fn(jax.device_put(cost, sharding), jax.device_put(valid, sharding))
  np.testing.assert_array_equal(out, matching.hungarian_match(cost, valid))


def _np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_match_cost_against_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 3)).astype(np.float32)
  pred = _random_boxes(rng, 4)
  target = np.array([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.9, 0.8], [0, 0, 0, 0]], np.float32)
  classes = np.array([2, 0, -1], np.int32)  # the last is padding: its column may hold anything finite
  cost = np.asarray(matching.match_cost(logits, pred, classes, target))
  assert cost.shape == (4, 3) and np.all(np.isfinite(cost))
  for q, m in itertools.product(range(4), range(2)):
    p = _np_sigmoid(logits[q, classes[m]])
    focal = 0.25 * (1 - p) ** 2 * -np.log(p) - 0.75 * p**2 * -np.log(1 - p)
    l1 = np.abs(pred[q] - target[m]).sum()
    expected = 2 * focal + 5 * l1 - 2 * _np_giou(pred[q].astype(np.float64), target[m].astype(np.float64))
    np.testing.assert_allclose(cost[q, m], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- losses


def _np_focal(x, t, alpha=0.25, gamma=2.0):
  p = _np_sigmoid(x)
  return -alpha * t * (1 - p) ** gamma * np.log(p) - (1 - alpha) * (1 - t) * p**gamma * np.log(1 - p)


def test_sigmoid_focal_loss_by_hand_and_against_numpy():
  # x = 0, t = 1: p = 1/2, alpha 0.25 * (1/2)^2 * log 2.
  np.testing.assert_allclose(
    detection_losses.sigmoid_focal_loss(jnp.float32(0.0), jnp.float32(1.0)), 0.0625 * math.log(2), rtol=1e-6
  )
  x = np.linspace(-6, 6, 13, dtype=np.float32)
  x64 = x.astype(np.float64)
  for t in (0.0, 1.0):
    np.testing.assert_allclose(
      detection_losses.sigmoid_focal_loss(x, np.full_like(x, t)), _np_focal(x64, t), rtol=1e-5, atol=1e-7
    )
  # gamma 0 without alpha weighting is plain binary cross-entropy; stable at large logits.
  bce = -np.log(_np_sigmoid(x64))
  np.testing.assert_allclose(
    detection_losses.sigmoid_focal_loss(x, np.ones_like(x), alpha=-1, gamma=0.0), bce, rtol=1e-5
  )
  assert np.isfinite(detection_losses.sigmoid_focal_loss(jnp.float32(-200.0), jnp.float32(1.0)))


def test_segmentation_cross_entropy_ignores_label_255():
  logits = np.array([[[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], [[1.0, 3.0, 0.0], [5.0, 5.0, 5.0]]]], np.float32)
  labels = np.array([[[0, 2], [255, 255]]], np.int32)

  @jax.jit
  def run(logits, labels):
    return (
      pixels.segmentation_cross_entropy(logits, labels),
      pixels.segmentation_ce_terms(logits, labels),
      jax.grad(pixels.segmentation_cross_entropy)(logits, labels),
    )

  loss, (total, count), _ = run(logits, labels)
  expected = np.mean([math.log(1 + math.exp(-2) + math.exp(-3)), math.log(3)])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(count) == 2.0
  np.testing.assert_allclose(total, 2 * expected, rtol=1e-6)
  loss, _, grads = run(logits, np.full_like(labels, 255))
  assert float(loss) == 0.0 and not np.any(grads)


def test_detection_set_loss_by_hand():
  # One image, two predictions, two classes; targets: one box of class 1 and one padding row.
  logits = np.array([[[-1.0, 0.5], [2.0, 1.0]]], np.float32)
  pred = np.array([[[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]]], np.float32)
  classes = np.array([[1, -1]], np.int32)
  target = np.array([[[0.2, 0.2, 0.6, 0.8], [0, 0, 0, 0]]], np.float32)
  index = np.array([[1, -1]], np.int32)  # target 0 <- prediction 1

  @jax.jit
  def run(pred):
    loss_fn = lambda b: detection_losses.detection_set_loss(logits, b, classes, target, index)
    return loss_fn(pred), jax.grad(lambda b: loss_fn(b)[0])(pred)

  (loss, parts), g = run(pred)
  onehot = np.array([[0.0, 0.0], [0.0, 1.0]])
  focal = _np_focal(logits[0].astype(np.float64), onehot).sum()
  l1 = 0.2  # only y2 differs: 0.6 vs 0.8
  giou = 1.0 - (0.4 * 0.4) / (0.4 * 0.6)  # nested: IoU = GIoU = 0.16 / 0.24
  np.testing.assert_allclose(parts["class"], focal, rtol=1e-5)
  np.testing.assert_allclose(parts["l1"], l1, rtol=1e-5)
  np.testing.assert_allclose(parts["giou"], giou, rtol=1e-5)
  np.testing.assert_allclose(loss, 2 * focal + 5 * l1 + 2 * giou, rtol=1e-5)
  # Box gradients reach the matched prediction only.
  assert not np.any(g[0, 0]) and np.any(g[0, 1])


def test_detection_set_loss_with_matching_under_jit():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 6, 3)).astype(np.float32)
  centre = rng.random((2, 6, 2)) * 0.6 + 0.2
  pred = np.concatenate([centre - 0.1, centre + 0.1], axis=-1).astype(np.float32)
  classes = np.array([[0, 2, -1], [1, -1, -1]], np.int32)
  target = pred[:, [3, 1, 0]] + 0.01  # near predictions 3 and 1 (image 0) and 3 (image 1)

  @jax.jit
  def loss_fn(logits, pred):
    cost = matching.batched_match_cost(logits, pred, classes, target)
    index = matching.hungarian_match(cost, classes >= 0)
    return detection_losses.detection_set_loss(logits, pred, classes, target, index), index

  (loss, parts), index = loss_fn(logits, pred)
  np.testing.assert_array_equal(index, [[3, 1, -1], [3, -1, -1]])
  np.testing.assert_allclose(parts["l1"], 3 * 0.04 / 3, rtol=1e-4)  # three matched boxes, 4 x 0.01 each
  assert np.isfinite(loss) and parts["giou"] > 0
