"""Hugging Face SwinV2 config.json <-> our `swinv2.SwinV2` fields, and the tensor names and shapes it implies.

Supported: `Swinv2Model` (no prefix) and `Swinv2ForImageClassification` (`swinv2.` prefix plus `classifier.*`).
Anything our SwinV2 cannot reproduce exactly is rejected with a CheckpointError naming the config.json field;
`hf_config` (the export direction) raises a ConfigError naming the field of ours transformers cannot express.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from visionfm_jax.convert.fields import RUN, ExportFields
from visionfm_jax.convert.hf_files import config_error  # "<dir>/config.json: ..." errors
from visionfm_jax.convert.hf_vit_config import label_fields, num_labels  # a head's label count and names
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import swinv2

BACKBONE, CLASSIFIER = "Swinv2Model", "Swinv2ForImageClassification"
# What an export does with each field of our SwinV2 (convert/fields.py); window_size and pretrained_window_sizes
# export where transformers' one window gives every stage ours (`hf_config`).
FIELDS = ExportFields(
  expressed=(
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "pretrained_window_sizes",
    "patch_size",
    "image_size",
    "num_classes",
    "mlp_ratio",
    "layer_norm_eps",
  ),
  only={"extra_norm_period": 0},
  inert={
    **RUN,
    "stage_remat_policies": "the backward pass",
    "stage_scan_unrolls": "the block layout",
    "token_subgrid": "training only",
    "extra_norm_scope": "where extra norms go: none (extra_norm_period=0)",
    "mask_token": "it replaces masked patches (SimMIM): an exported model masks none",
  },
)

# transformers' Swinv2Config defaults, for fields a hand-written config.json leaves out.
DEFAULTS = dict(
  image_size=224,
  patch_size=4,
  num_channels=3,
  embed_dim=96,
  depths=[2, 2, 6, 2],
  num_heads=[3, 6, 12, 24],
  window_size=7,
  pretrained_window_sizes=[0, 0, 0, 0],
  mlp_ratio=4.0,
  qkv_bias=True,
  hidden_act="gelu",
  use_absolute_embeddings=False,
  layer_norm_eps=1e-5,
  model_type="swinv2",
)

# Tensors (after the prefix) that do not feed our outputs: the masked-image-modelling token, and the
# relative-position buffers that older transformers versions saved (our model recomputes them from the sizes).
IGNORED = ("embeddings.mask_token",)
IGNORED_PER_BLOCK = ("attention.self.relative_coords_table", "attention.self.relative_position_index")


def _positive_int(path: str, cfg: dict[str, Any], key: str, square_pairs: bool = True) -> int:
  value = cfg[key]
  if square_pairs and isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
    value = value[0]  # a square (h, w) size
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise config_error(path, f"{key}={cfg[key]!r}: expected a positive integer (square sizes only)")
  return value


def _int_list(path: str, cfg: dict[str, Any], key: str, minimum: int) -> tuple[int, ...]:
  value = cfg[key]
  if (
    not isinstance(value, (list, tuple))
    or not value
    or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)
  ):
    raise config_error(path, f"{key}={value!r}: expected a non-empty list of integers >= {minimum}")
  return tuple(value)


def architecture(path: str, cfg: dict[str, Any], keys) -> str:
  """BACKBONE or CLASSIFIER, from the tensor names, checked against config.json's `architectures`."""
  if cfg.get("model_type", "swinv2") != "swinv2":
    raise config_error(path, f"model_type={cfg['model_type']!r}: expected 'swinv2' (transformers Swinv2)")
  from_keys = CLASSIFIER if any(k.startswith("swinv2.") or k.startswith("classifier.") for k in keys) else BACKBONE
  archs = cfg.get("architectures") or [from_keys]
  if archs not in ([BACKBONE], [CLASSIFIER]):
    raise config_error(path, f"architectures={archs}: supported are [{BACKBONE!r}] and [{CLASSIFIER!r}]")
  if archs[0] != from_keys:
    raise config_error(
      path,
      f"architectures={archs} but the tensor names look like {from_keys} "
      f"({'with' if from_keys == CLASSIFIER else 'without'} the 'swinv2.' prefix)",
    )
  return from_keys


def hf_stage_windows(image_size: int, patch_size: int, window: int, stages: int) -> list[tuple[int, int]]:
  """(window, shift) per stage as transformers picks them: from grid // 2**s (floor), not the merged size."""
  out = []
  for s in range(stages):
    resolution = image_size // patch_size // 2**s
    clamped = min(resolution, window)
    out.append((clamped, 0 if resolution <= clamped else window // 2))
  return out


def _check_windows(path: str, kw: dict[str, Any]) -> None:
  """Our model clamps windows from the feature maps it actually gets (odd maps merge to ceil(n / 2)); HF
  from floor(grid / 2**s). Where the two disagree the outputs would too."""
  stages = len(kw["depths"])
  hf = hf_stage_windows(kw["image_size"], kw["patch_size"], kw["window_size"], stages)
  try:
    ours = [
      (w, shift) for _, w, shift in swinv2.stage_windows(kw["image_size"], kw["window_size"], stages, kw["patch_size"])
    ]
  except ValueError as e:
    raise config_error(path, f"window_size={kw['window_size']}, image_size={kw['image_size']}: {e}") from e
  if hf != ours:
    raise config_error(
      path,
      f"window_size={kw['window_size']} with image_size={kw['image_size']}, "
      f"patch_size={kw['patch_size']}: transformers uses (window, shift) {hf} per stage "
      f"(clamped to the grid halved and rounded down), our SwinV2 {ours} (the merged maps, "
      f"rounded up)",
    )


def model_kwargs(path: str, cfg: dict[str, Any], arch: str) -> dict[str, Any]:
  """Keyword arguments of `swinv2.SwinV2` that reproduce the HF model."""
  cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}  # null: transformers' default
  if cfg["hidden_act"] != "gelu":
    raise config_error(path, f"hidden_act={cfg['hidden_act']!r}: only 'gelu' (exact, erf) is supported")
  if cfg["num_channels"] != 3:
    raise config_error(path, f"num_channels={cfg['num_channels']!r}: only 3 (RGB) is supported")
  if cfg["use_absolute_embeddings"] is not False:
    raise config_error(
      path,
      f"use_absolute_embeddings={cfg['use_absolute_embeddings']!r}: only false is supported "
      f"(our SwinV2 has no absolute position embedding)",
    )
  sizes = {k: _positive_int(path, cfg, k) for k in ("image_size", "patch_size", "embed_dim")}
  if sizes["image_size"] % sizes["patch_size"]:
    raise config_error(path, f"image_size={sizes['image_size']} is not divisible by patch_size={sizes['patch_size']}")
  window = _positive_int(path, cfg, "window_size", square_pairs=False)  # transformers takes one int
  depths, heads = _int_list(path, cfg, "depths", 1), _int_list(path, cfg, "num_heads", 1)
  if len(heads) != len(depths):
    raise config_error(path, f"num_heads={list(heads)} does not have one entry per stage of depths={list(depths)}")
  for s, h in enumerate(heads):
    if (sizes["embed_dim"] << s) % h:
      raise config_error(
        path, f"num_heads[{s}]={h} does not divide the stage width embed_dim * 2**{s} = {sizes['embed_dim'] << s}"
      )
  pretrained = _int_list(path, cfg, "pretrained_window_sizes", 0)
  if len(pretrained) < len(depths) or 1 in pretrained[: len(depths)]:
    # transformers indexes one entry per stage and divides offsets by (pretrained - 1).
    raise config_error(
      path,
      f"pretrained_window_sizes={list(pretrained)}: expected one entry per stage "
      f"({len(depths)}), each 0 (none) or >= 2",
    )
  mlp_ratio, eps, qkv_bias = cfg["mlp_ratio"], cfg["layer_norm_eps"], cfg["qkv_bias"]
  for key, value in (("mlp_ratio", mlp_ratio), ("layer_norm_eps", eps)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
      raise config_error(path, f"{key}={value!r}: expected a positive number")
  if not isinstance(qkv_bias, bool):
    raise config_error(path, f"qkv_bias={qkv_bias!r}: expected true or false")
  kw = dict(
    embed_dim=sizes["embed_dim"],
    depths=depths,
    num_heads=heads,
    window_size=window,
    pretrained_window_sizes=pretrained[: len(depths)],
    patch_size=sizes["patch_size"],
    image_size=sizes["image_size"],
    num_classes=num_labels(cfg) if arch == CLASSIFIER else 0,
    mlp_ratio=float(mlp_ratio),
    layer_norm_eps=float(eps),
    extra_norm_period=0,
  )
  _check_windows(path, kw)
  return kw


def prefix(arch: str) -> str:
  return "swinv2." if arch == CLASSIFIER else ""


def block_prefix(arch: str, stage: int, block: int) -> str:
  return f"{prefix(arch)}encoder.layers.{stage}.blocks.{block}."


def ignored(kw: dict[str, Any], arch: str) -> set[str]:
  """Names that may be present and are not converted."""
  names = {prefix(arch) + name for name in IGNORED}
  for s, depth in enumerate(kw["depths"]):
    names.update(block_prefix(arch, s, j) + name for j in range(depth) for name in IGNORED_PER_BLOCK)
  return names


def _norm(name: str, width: int) -> dict[str, tuple[int, ...]]:
  return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def _linear(name: str, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
  return {f"{name}.weight": (fan_out, fan_in), f"{name}.bias": (fan_out,)}


def _block_shapes(pre: str, width: int, heads: int, mlp: int, qkv_bias: bool) -> dict[str, tuple[int, ...]]:
  att = f"{pre}attention.self."
  shapes = {f"{att}{n}.weight": (width, width) for n in ("query", "key", "value")}
  if qkv_bias:
    shapes.update({f"{att}query.bias": (width,), f"{att}value.bias": (width,)})
  shapes[f"{att}logit_scale"] = (heads, 1, 1)
  shapes[f"{att}continuous_position_bias_mlp.2.weight"] = (heads, swinv2.CPB_HIDDEN)
  shapes.update(_linear(f"{att}continuous_position_bias_mlp.0", 2, swinv2.CPB_HIDDEN))
  shapes.update(_linear(f"{pre}attention.output.dense", width, width))
  shapes.update(_linear(f"{pre}intermediate.dense", width, mlp))
  shapes.update(_linear(f"{pre}output.dense", mlp, width))
  shapes.update(_norm(f"{pre}layernorm_before", width))
  shapes.update(_norm(f"{pre}layernorm_after", width))
  return shapes


def expected_shapes(kw: dict[str, Any], arch: str, qkv_bias: bool) -> dict[str, tuple[int, ...]]:
  """Every tensor name the HF model of `kw` stores (ignored ones aside), with its shape."""
  p, c, patch = prefix(arch), kw["embed_dim"], kw["patch_size"]
  shapes = {
    f"{p}embeddings.patch_embeddings.projection.weight": (c, 3, patch, patch),
    f"{p}embeddings.patch_embeddings.projection.bias": (c,),
  }
  shapes.update(_norm(f"{p}embeddings.norm", c))
  last = len(kw["depths"]) - 1
  for s, (depth, heads) in enumerate(zip(kw["depths"], kw["num_heads"])):
    width = c << s
    for j in range(depth):
      shapes.update(_block_shapes(block_prefix(arch, s, j), width, heads, int(kw["mlp_ratio"] * width), qkv_bias))
    if s < last:
      shapes[f"{p}encoder.layers.{s}.downsample.reduction.weight"] = (2 * width, 4 * width)
      shapes.update(_norm(f"{p}encoder.layers.{s}.downsample.norm", 2 * width))
  shapes.update(_norm(f"{p}layernorm", c << last))
  if kw["num_classes"]:
    shapes.update(_linear("classifier", c << last, kw["num_classes"]))
  return shapes


def qkv_bias(cfg: dict[str, Any]) -> bool:
  """Whether query and value have biases (validated by `model_kwargs`)."""
  return bool(cfg.get("qkv_bias", DEFAULTS["qkv_bias"]))


def _hf_window(model: swinv2.SwinV2) -> int:
  """The one window_size of transformers that gives every stage the (window, shift) our model uses."""
  stages = len(model.depths)
  windows, _ = model.stage_settings()
  ours = [(w, shift) for _, w, shift in swinv2.stage_windows(model.image_size, windows, stages, model.patch_size)]
  hf = hf_stage_windows(model.image_size, model.patch_size, windows[0], stages)
  if hf != ours:
    raise ConfigError(
      f"window_size={model.window_size!r} with image_size={model.image_size}, patch_size="
      f"{model.patch_size}: our SwinV2 uses (window, shift) {ours} per stage; transformers' one "
      f"window_size={windows[0]} (clamped to the grid halved and rounded down) gives {hf}"
    )
  return windows[0]


def hf_config(model: swinv2.SwinV2, labels: Sequence[str] | None = None) -> dict[str, Any]:
  """config.json of the transformers Swinv2 (Swinv2ForImageClassification with a head, else Swinv2Model) that
  computes what `model` computes. The mask token (SimMIM) is not part of it: `to_hf` drops it."""
  if model.extra_norm_period:
    raise ConfigError(
      f"extra_norm_period={model.extra_norm_period}: transformers' Swinv2 has no main-branch "
      f"LayerNorm every N blocks (the H and G sizes add them unless extra_norm_period=0)"
    )
  FIELDS.refuse(model, "transformers' Swinv2")  # a field of `only` that the line above does not name
  _, pretrained = model.stage_settings()
  if 1 in pretrained:
    raise ConfigError(
      f"pretrained_window_sizes={model.pretrained_window_sizes}: transformers divides the offsets "
      f"by (pretrained window - 1); use 0 (the stage's window) or >= 2"
    )
  arch = CLASSIFIER if model.num_classes else BACKBONE
  stages = len(model.depths)
  cfg = dict(
    architectures=[arch],
    model_type="swinv2",
    image_size=model.image_size,
    patch_size=model.patch_size,
    num_channels=3,
    embed_dim=model.embed_dim,
    depths=list(model.depths),
    num_heads=list(model.num_heads),
    window_size=_hf_window(model),
    pretrained_window_sizes=list(pretrained),
    mlp_ratio=float(model.mlp_ratio),
    qkv_bias=True,
    hidden_dropout_prob=float(model.dropout),
    attention_probs_dropout_prob=0.0,
    drop_path_rate=float(model.drop_path),
    hidden_act="gelu",
    use_absolute_embeddings=False,
    initializer_range=0.02,
    layer_norm_eps=float(model.layer_norm_eps),
    encoder_stride=model.patch_size * 2 ** (stages - 1),
    hidden_size=model.embed_dim * 2 ** (stages - 1),
    num_layers=stages,
    dtype="float32",
  )
  if model.num_classes:
    cfg.update(label_fields(model.num_classes, labels))
  return cfg
