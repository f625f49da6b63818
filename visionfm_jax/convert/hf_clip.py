"""Hugging Face `CLIPModel` weights <-> our `clip.CLIP` with a ViT image tower (OpenAI's and LAION's CLIPs).

Mapping (HF Linear weights are (out, in), ours (in, out) kernels; `V.` = vision_model., `E.i` = encoder.layers.i):
  V.embeddings.patch_embedding (no bias)    -> image/patch_embed/kernel (p, p, 3, W)   (ViT patch_bias=False)
  V.embeddings.class_embedding (W,)          -> image/cls_token (1, 1, W)
  V.embeddings.position_embedding (1+N, W)   -> image/pos_embed (1, 1+N, W)
  V.pre_layrnorm                             -> image/pre_norm                         (ViT pre_norm=True)
  V.E.i.*                                    -> image/blocks_i (as the text tower's layers, `hf_clip_text.block`)
  V.post_layernorm                           -> image/norm: HF normalises the class token only, our ViT every
                                                token; the pooled class token is the same
  visual_projection (no bias)                -> image_proj/kernel
  text_model.*, text_projection              -> text (`hf_clip_text`)
  logit_scale ()                             -> logit_scale
`hidden_act` quick_gelu / gelu of each tower -> its `act`. The CLIPModel's projection_dim is both towers' (its
text_config.projection_dim is not read by transformers either).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax import models
from visionfm_jax.convert import hf_clip_text, hf_files
from visionfm_jax.convert.fields import RUN, ExportFields
from visionfm_jax.convert.layout import stack_layers, unstack_layers
from visionfm_jax.convert.tensors import Reader, Writer, check_model, check_tensors, numpy_params, show
from visionfm_jax.errors import CheckpointError, ConfigError
from visionfm_jax.models import clip, vit
from visionfm_jax.models import text as text_lib

ARCH = "CLIPModel"
VISION = "vision_model."
# transformers' CLIPVisionConfig / CLIPConfig defaults, for fields a hand-written config.json leaves out.
VISION_DEFAULTS = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  num_channels=3,
  image_size=224,
  patch_size=32,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
)
PROJECTION_DIM, LOGIT_SCALE_INIT = 512, 2.6592
# What a CLIPModel export does with each field of our CLIP and of its towers (convert/fields.py); a model with a
# field of `only` at another value exports its image tower alone (tools.export_hf), as that tower's converter does.
FIELDS = ExportFields(
  expressed=("image", "text", "embed_dim"),
  only={"logit_bias_init": None},
  inert={"logit_scale_init": "the logit scale's initial value (the param itself is exported)"},
)
VISION_FIELDS = ExportFields(
  expressed=("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size", "layer_norm_eps", "act"),
  only={"pre_norm": True, "patch_bias": False, "pool": "cls", "qkv_bias": True, "class_token": True, "num_classes": 0},
  inert={**RUN, "token_drop": "training only"},
)
TEXT_FIELDS = ExportFields(
  expressed=(
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "embed_dim",
    "vocab_size",
    "max_len",
    "eos_id",
    "layer_norm_eps",
    "act",
  ),
  only={"pool": "eos"},
  inert={name: RUN[name] for name in ("dtype", "scan", "scan_unroll", "remat_policy", "attention")},
)
EXPORT_FIELDS = {clip.CLIP: FIELDS, vit.ViT: VISION_FIELDS, text_lib.TextTransformer: TEXT_FIELDS}


def _section(path: str, cfg: dict[str, Any], key: str) -> dict[str, Any]:
  section = cfg.get(key, {})
  if not isinstance(section, dict):
    raise hf_files.config_error(path, f"{key}: expected an object")
  return section


def vision_kwargs(path: str, cfg: dict[str, Any]) -> dict[str, Any]:
  """Keyword arguments of `vit.ViT` that reproduce the HF CLIP vision tower of config.json's vision_config."""
  bad = lambda message: hf_files.config_error(path, "vision_config." + message)  # noqa: E731
  get = lambda key: cfg.get(key, VISION_DEFAULTS[key])  # noqa: E731
  act = hf_clip_text.check_activation(bad, get("hidden_act"))
  sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
  for key in sizes:
    if isinstance(get(key), bool) or not isinstance(get(key), int) or get(key) < 1:
      raise bad(f"{key}={get(key)!r}: expected an integer >= 1 (square sizes only)")
  if get("num_channels") != 3:
    raise bad(f"num_channels={get('num_channels')!r}: only 3 (RGB) is supported")
  if get("hidden_size") % get("num_attention_heads") or get("image_size") % get("patch_size"):
    raise bad(
      f"hidden_size={get('hidden_size')}, num_attention_heads={get('num_attention_heads')}, image_size="
      f"{get('image_size')}, patch_size={get('patch_size')}: heads must divide the width, patches the image"
    )
  return dict(
    width=get("hidden_size"),
    depth=get("num_hidden_layers"),
    mlp_dim=get("intermediate_size"),
    num_heads=get("num_attention_heads"),
    patch_size=get("patch_size"),
    image_size=get("image_size"),
    layer_norm_eps=float(get("layer_norm_eps")),
    act=act,
    pre_norm=True,
    patch_bias=False,
    pool="cls",
    num_classes=0,
    qkv_bias=True,
  )


def model_kwargs(path: str, cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
  """(ViT kwargs, TextTransformer kwargs, embed_dim) of the CLIPModel that config.json describes."""
  archs = cfg.get("architectures") or [ARCH]
  if cfg.get("model_type") != "clip" or archs != [ARCH]:
    raise hf_files.config_error(
      path, f"model_type={cfg.get('model_type')!r}, architectures={archs}: expected 'clip' and [{ARCH!r}]"
    )
  embed_dim = cfg.get("projection_dim", PROJECTION_DIM)
  if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
    raise hf_files.config_error(path, f"projection_dim={embed_dim!r}: expected an integer >= 1")
  text_cfg = {**_section(path, cfg, "text_config"), "projection_dim": embed_dim}
  text_kw = hf_clip_text.tower_kwargs(path, text_cfg, "text_config.")
  return vision_kwargs(path, _section(path, cfg, "vision_config")), text_kw, embed_dim


def expected_shapes(image_kw: dict[str, Any], text_kw: dict[str, Any], embed_dim: int) -> dict[str, tuple[int, ...]]:
  """Every tensor name of the CLIPModel, with its shape."""
  w, patch, v = image_kw["width"], image_kw["patch_size"], VISION
  tokens = 1 + (image_kw["image_size"] // patch) ** 2
  shapes = {
    f"{v}embeddings.patch_embedding.weight": (w, 3, patch, patch),
    f"{v}embeddings.class_embedding": (w,),
    f"{v}embeddings.position_embedding.weight": (tokens, w),
    "visual_projection.weight": (embed_dim, w),
    "logit_scale": (),
  }
  for norm in ("pre_layrnorm", "post_layernorm"):
    shapes.update({f"{v}{norm}.weight": (w,), f"{v}{norm}.bias": (w,)})
  for i in range(image_kw["depth"]):
    shapes.update(hf_clip_text.block_shapes(f"{v}encoder.layers.{i}.", w, image_kw["mlp_dim"]))
  return {**shapes, **hf_clip_text.expected_shapes(text_kw)}


def _image_params(tensors: dict[str, np.ndarray], kw: dict[str, Any], taken: set[str]) -> dict[str, Any]:
  read = Reader(tensors, VISION, taken)
  width = kw["width"]
  params = {
    "patch_embed": {"kernel": read("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)},
    "cls_token": read("embeddings.class_embedding").reshape(1, 1, width),
    "pos_embed": read("embeddings.position_embedding.weight")[None],
    "pre_norm": read.norm("pre_layrnorm"),
    "norm": read.norm("post_layernorm"),
  }
  params.update(
    {f"blocks_{i}": hf_clip_text.block(read, f"encoder.layers.{i}.", kw["num_heads"]) for i in range(kw["depth"])}
  )
  return params


def convert_params(tensors, image_kw, text_kw) -> tuple[dict[str, Any], set[str]]:
  """Unrolled numpy params of our CLIP and the set of HF tensor names consumed."""
  taken: set[str] = set()
  image = _image_params(tensors, image_kw, taken)
  text, text_taken = hf_clip_text.convert_params(tensors, text_kw)
  top = Reader(tensors, "", taken)
  params = {
    "image": image,
    "text": text,
    "image_proj": {"kernel": top("visual_projection.weight").T},
    "logit_scale": top("logit_scale").reshape(()),
  }
  return params, taken | text_taken


def build_model(image_kw, text_kw, embed_dim: int, *, scan: bool, dtype: Any) -> clip.CLIP:
  return clip.CLIP(
    image=vit.ViT(**image_kw, dtype=dtype, scan=scan),
    text=text_lib.TextTransformer(**text_kw, dtype=dtype, scan=scan),
    embed_dim=embed_dim,
  )


def from_hf(path: str, *, scan: bool = True, dtype: Any = jnp.float32) -> tuple[clip.CLIP, dict[str, Any]]:
  """Reads a transformers `save_pretrained` directory of a CLIPModel: `(model, {'params': ...})` of our CLIP
  (ViT image tower with CLIP's pre-LayerNorm, the text tower, projections, logit scale); `dtype` is the compute
  dtype (params float32), `scan` the block layout of both towers."""
  path = os.fspath(path)
  kwargs = model_kwargs(path, hf_files.read_config(path))
  params = read_params(path, *kwargs, scan=scan)
  model = build_model(*kwargs, scan=scan, dtype=dtype)
  check_model(path, model, params)
  return model, {"params": jax.device_put(params)}


def read_params(
  path: str, image_kw: dict[str, Any], text_kw: dict[str, Any], embed_dim: int, *, scan: bool
) -> dict[str, Any]:
  """The numpy params of our CLIP (`model_kwargs`'s, `scan`'s block layout) from `path`'s weights, every tensor
  there of the expected name and shape and converted; the model that holds them is the caller's to build."""
  tensors = hf_files.read_tensors(path)
  check_tensors(path, tensors, expected_shapes(image_kw, text_kw, embed_dim), set(), family="CLIP")
  params, taken = convert_params(tensors, image_kw, text_kw)
  leftover = sorted(set(tensors) - taken)
  if leftover:
    raise CheckpointError(f"{path}: tensors not converted: {show(leftover)}")
  if scan:
    params = {
      **params,
      "image": stack_layers(params["image"], image_kw["depth"]),
      "text": stack_layers(params["text"], text_kw["depth"]),
    }
  return params


# ------------------------------------------------------------------------------------------------ export


def unexportable(model) -> str | None:
  """Why transformers' CLIPModel cannot compute what `model` computes (a field to name), None when it can."""
  image, text = getattr(model, "image", None), getattr(model, "text", None)
  if models.hf_converter(image) != "hf_vit":  # the tower's family says what it is (models/backbone.py)
    return f"image: a {type(image).__name__} tower (CLIPModel's is a ViT)"
  reasons = (
    (FIELDS.refusal(model, "a CLIPModel"), ""),
    (VISION_FIELDS.refusal(image, "CLIPModel's vision tower"), "image."),
    (TEXT_FIELDS.refusal(text, "CLIPModel's text tower"), "text."),
  )
  return next((prefix + reason for reason, prefix in reasons if reason), None)


def _block_to_hf(write: Writer, pre: str, block: dict[str, Any]) -> None:
  qkv, out = block["attn"]["qkv"], block["attn"]["out"]
  width = qkv["kernel"].shape[0]
  for n, name in enumerate(("q", "k", "v")):
    write.dense(
      f"{pre}self_attn.{name}_proj",
      {"kernel": qkv["kernel"][:, n].reshape(width, -1), "bias": qkv["bias"][n].reshape(-1)},
    )
  write.dense(f"{pre}self_attn.out_proj", {"kernel": out["kernel"].reshape(-1, width), "bias": out["bias"]})
  write.norm(f"{pre}layer_norm1", block["norm1"])
  write.norm(f"{pre}layer_norm2", block["norm2"])
  write.dense(f"{pre}mlp.fc1", block["mlp"]["fc1"])
  write.dense(f"{pre}mlp.fc2", block["mlp"]["fc2"])


def _image_to_hf(tensors: dict[str, np.ndarray], image: vit.ViT, params: dict[str, Any]) -> None:
  write = Writer(tensors, VISION)
  if image.scan:
    params = unstack_layers(params, image.depth)
  write("embeddings.patch_embedding.weight", params["patch_embed"]["kernel"].transpose(3, 2, 0, 1))
  write("embeddings.class_embedding", params["cls_token"].reshape(-1))
  write("embeddings.position_embedding.weight", params["pos_embed"][0])
  write.norm("pre_layrnorm", params["pre_norm"])
  write.norm("post_layernorm", params["norm"])
  for i in range(image.depth):
    _block_to_hf(write, f"encoder.layers.{i}.", params[f"blocks_{i}"])


def _text_to_hf(tensors: dict[str, np.ndarray], text: text_lib.TextTransformer, params: dict[str, Any]) -> None:
  write = Writer(tensors, hf_clip_text.PREFIX)
  if text.scan:
    params = unstack_layers(params, text.depth)
  write("embeddings.token_embedding.weight", params["token_embed"]["embedding"])
  write("embeddings.position_embedding.weight", params["pos_embed"])
  write.norm("final_layer_norm", params["norm"])
  for i in range(text.depth):
    _block_to_hf(write, f"encoder.layers.{i}.", params[f"blocks_{i}"])
  Writer(tensors, "")("text_projection.weight", params["proj"]["kernel"].T)


def hf_config(model: clip.CLIP) -> dict[str, Any]:
  """config.json of the CLIPModel that computes what `model` computes. The text tower pools the first eos_id
  (a new-style eos_token_id, never the legacy 2)."""
  image, text = model.image, model.text
  vision_config = dict(
    model_type="clip_vision_model",
    hidden_size=image.width,
    intermediate_size=image.mlp_dim,
    num_hidden_layers=image.depth,
    num_attention_heads=image.num_heads,
    num_channels=3,
    image_size=image.image_size,
    patch_size=image.patch_size,
    hidden_act=image.act,
    layer_norm_eps=float(image.layer_norm_eps),
    projection_dim=model.embed_dim,
  )
  text_config = dict(
    model_type="clip_text_model",
    vocab_size=text.vocab_size,
    hidden_size=text.width,
    intermediate_size=text.mlp_dim,
    num_hidden_layers=text.depth,
    num_attention_heads=text.num_heads,
    max_position_embeddings=text.max_len,
    hidden_act=text.act,
    layer_norm_eps=float(text.layer_norm_eps),
    eos_token_id=text.eos_id,
    projection_dim=model.embed_dim,
  )
  return dict(
    architectures=[ARCH],
    model_type="clip",
    projection_dim=model.embed_dim,
    logit_scale_init_value=float(model.logit_scale_init),
    vision_config=vision_config,
    text_config=text_config,
    dtype="float32",
  )


def to_hf(
  model: clip.CLIP, params: dict[str, Any], labels=None
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
  """(config.json, tensors, notes) of the CLIPModel that computes what `model` with `params` (scanned or
  unrolled) does; ConfigError naming the field transformers cannot express (`unexportable`)."""
  del labels  # a CLIP has no classes
  reason = unexportable(model)
  if reason:
    raise ConfigError(f"{reason}: not expressible as a transformers CLIPModel")
  if model.text.eos_id == hf_clip_text.LEGACY_EOS_TOKEN_ID:
    raise ConfigError(
      f"text.eos_id={model.text.eos_id}: transformers reads eos_token_id=2 as its legacy rule "
      f"(pool the largest id), not as the first EOS"
    )
  params = numpy_params(model, params)
  tensors: dict[str, np.ndarray] = {}
  _image_to_hf(tensors, model.image, params["image"])
  _text_to_hf(tensors, model.text, params["text"])
  tensors["visual_projection.weight"] = params["image_proj"]["kernel"].T
  tensors["logit_scale"] = np.asarray(params["logit_scale"], np.float32).reshape(())
  cfg = hf_config(model)
  image_kw, text_kw, embed_dim = model_kwargs("export", cfg)
  check_tensors("export", tensors, expected_shapes(image_kw, text_kw, embed_dim), set(), family="CLIP")
  return cfg, tensors, []
