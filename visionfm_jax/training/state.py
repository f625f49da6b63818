"""The train state: step, fp32 params, optimizer state, the fp16 loss scale and the health statistics (when on)."""

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

  @staticmethod
  def non_param_fields() -> tuple[str, ...]:
    return ("step", "loss_scale", "health")
