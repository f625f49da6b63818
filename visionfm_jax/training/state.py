"""The train state: step, fp32 params, optimizer state, the fp16 loss scale when there is one, the health
statistics (when on) and the EMA of the params when config.optim.ema_decay is set (training/ema.py)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

from visionfm_jax.training.health import HealthState
from visionfm_jax.training.precision import DynamicScale


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  loss_scale: DynamicScale | None = None
  health: HealthState | None = None
  ema_params: Any = None  # the params' exponential moving average, laid out as the optimizer state

  @staticmethod
  def non_param_fields() -> tuple[str, ...]:
    return ("step", "loss_scale", "health")
