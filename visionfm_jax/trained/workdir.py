"""A training workdir as the tools load it: the config its run wrote (config.json) and the params of one of its
checkpoints (checkpoints/<step>). Bad input is a UserError naming the flag (--checkpoint, --step)."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections

from visionfm_jax.errors import CheckpointError, UserError
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
  return ml_collections.ConfigDict(_listify(fields))


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
