"""Hugging Face `ViTModel` / `ViTForImageClassification` weights <-> our `vit.ViT` params.

`from_hf` reads a transformers directory; `to_hf` is the inverse mapping (the export direction).
Mapping (HF Linear weights are (out, in); ours are (in, out) kernels):
  embeddings.patch_embeddings.projection  conv (O, I, kh, kw) -> patch_embed kernel (kh, kw, I, O)
  embeddings.cls_token / position_embeddings -> cls_token / pos_embed
  encoder.layer.i.attention.attention.{query,key,value} -> blocks_i/attn/qkv: kernel (embed, 3, heads, head_dim),
      bias (3, heads, head_dim); HF output features are head-major (feature = head * head_dim + d)
  encoder.layer.i.attention.output.dense -> blocks_i/attn/out: kernel (heads, head_dim, embed)
  encoder.layer.i.intermediate.dense / output.dense -> blocks_i/mlp/fc1 / fc2
  encoder.layer.i.layernorm_before / layernorm_after / layernorm -> norm1 / norm2 / norm: ln/{scale, bias}
  classifier -> head
A ViTModel's pooler (dense + tanh on the class token) is not part of our ViT: `from_hf` ignores it, `to_hf`
writes an identity dense with pooler_act 'linear' (pooler_output = the class token = our `pooled`).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.convert import hf_dinov2, hf_files, hf_siglip2
from visionfm_jax.convert import hf_vit_config as hfc
from visionfm_jax.convert.hf_vit_config import hf_config
from visionfm_jax.convert.layout import stack_layers, unstack_layers
from visionfm_jax.convert.tensors import Reader, Writer, check_model, check_tensors, numpy_params, show
from visionfm_jax.errors import CheckpointError
from visionfm_jax.models import vit

EXPORT_FIELDS = {vit.ViT: hfc.FIELDS}  # convert/fields.py


def _attention(read: Reader, pre: str, heads: int, qkv_bias: bool) -> dict[str, Any]:
  names = ("query", "key", "value")
  weights = [read(f"{pre}attention.attention.{n}.weight") for n in names]
  width = weights[0].shape[1]
  qkv = {"kernel": np.stack([w.T.reshape(width, heads, -1) for w in weights], axis=1)}
  if qkv_bias:
    qkv["bias"] = np.stack([read(f"{pre}attention.attention.{n}.bias").reshape(heads, -1) for n in names])
  out = read.dense(f"{pre}attention.output.dense")
  out["kernel"] = out["kernel"].reshape(heads, -1, width)
  return {"qkv": qkv, "out": out}


def _block(read: Reader, i: int, kw: dict[str, Any]) -> dict[str, Any]:
  pre = f"encoder.layer.{i}."
  return {
    "norm1": read.norm(f"{pre}layernorm_before"),
    "attn": _attention(read, pre, kw["num_heads"], kw["qkv_bias"]),
    "norm2": read.norm(f"{pre}layernorm_after"),
    "mlp": {"fc1": read.dense(f"{pre}intermediate.dense"), "fc2": read.dense(f"{pre}output.dense")},
  }


def convert_params(tensors: dict[str, np.ndarray], kw: dict[str, Any], arch: str) -> tuple[dict[str, Any], set[str]]:
  """Unrolled numpy params of `vit.ViT(**kw)` and the set of HF tensor names consumed."""
  taken: set[str] = set()
  read = Reader(tensors, hfc.prefix(arch), taken)
  conv = "embeddings.patch_embeddings.projection"
  params = {
    "patch_embed": {"kernel": read(f"{conv}.weight").transpose(2, 3, 1, 0), "bias": read(f"{conv}.bias")},
    "cls_token": read("embeddings.cls_token"),
    "pos_embed": read("embeddings.position_embeddings"),
    "norm": read.norm("layernorm"),
  }
  params.update({f"blocks_{i}": _block(read, i, kw) for i in range(kw["depth"])})
  if kw["num_classes"]:
    params["head"] = Reader(tensors, "", taken).dense("classifier")
  return params, taken


def from_hf(path: str, *, scan: bool = True, dtype: Any = jnp.float32) -> tuple[vit.ViT, dict[str, Any]]:
  """Reads a transformers `save_pretrained` directory of a ViTModel / ViTForImageClassification.

  Returns `(model, variables)`: our `vit.ViT` with the HF sizes, head and LayerNorm eps (`dtype` is its
  compute dtype; params are float32), and plain `{'params': ...}` for `model.apply(variables, images)` with
  NHWC images normalised as the HF model expects. `scan` picks the scanned or unrolled block layout.
  """
  path = os.fspath(path)
  cfg = hf_files.read_config(path)
  tensors = hf_files.read_tensors(path)
  arch = hfc.architecture(path, cfg, tensors)
  kw = hfc.model_kwargs(path, cfg, arch)
  ignorable = {hfc.prefix(arch) + name for name in hfc.IGNORED}
  check_tensors(path, tensors, hfc.expected_shapes(kw, arch), ignorable)
  params, taken = convert_params(tensors, kw, arch)
  leftover = sorted(set(tensors) - taken - ignorable)
  if leftover:
    raise CheckpointError(f"{path}: tensors not converted: {show(leftover)}")
  ignored = sorted(set(tensors) & ignorable)
  if ignored:
    logging.warning("%s: ignoring %s (not part of our ViT: its outputs do not use them)", path, ", ".join(ignored))
  if scan:
    params = stack_layers(params, kw["depth"])
  model = vit.ViT(**kw, dtype=dtype, scan=scan)
  check_model(path, model, params)
  return model, {"params": jax.device_put(params)}


def _attention_to_hf(write: Writer, pre: str, attn: dict[str, Any]) -> None:
  qkv = attn["qkv"]
  width = qkv["kernel"].shape[0]
  for n, name in enumerate(("query", "key", "value")):
    write(f"{pre}attention.attention.{name}.weight", qkv["kernel"][:, n].reshape(width, -1).T)
    if "bias" in qkv:
      write(f"{pre}attention.attention.{name}.bias", qkv["bias"][n].reshape(-1))
  write.dense(
    f"{pre}attention.output.dense", {"kernel": attn["out"]["kernel"].reshape(-1, width), "bias": attn["out"]["bias"]}
  )


def _block_to_hf(write: Writer, i: int, block: dict[str, Any]) -> None:
  pre = f"encoder.layer.{i}."
  write.norm(f"{pre}layernorm_before", block["norm1"])
  _attention_to_hf(write, pre, block["attn"])
  write.norm(f"{pre}layernorm_after", block["norm2"])
  write.dense(f"{pre}intermediate.dense", block["mlp"]["fc1"])
  write.dense(f"{pre}output.dense", block["mlp"]["fc2"])


def export_notes(model: vit.ViT) -> list[str]:
  """What to compute from the transformers model's outputs to get `model`'s pooled features, where its
  pooler_output is not them (a backbone of pool='gap')."""
  if model.pool == "cls":
    return []
  return [
    f"pool={model.pool!r}: pooler_output is the class token; the run's pooled features are "
    f"last_hidden_state[:, 1:].mean(1)"
  ]


def to_hf(
  model: vit.ViT, params: dict[str, Any], labels=None
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
  """(config.json, tensors, notes) of the transformers ViT that computes what `model` with `params` (scanned
  or unrolled) does (a ViT without a class token: a Siglip2VisionModel, hf_siglip2.to_hf; a head on mean-pooled
  tokens: a Dinov2ForImageClassification, hf_dinov2.to_hf): `hf_config` picks the architecture; `labels` names the
  classes of a head; the notes say what to compute for the pooled features (`export_notes`). A field transformers
  cannot express is a ConfigError naming it (hfc.FIELDS)."""
  hfc.FIELDS.refuse(model, "a transformers ViT")
  if not model.class_token:  # SigLIP's tower
    return hf_siglip2.to_hf(model, params, labels)
  if model.pool == "gap" and model.num_classes:
    return hf_dinov2.to_hf(model, params, labels)
  cfg = hf_config(model, labels)
  arch = cfg["architectures"][0]
  params = numpy_params(model, params)
  if model.scan:
    params = unstack_layers(params, model.depth)
  tensors: dict[str, np.ndarray] = {}
  write = Writer(tensors, hfc.prefix(arch))
  conv = "embeddings.patch_embeddings.projection"
  write(f"{conv}.weight", params["patch_embed"]["kernel"].transpose(3, 2, 0, 1))
  write(f"{conv}.bias", params["patch_embed"].get("bias", np.zeros(model.width, np.float32)))  # patch_bias=False
  write("embeddings.cls_token", params["cls_token"])
  write("embeddings.position_embeddings", params["pos_embed"])
  for i in range(model.depth):
    _block_to_hf(write, i, params[f"blocks_{i}"])
  write.norm("layernorm", params["norm"])
  if arch == hfc.BACKBONE:
    write.dense("pooler.dense", {"kernel": np.eye(model.width), "bias": np.zeros(model.width)})
  else:
    Writer(tensors, "").dense("classifier", params["head"])
  # What the importer expects of this config (a mismatch here is a bug of this function).
  ignorable = {hfc.prefix(arch) + name for name in hfc.IGNORED}
  check_tensors("export", tensors, hfc.expected_shapes(hfc.model_kwargs("export", cfg, arch), arch), ignorable)
  return cfg, tensors, export_notes(model)
