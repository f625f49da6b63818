"""Hugging Face `CLIPTextModelWithProjection` weights -> our `text.TextTransformer` params.

Mapping (prefix `text_model.`; HF Linear weights are (out, in), ours (in, out) kernels; `E.i` = encoder.layers.i):
  embeddings.token_embedding / position_embedding -> token_embed/embedding (vocab, W) / pos_embed (max_len, W)
  E.i.self_attn.{q,k,v}_proj -> blocks_i/attn/qkv: kernel (W, 3, heads, head_dim), bias (3, heads, head_dim);
      HF output features are head-major (feature = head * head_dim + d)
  E.i.self_attn.out_proj -> blocks_i/attn/out: kernel (heads, head_dim, W)
  E.i.layer_norm1 / layer_norm2 / final_layer_norm -> norm1 / norm2 / norm: ln/{scale, bias}
  E.i.mlp.fc1 / fc2 -> blocks_i/mlp/fc1 / fc2
  text_projection (no prefix, no bias) -> proj/kernel (W, embed_dim)

`hidden_act` 'gelu' (exact) and 'quick_gelu' (OpenAI's checkpoints) convert to our tower's `act`. The pooled
position is the first `eos_token_id`, as HF does for every eos_token_id but 2, the legacy configs of OpenAI's
checkpoints: there HF pools the largest token id, which for CLIP's tokenizer is its end-of-text token, the last
of the vocabulary; our tower then pools the first `vocab_size - 1` (the same position in every row the tokenizer
writes: the EOS is the largest id in it).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.convert import hf_files
from visionfm_jax.convert.layout import stack_layers
from visionfm_jax.convert.tensors import Reader, converted, tree_shapes
from visionfm_jax.errors import CheckpointError
from visionfm_jax.models import layers
from visionfm_jax.models import text as text_lib
from visionfm_jax.parallel.sharding import unbox

PREFIX = "text_model."
ARCH = "CLIPTextModelWithProjection"
# transformers' CLIPTextConfig defaults, for fields a hand-written config.json leaves out.
DEFAULTS = dict(
  vocab_size=49408,
  hidden_size=512,
  intermediate_size=2048,
  projection_dim=512,
  num_hidden_layers=12,
  num_attention_heads=8,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
  eos_token_id=2,
)


ACTIVATIONS = tuple(layers.ACTIVATIONS)  # transformers' hidden_act names are ours: gelu (exact), quick_gelu
LEGACY_EOS_TOKEN_ID = 2  # HF pools the largest token id (argmax of input_ids) for this eos_token_id


def model_kwargs(path: str, cfg: dict[str, Any]) -> dict[str, Any]:
  """Keyword arguments of `text.TextTransformer` that reproduce the HF model described by config.json."""
  if cfg.get("model_type") != "clip_text_model" or cfg.get("architectures", [ARCH]) != [ARCH]:
    raise hf_files.config_error(
      path,
      f"model_type={cfg.get('model_type')!r}, architectures="
      f"{cfg.get('architectures')}: expected 'clip_text_model' and [{ARCH!r}]",
    )
  return tower_kwargs(path, cfg, "")


def check_activation(bad, act) -> str:
  if act not in ACTIVATIONS:
    raise bad(f"hidden_act={act!r}: supported are {ACTIVATIONS}")
  return act


def tower_kwargs(path: str, cfg: dict[str, Any], field: str) -> dict[str, Any]:
  """`model_kwargs` of a text config at `field` of config.json ('' or 'text_config.', named in errors)."""
  bad = lambda message: hf_files.config_error(path, field + message)  # noqa: E731
  get = lambda key: cfg.get(key, DEFAULTS[key])  # noqa: E731
  act = check_activation(bad, get("hidden_act"))
  sizes = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
  )
  for key in sizes + ("eos_token_id",):
    minimum = 0 if key == "eos_token_id" else 1
    if isinstance(get(key), bool) or not isinstance(get(key), int) or get(key) < minimum:
      raise bad(f"{key}={get(key)!r}: expected an integer >= {minimum}")
  if get("hidden_size") % get("num_attention_heads"):
    raise bad(f"hidden_size={get('hidden_size')} is not divisible by num_attention_heads={get('num_attention_heads')}")
  eos_id = get("vocab_size") - 1 if get("eos_token_id") == LEGACY_EOS_TOKEN_ID else get("eos_token_id")
  return dict(
    width=get("hidden_size"),
    depth=get("num_hidden_layers"),
    num_heads=get("num_attention_heads"),
    mlp_dim=get("intermediate_size"),
    embed_dim=get("projection_dim"),
    vocab_size=get("vocab_size"),
    max_len=get("max_position_embeddings"),
    eos_id=eos_id,
    layer_norm_eps=float(get("layer_norm_eps")),
    act=act,
  )


def expected_shapes(kw: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """Every tensor name of the HF model of `kw`, with its shape."""
  w, m, p = kw["width"], kw["mlp_dim"], PREFIX
  shapes = {
    f"{p}embeddings.token_embedding.weight": (kw["vocab_size"], w),
    f"{p}embeddings.position_embedding.weight": (kw["max_len"], w),
    f"{p}final_layer_norm.weight": (w,),
    f"{p}final_layer_norm.bias": (w,),
    "text_projection.weight": (kw["embed_dim"], w),
  }
  for i in range(kw["depth"]):
    shapes.update(block_shapes(f"{p}encoder.layers.{i}.", w, m))
  return shapes


def block_shapes(pre: str, width: int, mlp_dim: int) -> dict[str, tuple[int, ...]]:
  """The tensors of one CLIP encoder layer (text and vision alike) under `pre`, with their shapes."""
  w, m, shapes = width, mlp_dim, {}
  for name, (out, inp) in {
    "self_attn.q_proj": (w, w),
    "self_attn.k_proj": (w, w),
    "self_attn.v_proj": (w, w),
    "self_attn.out_proj": (w, w),
    "mlp.fc1": (m, w),
    "mlp.fc2": (w, m),
  }.items():
    shapes.update({f"{pre}{name}.weight": (out, inp), f"{pre}{name}.bias": (out,)})
  for norm in ("layer_norm1", "layer_norm2"):
    shapes.update({f"{pre}{norm}.weight": (w,), f"{pre}{norm}.bias": (w,)})
  return shapes


def block(read: Reader, pre: str, heads: int) -> dict[str, Any]:
  """Our pre-norm block's params (norm1, attn/qkv, attn/out, norm2, mlp) from one CLIP encoder layer."""
  qkv = [read.dense(f"{pre}self_attn.{n}_proj") for n in ("q", "k", "v")]
  width = qkv[0]["kernel"].shape[0]
  out = read.dense(f"{pre}self_attn.out_proj")
  return {
    "norm1": read.norm(f"{pre}layer_norm1"),
    "attn": {
      "qkv": {
        "kernel": np.stack([d["kernel"].reshape(width, heads, -1) for d in qkv], axis=1),
        "bias": np.stack([d["bias"].reshape(heads, -1) for d in qkv]),
      },
      "out": {"kernel": out["kernel"].reshape(heads, -1, width), "bias": out["bias"]},
    },
    "norm2": read.norm(f"{pre}layer_norm2"),
    "mlp": {"fc1": read.dense(f"{pre}mlp.fc1"), "fc2": read.dense(f"{pre}mlp.fc2")},
  }


def convert_params(tensors: dict[str, np.ndarray], kw: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
  """Unrolled numpy params of `text.TextTransformer(**kw)` and the set of HF tensor names consumed."""
  taken: set[str] = set()
  read = Reader(tensors, PREFIX, taken)
  params = {
    "token_embed": {"embedding": read("embeddings.token_embedding.weight")},
    "pos_embed": read("embeddings.position_embedding.weight"),
    "norm": read.norm("final_layer_norm"),
    "proj": {"kernel": Reader(tensors, "", taken)("text_projection.weight").T},
  }
  params.update({f"blocks_{i}": block(read, f"encoder.layers.{i}.", kw["num_heads"]) for i in range(kw["depth"])})
  return params, taken


def from_hf(
  path: str, *, scan: bool = True, dtype: Any = jnp.float32
) -> tuple[text_lib.TextTransformer, dict[str, Any]]:
  """Reads a transformers `save_pretrained` directory of a CLIPTextModelWithProjection.

  Returns `(model, {'params': ...})`: our `text.TextTransformer` with the HF sizes, eps and eos id (`dtype` its
  compute dtype; params float32). `scan` picks the scanned or unrolled block layout.
  """
  path = os.fspath(path)
  kw = model_kwargs(path, hf_files.read_config(path))
  tensors = hf_files.read_tensors(path)
  params = converted(path, tensors, expected_shapes(kw), lambda t: convert_params(t, kw), "CLIP text tower")
  if scan:
    params = stack_layers(params, kw["depth"])
  model = text_lib.TextTransformer(**kw, dtype=dtype, scan=scan)
  tokens = jax.ShapeDtypeStruct((1, kw["max_len"]), jnp.int32)
  want = tree_shapes(unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"])
  if want != tree_shapes(params):
    raise CheckpointError(f"{path}: converted params do not fit our TextTransformer")
  return model, {"params": jax.device_put(params)}
