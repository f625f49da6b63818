"""Dynamic loss scaling for fp16.

Params and optimizer state stay fp32; the model computes in the task's `dtype` (config.precision.compute_dtype,
tasks/base.py). With fp16 the loss is multiplied by a scale before differentiation; a step whose gradients are
not all finite is skipped (params and optimizer state unchanged) and the scale halves; after `period` finite
steps in a row it doubles.
"""

from __future__ import annotations

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp


class DynamicScale(flax.struct.PyTreeNode):
  scale: jax.Array  # f32 scalar
  good_steps: jax.Array  # i32 scalar: finite steps since the last change
  skipped: jax.Array  # i32 scalar: steps skipped so far
  skips_at_min: jax.Array  # i32 scalar: consecutive steps skipped at the minimum scale (train.py stops on many)
  period: int = flax.struct.field(pytree_node=False)
  min_scale: float = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, init_scale: float, period: int, min_scale: float) -> "DynamicScale":
    return cls(
      scale=jnp.asarray(init_scale, jnp.float32),
      good_steps=jnp.zeros((), jnp.int32),
      skipped=jnp.zeros((), jnp.int32),
      skips_at_min=jnp.zeros((), jnp.int32),
      period=period,
      min_scale=min_scale,
    )

  def update(self, finite: jax.Array) -> "DynamicScale":
    grow = finite & (self.good_steps + 1 >= self.period)
    scale = jnp.where(
      finite, jnp.where(grow, self.scale * 2.0, self.scale), jnp.maximum(self.scale * 0.5, self.min_scale)
    )
    good = jnp.where(finite & ~grow, self.good_steps + 1, 0)
    at_min = ~finite & (self.scale <= self.min_scale)
    return self.replace(
      scale=scale,
      good_steps=good.astype(jnp.int32),
      skipped=self.skipped + (~finite).astype(jnp.int32),
      skips_at_min=jnp.where(at_min, self.skips_at_min + 1, 0).astype(jnp.int32),
    )


def maybe_loss_scale(precision_cfg) -> DynamicScale | None:
  if precision_cfg.compute_dtype != "float16":
    return None
  return DynamicScale.create(
    precision_cfg.loss_scale_init, precision_cfg.loss_scale_period, precision_cfg.loss_scale_min
  )


def create(config, variables) -> DynamicScale | None:
  """The loss scale of a fresh state (training/state.py, `StatePart`): one in fp16, else None."""
  del variables
  return maybe_loss_scale(config.precision)


def checkpoint_target(target, config, saved_config: dict | None) -> DynamicScale | None:
  """This run's loss scale: a checkpoint of another compute dtype is refused before the restore
  (training/resume.py)."""
  del config, saved_config
  return target.loss_scale


def adopt(state, resumed) -> DynamicScale | None:
  """The restored loss scale fitted to this run's precision: a fresh one (laid out as the run's) when the run
  computes in fp16 and the checkpoint has none, which only one saved without its config can be (its compute
  dtype was never compared); the step's loss-scale guard reads it."""
  precision_cfg = resumed.config.precision
  fresh = maybe_loss_scale(precision_cfg)
  if fresh is None or state.loss_scale is not None:
    return state.loss_scale
  logging.warning(
    "%s has no fp16 loss scale: config.precision.compute_dtype=float16 starts one at %g",
    resumed.where,
    precision_cfg.loss_scale_init,
  )
  return jax.device_put(fresh, resumed.shardings.loss_scale)


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)
