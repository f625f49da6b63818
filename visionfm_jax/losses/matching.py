"""One-to-one (Hungarian) matching of dense predictions to padded ground-truth boxes, for set losses.

`match_cost` builds the (Q, M) cost of assigning prediction q to target m (OneNet / Deformable DETR):

  cost = class_weight * focal_cost + l1_weight * |box_q - box_m|_1 - giou_weight * GIoU(box_q, box_m)
  focal_cost = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)),  p = sigmoid(logit_q[class_m])

with boxes as normalised xyxy. `hungarian_match` solves the assignment on the host (scipy's
`linear_sum_assignment` through `jax.pure_callback`), so it runs inside `jit` and under `vmap`; targets marked
invalid (padding, class -1) take no prediction. It returns, per target, the index of its prediction (-1 for
padding). The matching has no gradient: costs are wrapped in `stop_gradient`.

Under a data-parallel mesh use `sharded_hungarian_match`: each device matches its own examples, instead of
gathering every cost matrix on one device for the callback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np

from visionfm_jax import parallel
from visionfm_jax.losses import boxes as box_lib

# A stand-in for non-finite costs: large enough never to be chosen over a finite one, small enough for scipy.
_INVALID_COST = 1e8


def focal_class_cost(
  logits: jax.Array, target_classes: jax.Array, alpha: float = 0.25, gamma: float = 2.0
) -> jax.Array:
  """(Q, C) logits, (M,) classes -> (Q, M) focal cost of predicting each target's class."""
  logits = jnp.take(logits.astype(jnp.float32), jnp.maximum(target_classes, 0), axis=-1)
  p = jax.nn.sigmoid(logits)
  log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  positive = alpha * (1 - p) ** gamma * -log_p
  negative = (1 - alpha) * p**gamma * -log_not_p
  return positive - negative


def match_cost(
  logits: jax.Array,
  pred_boxes: jax.Array,
  target_classes: jax.Array,
  target_boxes: jax.Array,
  *,
  class_weight: float = 2.0,
  l1_weight: float = 5.0,
  giou_weight: float = 2.0,
  alpha: float = 0.25,
  gamma: float = 2.0,
) -> jax.Array:
  """(Q, M) matching cost of one image: logits (Q, C), pred_boxes (Q, 4), target_classes (M,), target_boxes
  (M, 4); boxes xyxy in the same (normalised) units. Padded columns hold arbitrary finite values."""
  pred_boxes, target_boxes = pred_boxes.astype(jnp.float32), target_boxes.astype(jnp.float32)
  l1 = jnp.sum(jnp.abs(pred_boxes[:, None, :] - target_boxes[None, :, :]), axis=-1)
  cost = (
    class_weight * focal_class_cost(logits, target_classes, alpha, gamma)
    + l1_weight * l1
    - giou_weight * box_lib.pairwise_giou(pred_boxes, target_boxes)
  )
  return jax.lax.stop_gradient(cost)


def _assign(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Host side: (..., Q, M) costs, (..., M) validity -> (..., M) int32 prediction index per target, -1 if none."""
  # Imported here, at the first match: scipy.optimize takes 0.45 s to import, which every process that imports
  # the task registry (each training and tool start) would otherwise pay for detection alone.
  from scipy import optimize  # pylint: disable=g-import-not-at-top

  cost = np.nan_to_num(np.asarray(cost, np.float64), nan=_INVALID_COST, posinf=_INVALID_COST, neginf=-_INVALID_COST)
  valid = np.asarray(valid, bool)
  out = np.full(valid.shape, -1, np.int32)
  for index in np.ndindex(valid.shape[:-1]):
    columns = np.flatnonzero(valid[index])
    if columns.size == 0 or cost.shape[-2] == 0:
      continue
    rows, cols = optimize.linear_sum_assignment(cost[index][:, columns])
    out[index + (columns[cols],)] = rows
  return out


def hungarian_match(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """Minimum-cost one-to-one assignment. cost (..., Q, M), valid (..., M) bool -> (..., M) int32: the prediction
  assigned to each target, -1 for invalid targets (and for valid ones left over when Q < valid targets).

  Jit- and vmap-safe (the callback solves every leading index it is given)."""
  if cost.shape[:-2] != valid.shape[:-1] or cost.shape[-1] != valid.shape[-1]:
    raise ValueError(f"cost {cost.shape} and valid {valid.shape} disagree: expected (..., Q, M) and (..., M)")
  result = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
  return jax.pure_callback(_assign, result, jax.lax.stop_gradient(cost), valid, vmap_method="broadcast_all")


def sharded_hungarian_match(cost: jax.Array, valid: jax.Array, mesh: Mesh) -> jax.Array:
  """`hungarian_match` on (B, Q, M) costs whose batch is split over the data-parallel axes of `mesh`
  (`parallel.batch_axes_of`): every device solves its own examples (no gather of the cost matrices). Call it
  under `jit`."""
  axes = parallel.batch_axes_of(mesh)
  fn = jax.shard_map(hungarian_match, mesh=mesh, in_specs=(P(axes), P(axes)), out_specs=P(axes), check_vma=False)
  return fn(cost, valid)


def batched_match_cost(logits, pred_boxes, target_classes, target_boxes, **weights) -> jax.Array:
  """`match_cost` over a batch: (B, Q, C), (B, Q, 4), (B, M), (B, M, 4) -> (B, Q, M)."""
  return jax.vmap(lambda *a: match_cost(*a, **weights))(logits, pred_boxes, target_classes, target_boxes)
