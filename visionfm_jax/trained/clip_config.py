"""The task config of a CLIP that no training run of this project wrote: a tools.import_hf directory of a CLIPModel
(params/ + model.json + tokenizer.json) or a raw transformers CLIPModel directory (config.json with model_type
'clip' + model.safetensors + tokenizer.json).

Either becomes the contrastive task that would train it (the config builds the same model; its tokenizer, image
size, mean / std and CLIP's evaluation view feed it): `task_config(fields)`, the contrastive defaults with a ViT
image tower (`configs/swinv2_g_clip.py:vit` for training from it), overridden by the dotted `fields` that
`clip_fields` derives from the model, stored in model.json.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from visionfm_jax import config_lib, models
from visionfm_jax.convert import hf_clip, hf_files
from visionfm_jax.errors import UserError
from visionfm_jax.models import backbone

CLIP_TASKS = ("contrastive", "aurora")
TOKENIZER = "tokenizer.json"
# OpenAI's CLIP image normalisation, which its and LAION's published models use: the default when a
# directory has no preprocessor_config.json.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_fields(model, tokenizer: str, src: str) -> dict[str, Any]:
  """The dotted config fields (over `task_config`'s defaults) that build `model` as the contrastive task's CLIP
  and feed it: each tower's fields (backbone.config_fields) and variant, the fields CLIP sets for its towers, its
  tokenizer file, image size, and the mean / std of `src`'s image processor (OpenAI's when it has none)."""
  image, text = model.image, model.text
  # A CLIP's image tower is a registered backbone (ViT or SwinV2), which has a name and rebuilds from its fields.
  image_tower, image_fields = models.name_of(image), models.checkpoint_fields(image)
  assert image_tower is not None and image_fields is not None
  rows = config_lib.model_rows("clip", image_tower=image_tower)
  shared = {name: rows[name] for name in config_lib.TOWER_SHARED_FIELDS}  # the image tower's, as it is CLIP's
  towers = {"image": (image, image_fields["variant"]), "text": (text, text.size_name())}
  fields = {
    **backbone.config_fields(image, shared),
    **backbone.config_fields(model, rows),
    **{
      f"{key}.{k}": v
      for key, (tower, variant) in towers.items()
      for k, v in {**backbone.config_fields(tower, rows[key]), "variant": variant}.items()
    },
  }
  norm = hf_files.read_normalisation(src)
  return {
    **{f"model.{k}": v for k, v in fields.items()},
    "data.image_size": image.image_size,
    "data.tokenizer": os.path.abspath(tokenizer),
    "data.mean": tuple(norm.get("mean", CLIP_MEAN)),
    "data.std": tuple(norm.get("std", CLIP_STD)),
  }


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


def _tokenizer_file(path: str, argument: str) -> str:
  file = os.path.join(path, TOKENIZER)
  if not os.path.exists(file):
    raise UserError(
      f"{argument}={path}: no {TOKENIZER} (the checkpoint's own BPE tokenizer, which transformers' "
      f"CLIPTokenizerFast.save_pretrained writes)"
    )
  return file


def hf_config(
  path: str, argument: str = "--checkpoint", cfg: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """The task config of a transformers CLIPModel directory, from its config.json alone (`cfg` when the caller has
  read it; no weights read); errors name the caller's `argument`."""
  cfg = hf_files.read_config(path) if cfg is None else cfg
  if cfg.get("model_type") != "clip":
    raise UserError(f"{argument}={path}: a transformers {cfg.get('model_type')!r} directory, not a CLIPModel")
  model = hf_clip.build_model(*hf_clip.model_kwargs(path, cfg), scan=True, dtype=jnp.float32)
  return task_config(clip_fields(model, _tokenizer_file(path, argument), path))


def imported_clip_config(path: str, meta: dict[str, Any], argument: str) -> ml_collections.ConfigDict:
  """The task config of a tools.import_hf directory of a CLIP, from its model.json (`meta`)."""
  # The tokenizer from the directory as it is now: it may have moved since the import.
  return task_config({**meta["config"], "data.tokenizer": _tokenizer_file(path, argument)})
