"""Weight conversion into our models, and out of them (ViT and SwinV2) into Hugging Face transformers.

`from_hf(path, scan=..., dtype=...)`: a Hugging Face `save_pretrained` directory -> `(model, variables)`, picked
by config.json's `model_type`: 'vit' (ViTModel / ViTForImageClassification -> `vit.ViT`, see `hf_vit`) or
'swinv2' (Swinv2Model / Swinv2ForImageClassification -> `swinv2.SwinV2`, see `hf_swinv2`) or 'clip_text_model'
(CLIPTextModelWithProjection -> `text.TextTransformer`, see `hf_clip_text`) or 'clip' (CLIPModel -> `clip.CLIP`
with a ViT image tower, see `hf_clip`) or 'siglip2_vision_model' (Siglip2VisionModel, SigLIP 2's NaFlex tower ->
`vit.ViT` without a class token, with a MAP head, see `hf_siglip2`).
`to_hf(model, params, path)`: our `vit.ViT` / `swinv2.SwinV2` (either block layout), or a `clip.CLIP` whose ViT
tower has CLIP's pre-norm -> a `save_pretrained`-style directory (config.json + model.safetensors) of the
transformers model that computes the same outputs: ViTModel, ViTForImageClassification, Swinv2Model,
Swinv2ForImageClassification (with a head) or CLIPModel, which `from_hf` reads back, or for a ViT head on mean-pooled
tokens Dinov2ForImageClassification (`hf_dinov2`, export only).
A model exports when its family names its converter here (`hf_converter`, models/backbone.py; `converter`); the
converter names what it does with each of the model's fields (its EXPORT_FIELDS, `fields`), and refuses a value
transformers cannot compute (a ConfigError naming the field and the value).
`stack_layers` / `unstack_layers`: unrolled `blocks_<i>` <-> scanned `blocks` param layouts.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Sequence

import jax.numpy as jnp

from visionfm_jax import models
from visionfm_jax.convert import hf_clip, hf_clip_text, hf_files, hf_siglip2, hf_swinv2, hf_vit
from visionfm_jax.convert.layout import stack_layers, unstack_layers
from visionfm_jax.errors import CheckpointError, ConfigError

# config.json model_type -> converter; a config without model_type is taken as a ViT (hand-written configs).
CONVERTERS = {
  "vit": hf_vit.from_hf,
  "swinv2": hf_swinv2.from_hf,
  "clip_text_model": hf_clip_text.from_hf,
  "clip": hf_clip.from_hf,
  hf_siglip2.MODEL_TYPE: hf_siglip2.from_hf,
}


def from_hf(path: str, *, scan: bool = True, dtype: Any = jnp.float32):
  """Reads a transformers `save_pretrained` directory; returns `(model, {'params': ...})` of our matching model.

  `scan` picks the scanned or unrolled block layout, `dtype` the model's compute dtype (params are float32).
  """
  path = os.fspath(path)
  model_type = hf_files.read_config(path).get("model_type", "vit")
  if model_type not in CONVERTERS:
    raise CheckpointError(
      f"{path}/config.json: model_type={model_type!r}: supported are {', '.join(map(repr, CONVERTERS))}"
    )
  return CONVERTERS[model_type](path, scan=scan, dtype=dtype)


def converter(model) -> ModuleType | None:
  """The module here that writes `model` for transformers, as its family names it (`models.hf_converter`): its
  `to_hf(model, params, labels) -> (config.json, tensors, notes)` and `hf_config(model, labels)`; None when
  the model names none."""
  name = models.hf_converter(model)
  return importlib.import_module(f"{__name__}.{name}") if name else None


def to_hf(model, params, path: str, *, labels: Sequence[str] | None = None) -> tuple[str, list[str]]:
  """Writes `model` with `params` (plain or boxed, scanned or unrolled) as a transformers directory at `path`;
  returns its architecture ('ViTModel', ...) and notes on what it leaves out (a ViT head on mean-pooled tokens,
  a mask token). `labels` names a head's classes (id2label). A field of `model` that transformers cannot
  express is a ConfigError naming it."""
  module = converter(model)
  if module is None:
    raise ConfigError(f"a {type(model).__name__} does not export to transformers: only ViT, SwinV2 and CLIP do")
  config, tensors, notes = module.to_hf(model, params, labels)
  hf_files.write_dir(os.fspath(path), config, tensors)
  return config["architectures"][0], notes


__all__ = ["from_hf", "to_hf", "converter", "stack_layers", "unstack_layers"]
