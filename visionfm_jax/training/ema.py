"""An exponential moving average of the params (`config.optim.ema_decay`; 0: none).

  ema_0 = params_0 (after init_from)      ema_t = d * ema_(t-1) + (1 - d) * params_t

over the steps whose update is applied: a step that applies none (an fp16 overflow, a skipped spike) leaves
the EMA where it was, as it leaves the params. The plain decay, as NeMo's CLIP recipe (0.9999): no bias
correction, because the average starts at the params, not at zero, so its weights sum to 1 from the first
step (Adam's correction undoes a zero start); and no decay warmup, so that the average's horizon, 1 / (1 - d) steps, is
the one configured (for the first ~1 / (1 - d) steps it still leans on the initial params; pick d with that horizon much
shorter than the run). The EMA lives in fp32 in the train state, laid out as the optimizer state (as the params under
zero3, sharded over fsdp where zero1/zero2 replicate the params), is checkpointed with it, evaluated beside the params
(`eval/ema/...`) and read by `init_from` (`config.init_from_ema`) and the tools (`--ema`).

A resume whose checkpoint has no EMA while ema_decay is set starts the EMA from the restored params (logged):
turning the average on partway through a run is a legitimate choice, and a fresh average from the current
params is exactly what the run would have had if it had been on from this step; refusing would leave no way
to add it to a long run. A resume with ema_decay 0 from a checkpoint with an EMA drops it (logged).
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

# The name of the EMA's subtree in a checkpoint's `state` item (the TrainState field).
SUBTREE = "ema_params"


def update(ema, params, decay: float, applied):
  """ema * decay + params * (1 - decay) where `applied` (a bool scalar: the step's update was applied), else ema."""
  d = jnp.float32(decay)
  return jax.tree.map(lambda e, p: jnp.where(applied, e * d + p.astype(e.dtype) * (1 - d), e), ema, params)


def start(params, shardings):
  """A fresh EMA of `params`: copies laid out by `shardings` (never the params' own buffers: the train step
  donates the state)."""
  return jax.device_put(params, shardings, may_alias=False)


def saved_has_ema(saved_config: dict | None) -> bool:
  """Whether the checkpoint trained with `saved_config` (its JSON dict; None: one saved without it) holds an EMA."""
  return bool(((saved_config or {}).get("optim") or {}).get("ema_decay", 0.0))


def create(config, variables):
  """The EMA of a fresh state (training/state.py, `StatePart`): the params themselves when
  config.optim.ema_decay is set (the init's output, never its input), else None."""
  return variables["params"] if config.optim.ema_decay else None


def checkpoint_target(target, config, saved_config: dict | None):
  """The EMA of the restore target `target` (the TrainState of this run's config) for a checkpoint trained with
  `saved_config`: one in the params' shapes when the checkpoint has one and this run none (a checkpoint
  without one restores into a target with one: `Checkpointer.restore` leaves it None)."""
  del config
  if saved_has_ema(saved_config) and target.ema_params is None:
    return target.params
  return target.ema_params


def adopt(state, resumed):
  """The restored EMA fitted to this run: started from the params when config.optim.ema_decay is set and the
  checkpoint had none, dropped when it is 0."""
  decay = resumed.config.optim.ema_decay
  if decay and state.ema_params is None:
    logging.warning(
      "%s has no EMA of the params: config.optim.ema_decay=%g starts it from the restored params", resumed.where, decay
    )
    return start(state.params, resumed.shardings.ema_params)
  if not decay and state.ema_params is not None:
    logging.warning("%s has an EMA of the params and config.optim.ema_decay=0: this run drops it", resumed.where)
    return None
  return state.ema_params


def follow_params(state, shardings):
  """The EMA once `init_from` replaced the params: started from them (ema_0 = params_0), None without one."""
  return start(state.params, shardings.ema_params) if state.ema_params is not None else None
