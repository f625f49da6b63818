"""A trained model of any task as the tools and `visionfm_jax.load` load it, from any of the three places one
lives: a training workdir (config.json + checkpoints/<step>; `workdir`), a tools.import_hf directory (params/ +
model.json; a CLIP's also tokenizer.json; `imported`) or a raw transformers CLIPModel directory (config.json with
model_type 'clip' + model.safetensors + tokenizer.json).

Each becomes the task that trained it or would (a CLIP directory: `clip_config`'s contrastive task) plus its
params, so that the tools score, filter, evaluate and answer with the training loop's own code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import ml_collections

from visionfm_jax import tasks
from visionfm_jax.convert import hf_clip
from visionfm_jax.errors import CheckpointError, UserError
from visionfm_jax.parallel.sharding import unbox
from visionfm_jax.trained import clip_config, imported
from visionfm_jax.trained import workdir as workdir_lib
from visionfm_jax.training import stored

LAYOUTS = (
  f"{stored.WORKDIR_TEXT}, {stored.IMPORT_TEXT} or a transformers CLIPModel directory (config.json + "
  "model.safetensors + tokenizer.json)"
)


@dataclasses.dataclass
class Loaded:
  task: Any  # the tasks.Task that trained the params (a CLIP directory's: tasks.ContrastiveTask)
  params: Any
  origin: str  # the checkpoint's path, absolute
  step: int | None  # a workdir's checkpoint step; None for the other layouts


def _target(task, sharding):
  shapes = jax.eval_shape(lambda: unbox(task.init_variables(jax.random.key(0))["params"]))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _hf_params(where: stored.Stored, task, sharding):
  """The params of the transformers CLIP at `where`, converted once onto `task`'s model (built once: the target's
  shapes are the check)."""
  params = hf_clip.read_params(
    where.path, *hf_clip.model_kwargs(where.path, where.config_json), scan=task.config.model.scan
  )
  target = _target(task, sharding)
  # jaxlib ships no stub of its _jax extension, where PyTreeDef lives: mypy cannot tell it compares
  if jax.tree.structure(target) != jax.tree.structure(params) or any(  # type: ignore[operator]
    a.shape != b.shape for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(params))
  ):
    raise CheckpointError(f"{where.path}: its params do not fit the CLIP its config builds")
  return jax.device_put(params, sharding)


def opened(path: str, names: workdir_lib.Arguments = workdir_lib.FLAGS) -> stored.Stored:
  """The model at `path` (absolute) as `stored.Stored` recognises it, of kind IMPORT (a tools.import_hf directory),
  HF (a transformers directory) or WORKDIR (a training workdir); UserError for none of them, naming `names.path`."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise UserError(f"{names.path}={path}: no such directory (expected {LAYOUTS})")
  where = stored.Stored.at(path)
  if where.kind == stored.IMPORT and os.path.exists(os.path.join(path, stored.MODEL)):
    return where
  if where.kind not in (stored.HF, stored.WORKDIR) or not os.path.exists(os.path.join(path, stored.CONFIG)):
    raise UserError(f"{names.path}={path}: neither {LAYOUTS}")
  return where


def checkpoint_config(
  path: str, task_names: Sequence[str] = tuple(tasks.TASKS), names: workdir_lib.Arguments = workdir_lib.FLAGS
) -> ml_collections.ConfigDict:
  """The config of the model at `path` (any of the three layouts; a workdir's task one of `task_names`)."""
  return _config(opened(path, names), task_names, names)


def _config(where: stored.Stored, task_names: Sequence[str], names: workdir_lib.Arguments) -> ml_collections.ConfigDict:
  if where.kind == stored.IMPORT:
    return imported.config(where.path, names.path)
  if where.kind == stored.HF:
    return clip_config.hf_config(where.path, names.path, where.config_json)
  model = (
    "a CLIP model"
    if tuple(task_names) == clip_config.CLIP_TASKS
    else (f"a {' or '.join(repr(n) for n in task_names)} model")
  )
  return workdir_lib.load_config(where.path, task_names, model, names, where)


def load(
  path: str,
  step: int | None = None,
  sharding: jax.sharding.Sharding | None = None,
  *,
  config: ml_collections.ConfigDict | None = None,
  mesh=None,
  use_ema: bool = False,
  names: workdir_lib.Arguments = workdir_lib.FLAGS,
) -> Loaded:
  """The task and params of the model at `path` (any of the three layouts); params placed by `sharding`
  (default: this process's first device). `step` is a workdir's checkpoint, `use_ema` its EMA of the params;
  UserError for the others. `config` (default: `checkpoint_config(path)`, e.g. with overrides or for fewer tasks)
  builds the task, on `mesh` when given. A workdir's checkpoint is `step`, else the newest whose params are intact
  (`workdir.intact_params`); errors name the caller's arguments (`names`). The one loader of a model from a path:
  the tools and `visionfm_jax.load` (trained/model.py) call it. The path is opened once (`opened`): a transformers
  CLIP's config.json is read once and its model built once, by the task."""
  where = opened(path, names)
  path = where.path
  if where.kind != stored.WORKDIR and (step is not None or use_ema):
    what = f"{names.step}={step}" if step is not None else names.ema
    raise UserError(f"{what}: {path} is not a training workdir (it has one set of params, no steps and no EMA)")
  task = tasks.build(config if config is not None else _config(where, tuple(tasks.TASKS), names), mesh)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if where.kind == stored.IMPORT:
    return Loaded(task, stored.load_params(path, _target(task, sharding), argument=names.path), path, None)
  if where.kind == stored.HF:
    return Loaded(task, _hf_params(where, task, sharding), path, None)
  step, params = workdir_lib.intact_params(task, path, step, sharding, use_ema=use_ema, names=names)
  return Loaded(task, params, path, step)
