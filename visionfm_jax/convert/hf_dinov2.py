"""Our `vit.ViT` with a head on mean-pooled tokens (pool='gap', a class token) -> a transformers
`Dinov2ForImageClassification` (export only).

transformers' ViT classifies the class token; Dinov2ForImageClassification classifies the concatenation of the
final-normed class token and the mean of the final-normed patch tokens: with the class token's half of its
classifier zero, its logits are our head on our `pooled` (the mean of the final-normed patch tokens), exactly. Its
blocks are ours with LayerScale, written as ones (`layerscale_value` 1.0), and an MLP of hidden_size * mlp_ratio
features (an integer ratio). Mapping (HF Linear weights are (out, in); ours are (in, out) kernels; `L.i` =
dinov2.encoder.layer.i):
  dinov2.embeddings.patch_embeddings.projection  conv (O, I, kh, kw) <- patch_embed kernel (kh, kw, I, O)
  dinov2.embeddings.cls_token / position_embeddings <- cls_token / pos_embed; mask_token: zeros (unused)
  L.i.norm1, L.i.attention.attention.{query,key,value}, L.i.attention.output.dense, L.i.norm2, L.i.mlp.fc1, fc2
      <- blocks_i/norm1, attn/qkv, attn/out, norm2, mlp/fc1, fc2; L.i.layer_scale{1,2}.lambda1: ones
  dinov2.layernorm <- norm;  classifier (C, 2W) <- [zeros (C, W), head kernel.T]
Tensor names are those of the published DINOv2 checkpoints, which every transformers version loads.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from visionfm_jax.convert import hf_vit_config as vit_config
from visionfm_jax.convert.layout import unstack_layers
from visionfm_jax.convert.tensors import Writer, check_tensors, numpy_params
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import vit

ARCH = "Dinov2ForImageClassification"
PREFIX = "dinov2."


def mlp_ratio(model: vit.ViT) -> int:
  """mlp_dim / width, which transformers' Dinov2Config holds as an integer; ConfigError when it is not one."""
  if model.mlp_dim % model.width:
    raise ConfigError(
      f"pool='gap' with mlp_dim={model.mlp_dim}, width={model.width}: a head on mean-pooled tokens "
      f"exports as a {ARCH}, whose MLP is an integer multiple of its width"
    )
  return model.mlp_dim // model.width


def hf_config(model: vit.ViT, labels: Sequence[str] | None = None) -> dict[str, Any]:
  """config.json of the Dinov2ForImageClassification that computes `model` (pool='gap', with a head)."""
  if model.pool != "gap" or not model.num_classes or not model.class_token:
    raise ConfigError(
      f"pool={model.pool!r}, num_classes={model.num_classes}: a {ARCH} export is of a head on "
      f"mean-pooled tokens after a class token"
    )
  cfg = dict(
    architectures=[ARCH],
    model_type="dinov2",
    hidden_size=model.width,
    num_hidden_layers=model.depth,
    num_attention_heads=model.num_heads,
    mlp_ratio=mlp_ratio(model),
    hidden_act=model.act,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.02,
    layer_norm_eps=float(model.layer_norm_eps),
    image_size=model.image_size,
    patch_size=model.patch_size,
    num_channels=3,
    qkv_bias=bool(model.qkv_bias),
    layerscale_value=1.0,
    drop_path_rate=0.0,
    use_swiglu_ffn=False,
    use_mask_token=True,
    dtype="float32",
  )
  cfg.update(vit_config.label_fields(model.num_classes, labels))
  return cfg


def expected_shapes(model: vit.ViT) -> dict[str, tuple[int, ...]]:
  """Every tensor name of the Dinov2ForImageClassification of `model`, with its shape."""
  p, width, mlp, patch = PREFIX, model.width, model.mlp_dim, model.patch_size
  shapes = {
    f"{p}embeddings.cls_token": (1, 1, width),
    f"{p}embeddings.mask_token": (1, width),
    f"{p}embeddings.position_embeddings": (1, 1 + (model.image_size // patch) ** 2, width),
    f"{p}embeddings.patch_embeddings.projection.weight": (width, 3, patch, patch),
    f"{p}embeddings.patch_embeddings.projection.bias": (width,),
    f"{p}layernorm.weight": (width,),
    f"{p}layernorm.bias": (width,),
    "classifier.weight": (model.num_classes, 2 * width),
    "classifier.bias": (model.num_classes,),
  }
  for i in range(model.depth):
    pre = f"{p}encoder.layer.{i}."
    for name in ("query", "key", "value"):
      shapes[f"{pre}attention.attention.{name}.weight"] = (width, width)
      if model.qkv_bias:
        shapes[f"{pre}attention.attention.{name}.bias"] = (width,)
    shapes.update(
      {
        f"{pre}attention.output.dense.weight": (width, width),
        f"{pre}attention.output.dense.bias": (width,),
        f"{pre}mlp.fc1.weight": (mlp, width),
        f"{pre}mlp.fc1.bias": (mlp,),
        f"{pre}mlp.fc2.weight": (width, mlp),
        f"{pre}mlp.fc2.bias": (width,),
      }
    )
    for name in ("norm1", "norm2"):
      shapes.update({f"{pre}{name}.weight": (width,), f"{pre}{name}.bias": (width,)})
    shapes.update({f"{pre}layer_scale{k}.lambda1": (width,) for k in (1, 2)})
  return shapes


def _block_to_hf(write: Writer, i: int, block: dict[str, Any], width: int) -> None:
  pre = f"encoder.layer.{i}."
  write.norm(f"{pre}norm1", block["norm1"])
  qkv = block["attn"]["qkv"]
  for n, name in enumerate(("query", "key", "value")):
    write(f"{pre}attention.attention.{name}.weight", qkv["kernel"][:, n].reshape(width, -1).T)
    if "bias" in qkv:
      write(f"{pre}attention.attention.{name}.bias", qkv["bias"][n].reshape(-1))
  write.dense(
    f"{pre}attention.output.dense",
    {"kernel": block["attn"]["out"]["kernel"].reshape(-1, width), "bias": block["attn"]["out"]["bias"]},
  )
  write.norm(f"{pre}norm2", block["norm2"])
  write.dense(f"{pre}mlp.fc1", block["mlp"]["fc1"])
  write.dense(f"{pre}mlp.fc2", block["mlp"]["fc2"])
  for k in (1, 2):
    write(f"{pre}layer_scale{k}.lambda1", np.ones(width, np.float32))


def to_hf(
  model: vit.ViT, params: dict[str, Any], labels=None
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
  """(config.json, tensors, notes) of the Dinov2ForImageClassification that computes `model`'s logits, pooled
  features (its classifier's input's second half) and tokens (last_hidden_state) with `params` (scanned or
  unrolled)."""
  cfg = hf_config(model, labels)
  params = numpy_params(model, params)
  if model.scan:
    params = unstack_layers(params, model.depth)
  tensors: dict[str, np.ndarray] = {}
  write, width = Writer(tensors, PREFIX), model.width
  conv = "embeddings.patch_embeddings.projection"
  write(f"{conv}.weight", params["patch_embed"]["kernel"].transpose(3, 2, 0, 1))
  write(f"{conv}.bias", params["patch_embed"].get("bias", np.zeros(width, np.float32)))
  write("embeddings.cls_token", params["cls_token"])
  write("embeddings.mask_token", np.zeros((1, width), np.float32))
  write("embeddings.position_embeddings", params["pos_embed"])
  for i in range(model.depth):
    _block_to_hf(write, i, params[f"blocks_{i}"], width)
  write.norm("layernorm", params["norm"])
  head = params["head"]
  Writer(tensors, "").dense(
    "classifier", {"kernel": np.concatenate([np.zeros_like(head["kernel"]), head["kernel"]]), "bias": head["bias"]}
  )
  check_tensors("export", tensors, expected_shapes(model), set(), family=ARCH)
  return cfg, tensors, []
