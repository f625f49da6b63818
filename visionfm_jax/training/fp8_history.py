"""The amax histories of delayed FP8 scaling (`config.precision.gemm=fp8_delayed`, models/fp8.py): an optional part
of the train state (training/state.py, `StatePart`).

Each FP8 GEMM's input and output-gradient histories, fp32 and tiny (2 x fp8.HISTORY_LENGTH values a layer), every
device holds whole; they are checkpointed with the state. The model's init creates them empty (in the
`fp8.HISTORY` collection); the step updates them (training/grads.py, `with_amax_histories`). A resume that turns
the recipe on starts them empty (the first step scales by 1, as the run's first step did); one that turns it off
restores and drops them (logged).
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

from visionfm_jax import models, tasks
from visionfm_jax.models import fp8


def enabled(config) -> bool:
  return config.precision.gemm == fp8.DELAYED


def saved_enabled(saved_config: dict | None) -> bool:
  """Whether the checkpoint trained with `saved_config` (its JSON dict; None: one saved without it) holds them."""
  return ((saved_config or {}).get("precision") or {}).get("gemm") == fp8.DELAYED


def create(config, variables):
  """The histories of a fresh state: the init's (`step.make_init_fn` traces it under the run's recipe), else
  None."""
  return variables.get(fp8.HISTORY) if enabled(config) else None


def abstract_histories(config):
  """The shapes of the histories a model of `config` keeps under the delayed recipe (its init traced, nothing
  computed); None for a model without FP8 GEMMs."""
  task = tasks.build(config)
  with models.layers.rolled_stacks(), fp8.gemms(fp8.DELAYED):
    return jax.eval_shape(task.init_variables, jax.random.key(0)).get(fp8.HISTORY)


def checkpoint_target(target, config, saved_config: dict | None):
  """The histories of the restore target `target` for a checkpoint trained with `saved_config`: theirs (laid out
  whole on every device, as the step is) when it has them and this run does not, so that they restore and
  `adopt` drops them."""
  if target.fp8_history is not None or not saved_enabled(saved_config):
    return target.fp8_history
  whole = target.step.sharding
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), abstract_histories(config))


def adopt(state, resumed):
  """The restored histories fitted to this run: started empty when it turns delayed scaling on, dropped when it
  turns it off."""
  if enabled(resumed.config) and state.fp8_history is None:
    fresh = abstract_histories(resumed.config)
    logging.warning(
      "%s has no FP8 amax histories: config.precision.gemm=%s starts them empty (the first step scales by 1)",
      resumed.where,
      fp8.DELAYED,
    )
    return jax.device_put(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), fresh), resumed.shardings.fp8_history)
  if not enabled(resumed.config) and state.fp8_history is not None:
    logging.warning(
      "%s has FP8 amax histories and config.precision.gemm=%s: this run drops them",
      resumed.where,
      resumed.config.precision.gemm,
    )
    return None
  return state.fp8_history
