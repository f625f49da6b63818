"""Hugging Face `Swinv2Model` / `Swinv2ForImageClassification` weights <-> our `swinv2.SwinV2` params.

`from_hf` reads a transformers directory; `to_hf` is the inverse mapping (the export direction).

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
Scanned, stage_s/blocks_j lives at stage_s/blocks/plain[j // 2] (even j) or stage_s/blocks/shifted[j // 2] (odd j).
Exported q/v biases are always written (qkv_bias true); our mask token (SimMIM encoders) is not exported.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.convert import hf_files
from visionfm_jax.convert import hf_swinv2_config as hfc
from visionfm_jax.convert.hf_swinv2_config import hf_config
from visionfm_jax.convert.layout import stack_layers, unstack_layers
from visionfm_jax.convert.tensors import Reader, Writer, check_model, check_tensors, numpy_params, show
from visionfm_jax.errors import CheckpointError
from visionfm_jax.models import swinv2

EXPORT_FIELDS = {swinv2.SwinV2: hfc.FIELDS}  # convert/fields.py


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
  """(..., heads * head_dim) -> (..., heads, head_dim)."""
  return x.reshape(*x.shape[:-1], heads, -1)


def _attention(read: Reader, pre: str, heads: int, qkv_bias: bool) -> dict[str, Any]:
  att = f"{pre}attention.self."
  weights = [read(f"{att}{n}.weight") for n in ("query", "key", "value")]
  width = weights[0].shape[1]
  params = {
    "qkv": {"kernel": np.stack([_heads(w.T, heads) for w in weights], axis=1)},
    "logit_scale": read(f"{att}logit_scale").reshape(heads),
    "cpb_mlp": {
      "fc1": read.dense(f"{att}continuous_position_bias_mlp.0"),
      "fc2": {"kernel": read(f"{att}continuous_position_bias_mlp.2.weight").T},
    },
    "out": read.dense(f"{pre}attention.output.dense"),
  }
  for name, hf_name in (("q_bias", "query"), ("v_bias", "value")):
    params[name] = (
      _heads(read(f"{att}{hf_name}.bias"), heads) if qkv_bias else np.zeros((heads, width // heads), np.float32)
    )
  params["out"]["kernel"] = params["out"]["kernel"].reshape(heads, -1, width)
  return params


def _block(read: Reader, pre: str, heads: int, qkv_bias: bool) -> dict[str, Any]:
  return {
    "attn": _attention(read, pre, heads, qkv_bias),
    "norm1": read.norm(f"{pre}layernorm_before"),
    "mlp": {"fc1": read.dense(f"{pre}intermediate.dense"), "fc2": read.dense(f"{pre}output.dense")},
    "norm2": read.norm(f"{pre}layernorm_after"),
  }


def convert_params(
  tensors: dict[str, np.ndarray], kw: dict[str, Any], arch: str, qkv_bias: bool
) -> tuple[dict[str, Any], set[str]]:
  """Unrolled numpy params of `swinv2.SwinV2(**kw)` and the set of HF tensor names consumed."""
  taken: set[str] = set()
  read = Reader(tensors, "", taken)
  p = hfc.prefix(arch)
  conv = f"{p}embeddings.patch_embeddings.projection"
  params = {
    "patch_embed": {"kernel": read(f"{conv}.weight").transpose(2, 3, 1, 0), "bias": read(f"{conv}.bias")},
    "patch_norm": read.norm(f"{p}embeddings.norm"),
    "norm": read.norm(f"{p}layernorm"),
  }
  for s, (depth, heads) in enumerate(zip(kw["depths"], kw["num_heads"])):
    stage = {f"blocks_{j}": _block(read, hfc.block_prefix(arch, s, j), heads, qkv_bias) for j in range(depth)}
    if s < len(kw["depths"]) - 1:
      merge = f"{p}encoder.layers.{s}.downsample"
      stage["downsample"] = {
        "reduction": {"kernel": read(f"{merge}.reduction.weight").T},
        "norm": read.norm(f"{merge}.norm"),
      }
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
    raise CheckpointError(f"{path}: tensors not converted: {show(leftover)}")
  ignored = sorted(set(tensors) & ignorable)
  if ignored:
    logging.warning("%s: ignoring %s (our SwinV2 recomputes or does not use them)", path, show(ignored, 4))
  if scan and any(depth % 2 for depth in kw["depths"]):
    raise CheckpointError(
      f"{path}: depths {list(kw['depths'])}: a scanned SwinV2 repeats (plain, shifted) pairs "
      f"of blocks, so every depth must be even; import it unrolled (scan=False, --scan=false)"
    )
  if scan:
    params = {
      k: stack_layers(v, kw["depths"][int(k[len("stage_") :])], members=swinv2.PAIR) if k.startswith("stage_") else v
      for k, v in params.items()
    }
  model = swinv2.SwinV2(**kw, dtype=dtype, scan=scan)
  check_model(path, model, params)
  return model, {"params": jax.device_put(params)}


def _attention_to_hf(write: Writer, pre: str, attn: dict[str, Any]) -> None:
  att = f"{pre}attention.self."
  kernel = attn["qkv"]["kernel"]  # (C, 3, heads, head_dim)
  width = kernel.shape[0]
  for n, name in enumerate(("query", "key", "value")):
    write(f"{att}{name}.weight", kernel[:, n].reshape(width, -1).T)
  write(f"{att}query.bias", attn["q_bias"].reshape(-1))
  write(f"{att}value.bias", attn["v_bias"].reshape(-1))
  write(f"{att}logit_scale", attn["logit_scale"].reshape(-1, 1, 1))
  write.dense(f"{att}continuous_position_bias_mlp.0", attn["cpb_mlp"]["fc1"])
  write.dense(f"{att}continuous_position_bias_mlp.2", attn["cpb_mlp"]["fc2"])  # no bias
  write.dense(
    f"{pre}attention.output.dense", {"kernel": attn["out"]["kernel"].reshape(-1, width), "bias": attn["out"]["bias"]}
  )


def _block_to_hf(write: Writer, pre: str, block: dict[str, Any]) -> None:
  _attention_to_hf(write, pre, block["attn"])
  write.norm(f"{pre}layernorm_before", block["norm1"])
  write.dense(f"{pre}intermediate.dense", block["mlp"]["fc1"])
  write.dense(f"{pre}output.dense", block["mlp"]["fc2"])
  write.norm(f"{pre}layernorm_after", block["norm2"])


def to_hf(
  model: swinv2.SwinV2, params: dict[str, Any], labels=None
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
  """(config.json, tensors, notes) of the transformers Swinv2 that computes what `model` with `params`
  (scanned or unrolled) does: `hf_config` picks the architecture; `labels` names the classes of a head;
  the notes say what it leaves out."""
  cfg = hf_config(model, labels)
  arch = cfg["architectures"][0]
  params = numpy_params(model, params)
  notes = ["mask_token=True: not exported (it only replaces masked patches, SimMIM)"] if model.mask_token else []
  tensors: dict[str, np.ndarray] = {}
  write = Writer(tensors, "")
  p = hfc.prefix(arch)
  conv = f"{p}embeddings.patch_embeddings.projection"
  write(f"{conv}.weight", params["patch_embed"]["kernel"].transpose(3, 2, 0, 1))
  write(f"{conv}.bias", params["patch_embed"]["bias"])
  write.norm(f"{p}embeddings.norm", params["patch_norm"])
  for s, depth in enumerate(model.depths):
    stage = unstack_layers(params[f"stage_{s}"], depth, members=swinv2.PAIR) if model.scan else params[f"stage_{s}"]
    for j in range(depth):
      _block_to_hf(write, hfc.block_prefix(arch, s, j), stage[f"blocks_{j}"])
    if "downsample" in stage:
      merge = f"{p}encoder.layers.{s}.downsample"
      write.dense(f"{merge}.reduction", stage["downsample"]["reduction"])  # no bias
      write.norm(f"{merge}.norm", stage["downsample"]["norm"])
  write.norm(f"{p}layernorm", params["norm"])
  if model.num_classes:
    write.dense("classifier", params["head"])
  # What the importer expects of this config (a mismatch here is a bug of this function).
  kw = hfc.model_kwargs("export", cfg, arch)
  check_tensors("export", tensors, hfc.expected_shapes(kw, arch, qkv_bias=True), set(), family="SwinV2")
  return cfg, tensors, notes
