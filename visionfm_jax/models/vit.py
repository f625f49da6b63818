"""Vision Transformer (Dosovitskiy et al. 2021): the ViT family Ti..G with any patch size.

Pre-norm blocks `x + attn(LN(x))`, `x + mlp(LN(x))`, a learned class token and position embedding, a final LayerNorm,
class-token (or mean, or SigLIP's attention-pooling MAP head) pooling and an optional linear head. CLIP's image tower
(Radford et al. 2021) is this ViT with `pre_norm` (a LayerNorm on the embedded tokens before the blocks),
`patch_bias=False` and, in OpenAI's checkpoints, `act='quick_gelu'`; its post-LayerNorm on the class token is our final
norm. `__call__` returns a dict with `tokens` (after the final norm), `pooled` and, with a head, `logits`. SigLIP's
tower (Zhai et al. 2023) has no class token (`class_token=False`) and pools with a MAP head (`pool='map'`).

NaFlex (SigLIP 2, Tschannen et al. 2025): given {'patches': (B, N, p*p*3), 'grid': int32 (B, 2)} in place of images
(data/transforms/naflex.py makes them), each image is its grid's first rows * columns patch rows, row-major; the
square grid of position embeddings is resized to each image's grid (`naflex_position_weights`: bilinear with
antialiasing, as torch's interpolate), and attention and pooling see each image's own patches only.

As a backbone (models/backbone.py): one feature map, the patch tokens at stride `patch_size`. The class holds
the math; its family (`FAMILY`, the module functions at the end) numbers the layers patch embedding / class token /
position embedding 0, block i i + 1, the rest depth + 1, and resizes the position embedding of a checkpoint of
another resolution (`resize_pos_embed`).
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.config_lib import VIT_POOLS, custom_size, model_rows
from visionfm_jax.models import backbone, kernels, layers
from visionfm_jax.models.layers import ACT_EMBED, BATCH, EMBED, HEADS, KV, LENGTH

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
EMBEDDING_PARAMS = ("patch_embed", "cls_token", "pos_embed", "pre_norm")  # layer 0 of the layer-wise decay


def parse_variant(variant: str) -> dict[str, int]:
  """'H/14' -> width, depth, mlp_dim, num_heads, patch_size; the size may be spelled out as
  '<width>x<depth>x<mlp>x<heads>' ('32x2x64x2/4': `config_lib.custom_size`)."""
  size, sep, patch = variant.partition("/")
  dims = SIZES.get(size) or custom_size(size)
  if dims is None or not sep or not patch.isdigit():
    raise ValueError(
      f"ViT variant {variant!r}: expected '<size>/<patch>' with size in {sorted(SIZES)} or "
      f"'<width>x<depth>x<mlp>x<heads>', e.g. 'H/14'"
    )
  width, depth, mlp_dim, heads = dims
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(patch))


def check_pool(pool: str, class_token: bool = True) -> str:
  """`pool` when it is one of VIT_POOLS (and, for 'cls', the tower has a class token), else a ValueError naming it."""
  if pool not in VIT_POOLS:
    raise ValueError(
      f"pool={pool!r}: expected one of {VIT_POOLS} (the class token, the mean of the patch tokens, or a MAP head)"
    )
  if pool == "cls" and not class_token:
    raise ValueError("pool='cls' needs class_token=True: a tower without a class token pools with gap or map")
  return pool


def naflex_position_weights(grid: jax.Array, tokens: int, square: int) -> jax.Array:
  """float32 (B, tokens, square * square): token t of an image with grid (rows, columns) (B, 2) takes its position
  embedding as these weights of the square x square grid's, the grid resized bilinearly with antialiasing to
  rows x columns (torch's interpolate(mode='bilinear', align_corners=False, antialias=True)): along an axis of n
  outputs from `square` inputs, output i weighs input j by max(0, 1 - |j - c_i| / max(s, 1)), normalised,
  with s = square / n and c_i = (i + 0.5) s - 0.5. Tokens past rows * columns take position (0, 0)'s, and so do
  those of an empty grid."""
  t = jnp.arange(tokens)[None, :]
  rows, columns = jnp.maximum(grid[:, :1], 1), jnp.maximum(grid[:, 1:], 1)  # (0, 0): an evaluation batch's padding
  inside = t < rows * columns
  row, column = jnp.where(inside, t // columns, 0), jnp.where(inside, t % columns, 0)

  def axis_weights(index, size):
    scale = square / size.astype(jnp.float32)
    center = (index + 0.5) * scale - 0.5
    w = jnp.maximum(0.0, 1.0 - jnp.abs(jnp.arange(square) - center[..., None]) / jnp.maximum(scale, 1.0)[..., None])
    return w / jnp.sum(w, axis=-1, keepdims=True)

  row_w, column_w = axis_weights(row, rows), axis_weights(column, columns)
  return (row_w[..., :, None] * column_w[..., None, :]).reshape(grid.shape[0], tokens, square * square)


def resize_pos_embed(pos: np.ndarray, length: int, num_prefix: int = NUM_PREFIX_TOKENS) -> np.ndarray:
  """(1, num_prefix + g*g, D) -> (1, length, D): prefix entries kept, the g x g grid resized bicubically to the
  square grid of length - num_prefix entries. ValueError when either grid is not square."""
  grid_in, grid_out = math.isqrt(pos.shape[1] - num_prefix), math.isqrt(length - num_prefix)
  if grid_in**2 != pos.shape[1] - num_prefix or grid_out**2 != length - num_prefix:
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
  def __call__(self, x, drop_rate, mask=None):
    skip_drop_path = self.deterministic or not self.stochastic_depth
    x = layers.constrain(x, (BATCH, LENGTH, ACT_EMBED))
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm1")(x)
    y = layers.SelfAttention(
      self.num_heads, self.dtype, self.qkv_bias, self.attention, kv_length=self.real_tokens, name="attn"
    )(y, mask=mask)
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = x + layers.drop_path(self, y, drop_rate, skip_drop_path)
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm2")(x)
    y = layers.Mlp(self.mlp_dim, self.dtype, self.dropout, self.deterministic, act=self.act, name="mlp")(y)
    x = x + layers.drop_path(self, y, drop_rate, skip_drop_path)
    return x, None


class MapHead(nn.Module):
  """Multihead attention pooling (MAP; SigLIP's): a learned probe attends over the tokens (a (B, T) `mask`: those
  it may see), then y + MLP(LN(y)); returns the probe's (B, width) features."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  act: str = "gelu"

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    probe = self.param("probe", layers.logical(nn.initializers.xavier_uniform(), (None, None, EMBED)), (1, 1, width))
    q = layers.dense((self.num_heads, head_dim), (EMBED, HEADS, KV), self.dtype, name="q")(probe.astype(x.dtype))
    k, v = layers.dense((2, self.num_heads, head_dim), (EMBED, None, HEADS, KV), self.dtype, separate=True, name="kv")(
      x
    )
    q = jnp.broadcast_to(q, (x.shape[0],) + q.shape[1:])
    y = kernels.attention(q, k, v, mask=None if mask is None else mask[:, None, None, :])
    y = layers.dense(width, (HEADS, KV, EMBED), self.dtype, axis=(-2, -1), name="out")(y)
    z = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(y)
    y = y + layers.Mlp(self.mlp_dim, self.dtype, act=self.act, name="mlp")(z)
    return y[:, 0]


class ViT(nn.Module):
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int = 224
  num_classes: int = 0  # 0: no head
  pool: str = "cls"  # VIT_POOLS
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
  class_token: bool = True  # a learned class token before the patches (SigLIP's tower has none)

  @property
  def num_prefix_tokens(self) -> int:
    return NUM_PREFIX_TOKENS if self.class_token else 0

  @nn.compact
  def __call__(self, images, train: bool = False):
    """`images`: (B, H, W, 3), or a NaFlex batch {'patches', 'grid'} (module docstring)."""
    deterministic = not train
    naflex = isinstance(images, Mapping)
    if naflex:
      x, valid = self._embed_naflex(images)
    else:
      x = layers.patch_embed(images, self.width, self.patch_size, self.dtype, use_bias=self.patch_bias)
      x, valid = einops.rearrange(x, "b h w c -> b (h w) c"), None
    batch, prefix = x.shape[0], self.num_prefix_tokens
    if self.class_token:
      cls = self.param("cls_token", layers.logical(nn.initializers.zeros, (None, None, EMBED)), (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
    square = self.image_size // self.patch_size
    pos = self.param(
      "pos_embed",
      layers.logical(nn.initializers.normal(0.02), (None, None, EMBED)),
      (1, prefix + square * square if naflex else x.shape[1], self.width),
    )
    x = x + (self._naflex_positions(pos, images["grid"], x.shape[1] - prefix) if naflex else pos).astype(x.dtype)
    if train and self.token_drop > 0:
      if naflex:
        raise ValueError(f"token_drop={self.token_drop}: NaFlex inputs already vary their tokens; use token_drop=0")
      x = keep_random_patches(x, self.token_drop, self.make_rng("dropout"), prefix)
    if self.pre_norm:
      x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="pre_norm")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    attention = kernels.resolved_attention(self.attention)
    x, tokens = kernels.pad_tokens(x, kernels.token_multiple(attention))  # once, not around every layer's kernel
    seen = None if valid is None else jnp.pad(valid, [(0, 0), (prefix, x.shape[1] - tokens)], constant_values=True)

    run_blocks = layers.stack_blocks(
      EncoderBlock,
      depth=self.depth,
      scan=self.scan,
      unroll=self.scan_unroll,
      remat_policy=self.remat_policy,
      name="blocks",
      num_broadcast=1,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dtype=self.dtype,
      layer_norm_eps=self.layer_norm_eps,
      dropout=self.dropout,
      qkv_bias=self.qkv_bias,
      attention=attention,
      stochastic_depth=self.drop_path > 0,
      deterministic=deterministic,
      act=self.act,
      real_tokens=tokens if x.shape[1] > tokens else None,
    )
    x = run_blocks(
      x, layers.stochastic_depth_rates(self.drop_path, self.depth), None if seen is None else seen[:, None, None, :]
    )[:, :tokens]
    x = layers.LayerNorm(self.layer_norm_eps, jnp.float32, name="norm")(x)

    out = {"tokens": x, "pooled": self._pool(x, valid)}
    if self.num_classes:
      out["logits"] = layers.classifier_head(out["pooled"], self.num_classes, self.head_bias_init)
    return out

  def _embed_naflex(self, images) -> tuple[jax.Array, jax.Array]:
    """The patch embedding of NaFlex patches (B, N, p*p*3), by the square images' conv and params (the patches laid
    side by side as one p x N p image), and their validity (B, N)."""
    patches, p = images["patches"], self.patch_size
    if patches.shape[-1] != p * p * 3:
      raise ValueError(f"NaFlex patches of {patches.shape[-1]} values: a ViT of patch {p} takes {p * p * 3}")
    strip = einops.rearrange(patches, "b n (y x c) -> b y (n x) c", y=p, x=p)
    x = layers.patch_embed(strip, self.width, p, self.dtype, use_bias=self.patch_bias)[:, 0]
    tokens = patches.shape[1]
    return x, jnp.arange(tokens)[None, :] < jnp.prod(images["grid"], axis=-1)[:, None]

  def _naflex_positions(self, pos: jax.Array, grid: jax.Array, tokens: int) -> jax.Array:
    """(B, prefix + tokens, width): the prefix's embeddings, then the square grid's resized to each image's grid."""
    prefix, square = self.num_prefix_tokens, self.image_size // self.patch_size
    weights = naflex_position_weights(grid, tokens, square)
    resized = jnp.einsum(
      "bts,sd->btd", weights, pos[0, prefix:].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return jnp.concatenate([jnp.broadcast_to(pos[:, :prefix], (grid.shape[0], prefix, self.width)), resized], axis=1)

  def _pool(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """The pooled features: the class token's, the patches' mean, or the MAP head's (over each image's patches)."""
    pool, prefix = check_pool(self.pool, self.class_token), self.num_prefix_tokens
    if pool == "cls":
      return x[:, 0]
    patches = x[:, prefix:]
    if pool == "map":
      return MapHead(self.num_heads, self.mlp_dim, self.dtype, self.layer_norm_eps, self.act, name="map_head")(
        patches, valid
      ).astype(jnp.float32)
    if valid is None:
      return jnp.mean(patches, axis=1)
    weights = valid.astype(patches.dtype)[..., None]
    return jnp.sum(patches * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)

  # ------------------------------------------------------------- the backbone's computation (backbone.py)
  @property
  def num_features(self) -> int:
    return self.width

  def feature_maps(self, images, train: bool = False) -> list[jax.Array]:
    """The patch tokens after the final norm (class token dropped) as one (B, H/p, W/p, width) map."""
    if train and self.token_drop > 0:
      raise ValueError(
        f"token_drop={self.token_drop}: a ViT that drops patch tokens in training has no feature "
        "map there (dense heads need token_drop=0)"
      )
    tokens = self(images, train=train)["tokens"]
    grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
    return [tokens[:, self.num_prefix_tokens :].reshape(tokens.shape[0], *grid, tokens.shape[-1])]

  def feature_strides(self) -> tuple[float, ...]:
    return (float(self.patch_size),)


def keep_random_patches(x: jax.Array, drop: float, rng: jax.Array, prefix: int = NUM_PREFIX_TOKENS) -> jax.Array:
  """FLIP's masked image tower (Li et al. 2023): the class token and, per image, a uniformly random subset of
  round((1 - drop) x N) of its N patch tokens (position embeddings already added), in their order; the dropped
  ones are never computed."""
  first, patches = x[:, :prefix], x[:, prefix:]
  keep = kept_patches(patches.shape[1], drop)
  chosen = jnp.sort(jnp.argsort(jax.random.uniform(rng, patches.shape[:2]), axis=1)[:, :keep], axis=1)
  return jnp.concatenate([first, jnp.take_along_axis(patches, chosen[..., None], axis=1)], axis=1)


def kept_patches(patches: int, drop: float) -> int:
  return max(1, round((1.0 - drop) * patches))


def build(model_cfg, dtype) -> ViT:
  """Builds a ViT from `config.model`: its rows' fields as they are (token_drop's domain is its row's), the sizes
  of its variant (like 'H/14')."""
  check_pool(model_cfg.pool, model_cfg.class_token)
  layers.check_activation(model_cfg.act)
  kernels.check_attention(model_cfg.attention)
  return ViT(
    **backbone.config_kwargs(ViT, model_rows("vit"), model_cfg), **parse_variant(model_cfg.variant), dtype=dtype
  )


# --------------------------------------------------------------------------- the family (backbone.py)


def train_flops_per_example(model: ViT) -> float:
  """3 x (patch embedding + the encoder on the patches it keeps (token_drop) + class token + the head); a NaFlex
  tower's at its square grid, the token budget of image_size / patch_size squared."""
  patches = (model.image_size // model.patch_size) ** 2
  encoded = kept_patches(patches, model.token_drop)
  forward = (
    2 * patches * model.patch_size**2 * 3 * model.width
    + backbone.transformer_forward_flops(encoded + model.num_prefix_tokens, model.width, model.depth, model.mlp_dim)
    + 2 * model.width * model.num_classes
  )
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
  """`params` with a (1, prefix + g*g, width) `pos_embed` of another grid resized bicubically to `model`'s grid."""
  out = dict(params)
  pos, target = params.get("pos_embed"), shapes.get("pos_embed")
  if pos is None or target is None or np.shape(pos) == tuple(target):
    return out
  if len(target) == np.ndim(pos) == 3 and np.shape(pos)[::2] == tuple(target)[::2] == (1, model.width):
    try:
      out["pos_embed"] = resize_pos_embed(np.asarray(pos), target[1], model.num_prefix_tokens)
    except ValueError:
      pass
  return out


def description(model: ViT) -> str:
  """One line naming `model`'s dims, patch, resolution and classes."""
  return (
    f"ViT width {model.width}, depth {model.depth}, MLP {model.mlp_dim}, {model.num_heads} heads, "
    f"patch {model.patch_size}, {model.image_size} px, {model.num_classes or 'no'} classes"
  )


def variant(model: ViT) -> str:
  """`parse_variant`'s spelling of `model`'s sizes: '<size>/<patch>', the size a key of SIZES or spelled out."""
  dims = (model.width, model.depth, model.mlp_dim, model.num_heads)
  size = next((size for size, named in SIZES.items() if named == dims), layers.size_spec(*dims))
  return f"{size}/{model.patch_size}"


FAMILY = backbone.Family(
  module=ViT,
  name="vit",
  build=build,
  hf_converter="hf_vit",
  train_flops_per_example=train_flops_per_example,
  num_layer_ids=num_layer_ids,
  layer_id=layer_id,
  adapt_checkpoint=adapt_checkpoint,
  description=description,
  variant=variant,
)
