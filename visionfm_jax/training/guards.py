"""What stands between the optimizer's proposed update and the next state, chosen once from the config: each a
transform of (the state before the step, the proposed state after it), in this order.

  loss_scale   fp16 (training/precision.py): a step whose gradients are not all finite is skipped; the scale
               halves on it and doubles after `loss_scale_period` finite steps
  health       config.health.enabled (training/health.py): a spike of the loss or gradient norm is skipped
  hold         with either above: the old params and optimizer state where a guard held the update back
  ema          config.optim.ema_decay (training/ema.py): the params' moving average, over applied steps only

A guard is guard(before, after, signals, apply) -> (after, apply, metrics): it may update its own part of the
state and refuse the update (`apply` False). `guarded` applies them; without any of them it returns the
proposed state as it is.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from visionfm_jax.training import ema, health, precision


class Signals(NamedTuple):
  """What the guards read of a step: its loss, the global norm of its (unscaled) gradients, the gradients."""

  loss: jax.Array
  grad_norm: jax.Array
  grads: Any


def loss_scale(before, after, signals: Signals, apply):
  """Skips a step whose gradients overflowed, and moves the fp16 loss scale."""
  del apply  # the first guard
  finite = precision.all_finite(signals.grads)
  after = after.replace(loss_scale=before.loss_scale.update(finite))
  return (
    after,
    finite,
    {
      "train/loss_scale": before.loss_scale.scale,
      "train/skipped_steps": after.loss_scale.skipped,
      "train/skips_at_min_scale": after.loss_scale.skips_at_min,
    },
  )


def spike(before, after, signals: Signals, apply):
  """Skips a spike of the loss or gradient norm, and updates the health statistics."""
  return health.guard_step(before, after, signals.loss, signals.grad_norm, apply)


def _hold(before, after, apply):
  # No pass of its own: XLA fuses each select into the optimizer's update of its leaf, which reads the old state
  # anyway (docs/tried_and_dropped.md; the roofline lists those fusions as `update: state.opt_state, state.params`).
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
  return after.replace(params=keep(after.params, before.params), opt_state=keep(after.opt_state, before.opt_state))


def guarded(config) -> Callable[[Any, Any, Signals], tuple[Any, dict]]:
  """(before, proposed, signals) -> (the next state, the guards' metrics), for `config`'s guards."""
  guards = [
    guard
    for guard, on in ((loss_scale, config.precision.compute_dtype == "float16"), (spike, config.health.enabled))
    if on
  ]
  ema_decay = config.optim.ema_decay

  def apply_guards(before, proposed, signals: Signals):
    after, apply, metrics = proposed, jnp.asarray(True), {}
    for guard in guards:
      after, apply, guard_metrics = guard(before, after, signals, apply)
      metrics.update(guard_metrics)
    if guards:
      after = _hold(before, after, apply)
    if ema_decay:
      after = after.replace(ema_params=ema.update(before.ema_params, proposed.params, ema_decay, apply))
    return after, metrics

  return apply_guards
