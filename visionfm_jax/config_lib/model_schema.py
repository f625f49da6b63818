"""`config.model`'s rows, per family: the fields each builder reads (models/<name>.py `build`). A composite model
(clip, aurora) nests its towers' rows, so the same SwinV2 rows sit at `model.`, `model.image.` and `model.encoder.`."""

from __future__ import annotations

import dataclasses
import math

from visionfm_jax.config_lib.domains import (
  COUNT,
  NON_NEGATIVE_INT,
  POSITIVE,
  RATE,
  SIZED,
  SIZED_COUNT,
  Choices,
  Domain,
  TransformerSize,
  staged_size,
)
from visionfm_jax.config_lib.rows import Field, without
from visionfm_jax.errors import ConfigError

# Names of jax.checkpoint_policies (models/layers.py maps them to the policies) plus 'none' (no remat) and
# dots_with_no_batch_dims_and_attention_saveable (that policy keeping cuDNN attention's outputs too:
# models/kernels.py saving_cudnn_attention); here, so that config_lib itself needs no jax.
REMAT_POLICIES = (
  "none",
  "nothing_saveable",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "dots_with_no_batch_dims_and_attention_saveable",
  "everything_saveable",
)
# The names of the models' other choices (their rows' domains), which models/ maps to its math.
ATTENTION, ACTIVATIONS = ("auto", "softmax", "cudnn", "jax"), ("gelu", "quick_gelu", "gelu_pytorch_tanh")
# A SwinV2's attention takes one more: its window attention as Pallas kernels (models/kernels.py window_attention).
WINDOW_ATTENTION = ATTENTION + ("pallas",)
VIT_POOLS, TEXT_POOLS = ("cls", "gap", "map"), ("eos", "cls")
EXTRA_NORM_SCOPES, MIM_VIEWS = ("stage", "global"), ("separate", "shared")
# The named sizes of the SwinV2 and text towers, in the order of their SIZES tables (models/swinv2.py,
# models/text.py), which hold their widths and depths; tests/unit/test_backbone.py holds the names equal.
SWINV2_SIZES = ("pico", "femto", "mu", "T", "S", "B", "L", "H", "G")
TEXT_SIZES = ("pico", "mu", "B", "L", "H", "XL")
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07 (2.659260); Aurora's too
# The contrastive losses of a CLIP model (losses/image_text.py): CLIP's softmax over the batch, SigLIP's sigmoid
# per pair.
CONTRASTIVE_LOSSES = ("clip", "siglip")
# What a composite model (clip, aurora) sets for its towers (models/towers.py): its own value of these fields,
# once for all towers, and no classification head. A tower's config has neither.
TOWER_SHARED_FIELDS = ("image_size", "scan", "scan_unroll", "remat_policy")
TOWER_HEADLESS = {"num_classes": 0, "head_bias_init": 0.0}
FAMILIES = ("vit", "swinv2", "clip", "aurora")
IMAGE_TOWERS = ("swinv2", "vit")

# What every backbone reads; a composite model keeps the TOWER_SHARED_FIELDS of them.
BACKBONE = dict(
  num_classes=Field(
    1000,
    Domain(
      0, integer=True, extra=(SIZED,), note="0: no head; -1: the training data's class count, from its dataset.json"
    ),
    "classes of the classification head",
  ),
  image_size=Field(224, SIZED_COUNT, "input side in px"),
  drop_path=Field(0.0, RATE, "stochastic depth: the drop rate of the last block, rising linearly from 0 at the first"),
  dropout=Field(0.0, RATE, "dropout in the blocks"),
  head_bias_init=Field(0.0, doc="initial bias of the classification head's logits"),
  scan=Field(True, doc="the repeated blocks as one nn.scan (compile time independent of depth); False unrolls them"),
  scan_unroll=Field(
    1,
    NON_NEGATIVE_INT,
    "with scan: blocks (SwinV2: block pairs) per iteration of the scanned "
    "loop, 0 for the whole stack (straight-line code, each block's remat policy kept); the params "
    "stay stacked, so a run may change it at a resume (docs/performance.md)",
  ),
  remat_policy=Field(
    "nothing_saveable",
    Choices(REMAT_POLICIES),
    "what the blocks' backward pass keeps (models/layers.py); none: no remat",
  ),
  attention=Field(
    "auto",
    Choices(ATTENTION),
    "auto (cuDNN on GPUs in bf16/fp16, else softmax) | softmax "
    "(einsums, hand-written backward) | cudnn (cuDNN flash attention, GPU) | jax "
    "(jax.nn.dot_product_attention choosing)",
  ),
)

VIT = dict(
  variant=Field("B/16", doc="<size>/<patch>, a size of models/vit.py SIZES"),
  pool=Field(
    "cls",
    Choices(VIT_POOLS),
    "the class token's features, the tokens' mean, or a MAP head (SigLIP's attention pooling)",
  ),
  class_token=Field(True, doc="a learned class token before the patches; SigLIP's towers have none"),
  layer_norm_eps=Field(1e-6, POSITIVE, "the LayerNorms' epsilon"),
  qkv_bias=Field(True, doc="biases on the query, key and value projections"),
  pre_norm=Field(False, doc="a LayerNorm on the embedded tokens before the blocks (CLIP's image tower)"),
  patch_bias=Field(True, doc="the patch embedding's bias (CLIP's image tower has none)"),
  act=Field(
    "gelu",
    Choices(ACTIVATIONS),
    "the MLP activation: gelu (exact) | quick_gelu (OpenAI's CLIP) | gelu_pytorch_tanh (a GPU candidate)",
  ),
  token_drop=Field(0.0, RATE, "in training, the fraction of each image's patch tokens dropped (FLIP); none at eval"),
)

SWINV2 = dict(
  attention=Field(
    "auto",
    Choices(WINDOW_ATTENTION),
    "as a ViT's, or pallas: the window attention as Pallas "
    "kernels with the position bias's gradient summed inside them (GPU; models/kernels.py "
    "window_attention)",
  ),
  variant=Field(
    "T",
    TransformerSize(SWINV2_SIZES, staged_size, "'<embed_dim>x<depth,...>x<heads,...>' (one a stage)"),
    "a size of models/swinv2.py SIZES: its width and depth per stage",
  ),
  mlp_ratio=Field(4.0, POSITIVE, "the MLP's hidden width over the block's"),
  patch_size=Field(4, COUNT, "side in px of the patches the first stage embeds"),
  window_size=Field(14, COUNT, "every stage; a stage whose map is not larger becomes one unshifted window"),
  pretrained_window_sizes=Field(
    (),
    Domain(0, integer=True, note="0: the stage's own window"),
    "Windows the weights were trained with, per stage, when they differ (224/w14 -> "
    "640/w40: (14, 14, 14, 7), see swinv2.pretrained_windows); (): the windows "
    "themselves. init_from refuses a checkpoint trained with other windows, naming the "
    "value to set (training/init_from.py)",
  ),
  layer_norm_eps=Field(1e-5, POSITIVE, "the LayerNorms' epsilon"),
  extra_norm_period=Field(
    -1,
    Domain(0, integer=True, extra=(-1,), note="0: none; -1: the size's default"),
    "main-branch LayerNorm every N blocks (6 for H and G by default)",
  ),
  extra_norm_scope=Field("stage", Choices(EXTRA_NORM_SCOPES), "count blocks within each stage or across the network"),
  stage_remat_policies=Field(
    (),
    Choices(REMAT_POLICIES),
    "per stage, what its blocks' backward pass keeps, in place of remat_policy: e.g. "
    "nothing_saveable where many tokens make a stage's activations large and its FLOPs "
    "few (SwinV2-G-CLIP 224's runbook); (): remat_policy in every stage",
  ),
  stage_scan_unrolls=Field(
    (),
    NON_NEGATIVE_INT,
    "with scan: per stage, block pairs per iteration of its scanned loop (0: the whole "
    "stage straight-line), in place of scan_unroll: e.g. SwinV2-G's 42-block stage in "
    "groups, the short stages straight-line, which compiles in bounded time; (): "
    "scan_unroll in every stage",
  ),
  token_subgrid=Field(
    1,
    Domain(1, integer=True, note="1: off"),
    "k > 1: in training every k-th patch per axis (1 - 1/k^2 dropped, a random phase per image), "
    "windows whole; none at eval (models/swinv2.py; a ViT's token_drop, open_clip's "
    "patch_dropout, in a form Swin keeps)",
  ),
)

TEXT = dict(
  variant=Field(
    "B",
    TransformerSize(TEXT_SIZES),
    "a size of models/text.py SIZES (B: width 512, 12 layers, 8 heads), or the sizes spelled out",
  ),
  vocab_size=Field(32000, COUNT, "at least the tokenizer's pieces (pad 0, unk 1, bos 2, eos 3)"),
  max_len=Field(77, COUNT, "tokens per caption, BOS and EOS included"),
  eos_id=Field(3, NON_NEGATIVE_INT, "pooled position: the first eos_id of each row (pool='eos')"),
  pool=Field(
    "eos", Choices(TEXT_POOLS), "eos: EOS features (CLIP) | cls: a learned token appended after the caption (CoCa)"
  ),
  layer_norm_eps=Field(1e-5, POSITIVE, "the LayerNorms' epsilon"),
  attention=Field("auto", Choices(ATTENTION), "as the image's, causal"),
  act=Field("gelu", Choices(ACTIVATIONS), "the MLP activation: gelu (exact) | quick_gelu (OpenAI's CLIP)"),
)

BACKBONES = {"vit": VIT, "swinv2": SWINV2}


def model_rows(name: str, *, image_tower: str = "swinv2") -> dict:
  """The rows of `config.model` of family `name`. 'clip' nests the image tower's (`image_tower`: swinv2 | vit)
  under `image` and the text tower's under `text`; its top-level image_size, scan, scan_unroll and remat_policy
  apply to both towers (models/clip.py)."""
  rows = {"name": Field(name, doc=f"the model family: {' | '.join(FAMILIES)} (models/<name>.py build)")}
  if name in BACKBONES:
    return {**rows, **BACKBONE, **BACKBONES[name]}
  if name == "clip":
    return {**rows, **_composite(), **_clip(image_tower)}
  if name == "aurora":
    return {**rows, **_composite(), **_aurora()}
  raise ConfigError(f"model {name!r}: known families are {', '.join(FAMILIES)}")


def tower_rows(name: str, *also: str) -> dict:
  """`model_rows(name)` without the fields the composite model sets for it (TOWER_SHARED_FIELDS,
  TOWER_HEADLESS) and `also`."""
  return without(model_rows(name), *TOWER_SHARED_FIELDS, *TOWER_HEADLESS, *also)


def _composite() -> dict:
  return {key: BACKBONE[key] for key in TOWER_SHARED_FIELDS}


def _clip(image_tower: str) -> dict:
  if image_tower not in IMAGE_TOWERS:
    raise ConfigError(f"clip image_tower={image_tower!r}: expected swinv2 or vit")
  return dict(
    embed_dim=Field(512, COUNT, "the joint embedding both towers project to"),
    logit_scale_init=Field(
      LOGIT_SCALE_INIT, doc="log(1 / 0.07); the task clamps it to [0, log 100] after every update"
    ),
    contrastive_loss=Field(
      "clip",
      Choices(CONTRASTIVE_LOSSES),
      "clip: softmax over the batch | siglip: a sigmoid per pair, with a learnable bias "
      "(SigLIP; its paper starts logit_scale_init at log 10, as configs/swinv2_g_clip.py:siglip "
      "does)",
    ),
    logit_bias_init=Field(-10.0, doc="siglip's learnable logit bias at init (the SigLIP paper's); clip has none"),
    image=tower_rows(image_tower),  # the image tower's own fields; its pooled features are projected
    text=TEXT,
  )


def _aurora() -> dict:
  return dict(
    embed_dim=Field(1024, COUNT, "the contrastive embedding both sides project to"),
    logit_scale_init=Field(LOGIT_SCALE_INIT, doc="log(1 / 0.07); clamped to [0, log 100] after every update"),
    caption_queries=Field(256, COUNT, "learned queries of the captioning pooler: the decoder's cross-attention memory"),
    decoder_depth=Field(12, COUNT, "multimodal decoder layers (width, heads and MLP of the text encoder)"),
    mim_view=Field(
      "separate",
      Choices(MIM_VIEWS),
      "separate: contrastive + captioning see the clean image, a "
      "second encoder pass the masked one (MIM); shared: one masked pass feeds all heads",
    ),
    encoder=tower_rows("swinv2", "name"),  # always a SwinV2; a mask token is added
    # the unimodal causal text encoder; the decoder shares its width
    text={**TEXT, "pool": dataclasses.replace(TEXT["pool"], default="cls")},
  )


def rows_of_model(model) -> dict:
  """The rows of a config's `model` section by its own family (and CLIP's image tower); {} for an unknown one,
  which the model's builder names."""
  name = model.get("name")
  image = model.get("image") if name == "clip" else None
  image_tower = image.get("name", "swinv2") if image is not None else "swinv2"
  try:
    return model_rows(name, image_tower=image_tower)
  except ConfigError:
    return {}
