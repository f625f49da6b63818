"""The train state: step, fp32 params, optimizer state, and the optional parts the config turns on, each one
`StatePart` of `PARTS`: the fp16 loss scale (training/precision.py), the health statistics (training/health.py),
the EMA of the params (training/ema.py) and delayed FP8 scaling's amax histories (training/fp8_history.py).

A part is created with the state (`created`, in `step.make_init_fn`), restored in the layout its checkpoint
holds (`checkpoint_target`) and then fitted to this run's config (`adopted`); the EMA also follows params
that `init_from` replaced (`follow_params`). Init, layout (`TrainState.non_param_fields`) and restore loop over
`PARTS` in order: a further part is a field here, a row of `PARTS` and its own module's functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import ml_collections

from visionfm_jax.training import ema, fp8_history, health, precision
from visionfm_jax.training.health import HealthState
from visionfm_jax.training.precision import DynamicScale


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  loss_scale: DynamicScale | None = None
  health: HealthState | None = None
  ema_params: Any = None  # the params' exponential moving average, laid out as the optimizer state
  fp8_history: Any = None  # the FP8 GEMMs' amax histories (delayed scaling), in the init's fp8.HISTORY layout

  @staticmethod
  def non_param_fields() -> tuple[str, ...]:
    """The fields every device holds whole (parallel/sharding.py): the step and the parts not laid out as the
    optimizer state."""
    return ("step", *(part.field for part in PARTS if not part.as_opt_state))

  @staticmethod
  def opt_state_like_fields() -> tuple[str, ...]:
    """The parts laid out as the optimizer state (trees in the params' shapes)."""
    return tuple(part.field for part in PARTS if part.as_opt_state)


class Resumed(NamedTuple):
  """What a restored part is fitted to: this run's config, the config its checkpoint trained with (the JSON dict;
  None: one saved without it), the run's state shardings and the checkpoint's path (for the log lines)."""

  config: ml_collections.ConfigDict
  saved_config: dict | None
  shardings: Any
  where: str


@dataclasses.dataclass(frozen=True)
class StatePart:
  """An optional field of the train state (None where the config leaves it off).

  create(config, variables)                    its value in a fresh state, traced inside the state's init from
                                               the model init's collections (`variables['params']`, ...)
  checkpoint_target(target, config, saved)     its restore target in the layout of a checkpoint trained with
                                               the config `saved` (`target`: the state of this run's config)
  adopt(state, resumed: Resumed)               its value in the restored `state` fitted to this run's config
  follow_params(state, shardings)              its value once `init_from` replaced the params; None: it keeps it
  as_opt_state                                 laid out as the optimizer state (a tree in the params' shapes,
                                               parallel/sharding.py), else whole on every device
  """

  field: str
  create: Callable[[ml_collections.ConfigDict, Any], Any]
  checkpoint_target: Callable[[Any, ml_collections.ConfigDict, dict | None], Any]
  adopt: Callable[[Any, Resumed], Any]
  follow_params: Callable[[Any, Any], Any] | None = None
  as_opt_state: bool = False


PARTS: tuple[StatePart, ...] = (
  StatePart("loss_scale", precision.create, precision.checkpoint_target, precision.adopt),
  StatePart("health", health.create, health.checkpoint_target, health.adopt),
  StatePart("ema_params", ema.create, ema.checkpoint_target, ema.adopt, ema.follow_params, as_opt_state=True),
  StatePart("fp8_history", fp8_history.create, fp8_history.checkpoint_target, fp8_history.adopt),
)


def created(config, variables) -> dict[str, Any]:
  """{field: value} of each part in a fresh state whose model init made `variables` ({'params': ..., ...})."""
  return {part.field: part.create(config, variables) for part in PARTS}


def checkpoint_target(target, config, saved_config: dict | None):
  """`target` (the state of this run's config) with each part in the layout of a checkpoint trained with
  `saved_config`."""
  return target.replace(**{part.field: part.checkpoint_target(target, config, saved_config) for part in PARTS})


def adopted(state, resumed: Resumed):
  """The restored `state` with each part, in order, fitted to this run's config."""
  for part in PARTS:
    state = state.replace(**{part.field: part.adopt(state, resumed)})
  return state


def follow_params(state, shardings):
  """`state`, whose params `init_from` replaced, with the parts that derive from the params following them."""
  for part in PARTS:
    if part.follow_params is not None:
      state = state.replace(**{part.field: part.follow_params(state, shardings)})
  return state
