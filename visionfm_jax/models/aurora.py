"""Aurora-Vision-XL: a SwinV2 encoder with SimMIM, CoCa-style contrastive and captioning heads.

  tokens     = encoder(images [, mim mask])                        # SwinV2 stages, (B, N, 8C) after the final LN
  image_emb  = normalise(image_proj(contrastive_pool(tokens)))     # 1 learned query
  memory     = caption_pool(tokens)                                # `caption_queries` learned queries, (B, Q, W)
  text_emb, text_tokens = text(caption)                            # causal; a CLS token appended after the caption
  logits     = decoder(text_tokens, memory)                        # per layer: causal self-attention + MLP,
                                                                   # cross-attention to memory + MLP; LN; vocab
  recon      = pixel_shuffle(mim_head(masked tokens))              # 1x1 conv 8C -> stride^2 * 3, stride = 32

Attentional pooling (CoCa): learned queries cross-attend to the tokens with pre-LN on both sides, no residual
and no MLP, then LN. As in the CoCa paper the contrastive pooler (1 query) and the captioning pooler (256
queries) are separate. Width W of poolers, text encoder and decoder is the text width.

Which pass sees the masked image (`mim_view`):
  'separate' (default): the contrastive and captioning heads see the clean image; the masked image (mask token
    in 60% of the 32 px patches) feeds only the MIM head. Retrieval and captioning evaluate on clean images, so
    training them on clean images keeps train and test alike; the price is the masked view's encoder forward and
    backward (the encoder is ~80% of the model). Both views run as one encoder call on the batch twice over
    (`encode_views`).
  'shared': one pass on the masked image feeds all three heads (FLIP-style), ~40% cheaper per step, at the
    cost of aligning text with 40%-visible images.

Params: 'encoder', 'text', 'decoder', 'contrastive_pool', 'caption_pool', 'image_proj', 'mim_head',
'logit_scale'. Incremental decoding (`decode_step`) runs the text encoder and the decoder on new tokens with
key/value caches; the cross-attention keys and values of the memory are computed once, at the first step.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from visionfm_jax.config_lib import LOGIT_SCALE_INIT, MIM_VIEWS, model_rows
from visionfm_jax.models import backbone, layers, swinv2, towers
from visionfm_jax.models import text as text_lib
from visionfm_jax.models.layers import ACT_EMBED, BATCH, EMBED, LENGTH, VOCAB


class AttentionalPooler(nn.Module):
  """`num_queries` learned queries attend to `tokens` (pre-LN on both sides, no residual, no MLP), then LN."""

  width: int
  num_queries: int
  num_heads: int
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    queries = self.param(
      "queries", layers.logical(nn.initializers.normal(0.02), (None, EMBED)), (self.num_queries, self.width)
    )
    queries = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm_q")(queries)
    context = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm_kv")(tokens)
    pooled = layers.CrossAttention(self.width, self.num_heads, self.dtype, name="attn")(queries, context)
    return layers.LayerNorm(self.layer_norm_eps, jnp.float32, name="norm")(pooled)


class DecoderBlock(nn.Module):
  """Causal self-attention + MLP, then cross-attention to the image memory + MLP; all pre-norm residuals.

  `cache` is None in training, else {'k', 'v', 'cross_k', 'cross_v'} for incremental decoding; the cross
  keys/values are projected from `memory` when it is given and read from the cache when it is None.
  """

  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-5
  attention: str = "softmax"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cache, memory, index=None):
    width = x.shape[-1]
    norm = lambda name: layers.LayerNorm(self.layer_norm_eps, self.dtype, name=name)
    mlp = lambda name: layers.Mlp(self.mlp_dim, self.dtype, name=name)
    x = layers.constrain(x, (BATCH, LENGTH, ACT_EMBED))
    attn = layers.SelfAttention(self.num_heads, self.dtype, implementation=self.attention, causal=True, name="attn")
    if cache is None:
      x = x + attn(norm("norm1")(x))
    else:
      y, self_cache = attn(norm("norm1")(x), cache={"k": cache["k"], "v": cache["v"]}, index=index)
      x = x + y
    x = x + mlp("mlp")(norm("norm2")(x))

    cross = layers.CrossAttention(width, self.num_heads, self.dtype, fp8=True, name="cross_attn")
    if cache is None:
      x = x + cross(norm("norm3")(x), memory)
    else:
      k, v = cross.project_kv(memory) if memory is not None else (cache["cross_k"], cache["cross_v"])
      x = x + cross(norm("norm3")(x), kv=(k, v))
      dtype = cache["cross_k"].dtype
      cache = {**self_cache, "cross_k": k.astype(dtype), "cross_v": v.astype(dtype)}
    x = x + mlp("cross_mlp")(norm("norm4")(x))
    return x, cache


class MultimodalDecoder(nn.Module):
  """`depth` DecoderBlocks over the text encoder's token features, final LN, bias-free vocabulary projection."""

  depth: int
  num_heads: int
  mlp_dim: int
  vocab_size: int
  layer_norm_eps: float = 1e-5
  attention: str = "softmax"
  dtype: Any = jnp.float32
  scan: bool = True
  scan_unroll: int = 1  # blocks per iteration of the scanned loop; 0: all (layers.stack_blocks)
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x, memory, cache=None, index=None):
    """-> (fp32 logits (B, L, vocab), new cache or None)."""
    run_blocks = layers.stack_blocks(
      DecoderBlock,
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
    )
    x, cache = run_blocks(x, cache, memory, index)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(x)
    logits = layers.dense(
      self.vocab_size,
      (EMBED, VOCAB),
      self.dtype,
      use_bias=False,
      name="vocab_proj",
      kernel_init=nn.initializers.normal(x.shape[-1] ** -0.5),
    )(x)
    return logits.astype(jnp.float32), cache

  def init_cache(self, batch: int, length: int, memory_len: int, width: int) -> dict[str, jax.Array]:
    head_dim = width // self.num_heads
    cache = {
      **layers.init_kv_cache(batch, length, self.num_heads, head_dim, self.dtype),
      **{
        f"cross_{k}": v
        for k, v in layers.init_kv_cache(batch, memory_len, self.num_heads, head_dim, self.dtype).items()
      },
    }
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.depth,) + a.shape), cache)


def pixel_shuffle(x: jax.Array, factor: int, channels: int = 3) -> jax.Array:
  """(B, h, w, channels * f * f) -> (B, h*f, w*f, channels); channel c*f*f + i*f + j lands at (i, j) of c
  (torch.nn.PixelShuffle's order)."""
  return einops.rearrange(x, "b h w (c i j) -> b (h i) (w j) c", c=channels, i=factor, j=factor)


class Aurora(nn.Module):
  encoder: swinv2.SwinV2  # with mask_token, no head
  text: text_lib.TextTransformer  # pool='cls', projects to embed_dim
  decoder: MultimodalDecoder
  embed_dim: int
  caption_queries: int = 256
  logit_scale_init: float = LOGIT_SCALE_INIT
  mim_view: str = "separate"
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.mim_view not in MIM_VIEWS:
      raise ValueError(f"mim_view={self.mim_view!r}: expected one of {MIM_VIEWS}")
    if self.text.pool != "cls":
      raise ValueError(f"text.pool={self.text.pool!r}: Aurora's text encoder pools a CLS token ('cls')")
    if self.text.embed_dim != self.embed_dim:
      raise ValueError(f"the text encoder projects to {self.text.embed_dim}, Aurora's embed_dim is {self.embed_dim}")
    super().__post_init__()

  def setup(self):
    width, heads = self.text.width, self.text.num_heads
    self.contrastive_pool = AttentionalPooler(width, 1, heads, dtype=self.dtype)
    self.caption_pool = AttentionalPooler(width, self.caption_queries, heads, dtype=self.dtype)
    self.image_proj = layers.dense(
      self.embed_dim, (EMBED, None), jnp.float32, use_bias=False, kernel_init=nn.initializers.normal(width**-0.5)
    )
    self.mim_head = layers.dense(
      self.stride**2 * 3, (EMBED, None), self.dtype, kernel_init=nn.initializers.truncated_normal(0.02)
    )
    self.logit_scale = self.param(
      "logit_scale", layers.logical(nn.initializers.constant(self.logit_scale_init), ()), ()
    )

  @property
  def stride(self) -> int:
    """Pixels per final-stage token along each side: the encoder's output stride (32 for 4 stages of patch 4)."""
    return self.encoder.output_stride

  # ------------------------------------------------------------------------------------------- image side
  def encode(self, images, mim_mask=None, train: bool = False) -> jax.Array:
    """(B, H, W, 3) normalised images [and (B, gh, gw) 0/1 masks] -> (B, N, 8C) final tokens."""
    patch_mask = None
    if mim_mask is not None:
      grid = images.shape[1] // self.encoder.patch_size
      if grid % mim_mask.shape[1]:
        raise ValueError(f"mask grid {mim_mask.shape[1:]} does not divide the {grid}x{grid} patch grid")
      factor = grid // mim_mask.shape[1]
      patch_mask = jnp.repeat(jnp.repeat(mim_mask, factor, axis=1), factor, axis=2)
    return self.encoder(images, train=train, mask=patch_mask)["tokens"]

  def encode_views(self, images, mim_mask, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(clean, masked) final tokens of both views, as one encoder call on [images; images] with the masks [0; m]:
    the weights are read and their gradients written once, not twice, and each GEMM has twice the rows. An
    all-zero mask leaves a token as it is, and the first half's random draws (stochastic depth) are those of a
    call on the clean images alone (JAX's draws of a leading axis are prefixes of a longer one's), so the clean
    view is what `contrastive_features` computes."""
    both = self.encode(jnp.concatenate([images, images]), jnp.concatenate([jnp.zeros_like(mim_mask), mim_mask]), train)
    return both[: images.shape[0]], both[images.shape[0] :]

  def image_embedding(self, tokens) -> jax.Array:
    return layers.l2_normalize(self.image_proj(self.contrastive_pool(tokens)[:, 0].astype(jnp.float32)))

  def reconstruct(self, tokens, image_hw: tuple[int, int]) -> jax.Array:
    """Final tokens -> (B, H, W, 3) predicted normalised pixels (1x1 conv, pixel shuffle by the stride)."""
    h, w = -(-image_hw[0] // self.stride), -(-image_hw[1] // self.stride)
    pixels = self.mim_head(einops.rearrange(tokens, "b (h w) c -> b h w c", h=h, w=w))
    return pixel_shuffle(pixels.astype(jnp.float32), self.stride)[:, : image_hw[0], : image_hw[1]]

  def embed_images(self, images) -> jax.Array:
    return self.image_embedding(self.encode(images))

  def caption_memory(self, images) -> jax.Array:
    return self.caption_pool(self.encode(images))

  # -------------------------------------------------------------------------------------------- text side
  def embed_texts(self, tokens) -> jax.Array:
    return layers.l2_normalize(self.text(tokens)["embedding"])

  def caption_logits(self, tokens, memory, train: bool = False) -> jax.Array:
    """Teacher-forced (B, L, vocab) logits: position i predicts token i + 1."""
    return self.decoder(self.text(tokens, train=train)["tokens"], memory)[0]

  def describe(self, images, tokens) -> jax.Array:
    """Teacher-forced caption logits (B, L, vocab) of clean images (evaluation)."""
    return self.caption_logits(tokens, self.caption_memory(images))

  def reconstruct_masked(self, images, mim_mask) -> jax.Array:
    """The MIM head's (B, H, W, 3) prediction for masked images (evaluation)."""
    return self.reconstruct(self.encode(images, mim_mask), images.shape[1:3])

  def contrastive_features(self, images, tokens, mim_mask=None, train: bool = False):
    """(image_emb, text_emb) exactly as `__call__` computes them (same view, same dropout draws), forward only
    the contrastive path: the first pass of gradient accumulation."""
    view = mim_mask if mim_mask is not None and self.mim_view == "shared" else None
    image_emb = self.image_embedding(self.encode(images, view, train))
    return image_emb, layers.l2_normalize(self.text(tokens, train=train)["embedding"])

  def __call__(self, images, tokens, mim_mask=None, train: bool = False) -> dict[str, jax.Array]:
    """Every head on one batch. `mim_mask` (B, gh, gw) adds 'reconstruction' (B, H, W, 3)."""
    masked = None
    if mim_mask is not None and self.mim_view == "shared":
      clean = masked = self.encode(images, mim_mask, train)
    elif mim_mask is not None:
      clean, masked = self.encode_views(images, mim_mask, train)
    else:
      clean = self.encode(images, train=train)
    text_out = self.text(tokens, train=train)
    logits, _ = self.decoder(text_out["tokens"], self.caption_pool(clean))
    out = {
      "image_emb": self.image_embedding(clean),
      "text_emb": layers.l2_normalize(text_out["embedding"]),
      "logit_scale": self.logit_scale.astype(jnp.float32),
      "caption_logits": logits,
    }
    if masked is not None:
      out["reconstruction"] = self.reconstruct(masked, images.shape[1:3])
    return out

  # ------------------------------------------------------------------------------------------- generation
  def init_cache(self, batch: int, length: int | None = None) -> dict[str, Any]:
    """Empty caches for `decode_step` (length: max_len of the text encoder unless given)."""
    length = length or self.text.max_len
    return {
      "text": self.text.init_cache(batch, length),
      "decoder": self.decoder.init_cache(batch, length, self.caption_queries, self.text.width),
    }

  def decode_step(self, tokens, cache, index, memory=None):
    """Tokens (B, t) at positions index.. -> (logits (B, t, vocab), new cache). Pass the caption `memory` at
    the first step (its cross-attention keys/values are cached), None after."""
    text_out = self.text(tokens, cache=cache["text"], index=index)
    logits, decoder_cache = self.decoder(text_out["tokens"], memory, cache=cache["decoder"], index=index)
    return logits, {"text": text_out["cache"], "decoder": decoder_cache}


ENCODER = "swinv2"  # config.model.encoder has no name: the encoder is always a SwinV2


def encoder_config(model_cfg) -> ml_collections.ConfigDict:
  """`config.model.encoder` plus the fields Aurora sets for it (`towers.tower_config`)."""
  return towers.tower_config(model_cfg, "encoder", name=ENCODER)


def build(model_cfg, dtype) -> Aurora:
  """Builds Aurora from `config.model` (config_lib.model_config('aurora')); ValueErrors name the field."""
  try:
    encoder = swinv2.build(encoder_config(model_cfg), dtype)
  except ValueError as e:
    raise ValueError(f"encoder: {e}") from e
  encoder = encoder.clone(mask_token=True)
  if model_cfg.image_size % encoder.output_stride:
    raise ValueError(
      f"image_size={model_cfg.image_size} is not a multiple of the encoder's stride "
      f"{encoder.output_stride} "
      "(the MIM head predicts stride x stride pixels per final token)"
    )
  unroll = model_cfg.scan_unroll
  text = text_lib.build(
    model_cfg.text,
    model_cfg.embed_dim,
    dtype,
    scan=model_cfg.scan,
    remat_policy=model_cfg.remat_policy,
    scan_unroll=unroll,
  )
  decoder = MultimodalDecoder(
    depth=model_cfg.decoder_depth,
    num_heads=text.num_heads,
    mlp_dim=text.mlp_dim,
    vocab_size=text.vocab_size,
    layer_norm_eps=text.layer_norm_eps,
    attention=text.attention,
    dtype=dtype,
    scan=model_cfg.scan,
    scan_unroll=unroll,
    remat_policy=model_cfg.remat_policy,
  )
  return Aurora(
    **backbone.config_kwargs(Aurora, model_rows("aurora"), model_cfg),
    encoder=encoder,
    text=text,
    decoder=decoder,
    dtype=dtype,
  )


# --------------------------------------------------------------------------- the family (backbone.py)


def train_flops_per_example(model: Aurora) -> float:
  """The encoder (twice with mim_view='separate': clean and masked passes), poolers, MIM head, text encoder
  (max_len + CLS positions), decoder (self + cross attention, two MLPs), vocabulary projection; x 3.
  Recomputation (remat, the feature pass of accumulation) is not counted, as MFU conventionally does not."""
  encoder, text, decoder = model.encoder, model.text, model.decoder
  encoder_flops = swinv2.train_flops_per_example(encoder) * (2 if model.mim_view == "separate" else 1)
  tokens = (encoder.image_size // model.stride) ** 2
  final, width, memory, text_len = encoder.num_features, text.width, model.caption_queries, text.max_len

  def pooler(queries):
    return 2 * 2 * tokens * final * width + 2 * 2 * queries * width * width + 4 * queries * tokens * width

  forward = (
    pooler(1)
    + pooler(memory)
    + 2 * tokens * final * model.stride**2 * 3
    + 2 * width * model.embed_dim
    + backbone.transformer_forward_flops(text_len + 1, width, text.depth, text.mlp_dim)
    + 2 * width * text.embed_dim
    + backbone.transformer_forward_flops(text_len, width, decoder.depth, decoder.mlp_dim)
    + decoder.depth
    * (
      2 * text_len * width * (2 * width + 2 * decoder.mlp_dim)  # cross q/out, 2nd MLP
      + 4 * memory * width * width
      + 4 * text_len * memory * width
    )
    + 2 * text_len * width * decoder.vocab_size
  )
  return encoder_flops + 3.0 * forward


def adapt_checkpoint(model: Aurora, params: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """`params` with the encoder's adapted by it (backbone.py); the heads' do not depend on the resolution."""
  return towers.adapt_checkpoint("encoder", model.encoder, params, shapes)


def tower_fields(fields: dict[str, Any], key: str) -> dict[str, Any] | None:
  """The encoder's config fields in an Aurora config (a dict), completed as `encoder_config` completes them; None
  for another key (the text tower is no family's)."""
  return towers.tower_fields(fields, key, name=ENCODER) if key == "encoder" else None


FAMILY = backbone.Family(
  module=Aurora,
  name="aurora",
  build=build,
  train_flops_per_example=train_flops_per_example,
  adapt_checkpoint=adapt_checkpoint,
  tower_fields=tower_fields,
)
