"""A CLIP as the tools load it, from any of the three places one lives: a training workdir (config.json +
checkpoints/<step>), a tools.import_hf directory of a CLIPModel (params/ + model.json + tokenizer.json) or a raw
transformers CLIPModel directory (config.json with model_type 'clip' + model.safetensors + tokenizer.json).

Each becomes the contrastive task that trained it or would (the config builds the same model; its tokenizer,
image size, mean / std and CLIP's evaluation view feed it) plus its params, so that the tools score, filter and
evaluate with the training loop's own code. An imported CLIP's config is `task_config(fields)`: the
contrastive defaults with a ViT image tower (`configs/swinv2_g_clip.py:vit` for training from it), overridden by
the dotted `fields` that `clip_fields` derives from the model, stored in model.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from visionfm_jax import config_lib, convert, models, tasks
from visionfm_jax.convert import hf_clip, hf_files
from visionfm_jax.errors import CheckpointError, UserError
from visionfm_jax.tools import workdir as workdir_lib
from visionfm_jax.training import checkpoint

CLIP_TASKS = ("contrastive", "aurora")
TOKENIZER = "tokenizer.json"
# OpenAI's CLIP image normalisation, which its and LAION's published models use: the default when a
# directory has no preprocessor_config.json.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
LAYOUTS = ("a training workdir (config.json + checkpoints/<step>), a tools.import_hf directory (params/ + "
           "model.json) or a transformers CLIPModel directory (config.json + model.safetensors + tokenizer.json)")


@dataclasses.dataclass
class Loaded:
  task: Any  # tasks.ContrastiveTask (or AuroraTask)
  params: Any
  origin: str  # the checkpoint's path, absolute
  step: int | None  # a workdir's checkpoint step; None for the other layouts


def clip_fields(model, tokenizer: str, src: str) -> dict[str, Any]:
  """The dotted config fields (over `task_config`'s defaults) that build `model` as the contrastive task's CLIP
  and feed it: its tokenizer file, image size, and the mean / std of `src`'s image processor (OpenAI's when it
  has none)."""
  image, text = model.image, model.text
  norm = hf_files.read_normalisation(src)
  return {"model.image_size": image.image_size, "model.embed_dim": model.embed_dim, "model.scan": image.scan,
          "model.image.variant": models.checkpoint_fields(image)["variant"], "model.image.pool": image.pool,
          "model.image.layer_norm_eps": image.layer_norm_eps, "model.image.qkv_bias": image.qkv_bias,
          "model.image.pre_norm": image.pre_norm, "model.image.patch_bias": image.patch_bias,
          "model.image.act": image.act,
          "model.text.variant": text.size_name(), "model.text.vocab_size": text.vocab_size,
          "model.text.max_len": text.max_len, "model.text.eos_id": text.eos_id,
          "model.text.layer_norm_eps": text.layer_norm_eps, "model.text.act": text.act,
          "data.image_size": image.image_size, "data.tokenizer": os.path.abspath(tokenizer),
          "data.mean": tuple(norm.get("mean", CLIP_MEAN)), "data.std": tuple(norm.get("std", CLIP_STD))}


def task_config(fields: dict[str, Any]) -> ml_collections.ConfigDict:
  """The contrastive task's config with a ViT image tower, fp32, CLIP's evaluation view and OpenAI's ImageNet
  zero-shot set, overridden by `fields` (`clip_fields`). No retrieval on held-out pairs: a published CLIP names
  none (its data.eval_source would be the embedded shapes); `--config.eval.retrieval=true` with an eval source
  asks for it."""
  config = config_lib.base_config("clip", task="contrastive")
  config.model = config_lib.model_config("clip", image_tower="vit")
  config.eval.retrieval = False
  config.precision.compute_dtype = "float32"
  config.data.eval_preprocess = "clip"
  return config_lib.set_paths(config, {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _tokenizer_file(path: str) -> str:
  file = os.path.join(path, TOKENIZER)
  if not os.path.exists(file):
    raise UserError(f"--checkpoint={path}: no {TOKENIZER} (the checkpoint's own BPE tokenizer, which transformers' "
                    f"CLIPTokenizerFast.save_pretrained writes)")
  return file


def _hf_config(path: str) -> ml_collections.ConfigDict:
  """The task config of a transformers CLIPModel directory, from its config.json alone (no weights read)."""
  cfg = hf_files.read_config(path)
  if cfg.get("model_type") != "clip":
    raise UserError(f"--checkpoint={path}: a transformers {cfg.get('model_type')!r} directory, not a CLIPModel")
  model = hf_clip.build_model(*hf_clip.model_kwargs(path, cfg), scan=True, dtype=jnp.float32)
  return task_config(clip_fields(model, _tokenizer_file(path), path))


def _import_config(path: str) -> ml_collections.ConfigDict:
  meta = hf_files.read_json(os.path.join(path, "model.json"))
  if meta.get("name") != "clip" or not isinstance(meta.get("config"), dict):
    raise UserError(f"--checkpoint={path}: a tools.import_hf directory of a {meta.get('name')!r} model, not a CLIP")
  return task_config({**meta["config"], "data.tokenizer": _tokenizer_file(path)})  # the directory may have moved


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


def layout(path: str) -> str:
  """'import' (a tools.import_hf directory), 'hf' (a transformers directory), 'workdir' (a training workdir);
  UserError for none of them."""
  if not os.path.isdir(path):
    raise UserError(f"--checkpoint={path}: no such directory (expected {LAYOUTS})")
  if os.path.exists(os.path.join(path, "model.json")) and os.path.isdir(os.path.join(path, "params")):
    return "import"
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise UserError(f"--checkpoint={path}: neither {LAYOUTS}")
  try:
    with open(config_file, encoding="utf-8") as f:
      is_hf = "model_type" in json.load(f)
  except (ValueError, TypeError):
    is_hf = False  # load_config says what is wrong with it
  return "hf" if is_hf else "workdir"


def checkpoint_config(path: str, task_names=CLIP_TASKS) -> ml_collections.ConfigDict:
  """The config of the model at `path` (any of the three layouts; a workdir's task one of `task_names`)."""
  path = os.path.abspath(os.path.expanduser(path))
  kind = layout(path)
  if kind == "import":
    return _import_config(path)
  if kind == "hf":
    return _hf_config(path)
  names = " or ".join(repr(n) for n in task_names)
  return workdir_lib.load_config(path, task_names, "a CLIP model" if task_names == CLIP_TASKS else f"a {names} model")


def load(path: str, step: int | None = None, sharding: jax.sharding.Sharding | None = None, *,
         config: ml_collections.ConfigDict | None = None, mesh=None, use_ema: bool = False) -> Loaded:
  """The task and params of the CLIP at `path` (any of the three layouts); params placed by `sharding`
  (default: this process's first device). `step` is a workdir's checkpoint, `use_ema` its EMA of the params;
  UserError for the others. `config` (default: `checkpoint_config(path)`, e.g. with overrides) builds the task,
  on `mesh` when given. The one loader of a model from a path: the tools and `visionfm_jax.load`
  (tools/trained_model.py) call it."""
  path = os.path.abspath(os.path.expanduser(path))
  kind = layout(path)
  if kind != "workdir" and (step is not None or use_ema):
    what = f"--step={step}" if step is not None else "--ema"
    raise UserError(f"{what}: {path} is not a training workdir (it has one set of params, no steps and no EMA)")
  task = tasks.build(config if config is not None else checkpoint_config(path), mesh)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if kind == "import":
    return Loaded(task, checkpoint.load_params(path, _target(task, sharding)), path, None)
  if kind == "hf":
    return Loaded(task, _hf_params(path, task, sharding), path, None)
  step = workdir_lib.checkpoint_step(path, step)
  return Loaded(task, workdir_lib.load_params(task, path, step, sharding, use_ema=use_ema), path, step)
