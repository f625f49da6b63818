"""The task config of a tools.import_hf directory (params/ + model.json), from its model.json alone: a CLIP's is the
contrastive task that would train it (clip_config.py), a ViT's or a SwinV2's the classification task of the model
its fields rebuild (models.from_checkpoint_fields), fp32, at the model's image size, normalised as the transformers
directory it came from said (its preprocessor_config.json, else the defaults) and viewed as tools.import_hf's
printed config evaluates: the default evaluation view. A model without a head (num_classes 0) gives features."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from visionfm_jax import config_lib, models
from visionfm_jax.convert import hf_files
from visionfm_jax.errors import UserError
from visionfm_jax.models import backbone
from visionfm_jax.trained import clip_config
from visionfm_jax.training import stored


def config(path: str, argument: str = "--checkpoint") -> ml_collections.ConfigDict:
  """The task config of the tools.import_hf directory `path`; UserError naming the caller's `argument` for a
  model.json that describes no model this project builds."""
  file = os.path.join(path, stored.MODEL)
  meta = hf_files.read_json(file)
  if isinstance(meta, dict) and meta.get("name") == "clip" and isinstance(meta.get("config"), dict):
    return clip_config.imported_clip_config(path, meta, argument)
  try:
    model = models.from_checkpoint_fields(meta if isinstance(meta, dict) else {})
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(
      f"{argument}={path}: {file} describes no model this project builds (field {e} missing or "
      f"invalid; 'name' is one of clip, vit, swinv2)"
    ) from e
  return backbone_config(model, meta)


def backbone_fields(model, meta: dict[str, Any]) -> dict[str, Any]:
  """The dotted config fields that build `model` (a ViT or a SwinV2) and feed it as `meta` (its model.json) says:
  each of its config rows but the run's (backbone.RUN_FIELDS), its variant (a named size or spelled out), the data's
  image size and, when the transformers directory it came from had them, its mean and std."""
  fields = {f"model.{k}": v for k, v in backbone.config_fields(model, config_lib.model_rows(meta["name"])).items()}
  fields.update({"model.variant": meta["variant"], "data.image_size": model.image_size})
  fields.update({f"data.{k}": tuple(meta[k]) for k in ("mean", "std") if k in meta})
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def backbone_config(model, meta: dict[str, Any]) -> ml_collections.ConfigDict:
  """The classification task that builds `model` (a ViT or a SwinV2), fed as `meta` (a model.json) says."""
  task = config_lib.base_config(meta["name"], task="classification")
  task.precision.compute_dtype = "float32"
  return config_lib.set_paths(task, backbone_fields(model, meta))
