"""CLIP (Radford et al. 2021) with a SwinV2 or ViT image tower: the model of SwinV2-G-CLIP.

  image_emb = normalise(image_proj(image_tower(images)['pooled']))   # bias-free Linear(pooled width -> embed)
  text_emb  = normalise(text_tower(tokens)['embedding'])             # EOS features, bias-free projection
  logits    = exp(logit_scale) * image_emb @ text_emb.T              # (the contrastive task computes these)

SwinV2's `pooled` is the mean of its final tokens; ViT's is its class token (or mean, per `pool`), both after
the tower's final LayerNorm. `logit_scale` is a learnable scalar, init log(1/0.07); the task clamps it to
[0, log 100] after every update with `clamp_logit_scale`. Params: 'image', 'image_proj', 'text', 'logit_scale'.
Trained with SigLIP's sigmoid loss (Zhai et al. 2023; config.model.contrastive_loss='siglip') the logits get a
learnable bias too, `logit_bias` (init -10): logits = exp(logit_scale) * image_emb @ text_emb.T + logit_bias.

Entry points: `model.apply(v, images, tokens)` -> {'image_emb', 'text_emb', 'logit_scale'} (and 'logit_bias');
`model.apply(v, images, method=CLIP.embed_images)` and `model.apply(v, tokens, method=CLIP.embed_texts)` for
zero-shot and retrieval. Embeddings are L2-normalised fp32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from visionfm_jax.config_lib import LOGIT_SCALE_INIT, model_rows
from visionfm_jax.models import backbone, layers, towers
from visionfm_jax.models import text as text_lib
from visionfm_jax.models.layers import EMBED

MAX_LOGIT_SCALE = math.log(100.0)
IMAGE_TOWERS = tuple(towers.IMAGE_BUILDERS)


def clamp_logit_scale(params: dict[str, Any]) -> dict[str, Any]:
  """`params` (CLIP's, with a top-level 'logit_scale') with that scalar clamped to [0, log 100]; pure."""
  return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}


class CLIP(nn.Module):
  image: nn.Module  # a backbone.ImageBackbone (vit.ViT or swinv2.SwinV2) without a head (num_classes=0)
  text: text_lib.TextTransformer  # its embed_dim must equal embed_dim
  embed_dim: int
  logit_scale_init: float = LOGIT_SCALE_INIT
  logit_bias_init: float | None = None  # SigLIP's bias; None: no bias (CLIP's softmax loss)

  def setup(self):
    if self.text.embed_dim != self.embed_dim:
      raise ValueError(f"text tower projects to {self.text.embed_dim}, CLIP embed_dim is {self.embed_dim}")
    self.image_proj = layers.dense(
      self.embed_dim, (EMBED, None), jnp.float32, use_bias=False, kernel_init=nn.initializers.lecun_normal()
    )
    self.logit_scale = self.param(
      "logit_scale", layers.logical(nn.initializers.constant(self.logit_scale_init), ()), ()
    )
    if self.logit_bias_init is not None:
      self.logit_bias = self.param("logit_bias", layers.logical(nn.initializers.constant(self.logit_bias_init), ()), ())

  def embed_images(self, images, train: bool = False) -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, embed_dim) unit-norm fp32 embeddings."""
    pooled = self.image(images, train=train)["pooled"]
    return layers.l2_normalize(self.image_proj(pooled.astype(jnp.float32)))

  def embed_texts(self, tokens, train: bool = False) -> jax.Array:
    """(B, L) int token ids -> (B, embed_dim) unit-norm fp32 embeddings."""
    return layers.l2_normalize(self.text(tokens, train=train)["embedding"])

  def __call__(self, images, tokens=None, train: bool = False) -> dict[str, jax.Array]:
    """`tokens=None` stands in a batch of padding (max_len long): `init` from images alone makes every param."""
    if tokens is None:
      tokens = jnp.zeros((images.shape[0], self.text.max_len), jnp.int32)
    out = {
      "image_emb": self.embed_images(images, train),
      "text_emb": self.embed_texts(tokens, train),
      "logit_scale": self.logit_scale.astype(jnp.float32),
    }
    if self.logit_bias_init is not None:
      out["logit_bias"] = self.logit_bias.astype(jnp.float32)
    return out

  @property
  def image_size(self) -> int:
    return self.image.image_size


def image_tower_config(model_cfg) -> ml_collections.ConfigDict:
  """`config.model.image` plus the fields CLIP sets for it (`towers.tower_config`)."""
  name = model_cfg.image.get("name")
  if name not in IMAGE_TOWERS:
    raise ValueError(f"image.name={name!r}: expected one of {IMAGE_TOWERS}")
  return towers.tower_config(model_cfg, "image")


def build(model_cfg, dtype) -> CLIP:
  """Builds CLIP from `config.model` (config_lib.model_config('clip')); ValueErrors name the field."""
  image_cfg = image_tower_config(model_cfg)
  try:
    image = towers.IMAGE_BUILDERS[image_cfg.name](image_cfg, dtype)
  except (AttributeError, KeyError) as e:
    raise ValueError(
      f"image: a {image_cfg.name} tower needs field {e} (start from "
      f"config_lib.model_config('clip', image_tower={image_cfg.name!r}))"
    ) from e
  except ValueError as e:
    raise ValueError(f"image: {e}") from e
  text = text_lib.build(
    model_cfg.text,
    model_cfg.embed_dim,
    dtype,
    scan=model_cfg.scan,
    remat_policy=model_cfg.remat_policy,
    scan_unroll=model_cfg.scan_unroll,
  )
  bias = model_cfg.logit_bias_init if uses_siglip(model_cfg) else None
  return CLIP(
    **{**backbone.config_kwargs(CLIP, model_rows("clip"), model_cfg), "logit_bias_init": bias}, image=image, text=text
  )


def uses_siglip(model_cfg) -> bool:
  """Whether `config.model` trains with SigLIP's loss (and so has a logit bias)."""
  return model_cfg.contrastive_loss == "siglip"


# --------------------------------------------------------------------------- the family (backbone.py)


def train_flops_per_example(model: CLIP) -> float:
  """The image tower's, the text tower's (all max_len positions) and both projections', x 3."""
  image, text = model.image, model.text
  text_forward = (
    backbone.transformer_forward_flops(text.max_len, text.width, text.depth, text.mlp_dim)
    + 2 * text.width * text.embed_dim
  )
  image_flops = towers.family(image).train_flops_per_example(image)
  return image_flops + 3.0 * (text_forward + 2 * image.num_features * model.embed_dim)


def adapt_checkpoint(model: CLIP, params: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """`params` with the image tower's adapted by it (backbone.py); the text tower's do not depend on the
  resolution."""
  return towers.adapt_checkpoint("image", model.image, params, shapes)


def description(model: CLIP) -> str:
  """One line naming the embedding width and both towers."""
  image, text = model.image, model.text
  return (
    f"CLIP, {model.embed_dim}-d embeddings; image: {towers.family(image).description(image)}; "
    f"text: width {text.width}, depth {text.depth}, {text.max_len} tokens"
  )


def tower_fields(fields: dict[str, Any], key: str) -> dict[str, Any] | None:
  """The image tower's config fields in a CLIP config (a dict), completed as `image_tower_config` completes them;
  None for another key (the text tower is no family's)."""
  return towers.tower_fields(fields, key) if key == "image" else None


# convert/hf_clip.py: a ViT-tower CLIP with CLIP's pre-norm exports as a CLIPModel.
FAMILY = backbone.Family(
  module=CLIP,
  name="clip",
  build=build,
  hf_converter="hf_clip",
  train_flops_per_example=train_flops_per_example,
  adapt_checkpoint=adapt_checkpoint,
  description=description,
  tower_fields=tower_fields,
)
