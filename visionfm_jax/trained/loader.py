"""A trained model of any task as the tools and `visionfm_jax.load` load it, from any of the three places one
lives: a training workdir (config.json + checkpoints/<step>; `workdir`), a tools.import_hf directory (params/ +
model.json; a CLIP's also tokenizer.json) or a raw transformers CLIPModel directory (config.json with model_type
'clip' + model.safetensors + tokenizer.json).

Each becomes the task that trained it or would (a CLIP directory: `clip_config`'s contrastive task) plus its
params, so that the tools score, filter, evaluate and answer with the training loop's own code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections

from visionfm_jax import convert, tasks
from visionfm_jax.errors import CheckpointError, UserError
from visionfm_jax.trained import clip_config
from visionfm_jax.trained import workdir as workdir_lib
from visionfm_jax.training import stored

LAYOUTS = (f"{stored.WORKDIR_TEXT}, {stored.IMPORT_TEXT} or a transformers CLIPModel directory (config.json + "
           "model.safetensors + tokenizer.json)")


@dataclasses.dataclass
class Loaded:
  task: Any  # the tasks.Task that trained the params (a CLIP directory's: tasks.ContrastiveTask)
  params: Any
  origin: str  # the checkpoint's path, absolute
  step: int | None  # a workdir's checkpoint step; None for the other layouts


def _target(task, sharding):
  shapes = jax.eval_shape(lambda: nn.unbox(task.init_variables(jax.random.key(0))["params"]))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _hf_params(path: str, task, sharding):
  _, variables = convert.from_hf(path, scan=task.config.model.scan)
  target = _target(task, sharding)
  if jax.tree.structure(target) != jax.tree.structure(variables["params"]) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(variables["params"]))):
    raise CheckpointError(f"{path}: its params do not fit the CLIP its config builds")
  return jax.device_put(variables["params"], sharding)


def layout(path: str, names: workdir_lib.Arguments = workdir_lib.FLAGS) -> str:
  """'import' (a tools.import_hf directory), 'hf' (a transformers directory), 'workdir' (a training workdir), as
  `stored.kind_of` recognises them; UserError for none of them, naming `names.path`."""
  if not os.path.isdir(path):
    raise UserError(f"{names.path}={path}: no such directory (expected {LAYOUTS})")
  kind = stored.kind_of(path)
  if kind == stored.IMPORT and os.path.exists(os.path.join(path, stored.MODEL)):
    return "import"
  if kind not in (stored.HF, stored.WORKDIR) or not os.path.exists(os.path.join(path, stored.CONFIG)):
    raise UserError(f"{names.path}={path}: neither {LAYOUTS}")
  return kind


def checkpoint_config(path: str, task_names: Sequence[str] = tuple(tasks.TASKS),
                      names: workdir_lib.Arguments = workdir_lib.FLAGS) -> ml_collections.ConfigDict:
  """The config of the model at `path` (any of the three layouts; a workdir's task one of `task_names`)."""
  path = os.path.abspath(os.path.expanduser(path))
  kind = layout(path, names)
  if kind == "import":
    return clip_config.import_config(path, names.path)
  if kind == "hf":
    return clip_config.hf_config(path, names.path)
  if tuple(task_names) == clip_config.CLIP_TASKS:
    return workdir_lib.load_config(path, task_names, "a CLIP model", names)
  model = " or ".join(repr(n) for n in task_names)
  return workdir_lib.load_config(path, task_names, f"a {model} model", names)


def load(path: str, step: int | None = None, sharding: jax.sharding.Sharding | None = None, *,
         config: ml_collections.ConfigDict | None = None, mesh=None, use_ema: bool = False,
         names: workdir_lib.Arguments = workdir_lib.FLAGS) -> Loaded:
  """The task and params of the model at `path` (any of the three layouts); params placed by `sharding`
  (default: this process's first device). `step` is a workdir's checkpoint, `use_ema` its EMA of the params;
  UserError for the others. `config` (default: `checkpoint_config(path)`, e.g. with overrides or for fewer tasks)
  builds the task, on `mesh` when given. A workdir's checkpoint is `step`, else the newest whose params are intact
  (`workdir.intact_params`); errors name the caller's arguments (`names`). The one loader of a model from a path:
  the tools and `visionfm_jax.load` (trained/model.py) call it."""
  path = os.path.abspath(os.path.expanduser(path))
  kind = layout(path, names)
  if kind != "workdir" and (step is not None or use_ema):
    what = f"{names.step}={step}" if step is not None else names.ema
    raise UserError(f"{what}: {path} is not a training workdir (it has one set of params, no steps and no EMA)")
  task = tasks.build(config if config is not None else checkpoint_config(path, names=names), mesh)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if kind == "import":
    return Loaded(task, stored.load_params(path, _target(task, sharding), argument=names.path), path, None)
  if kind == "hf":
    return Loaded(task, _hf_params(path, task, sharding), path, None)
  step, params = workdir_lib.intact_params(task, path, step, sharding, use_ema=use_ema, names=names)
  return Loaded(task, params, path, step)
