"""The backbone interface: what the loop, the optimizer, `init_from`, the evaluators, the
dense heads and the tools ask of an image backbone (ViT, SwinV2) and of the models built around one, instead of
dispatching on their class.

A backbone's Linen class holds the math (`ImageBackbone`):
  pooled features           __call__(images, train)['pooled'], (B, num_features)
  feature_maps(images, train) -> [(B, H_i, W_i, C_i)], finest first, at `feature_strides()` pixels per cell;
                            one map: a plain backbone (dense models add ViTDet's simple pyramid), several: a
                            hierarchy of un-normalised stage outputs (dense models add a norm per level)

Everything else is its family's (`Family`): module functions in the family's own file, gathered in one
instance there (`vit.FAMILY`, `swinv2.FAMILY`, `clip.FAMILY`, ...), which the registry (`models.FAMILIES`)
files under the Linen class. Callers ask the registry, `models.<question>(model)` (the optimizer:
models.layer_ids; init_from: models.adapt_checkpoint; a task: Task.train_flops_per_example), the models of towers
`towers.family`:
  train_flops_per_example(model)
                            analytic training FLOPs of one image: 3 x forward matmul FLOPs (a multiply-add is
                            2), recomputation (remat) not counted
  layer_id(model, path), num_layer_ids(model)
                            BEiT's numbering for layer-wise lr decay: embeddings 0, block i (0-based, counted
                            across stages) i + 1, final norm and heads num_layer_ids - 1; a scanned stack is
                            one leaf with a leading depth axis, its id a vector; `path` is '/'-joined below
                            the backbone's own params
  adapt_checkpoint(model, params, shapes)
                            {path: array} of a checkpoint (another resolution) -> the same, carried to this
                            model's {path: shape} where the model knows how (ViT: pos_embed resized; SwinV2
                            leaves it out: none of its params depends on the resolution); what it cannot carry
                            is returned as given, for the caller to report
  description(model), variant(model), hf_converter
                            for import/export tools: one line about the architecture, the config's name of its
                            size (model.json's `variant`, for a family that rebuilds from its fields alone:
                            `checkpoint_fields` below), the module under visionfm_jax.convert that writes it for
                            transformers (its `to_hf` and `hf_config`)
  checkpoint_conflicts(fields, checkpoint_fields)
                            {field: the value it needs} of a model config (a dict) whose weights come from a
                            checkpoint described by its own config fields, where the two disagree; only a family
                            whose config states something of the checkpoint that its weights do not carry answers
                            it (SwinV2: the windows its position bias was trained with; a ViT carries another
                            resolution in its weights, and another patch or width is a shape mismatch that
                            init_from names); init_from names them in its error
  tower_fields(fields, key)
                            a composite model's (CLIP, Aurora): the config fields (a dict) of its image tower
                            `key` in the model config `fields`, completed as its builder completes them
                            (towers.tower_config), so that init_from compares a tower's windows
A family leaves out (None) what it does not answer; the registry then answers None (FLOPs, layer ids,
description, fields, converter, a tower's fields), the params as given (`adapt_checkpoint`) or no conflict.

Models that hold a backbone answer part of this by asking it (models/towers.py: `family`, `layer_id`,
`adapt_checkpoint`; `image_tower` below finds it): the dense models (dense_heads.DenseModel) their layer ids and
checkpoint adaptation; CLIP and Aurora only `adapt_checkpoint` (and count their own `train_flops_per_example`). They
have no layer ids, so `config.optim.layer_decay` is not available for them (optim.layer_ids says so).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import numpy as np

from visionfm_jax.config_lib import Field


@runtime_checkable
class ImageBackbone(Protocol):
  """A ViT or SwinV2 module: the computation a backbone offers (see the module docstring)."""

  @property
  def num_features(self) -> int: ...

  def feature_maps(self, images: jax.Array, train: bool = False) -> list[jax.Array]: ...

  def feature_strides(self) -> tuple[float, ...]: ...


@dataclasses.dataclass(frozen=True)
class Family:
  """What a family of models answers besides its math (the module docstring's contract): one instance per
  family, in its own file. `name` and `build` are its `config.model.name` and builder(model_cfg, dtype) for a
  model a config builds by name (None: its task builds it)."""

  module: type
  name: str | None = None
  build: Callable[[Any, Any], Any] | None = None
  hf_converter: str | None = None
  train_flops_per_example: Callable[[Any], float | None] | None = None
  num_layer_ids: Callable[[Any], int] | None = None
  layer_id: Callable[[Any, str], int | np.ndarray] | None = None
  adapt_checkpoint: Callable[[Any, dict[str, Any], dict[str, tuple[int, ...]]], dict[str, Any]] | None = None
  description: Callable[[Any], str] | None = None
  variant: Callable[[Any], str | None] | None = None
  checkpoint_conflicts: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
  tower_fields: Callable[[dict[str, Any], str], dict[str, Any] | None] | None = None


# A module's fields of how it trains, initialises or runs, not of the model its params hold: model.json and an
# imported CLIP's config leave them to the run.
RUN_FIELDS = (
  "dtype",
  "drop_path",
  "dropout",
  "head_bias_init",
  "logit_scale_init",
  "logit_bias_init",
  "scan_unroll",
  "remat_policy",
  "stage_remat_policies",
  "stage_scan_unrolls",
  "attention",
  "token_drop",
  "token_subgrid",
)
SAVED_AS = {"num_heads": "heads", "patch_size": "patch"}  # model.json's keys of two fields, as tools.import_hf writes


def module_fields(module: type) -> dict[str, dataclasses.Field]:
  """The fields that configure a Linen class (flax's `parent` and `name` aside)."""
  return {f.name: f for f in dataclasses.fields(module) if f.name not in ("parent", "name")}


def attribute(value):
  """A config's or a JSON file's value as a module field holds it: a list as a tuple."""
  return tuple(value) if isinstance(value, (list, tuple)) else value


def row_fields(module: type, rows: Mapping) -> list[str]:
  """The fields of `module` that are `rows` (config_lib's)."""
  fields = module_fields(module)
  return [name for name, row in rows.items() if name in fields and isinstance(row, Field)]


def config_kwargs(module: type, rows: Mapping, model_cfg) -> dict[str, Any]:
  """The values `model_cfg` sets of `row_fields`; a builder adds what it derives (the variant's sizes, the dtype)."""
  return {name: attribute(model_cfg[name]) for name in row_fields(module, rows)}


def config_fields(model, rows: Mapping) -> dict[str, Any]:
  """`config_kwargs` inverted, RUN_FIELDS aside."""
  return {name: getattr(model, name) for name in row_fields(type(model), rows) if name not in RUN_FIELDS}


def checkpoint_fields(model, name: str, variant: str | None) -> dict[str, Any]:
  """What rebuilds `model`'s params (tools.import_hf's model.json; `from_checkpoint_fields` reads it): its family
  `name`, its `variant` and every field of its module but RUN_FIELDS, under its key in SAVED_AS."""
  saved = {
    SAVED_AS.get(field, field): getattr(model, field) for field in module_fields(type(model)) if field not in RUN_FIELDS
  }
  return {"name": name, "variant": variant, **{k: list(v) if isinstance(v, tuple) else v for k, v in saved.items()}}


def from_checkpoint_fields(module: type, fields: dict[str, Any]):
  """The `module` that `checkpoint_fields` describe; a field they lack takes its default (a model.json of an older
  release), KeyError naming one without a default."""
  keys = {
    name: (SAVED_AS.get(name, name), field.default is dataclasses.MISSING)
    for name, field in module_fields(module).items()
    if name not in RUN_FIELDS
  }
  return module(**{name: attribute(fields[key]) for name, (key, required) in keys.items() if key in fields or required})


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Pre-norm transformer encoder on `tokens` tokens: qkv + out projections 8nD^2, MLP 4nDM, attention scores and
  mixing 4n^2D per layer."""
  per_layer = 2 * tokens * width * (4 * width + 2 * mlp_dim) + 4 * tokens * tokens * width
  return depth * per_layer


def block_layer_ids(part: str, first: int, depth: int, stack: str = "blocks") -> int | np.ndarray | None:
  """Layer ids of the params under `part` of a block stack whose blocks are layers first, first + 1, ...:
  `stack` (scanned, one leaf per param over all `depth` blocks) -> the vector of their ids; `stack`_i
  (unrolled) -> first + i; None when `part` is not the stack."""
  if part == stack:
    return first + np.arange(depth)
  index = part[len(stack) + 1 :] if part.startswith(stack + "_") else ""
  return first + int(index) if index.isdigit() else None


# ----------------------------------------------------------------------------------- models of towers


def image_tower(model) -> tuple[ImageBackbone, str | None] | None:
  """(the image backbone of `model`, the field (and params key) it is under, None when it is `model` itself):
  `model` when it is a backbone, else its one backbone field (CLIP's 'image', Aurora's 'encoder', a dense
  model's 'backbone'); None when it has no backbone or several."""
  if isinstance(model, ImageBackbone):
    return model, None
  names = [f.name for f in dataclasses.fields(model) if isinstance(getattr(model, f.name, None), ImageBackbone)]
  return (getattr(model, names[0]), names[0]) if len(names) == 1 else None
