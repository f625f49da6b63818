"""Hugging Face ViT config.json <-> our `vit.ViT` fields, and the tensor names and shapes that config implies.

Supported: `ViTModel` (no prefix, optional pooler) and `ViTForImageClassification` (`vit.` prefix plus
`classifier.*`). Anything our ViT cannot reproduce exactly is rejected with a CheckpointError. `hf_config` is
the export direction.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from visionfm_jax.convert.fields import RUN, ExportFields
from visionfm_jax.convert.hf_files import config_error
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import layers

BACKBONE, CLASSIFIER = "ViTModel", "ViTForImageClassification"
# What an export does with each field of our ViT (convert/fields.py). class_token picks the transformers model (a
# ViT, or without one a Siglip2VisionModel); pool='gap' with a head exports as a Dinov2ForImageClassification.
FIELDS = ExportFields(
  expressed=(
    "width",
    "depth",
    "mlp_dim",
    "num_heads",
    "patch_size",
    "image_size",
    "num_classes",
    "pool",
    "layer_norm_eps",
    "qkv_bias",
    "patch_bias",
    "act",
    "class_token",
  ),
  only={"pre_norm": False},
  inert={**RUN, "token_drop": "training only"},
)
# transformers' hidden_act names of our activations (models/layers.py): the same functions.
ACTIVATIONS = tuple(layers.ACTIVATIONS)

# transformers' ViTConfig defaults, for fields a hand-written config.json leaves out.
DEFAULTS = dict(
  hidden_size=768,
  num_hidden_layers=12,
  num_attention_heads=12,
  intermediate_size=3072,
  hidden_act="gelu",
  layer_norm_eps=1e-12,
  image_size=224,
  patch_size=16,
  num_channels=3,
  qkv_bias=True,
  model_type="vit",
)

# Tensors (after the prefix) that do not feed our ViT's outputs: the ViTModel pooler (dense + tanh on the
# class token) and the masked-image-modelling mask token.
IGNORED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token")


def _field(cfg: dict[str, Any], key: str):
  return cfg.get(key, DEFAULTS[key])


def _positive_int(path: str, cfg: dict[str, Any], key: str) -> int:
  value = _field(cfg, key)
  if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
    value = value[0]  # a square (h, w) size
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise config_error(path, f"{key}={value!r}: expected a positive integer (square sizes only)")
  return value


def architecture(path: str, cfg: dict[str, Any], keys) -> str:
  """BACKBONE or CLASSIFIER, from the tensor names, checked against config.json's `architectures`."""
  if _field(cfg, "model_type") != "vit":
    raise config_error(path, f"model_type={cfg.get('model_type')!r}: only 'vit' (transformers ViT) is supported")
  from_keys = CLASSIFIER if any(k.startswith("vit.") for k in keys) or "classifier.weight" in keys else BACKBONE
  archs = cfg.get("architectures") or []
  unsupported = [a for a in archs if a not in (BACKBONE, CLASSIFIER)]
  if unsupported or len(archs) > 1:
    raise config_error(path, f"architectures={archs}: supported are [{BACKBONE!r}] and [{CLASSIFIER!r}]")
  if archs and archs[0] != from_keys:
    raise config_error(
      path,
      f"architectures={archs} but the tensor names look like {from_keys} "
      f"({'with' if from_keys == CLASSIFIER else 'without'} the 'vit.' prefix)",
    )
  return from_keys


def num_labels(cfg: dict[str, Any]) -> int:
  if isinstance(cfg.get("id2label"), dict):
    return len(cfg["id2label"])
  return int(cfg.get("num_labels", 2))


def model_kwargs(path: str, cfg: dict[str, Any], arch: str) -> dict[str, Any]:
  """Keyword arguments of `vit.ViT` (sizes, head, eps, qkv bias) that reproduce the HF model."""
  if _field(cfg, "hidden_act") not in ACTIVATIONS:
    raise config_error(path, f"hidden_act={cfg['hidden_act']!r}: supported are {ACTIVATIONS}")
  if _field(cfg, "num_channels") != 3:
    raise config_error(path, f"num_channels={cfg['num_channels']!r}: only 3 (RGB) is supported")
  sizes = {
    k: _positive_int(path, cfg, k)
    for k in (
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "intermediate_size",
      "image_size",
      "patch_size",
    )
  }
  if sizes["hidden_size"] % sizes["num_attention_heads"]:
    raise config_error(
      path, f"hidden_size={sizes['hidden_size']} is not divisible by num_attention_heads={sizes['num_attention_heads']}"
    )
  if sizes["image_size"] % sizes["patch_size"]:
    raise config_error(path, f"image_size={sizes['image_size']} is not divisible by patch_size={sizes['patch_size']}")
  eps, qkv_bias = _field(cfg, "layer_norm_eps"), _field(cfg, "qkv_bias")
  if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps <= 0:
    raise config_error(path, f"layer_norm_eps={eps!r}: expected a positive number")
  if not isinstance(qkv_bias, bool):
    raise config_error(path, f"qkv_bias={qkv_bias!r}: expected true or false")
  return dict(
    width=sizes["hidden_size"],
    depth=sizes["num_hidden_layers"],
    mlp_dim=sizes["intermediate_size"],
    num_heads=sizes["num_attention_heads"],
    patch_size=sizes["patch_size"],
    image_size=sizes["image_size"],
    num_classes=num_labels(cfg) if arch == CLASSIFIER else 0,
    layer_norm_eps=float(eps),
    qkv_bias=qkv_bias,
    pool="cls",
    act=_field(cfg, "hidden_act"),
  )


def _layer_shapes(pre: str, width: int, mlp: int, qkv_bias: bool) -> dict[str, tuple[int, ...]]:
  shapes = {f"{pre}attention.attention.{n}.weight": (width, width) for n in ("query", "key", "value")}
  if qkv_bias:
    shapes.update({f"{pre}attention.attention.{n}.bias": (width,) for n in ("query", "key", "value")})
  shapes.update(
    {
      f"{pre}attention.output.dense.weight": (width, width),
      f"{pre}attention.output.dense.bias": (width,),
      f"{pre}intermediate.dense.weight": (mlp, width),
      f"{pre}intermediate.dense.bias": (mlp,),
      f"{pre}output.dense.weight": (width, mlp),
      f"{pre}output.dense.bias": (width,),
    }
  )
  for norm in ("layernorm_before", "layernorm_after"):
    shapes.update({f"{pre}{norm}.weight": (width,), f"{pre}{norm}.bias": (width,)})
  return shapes


def prefix(arch: str) -> str:
  return "vit." if arch == CLASSIFIER else ""


def expected_shapes(kw: dict[str, Any], arch: str) -> dict[str, tuple[int, ...]]:
  """Every tensor name the HF model of `kw` stores (ignored ones aside), with its shape."""
  p, width, patch = prefix(arch), kw["width"], kw["patch_size"]
  tokens = 1 + (kw["image_size"] // patch) ** 2
  shapes = {
    f"{p}embeddings.cls_token": (1, 1, width),
    f"{p}embeddings.position_embeddings": (1, tokens, width),
    f"{p}embeddings.patch_embeddings.projection.weight": (width, 3, patch, patch),
    f"{p}embeddings.patch_embeddings.projection.bias": (width,),
    f"{p}layernorm.weight": (width,),
    f"{p}layernorm.bias": (width,),
  }
  for i in range(kw["depth"]):
    shapes.update(_layer_shapes(f"{p}encoder.layer.{i}.", width, kw["mlp_dim"], kw["qkv_bias"]))
  if kw["num_classes"]:
    shapes.update({"classifier.weight": (kw["num_classes"], width), "classifier.bias": (kw["num_classes"],)})
  return shapes


def label_fields(num_classes: int, labels: Sequence[str] | None = None) -> dict[str, Any]:
  """id2label / label2id of a classifier (transformers counts its classes from them); `labels` names the
  classes when given, one per class and all different, else LABEL_<i> as transformers does."""
  if labels is None or len(labels) != num_classes or len(set(labels)) != num_classes:
    labels = [f"LABEL_{i}" for i in range(num_classes)]
  return {
    "id2label": {str(i): name for i, name in enumerate(labels)},
    "label2id": {name: i for i, name in enumerate(labels)},
  }


def hf_config(model, labels: Sequence[str] | None = None) -> dict[str, Any]:
  """config.json of the transformers model that computes what `model` (a `vit.ViT` with a class token, pool 'cls',
  or 'gap' without a head) computes: ViTForImageClassification with a head, else a ViTModel whose pooler is the
  identity on the class token (pooler_act 'linear'; `to_hf` writes an identity dense): with pool='cls' its
  pooler_output is our `pooled`. ConfigError naming a field (and its value) that a transformers ViT lacks."""
  FIELDS.refuse(model, "a transformers ViT")
  if model.pool == "map":
    raise ConfigError(
      "pool='map' with a class token: no transformers model has a MAP head after a class token "
      "(a Siglip2VisionModel's follows none: class_token=False); train with pool='cls' or 'gap'"
    )
  if model.num_classes and model.pool != "cls":
    raise ConfigError(
      f"pool={model.pool!r}: a ViT classifier classifies the class token (a head on mean-pooled "
      f"tokens exports as a Dinov2ForImageClassification, convert/hf_dinov2.py)"
    )
  arch = CLASSIFIER if model.num_classes else BACKBONE
  cfg = dict(
    architectures=[arch],
    model_type="vit",
    hidden_size=model.width,
    num_hidden_layers=model.depth,
    num_attention_heads=model.num_heads,
    intermediate_size=model.mlp_dim,
    hidden_act=model.act,
    hidden_dropout_prob=float(model.dropout),
    attention_probs_dropout_prob=0.0,
    initializer_range=0.02,
    layer_norm_eps=float(model.layer_norm_eps),
    image_size=model.image_size,
    patch_size=model.patch_size,
    num_channels=3,
    qkv_bias=bool(model.qkv_bias),
    encoder_stride=model.patch_size,
    dtype="float32",
  )
  if arch == BACKBONE:
    cfg.update(pooler_act="linear", pooler_output_size=model.width)
  else:
    cfg.update(label_fields(model.num_classes, labels))
  return cfg
