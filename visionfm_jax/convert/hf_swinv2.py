"""Hugging Face `Swinv2Model` / `Swinv2ForImageClassification` weights -> our `swinv2.SwinV2` params.

Mapping (HF Linear weights are (out, in); ours are (in, out) kernels; `L.s.B.j` = encoder.layers.s.blocks.j):
  embeddings.patch_embeddings.projection  conv (O, I, kh, kw) -> patch_embed kernel (kh, kw, I, O)
  embeddings.norm -> patch_norm
  L.s.B.j.attention.self.{query,key,value} -> stage_s/blocks_j/attn/qkv kernel (C, 3, heads, head_dim), no bias;
      HF output features are head-major (feature = head * head_dim + d)
  L.s.B.j.attention.self.{query,value}.bias -> attn/q_bias, attn/v_bias (heads, head_dim); zeros when
      qkv_bias is false (exactly the HF function). The key has no bias in either.
  L.s.B.j.attention.self.logit_scale (heads, 1, 1) -> attn/logit_scale (heads,)
  L.s.B.j.attention.self.continuous_position_bias_mlp.{0,2} -> attn/cpb_mlp/fc1 (with bias), fc2 (without)
  L.s.B.j.attention.output.dense -> attn/out kernel (heads, head_dim, C)
  L.s.B.j.layernorm_before / layernorm_after -> norm1 / norm2 (both res-post-norms)
  L.s.B.j.intermediate.dense / output.dense -> mlp/fc1 / fc2
  encoder.layers.s.downsample.{reduction, norm} -> stage_s/downsample/{reduction, norm}
  layernorm -> norm; classifier -> head
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from visionfm_jax.convert import hf_files, hf_swinv2_config as hfc
from visionfm_jax.convert.hf_vit import _check_model, _Reader, _show, check_tensors
from visionfm_jax.convert.layout import stack_layers
from visionfm_jax.errors import CheckpointError
from visionfm_jax.models import swinv2


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
  """(..., heads * head_dim) -> (..., heads, head_dim)."""
  return x.reshape(*x.shape[:-1], heads, -1)


def _attention(read: _Reader, pre: str, heads: int, qkv_bias: bool) -> dict[str, Any]:
  att = f"{pre}attention.self."
  weights = [read(f"{att}{n}.weight") for n in ("query", "key", "value")]
  width = weights[0].shape[1]
  params = {"qkv": {"kernel": np.stack([_heads(w.T, heads) for w in weights], axis=1)},
            "logit_scale": read(f"{att}logit_scale").reshape(heads),
            "cpb_mlp": {"fc1": read.dense(f"{att}continuous_position_bias_mlp.0"),
                        "fc2": {"kernel": read(f"{att}continuous_position_bias_mlp.2.weight").T}},
            "out": read.dense(f"{pre}attention.output.dense")}
  for name, hf_name in (("q_bias", "query"), ("v_bias", "value")):
    params[name] = _heads(read(f"{att}{hf_name}.bias"), heads) if qkv_bias else np.zeros((heads, width // heads),
                                                                                          np.float32)
  params["out"]["kernel"] = params["out"]["kernel"].reshape(heads, -1, width)
  return params


def _block(read: _Reader, pre: str, heads: int, qkv_bias: bool) -> dict[str, Any]:
  return {"attn": _attention(read, pre, heads, qkv_bias), "norm1": read.norm(f"{pre}layernorm_before"),
          "mlp": {"fc1": read.dense(f"{pre}intermediate.dense"), "fc2": read.dense(f"{pre}output.dense")},
          "norm2": read.norm(f"{pre}layernorm_after")}


def convert_params(tensors: dict[str, np.ndarray], kw: dict[str, Any], arch: str,
                   qkv_bias: bool) -> tuple[dict[str, Any], set[str]]:
  """Unrolled numpy params of `swinv2.SwinV2(**kw)` and the set of HF tensor names consumed."""
  taken: set[str] = set()
  read = _Reader(tensors, "", taken)
  p = hfc.prefix(arch)
  conv = f"{p}embeddings.patch_embeddings.projection"
  params = {"patch_embed": {"kernel": read(f"{conv}.weight").transpose(2, 3, 1, 0), "bias": read(f"{conv}.bias")},
            "patch_norm": read.norm(f"{p}embeddings.norm"), "norm": read.norm(f"{p}layernorm")}
  for s, (depth, heads) in enumerate(zip(kw["depths"], kw["num_heads"])):
    stage = {f"blocks_{j}": _block(read, hfc.block_prefix(arch, s, j), heads, qkv_bias) for j in range(depth)}
    if s < len(kw["depths"]) - 1:
      merge = f"{p}encoder.layers.{s}.downsample"
      stage["downsample"] = {"reduction": {"kernel": read(f"{merge}.reduction.weight").T},
                             "norm": read.norm(f"{merge}.norm")}
    params[f"stage_{s}"] = stage
  if kw["num_classes"]:
    params["head"] = read.dense("classifier")
  return params, taken


def from_hf(path: str, *, scan: bool = True, dtype: Any = jnp.float32) -> tuple[swinv2.SwinV2, dict[str, Any]]:
  """Reads a transformers `save_pretrained` directory of a Swinv2Model / Swinv2ForImageClassification.

  Returns `(model, variables)`: our `swinv2.SwinV2` with the HF sizes, windows, head and LayerNorm eps (`dtype`
  is its compute dtype; params are float32), and plain `{'params': ...}` for `model.apply(variables, images)`
  with NHWC images normalised as the HF model expects. `scan` picks the scanned or unrolled block layout of
  every stage. Its `tokens` are HF's last_hidden_state, `pooled` its pooler_output, `logits` the classifier's.
  """
  path = os.fspath(path)
  cfg = hf_files.read_config(path)
  tensors = hf_files.read_tensors(path)
  arch = hfc.architecture(path, cfg, tensors)
  kw = hfc.model_kwargs(path, cfg, arch)
  qkv_bias = hfc.qkv_bias(cfg)
  ignorable = hfc.ignored(kw, arch)
  check_tensors(path, tensors, hfc.expected_shapes(kw, arch, qkv_bias), ignorable, family="SwinV2")
  params, taken = convert_params(tensors, kw, arch, qkv_bias)
  leftover = sorted(set(tensors) - taken - ignorable)
  if leftover:
    raise CheckpointError(f"{path}: tensors not converted: {_show(leftover)}")
  ignored = sorted(set(tensors) & ignorable)
  if ignored:
    logging.warning("%s: ignoring %s (our SwinV2 recomputes or does not use them)", path, _show(ignored, 4))
  if scan:
    params = {k: stack_layers(v, kw["depths"][int(k[len("stage_"):])]) if k.startswith("stage_") else v
              for k, v in params.items()}
  model = swinv2.SwinV2(**kw, dtype=dtype, scan=scan)
  _check_model(path, model, params)
  return model, {"params": jax.tree.map(jnp.asarray, params)}
