"""Weight conversion into our models.

`from_hf(path, scan=..., dtype=...)`: a Hugging Face `save_pretrained` directory -> `(model, variables)`, picked
by config.json's `model_type`: 'vit' (ViTModel / ViTForImageClassification -> `vit.ViT`, see `hf_vit`) or
'swinv2' (Swinv2Model / Swinv2ForImageClassification -> `swinv2.SwinV2`, see `hf_swinv2`) or 'clip_text_model'
(CLIPTextModelWithProjection -> `text.TextTransformer`, see `hf_clip_text`).
`stack_layers` / `unstack_layers`: unrolled `blocks_<i>` <-> scanned `blocks` param layouts.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from visionfm_jax.convert import hf_clip_text, hf_files, hf_swinv2, hf_vit
from visionfm_jax.convert.layout import stack_layers, unstack_layers
from visionfm_jax.errors import CheckpointError

# config.json model_type -> converter; a config without model_type is taken as a ViT (hand-written configs).
CONVERTERS = {"vit": hf_vit.from_hf, "swinv2": hf_swinv2.from_hf, "clip_text_model": hf_clip_text.from_hf}


def from_hf(path: str, *, scan: bool = True, dtype: Any = jnp.float32):
  """Reads a transformers `save_pretrained` directory; returns `(model, {'params': ...})` of our matching model.

  `scan` picks the scanned or unrolled block layout, `dtype` the model's compute dtype (params are float32).
  """
  path = os.fspath(path)
  model_type = hf_files.read_config(path).get("model_type", "vit")
  if model_type not in CONVERTERS:
    raise CheckpointError(f"{path}/config.json: model_type={model_type!r}: supported are "
                          f"{', '.join(map(repr, CONVERTERS))}")
  return CONVERTERS[model_type](path, scan=scan, dtype=dtype)


__all__ = ["from_hf", "stack_layers", "unstack_layers"]
