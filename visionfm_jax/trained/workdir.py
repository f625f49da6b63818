"""A training workdir as the tools load it: the config its run wrote (config.json) and the params of one of its
checkpoints (checkpoints/<step>). Bad input is a UserError naming the flag (--checkpoint, --step)."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections

from visionfm_jax import config_lib
from visionfm_jax.errors import CheckpointError, ConfigError, UserError
from visionfm_jax.training import checkpoint, ema


def _listify(value: Any) -> Any:
  """JSON lists back to the tuples configs hold (to_json writes tuples as lists)."""
  if isinstance(value, dict):
    return {k: _listify(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_listify(v) for v in value)
  return value


def load_config(workdir: str, task_names: Sequence[str], model: str) -> ml_collections.ConfigDict:
  """The config a training run wrote to `workdir`/config.json; UserError unless its task is one of `task_names`
  (`model` names what they train in the message, e.g. 'an Aurora model')."""
  if not os.path.isdir(workdir):
    raise UserError(f"--checkpoint={workdir}: no such directory")
  path = os.path.join(workdir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      fields = json.load(f)
  except OSError as e:
    raise UserError(f"--checkpoint={workdir}: cannot read config.json ({e.strerror or e}); expected a training "
                    "workdir") from e
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(fields, dict) or fields.get("task") not in task_names:
    task = fields.get("task") if isinstance(fields, dict) else None
    names = " or ".join(repr(n) for n in task_names)
    raise UserError(f"--checkpoint={workdir}: config.task={task!r} is not {model} (task {names})")
  return _completed(ml_collections.ConfigDict(_listify(fields)), path)


def _completed(config: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
  """`config` with the fields its schema has and it lacks (written before they existed) at their defaults, named
  in one log line. The model's family has no default: the schema and the params follow from it."""
  if not isinstance(config.get("model"), ml_collections.ConfigDict) or "name" not in config.model:
    raise ConfigError(f"{path}: no model.name; the model family cannot be defaulted")
  filled = config_lib.complete(config)
  if filled:
    logging.info("%s: fields at their defaults (written before they existed): %s", path, ", ".join(filled))
  return config


def checkpoint_step(workdir: str, step: int | None = None) -> int:
  """`step` when `workdir` has that checkpoint, its newest step when `step` is None; UserError otherwise."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit()) if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise UserError(f"--checkpoint={workdir}: no checkpoints (checkpoints/<step>) there")
  if step is not None and step not in steps:
    raise UserError(f"--step={step}: no such checkpoint in {ckpt_dir}; steps there: {steps}")
  return steps[-1] if step is None else step


def load_params(task, workdir: str, step: int | None = None, sharding: jax.sharding.Sharding | None = None,
                use_ema: bool = False):
  """The params of `workdir`'s newest checkpoint (or of `step`), or their EMA with `use_ema` (a UserError when the
  checkpoint has none), placed by `sharding` (default: this process's first device)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes_only = jax.eval_shape(lambda: nn.unbox(task.init_variables(jax.random.key(0))["params"]))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes_only)
  try:
    return checkpoint.load_params(workdir, target, step=checkpoint_step(workdir, step),
                                  weights=ema.SUBTREE if use_ema else "params")
  except CheckpointError as e:
    if not use_ema:
      raise
    raise UserError(f"--ema: {e}") from e
