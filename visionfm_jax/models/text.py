"""CLIP text transformer (Radford et al. 2021): the text tower of SwinV2-G-CLIP.

Token embedding plus a learned position embedding, then pre-norm blocks with causal self-attention

  x = x + attn(LN1(x))      # token i attends to tokens <= i
  x = x + mlp(LN2(x))       # exact GELU (or `act`: OpenAI's checkpoints use quick_gelu)

a final LayerNorm, the features of the end-of-text token (the first `eos_id` of each row; a row without one,
e.g. truncated, takes its last position), and a bias-free projection to `embed_dim`.

Tokens follow our tokenizer: pad 0, unk 1, bos 2, eos 3; BOS first, EOS last, padding after. Padding needs no
mask: it comes after the EOS, which the causal mask keeps it from influencing.

With `pool='cls'` (CoCa, Aurora's text encoder) a learned CLS token follows the caption instead; it sees the
caption's tokens and not its padding (`cls_attention_mask`), and its features are pooled.

`__call__(tokens, train=False)` returns `tokens` (B, L, W) after the final norm, `pooled` (B, W) the EOS (or
CLS) features and `embedding` (B, embed_dim), projected, not normalised. With `cache` (from `init_cache`) and
`index` it decodes incrementally instead and returns {'tokens', 'cache'}. Norms, softmax, pooling and the projection
run in fp32; the blocks in `dtype`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from visionfm_jax.config_lib import TEXT_POOLS, custom_size, model_rows
from visionfm_jax.models import backbone, kernels, layers
from visionfm_jax.models.layers import ACT_EMBED, BATCH, EMBED, LENGTH, VOCAB
from visionfm_jax.token_ids import EOS_ID, PAD_ID, SPECIAL_IDS, eos_positions

# name: (width, depth, heads); the MLP is 4 x width.
SIZES: dict[str, tuple[int, int, int]] = {
  "pico": (32, 2, 2),  # unit tests
  "mu": (64, 3, 4),  # CPU demos
  "B": (512, 12, 8),  # CLIP's text tower
  "L": (768, 12, 12),
  "H": (1024, 24, 16),  # the large text tower: 77 tokens
  "XL": (1024, 16, 16),  # Aurora-Vision-XL's text encoder (its decoder: 16 more such layers + cross-attention)
}


def parse_variant(variant: str) -> dict[str, int]:
  """'H' -> width, depth, num_heads, mlp_dim; or the sizes spelled out, '<width>x<depth>x<mlp>x<heads>'
  (`config_lib.custom_size`)."""
  if variant in SIZES:
    width, depth, heads = SIZES[variant]
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width)
  dims = custom_size(variant)
  if dims is None:
    raise ValueError(f"text.variant={variant!r}: expected one of {list(SIZES)} or '<width>x<depth>x<mlp>x<heads>'")
  width, depth, mlp_dim, heads = dims
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim)


class CausalBlock(nn.Module):
  """Pre-norm transformer block with causal self-attention; `cache` (or None) for incremental decoding."""

  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-5
  attention: str = "softmax"
  dtype: Any = jnp.float32
  act: str = "gelu"  # layers.ACTIVATIONS

  @nn.compact
  def __call__(self, x, cache, mask=None, index=None):
    x = layers.constrain(x, (BATCH, LENGTH, ACT_EMBED))
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm1")(x)
    attn = layers.SelfAttention(self.num_heads, self.dtype, implementation=self.attention, causal=True, name="attn")
    if cache is None:
      y = attn(y, mask=mask)
    else:
      y, cache = attn(y, cache=cache, index=index)
    x = x + y
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm2")(x)
    return x + layers.Mlp(self.mlp_dim, self.dtype, act=self.act, name="mlp")(y), cache


def cls_attention_mask(tokens: jax.Array, pad_id: int = PAD_ID) -> jax.Array:
  """(B, 1, L+1, L+1) mask for tokens followed by a CLS token: no position attends to padding keys (a padding
  query still sees itself). Combined with the causal mask, the CLS sees exactly the caption's tokens."""
  keys = jnp.concatenate([tokens != pad_id, jnp.ones((tokens.shape[0], 1), bool)], axis=1)
  itself = jnp.eye(keys.shape[1], dtype=bool)
  return keys[:, None, None, :] | itself[None, None]


class TextTransformer(nn.Module):
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  embed_dim: int = 512
  vocab_size: int = 32000
  max_len: int = 77
  eos_id: int = EOS_ID
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  scan: bool = True
  scan_unroll: int = 1  # blocks per iteration of the scanned loop; 0: all (layers.stack_blocks)
  remat_policy: str = "none"
  attention: str = "softmax"  # kernels.ATTENTION
  pool: str = "eos"  # eos: the first EOS token (CLIP) | cls: a learned token appended after the caption (CoCa)
  act: str = "gelu"  # the MLPs' activation, layers.ACTIVATIONS (OpenAI's CLIP: quick_gelu)

  def __post_init__(self):
    if self.pool not in TEXT_POOLS:
      raise ValueError(f"pool={self.pool!r}: expected 'eos' (CLIP) or 'cls' (CoCa)")
    super().__post_init__()

  def size_name(self) -> str:
    """The `parse_variant` spelling of this tower's sizes: a key of SIZES when one matches."""
    named = next(
      (
        k
        for k, (w, d, h) in SIZES.items()
        if (w, d, h, 4 * w) == (self.width, self.depth, self.num_heads, self.mlp_dim)
      ),
      None,
    )
    return named or layers.size_spec(self.width, self.depth, self.mlp_dim, self.num_heads)

  @nn.compact
  def __call__(self, tokens, train: bool = False, cache=None, index=None):
    """`cache` (from `init_cache`) switches to incremental decoding of tokens at positions index..: returns
    {'tokens', 'cache'} (no pooling, no CLS)."""
    del train  # no dropout or stochastic depth in the text tower
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens of shape {tokens.shape}: expected (batch, length <= max_len={self.max_len})")
    length = tokens.shape[1]
    x = nn.Embed(
      self.vocab_size,
      self.width,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="token_embed",
      embedding_init=layers.logical(nn.initializers.normal(0.02), (VOCAB, EMBED)),
    )(tokens)
    positions = self.max_len + (self.pool == "cls")
    pos = self.param("pos_embed", layers.logical(nn.initializers.normal(0.01), (None, EMBED)), (positions, self.width))
    run_blocks = layers.stack_blocks(
      CausalBlock,
      depth=self.depth,
      scan=self.scan,
      unroll=self.scan_unroll,
      remat_policy=self.remat_policy,
      name="blocks",
      num_broadcast=2,
      with_outputs=True,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      layer_norm_eps=self.layer_norm_eps,
      attention=self.attention,
      dtype=self.dtype,
      act=self.act,
    )
    final_norm = layers.LayerNorm(self.layer_norm_eps, jnp.float32, name="norm")

    if cache is not None:
      x = x + jax.lax.dynamic_slice_in_dim(pos, index, length).astype(x.dtype)
      x, cache = run_blocks(x, cache, None, index)
      return {"tokens": final_norm(x), "cache": cache}

    mask = None
    if self.pool == "cls":
      cls = self.param("cls_token", layers.logical(nn.initializers.normal(0.02), (EMBED,)), (self.width,))
      x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))], axis=1)
      mask = cls_attention_mask(tokens)
    x = x + pos[: x.shape[1]].astype(x.dtype)
    x, _ = run_blocks(x, None, mask, None)
    x = final_norm(x)

    if self.pool == "cls":
      pooled, x = x[:, -1], x[:, :-1]
    else:
      pooled = jnp.take_along_axis(x, eos_positions(tokens, self.eos_id)[:, None, None], axis=1)[:, 0]
    embedding = layers.dense(
      self.embed_dim,
      (EMBED, None),
      jnp.float32,
      use_bias=False,
      name="proj",
      kernel_init=nn.initializers.normal(self.width**-0.5),
    )(pooled)
    return {"tokens": x, "pooled": pooled, "embedding": embedding}

  def init_cache(self, batch: int, length: int | None = None) -> dict[str, jax.Array]:
    """An empty key/value cache for incremental decoding: per block {'k', 'v'}, layers leading."""
    cache = layers.init_kv_cache(
      batch, length or self.max_len, self.num_heads, self.width // self.num_heads, self.dtype
    )
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.depth,) + a.shape), cache)


def build(text_cfg, embed_dim: int, dtype, *, scan: bool, remat_policy: str, scan_unroll: int = 1) -> TextTransformer:
  """Builds the text tower from `config.model.text` (variant: a key of SIZES); raises ValueError naming the field."""
  sizes = parse_variant(text_cfg.variant)
  special = max(*SPECIAL_IDS, int(text_cfg.eos_id))
  if text_cfg.vocab_size <= special:
    raise ValueError(
      f"text.vocab_size={text_cfg.vocab_size}: must exceed the special token ids (eos_id="
      f"{text_cfg.eos_id}; pad 0, unk 1, bos 2, eos 3)"
    )
  kernels.check_attention(text_cfg.attention, "text.attention")
  layers.check_activation(text_cfg.act, "text.act")
  try:
    return TextTransformer(
      **backbone.config_kwargs(TextTransformer, model_rows("clip")["text"], text_cfg),
      **sizes,
      embed_dim=embed_dim,
      dtype=dtype,
      scan=scan,
      scan_unroll=scan_unroll,
      remat_policy=remat_policy,
    )
  except ValueError as e:  # its message starts with the field's name
    raise ValueError(f"text.{e}") from e
