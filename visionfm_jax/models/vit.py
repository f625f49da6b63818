"""Vision Transformer (Dosovitskiy et al. 2021): the ViT family Ti..G with any patch size.

Pre-norm blocks `x + attn(LN(x))`, `x + mlp(LN(x))`, a learned class token and position embedding, a final
LayerNorm, class-token (or mean) pooling and an optional linear head. CLIP's image tower (Radford et al. 2021)
is this ViT with `pre_norm` (a LayerNorm on the embedded tokens before the blocks), `patch_bias=False` and, in
OpenAI's checkpoints, `act='quick_gelu'`; its post-LayerNorm on the class token is our final norm. `__call__` returns a dict with
`tokens` (after the final norm), `pooled` and, with a head, `logits`.

As a backbone (models/backbone.py): one feature map, the patch tokens at stride `patch_size`. The class holds
the math; its family (`FAMILY`, the module functions at the end) numbers the layers patch embedding / class token /
position embedding 0, block i i + 1, the rest depth + 1, and resizes the position embedding of a checkpoint of
another resolution (`resize_pos_embed`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.models import backbone, kernels, layers
from visionfm_jax.models.layers import ACT_EMBED, BATCH, EMBED, LENGTH

# name: (width, depth, mlp_dim, heads)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "pico": (32, 2, 64, 2),  # unit tests
    "mu": (96, 4, 384, 3),  # CPU demos
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}
NUM_PREFIX_TOKENS = 1  # the class token precedes the patch grid in pos_embed
POOLS = ("cls", "gap")  # the class token's features | the mean of the patch tokens'
EMBEDDING_PARAMS = ("patch_embed", "cls_token", "pos_embed", "pre_norm")  # layer 0 of the layer-wise decay


def parse_variant(variant: str) -> dict[str, int]:
  """'H/14' -> width, depth, mlp_dim, num_heads, patch_size; the size may be spelled out as
  '<width>x<depth>x<mlp>x<heads>' ('32x2x64x2/4': `layers.custom_size`)."""
  size, sep, patch = variant.partition("/")
  dims = SIZES.get(size) or layers.custom_size(size)
  if dims is None or not sep or not patch.isdigit():
    raise ValueError(f"ViT variant {variant!r}: expected '<size>/<patch>' with size in {sorted(SIZES)} or "
                     f"'<width>x<depth>x<mlp>x<heads>', e.g. 'H/14'")
  width, depth, mlp_dim, heads = dims
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(patch))


def check_pool(pool: str) -> str:
  """`pool` when it is one of POOLS, else a ValueError naming it."""
  if pool not in POOLS:
    raise ValueError(f"pool={pool!r}: expected one of {POOLS} (the class token, or the mean of the patch tokens)")
  return pool


def resize_pos_embed(pos: np.ndarray, length: int, num_prefix: int = NUM_PREFIX_TOKENS) -> np.ndarray:
  """(1, num_prefix + g*g, D) -> (1, length, D): prefix entries kept, the g x g grid resized bicubically to the
  square grid of length - num_prefix entries. ValueError when either grid is not square."""
  grid_in, grid_out = math.isqrt(pos.shape[1] - num_prefix), math.isqrt(length - num_prefix)
  if grid_in ** 2 != pos.shape[1] - num_prefix or grid_out ** 2 != length - num_prefix:
    raise ValueError(f"{pos.shape[1]} -> {length} position embeddings are not {num_prefix} + a square grid")
  prefix, grid = pos[:, :num_prefix], pos[0, num_prefix:].reshape(grid_in, grid_in, -1)
  resized = jax.image.resize(jnp.asarray(grid, jnp.float32), (grid_out, grid_out, grid.shape[-1]), "bicubic")
  resized = np.asarray(resized, pos.dtype).reshape(1, grid_out * grid_out, -1)
  return np.concatenate([prefix, resized], axis=1)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  dropout: float = 0.0
  qkv_bias: bool = True
  attention: str = "softmax"  # kernels.ATTENTION
  stochastic_depth: bool = False
  deterministic: bool = True
  act: str = "gelu"  # layers.ACTIVATIONS
  real_tokens: int | None = None  # tokens before `kernels.pad_tokens`' padding, when padded

  @nn.compact
  def __call__(self, x, drop_rate):
    skip_drop_path = self.deterministic or not self.stochastic_depth
    x = layers.constrain(x, (BATCH, LENGTH, ACT_EMBED))
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm1")(x)
    y = layers.SelfAttention(self.num_heads, self.dtype, self.qkv_bias, self.attention,
                             kv_length=self.real_tokens, name="attn")(y)
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = x + layers.drop_path(self, y, drop_rate, skip_drop_path)
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm2")(x)
    y = layers.Mlp(self.mlp_dim, self.dtype, self.dropout, self.deterministic, act=self.act,
                   name="mlp")(y)
    x = x + layers.drop_path(self, y, drop_rate, skip_drop_path)
    return x, None


class ViT(nn.Module):
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int = 224
  num_classes: int = 0  # 0: no head
  pool: str = "cls"  # POOLS
  drop_path: float = 0.0
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  head_bias_init: float = 0.0
  dtype: Any = jnp.float32
  scan: bool = True
  scan_unroll: int = 1  # blocks per iteration of the scanned loop; 0: all (layers.stack_blocks)
  remat_policy: str = "none"
  attention: str = "softmax"  # kernels.ATTENTION
  pre_norm: bool = False  # a LayerNorm on the embedded tokens before the blocks (CLIP's image tower)
  patch_bias: bool = True  # the patch embedding's bias (CLIP's has none)
  act: str = "gelu"  # the MLPs' activation, layers.ACTIVATIONS (OpenAI's CLIP: quick_gelu)
  token_drop: float = 0.0  # in training, this fraction of each image's patch tokens is dropped (FLIP)

  @nn.compact
  def __call__(self, images, train: bool = False):
    deterministic = not train
    x = layers.patch_embed(images, self.width, self.patch_size, self.dtype, use_bias=self.patch_bias)
    batch = x.shape[0]
    x = einops.rearrange(x, "b h w c -> b (h w) c")
    cls = self.param("cls_token", layers.logical(nn.initializers.zeros, (None, None, EMBED)), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embed", layers.logical(nn.initializers.normal(0.02), (None, None, EMBED)),
                     (1, x.shape[1], self.width))
    x = x + pos.astype(x.dtype)
    if train and self.token_drop > 0:
      x = keep_random_patches(x, self.token_drop, self.make_rng("dropout"))
    if self.pre_norm:
      x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="pre_norm")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    attention = kernels.resolved_attention(self.attention)
    x, tokens = kernels.pad_tokens(x, kernels.token_multiple(attention))  # once, not around every layer's kernel

    run_blocks = layers.stack_blocks(
        EncoderBlock, depth=self.depth, scan=self.scan, unroll=self.scan_unroll, remat_policy=self.remat_policy,
        name="blocks", num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype, layer_norm_eps=self.layer_norm_eps,
        dropout=self.dropout, qkv_bias=self.qkv_bias, attention=attention, stochastic_depth=self.drop_path > 0,
        deterministic=deterministic, act=self.act,
        real_tokens=tokens if x.shape[1] > tokens else None)
    x = run_blocks(x, layers.stochastic_depth_rates(self.drop_path, self.depth))[:, :tokens]
    x = layers.LayerNorm(self.layer_norm_eps, jnp.float32, name="norm")(x)

    pooled = x[:, 0] if check_pool(self.pool) == "cls" else jnp.mean(x[:, 1:], axis=1)
    out = {"tokens": x, "pooled": pooled}
    if self.num_classes:
      out["logits"] = layers.classifier_head(pooled, self.num_classes, self.head_bias_init)
    return out

  # ------------------------------------------------------------- the backbone's computation (backbone.py)
  @property
  def num_features(self) -> int:
    return self.width

  def feature_maps(self, images, train: bool = False) -> list[jax.Array]:
    """The patch tokens after the final norm (class token dropped) as one (B, H/p, W/p, width) map."""
    if train and self.token_drop > 0:
      raise ValueError(f"token_drop={self.token_drop}: a ViT that drops patch tokens in training has no feature "
                       "map there (dense heads need token_drop=0)")
    tokens = self(images, train=train)["tokens"]
    grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
    return [tokens[:, NUM_PREFIX_TOKENS:].reshape(tokens.shape[0], *grid, tokens.shape[-1])]

  def feature_strides(self) -> tuple[float, ...]:
    return (float(self.patch_size),)


def keep_random_patches(x: jax.Array, drop: float, rng: jax.Array) -> jax.Array:
  """FLIP's masked image tower (Li et al. 2023): the class token and, per image, a uniformly random subset of
  round((1 - drop) x N) of its N patch tokens (position embeddings already added), in their order; the dropped
  ones are never computed."""
  prefix, patches = x[:, :NUM_PREFIX_TOKENS], x[:, NUM_PREFIX_TOKENS:]
  keep = kept_patches(patches.shape[1], drop)
  chosen = jnp.sort(jnp.argsort(jax.random.uniform(rng, patches.shape[:2]), axis=1)[:, :keep], axis=1)
  return jnp.concatenate([prefix, jnp.take_along_axis(patches, chosen[..., None], axis=1)], axis=1)


def kept_patches(patches: int, drop: float) -> int:
  return max(1, round((1.0 - drop) * patches))


def check_token_drop(drop: float) -> float:
  if not 0.0 <= drop < 1.0:
    raise ValueError(f"token_drop={drop}: expected a fraction in [0, 1) of the patch tokens to drop in training")
  return float(drop)


def build(model_cfg, dtype) -> ViT:
  """Builds a ViT from `config.model` (variant like 'H/14')."""
  fields = {f.name for f in dataclasses.fields(ViT)}
  kwargs = dict(parse_variant(model_cfg.variant), image_size=model_cfg.image_size, num_classes=model_cfg.num_classes,
                pool=check_pool(model_cfg.pool), drop_path=model_cfg.drop_path, dropout=model_cfg.dropout,
                layer_norm_eps=model_cfg.layer_norm_eps, qkv_bias=model_cfg.qkv_bias, head_bias_init=model_cfg.head_bias_init, dtype=dtype,
                scan=model_cfg.scan, scan_unroll=model_cfg.get("scan_unroll", 1),
                remat_policy=model_cfg.remat_policy, attention=model_cfg.attention, pre_norm=model_cfg.pre_norm,
                patch_bias=model_cfg.patch_bias, act=layers.check_activation(model_cfg.act),
                token_drop=check_token_drop(model_cfg.token_drop))
  assert set(kwargs) <= fields
  kernels.check_attention(model_cfg.attention)
  return ViT(**kwargs)


# --------------------------------------------------------------------------- the family (backbone.py)

def train_flops_per_example(model: ViT) -> float:
  """3 x (patch embedding + the encoder on the patches it keeps (token_drop) + class token + the head)."""
  patches = (model.image_size // model.patch_size) ** 2
  encoded = kept_patches(patches, model.token_drop)
  forward = (2 * patches * model.patch_size ** 2 * 3 * model.width
             + backbone.transformer_forward_flops(encoded + NUM_PREFIX_TOKENS, model.width, model.depth,
                                                  model.mlp_dim)
             + 2 * model.width * model.num_classes)
  return 3.0 * forward


def num_layer_ids(model: ViT) -> int:
  """depth + 2: the embeddings, the blocks, then the final norm and the head."""
  return model.depth + 2


def layer_id(model: ViT, param_path: str) -> int | np.ndarray:
  """The layer id of the param at `param_path` (the module docstring's numbering)."""
  top = param_path.split("/")[0]
  if top in EMBEDDING_PARAMS:
    return 0
  block = backbone.block_layer_ids(top, 1, model.depth)
  return num_layer_ids(model) - 1 if block is None else block


def adapt_checkpoint(model: ViT, params: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """`params` with a (1, 1 + g*g, width) `pos_embed` of another grid resized bicubically to `model`'s grid."""
  out = dict(params)
  pos, target = params.get("pos_embed"), shapes.get("pos_embed")
  if pos is None or target is None or np.shape(pos) == tuple(target):
    return out
  if len(target) == np.ndim(pos) == 3 and np.shape(pos)[::2] == tuple(target)[::2] == (1, model.width):
    try:
      out["pos_embed"] = resize_pos_embed(np.asarray(pos), target[1])
    except ValueError:
      pass
  return out


def description(model: ViT) -> str:
  """One line naming `model`'s dims, patch, resolution and classes."""
  return (f"ViT width {model.width}, depth {model.depth}, MLP {model.mlp_dim}, {model.num_heads} heads, "
          f"patch {model.patch_size}, {model.image_size} px, {model.num_classes or 'no'} classes")


def size_name(model: ViT) -> str:
  """The key of SIZES with `model`'s dims, else they spelled out ('32x2x64x2', `parse_variant`)."""
  dims = (model.width, model.depth, model.mlp_dim, model.num_heads)
  return next((size for size, named in SIZES.items() if named == dims), layers.size_spec(*dims))


def checkpoint_fields(model: ViT) -> dict[str, Any]:
  """What rebuilds `model`'s params (tools.import_hf's model.json; `from_checkpoint_fields` reads it)."""
  return dict(name="vit", variant=f"{size_name(model)}/{model.patch_size}", width=model.width,
              depth=model.depth, mlp_dim=model.mlp_dim, heads=model.num_heads, qkv_bias=model.qkv_bias,
              pool=model.pool, pre_norm=model.pre_norm, patch_bias=model.patch_bias, act=model.act,
              patch=model.patch_size, image_size=model.image_size, num_classes=model.num_classes,
              layer_norm_eps=model.layer_norm_eps, scan=model.scan)


def from_checkpoint_fields(fields: dict[str, Any]) -> ViT:
  """The ViT that `checkpoint_fields` describes (KeyError naming a missing field)."""
  return ViT(width=fields["width"], depth=fields["depth"], mlp_dim=fields["mlp_dim"], num_heads=fields["heads"],
             patch_size=fields["patch"], image_size=fields["image_size"], num_classes=fields["num_classes"] or 0,
             layer_norm_eps=fields["layer_norm_eps"], scan=fields["scan"], qkv_bias=fields["qkv_bias"],
             pool=fields["pool"], **{k: fields[k] for k in ("pre_norm", "patch_bias", "act") if k in fields})


FAMILY = backbone.Family(
    module=ViT, name="vit", build=build, hf_converter="hf_vit", train_flops_per_example=train_flops_per_example,
    num_layer_ids=num_layer_ids, layer_id=layer_id, adapt_checkpoint=adapt_checkpoint, description=description,
    checkpoint_fields=checkpoint_fields, from_checkpoint_fields=from_checkpoint_fields)
