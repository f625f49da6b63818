"""Hugging Face `Siglip2VisionModel` (SigLIP 2's NaFlex image tower) weights <-> our `vit.ViT` params.

The tower is our ViT without a class token (`class_token=False`), with a MAP head (`pool='map'`), the activation
of its config (SigLIP 2's: gelu_pytorch_tanh) and image_size = sqrt(num_patches) x patch_size: its square grid of
position embeddings, which NaFlex inputs resize per image (models/vit.py). Mapping (HF Linear weights are (out, in);
ours are (in, out) kernels):
  embeddings.patch_embedding (D, p*p*3), a Linear over patches flattened (row, column, channel)
                                            -> patch_embed conv kernel (p, p, 3, D): the same numbers
  embeddings.position_embedding (g*g, D)   -> pos_embed (1, g*g, D)
  encoder.layers.i.self_attn.{q,k,v}_proj  -> blocks_i/attn/qkv: kernel (D, 3, heads, head_dim), head-major
  encoder.layers.i.self_attn.out_proj      -> blocks_i/attn/out: kernel (heads, head_dim, D)
  encoder.layers.i.layer_norm1 / 2, mlp    -> norm1 / norm2, mlp/fc1, fc2
  post_layernorm                           -> norm
  head.probe, head.attention (torch's MultiheadAttention: in_proj rows q, k, v), head.layernorm, head.mlp
                                           -> map_head/probe, q, kv, out, norm, mlp
Its pooler_output is our `pooled`, its last_hidden_state our `tokens` at each image's patches. `to_hf` is the
inverse (the export of a ViT without a class token, models/vit.py's family routes it here through hf_vit).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.convert import hf_files
from visionfm_jax.convert.layout import stack_layers, unstack_layers
from visionfm_jax.convert.tensors import Reader, Writer, check_model, check_tensors, converted, numpy_params
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import layers, vit

MODEL_TYPE = "siglip2_vision_model"


def model_kwargs(path: str, cfg: dict[str, Any]) -> dict[str, Any]:
  """The `vit.ViT` fields of a Siglip2VisionConfig; CheckpointError naming a field we cannot build."""

  def field(key):
    if key not in cfg:
      raise hf_files.config_error(path, f"has no {key!r} (a Siglip2VisionModel's config has it)")
    return cfg[key]

  width, heads, patch, patches = (
    int(field(k)) for k in ("hidden_size", "num_attention_heads", "patch_size", "num_patches")
  )
  grid = math.isqrt(patches)
  if grid * grid != patches or width % heads:
    raise hf_files.config_error(
      path,
      f"num_patches={patches} is not a square grid, or hidden_size={width} is not "
      f"a multiple of num_attention_heads={heads}",
    )
  act = cfg.get("hidden_act", "gelu_pytorch_tanh")
  if act not in layers.ACTIVATIONS:
    raise hf_files.config_error(path, f"hidden_act={act!r}: our ViT has {', '.join(layers.ACTIVATIONS)}")
  return dict(
    width=width,
    depth=int(field("num_hidden_layers")),
    mlp_dim=int(field("intermediate_size")),
    num_heads=heads,
    patch_size=patch,
    image_size=grid * patch,
    num_classes=0,
    pool="map" if cfg.get("vision_use_head", True) else "gap",
    class_token=False,
    act=act,
    layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
  )


def expected_shapes(kw: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  width, mlp, patch = kw["width"], kw["mlp_dim"], kw["patch_size"]
  grid = kw["image_size"] // patch
  shapes = {
    "embeddings.patch_embedding.weight": (width, patch * patch * 3),
    "embeddings.patch_embedding.bias": (width,),
    "embeddings.position_embedding.weight": (grid * grid, width),
    "post_layernorm.weight": (width,),
    "post_layernorm.bias": (width,),
  }
  mlp_shapes = {
    "mlp.fc1.weight": (mlp, width),
    "mlp.fc1.bias": (mlp,),
    "mlp.fc2.weight": (width, mlp),
    "mlp.fc2.bias": (width,),
  }
  for i in range(kw["depth"]):
    pre = f"encoder.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes.update({f"{pre}self_attn.{name}.weight": (width, width), f"{pre}self_attn.{name}.bias": (width,)})
    for name in ("layer_norm1", "layer_norm2"):
      shapes.update({f"{pre}{name}.weight": (width,), f"{pre}{name}.bias": (width,)})
    shapes.update({pre + k: v for k, v in mlp_shapes.items()})
  if kw["pool"] == "map":
    shapes.update(
      {
        "head.probe": (1, 1, width),
        "head.attention.in_proj_weight": (3 * width, width),
        "head.attention.in_proj_bias": (3 * width,),
        "head.attention.out_proj.weight": (width, width),
        "head.attention.out_proj.bias": (width,),
        "head.layernorm.weight": (width,),
        "head.layernorm.bias": (width,),
        **{"head." + k: v for k, v in mlp_shapes.items()},
      }
    )
  return shapes


def _heads(weight: np.ndarray, heads: int) -> np.ndarray:
  """A (out, in) Linear weight -> (in, heads, head_dim) kernel."""
  return weight.T.reshape(weight.shape[1], heads, -1)


def _block(read: Reader, i: int, heads: int) -> dict[str, Any]:
  pre = f"encoder.layers.{i}."
  names = ("q_proj", "k_proj", "v_proj")
  qkv = {
    "kernel": np.stack([_heads(read(f"{pre}self_attn.{n}.weight"), heads) for n in names], axis=1),
    "bias": np.stack([read(f"{pre}self_attn.{n}.bias").reshape(heads, -1) for n in names]),
  }
  out = read.dense(f"{pre}self_attn.out_proj")
  out["kernel"] = out["kernel"].reshape(heads, -1, out["kernel"].shape[-1])
  return {
    "norm1": read.norm(f"{pre}layer_norm1"),
    "attn": {"qkv": qkv, "out": out},
    "norm2": read.norm(f"{pre}layer_norm2"),
    "mlp": {"fc1": read.dense(f"{pre}mlp.fc1"), "fc2": read.dense(f"{pre}mlp.fc2")},
  }


def _map_head(read: Reader, heads: int) -> dict[str, Any]:
  weight, bias = read("head.attention.in_proj_weight"), read("head.attention.in_proj_bias")
  q, k, v = np.split(weight, 3)
  q_bias, k_bias, v_bias = np.split(bias, 3)
  out = read.dense("head.attention.out_proj")
  out["kernel"] = out["kernel"].reshape(heads, -1, out["kernel"].shape[-1])
  return {
    "probe": read("head.probe"),
    "q": {"kernel": _heads(q, heads), "bias": q_bias.reshape(heads, -1)},
    "kv": {
      "kernel": np.stack([_heads(k, heads), _heads(v, heads)], axis=1),
      "bias": np.stack([k_bias.reshape(heads, -1), v_bias.reshape(heads, -1)]),
    },
    "out": out,
    "norm": read.norm("head.layernorm"),
    "mlp": {"fc1": read.dense("head.mlp.fc1"), "fc2": read.dense("head.mlp.fc2")},
  }


def convert_params(tensors: dict[str, np.ndarray], kw: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
  """Unrolled numpy params of `vit.ViT(**kw)` and the set of HF tensor names consumed."""
  taken: set[str] = set()
  read = Reader(tensors, "", taken)
  patch, heads = kw["patch_size"], kw["num_heads"]
  params = {
    "patch_embed": {
      "kernel": read("embeddings.patch_embedding.weight").T.reshape(patch, patch, 3, -1),
      "bias": read("embeddings.patch_embedding.bias"),
    },
    "pos_embed": read("embeddings.position_embedding.weight")[None],
    "norm": read.norm("post_layernorm"),
  }
  params.update({f"blocks_{i}": _block(read, i, heads) for i in range(kw["depth"])})
  if kw["pool"] == "map":
    params["map_head"] = _map_head(read, heads)
  return params, taken


def from_hf(path: str, *, scan: bool = True, dtype: Any = jnp.float32) -> tuple[vit.ViT, dict[str, Any]]:
  """Reads a transformers `save_pretrained` directory of a Siglip2VisionModel: `(model, {'params': ...})`, the
  model taking NaFlex inputs ({'patches', 'grid'}, models/vit.py) normalised as its processor does (mean and std
  0.5) or square images of its image_size."""
  path = os.fspath(path)
  cfg = hf_files.read_config(path)
  tensors = hf_files.read_tensors(path)
  kw = model_kwargs(path, cfg)
  params = converted(path, tensors, expected_shapes(kw), lambda t: convert_params(t, kw), "Siglip2VisionModel")
  if scan:
    params = stack_layers(params, kw["depth"])
  model = vit.ViT(**kw, dtype=dtype, scan=scan)
  check_model(path, model, params)
  return model, {"params": jax.device_put(params)}


def hf_config(model: vit.ViT, labels=None) -> dict[str, Any]:
  """config.json of the Siglip2VisionModel that computes `model` (a ViT without a class token); ConfigError naming
  a field it cannot express."""
  del labels  # a head is refused
  if model.class_token or model.pre_norm:
    field = "class_token=True" if model.class_token else "pre_norm=True"
    raise ConfigError(f"{field}: a Siglip2VisionModel has no class token and no LayerNorm before its blocks")
  if model.num_classes:
    raise ConfigError(
      f"num_classes={model.num_classes} with class_token=False: a Siglip2VisionModel has no "
      f"classifier (its tower exports without a head: num_classes=0)"
    )
  grid = model.image_size // model.patch_size
  return {
    "architectures": ["Siglip2VisionModel"],
    "model_type": MODEL_TYPE,
    "hidden_size": model.width,
    "intermediate_size": model.mlp_dim,
    "num_hidden_layers": model.depth,
    "num_attention_heads": model.num_heads,
    "num_channels": 3,
    "patch_size": model.patch_size,
    "num_patches": grid * grid,
    "hidden_act": model.act,
    "layer_norm_eps": model.layer_norm_eps,
    "attention_dropout": 0.0,
    "vision_use_head": model.pool == "map",
    "torch_dtype": "float32",
  }


def _heads_to_hf(kernel: np.ndarray) -> np.ndarray:
  """(in, heads, head_dim) kernel -> (out, in) Linear weight."""
  return kernel.reshape(kernel.shape[0], -1).T


def _block_to_hf(write: Writer, i: int, block: dict[str, Any], width: int) -> None:
  pre = f"encoder.layers.{i}."
  qkv, out = block["attn"]["qkv"], block["attn"]["out"]
  for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
    write(f"{pre}self_attn.{name}.weight", _heads_to_hf(qkv["kernel"][:, n]))
    write(f"{pre}self_attn.{name}.bias", qkv["bias"][n].reshape(-1) if "bias" in qkv else np.zeros(width))
  write.dense(f"{pre}self_attn.out_proj", {"kernel": out["kernel"].reshape(-1, width), "bias": out["bias"]})
  write.norm(f"{pre}layer_norm1", block["norm1"])
  write.norm(f"{pre}layer_norm2", block["norm2"])
  write.dense(f"{pre}mlp.fc1", block["mlp"]["fc1"])
  write.dense(f"{pre}mlp.fc2", block["mlp"]["fc2"])


def _map_head_to_hf(write: Writer, head: dict[str, Any], width: int) -> None:
  write("head.probe", head["probe"])
  kv = head["kv"]["kernel"]
  write(
    "head.attention.in_proj_weight",
    np.concatenate([_heads_to_hf(head["q"]["kernel"]), _heads_to_hf(kv[:, 0]), _heads_to_hf(kv[:, 1])]),
  )
  write("head.attention.in_proj_bias", np.concatenate([head["q"]["bias"].reshape(-1), head["kv"]["bias"].reshape(-1)]))
  write.dense(
    "head.attention.out_proj", {"kernel": head["out"]["kernel"].reshape(-1, width), "bias": head["out"]["bias"]}
  )
  write.norm("head.layernorm", head["norm"])
  write.dense("head.mlp.fc1", head["mlp"]["fc1"])
  write.dense("head.mlp.fc2", head["mlp"]["fc2"])


def to_hf(
  model: vit.ViT, params: dict[str, Any], labels=None
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
  """(config.json, tensors, notes) of the Siglip2VisionModel that computes what `model` (no class token) with
  `params` (scanned or unrolled) does: the inverse of `from_hf`; a bias-free patch embedding or qkv is written
  as zero biases."""
  cfg = hf_config(model, labels)
  params = numpy_params(model, params)
  if model.scan:
    params = unstack_layers(params, model.depth)
  tensors: dict[str, np.ndarray] = {}
  write, width, patch = Writer(tensors, ""), model.width, model.patch_size
  embed = params["patch_embed"]
  write("embeddings.patch_embedding.weight", embed["kernel"].reshape(patch * patch * 3, width).T)
  write("embeddings.patch_embedding.bias", embed.get("bias", np.zeros(width)))
  write("embeddings.position_embedding.weight", params["pos_embed"][0])
  for i in range(model.depth):
    _block_to_hf(write, i, params[f"blocks_{i}"], width)
  write.norm("post_layernorm", params["norm"])
  notes = []
  if model.pool == "map":
    _map_head_to_hf(write, params["map_head"], width)
  else:
    notes.append(
      f"pool={model.pool!r}: a Siglip2VisionModel without its head has no pooler_output; the run's "
      "pooled features are the mean of last_hidden_state over each image's patches"
    )
  check_tensors("export", tensors, expected_shapes(model_kwargs("export", cfg)), set(), family="Siglip2VisionModel")
  return cfg, tensors, notes
