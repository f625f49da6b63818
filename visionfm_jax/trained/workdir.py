"""A training workdir as the tools load it: the config its run wrote (config.json) and the params of one of its
checkpoints (checkpoints/<step>): the newest whose params are intact, as a resume takes the newest it can restore.
Bad input is a UserError naming the caller's argument (`Arguments`: a tool's --checkpoint, --step, --ema; or
`visionfm_jax.load`'s path, step, ema)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections

from visionfm_jax import config_lib
from visionfm_jax.errors import CheckpointError, ConfigError, UserError
from visionfm_jax.parallel.sharding import unbox
from visionfm_jax.training import checkpoint, ema, stored


@dataclasses.dataclass(frozen=True)
class Arguments:
  """The names of a caller's arguments, as its errors name them."""

  path: str = "--checkpoint"
  step: str = "--step"
  ema: str = "--ema"


FLAGS = Arguments()  # the tools'
PARAMETERS = Arguments("path", "step", "ema")  # visionfm_jax.load's


def _listify(value: Any) -> Any:
  """JSON lists back to the tuples configs hold (to_json writes tuples as lists)."""
  if isinstance(value, dict):
    return {k: _listify(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_listify(v) for v in value)
  return value


def load_config(
  workdir: str, task_names: Sequence[str], model: str, names: Arguments = FLAGS, where: stored.Stored | None = None
) -> ml_collections.ConfigDict:
  """The config a training run wrote to `workdir`/config.json (as `where`, `stored.Stored.at(workdir)`, read it);
  UserError unless its task is one of `task_names` (`model` names what they train in the message, e.g. 'an Aurora
  model')."""
  if not os.path.isdir(workdir):
    raise UserError(f"{names.path}={workdir}: no such directory")
  where = where or stored.Stored.at(workdir)
  path, error, fields = os.path.join(workdir, stored.CONFIG), where.config_error, where.config_json
  if isinstance(error, OSError):
    raise UserError(
      f"{names.path}={workdir}: cannot read config.json ({error.strerror or error}); expected a training workdir"
    ) from error
  if error is not None:
    raise UserError(f"{path}: not valid JSON ({error})") from error
  if not isinstance(fields, dict) or fields.get("task") not in task_names:
    task = fields.get("task") if isinstance(fields, dict) else None
    expected = " or ".join(repr(n) for n in task_names)
    raise UserError(f"{names.path}={workdir}: config.task={task!r} is not {model} (task {expected})")
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


def checkpoint_step(workdir: str, step: int | None = None, names: Arguments = FLAGS) -> int:
  """`step` when `workdir` has that checkpoint, its newest step when `step` is None; UserError otherwise."""
  return _steps(workdir, step, names)[-1] if step is None else step


def _steps(workdir: str, step: int | None, names: Arguments) -> list[int]:
  """The committed steps of `workdir`, oldest first; UserError when there are none or `step` is not one."""
  ckpt_dir = stored.checkpoints_dir(workdir)
  steps = stored.Stored.at(workdir).steps()
  if not steps:
    raise UserError(f"{names.path}={workdir}: no checkpoints (checkpoints/<step>) there")
  if step is not None and step not in steps:
    raise UserError(f"{names.step}={step}: no such checkpoint in {ckpt_dir}; steps there: {steps}")
  return steps


def load_params(
  task,
  workdir: str,
  step: int | None = None,
  sharding: jax.sharding.Sharding | None = None,
  use_ema: bool = False,
  names: Arguments = FLAGS,
):
  """The params of `workdir`'s checkpoint `step` (default: the newest whose params are intact, `intact_params`), or
  their EMA with `use_ema`, placed by `sharding` (default: this process's first device)."""
  return intact_params(task, workdir, step, sharding, use_ema, names)[1]


def intact_params(
  task,
  workdir: str,
  step: int | None = None,
  sharding: jax.sharding.Sharding | None = None,
  use_ema: bool = False,
  names: Arguments = FLAGS,
) -> tuple[int, Any]:
  """(step, params) of `workdir`'s checkpoint `step`, or with `step` None of its newest checkpoint whose params (their
  EMA with `use_ema`) read and match their digests, as a resume takes the newest it can restore: one warning names
  each newer, damaged one and the step taken. A damaged `step`, or none intact, is a CheckpointError naming the
  argument and the part; a checkpoint without an EMA of its params a UserError naming `names.ema`."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes_only = jax.eval_shape(lambda: unbox(task.init_variables(jax.random.key(0))["params"]))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes_only)
  steps = _steps(workdir, step, names)
  damaged = []
  for candidate in [step] if step is not None else reversed(steps):
    try:
      params = stored.load_params(
        workdir, target, step=candidate, argument=names.path, weights=ema.SUBTREE if use_ema else "params"
      )
    except checkpoint.DamagedCheckpointError as e:
      if step is not None:
        raise CheckpointError(f"{names.step}={step}: {e.damage}; steps there: {steps}") from e
      damaged.append(e.damage)
      continue
    except CheckpointError as e:
      if not use_ema:
        raise
      raise UserError(f"{names.ema}: {e}") from e
    if damaged:
      logging.warning(
        "%s; taking step %d, the newest checkpoint whose %s are intact",
        "; ".join(damaged),
        candidate,
        "EMA params" if use_ema else "params",
      )
    return candidate, params
  raise CheckpointError(f"{names.path}={workdir}: no checkpoint whose params are intact: {'; '.join(damaged)}")
