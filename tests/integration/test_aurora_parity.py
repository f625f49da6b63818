"""fp32 parity of Aurora's building blocks with PyTorch references we did not write (torch CPU).

  layers.CrossAttention      == torch.nn.MultiheadAttention(kdim=vdim=memory width), batch and learned queries
  aurora.AttentionalPooler   == LN(queries) -> MultiheadAttention(k=v=LN(tokens)) -> LN
  aurora.pixel_shuffle       == torch.nn.PixelShuffle on NCHW
  Aurora.reconstruct         == Conv2d(C, f*f*3, 1) + PixelShuffle(f) (the SimMIM head)
  text.TextTransformer(cls)  == torch.nn.TransformerEncoderLayer stack (norm_first, exact GELU) with a CLS token
                                appended, mask = causal AND key-not-pad (a position always sees itself)
  aurora.DecoderBlock        == causal self-attn + MLP, cross-attn + MLP from torch MultiheadAttention/Linear/GELU
  aurora.MultimodalDecoder   == that stack + final LN + bias-free vocabulary Linear (scanned and unrolled layouts)

Torch weights are random, LayerNorm scales and every bias included (default inits of 1 and 0 hide mapping
errors), and are copied into our param trees: Linear (out, in) -> kernel (in, out), split over heads where our
DenseGeneral kernels are (embed, [3|2,] heads, head_dim) or (heads, head_dim, embed). Each copied tree is
checked against the module's own `init` shapes. Mutation checks (k/v swapped, pad mask dropped, norm3/norm4
swapped, causal mask dropped, another pixel order) show that the comparisons can fail.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import config_lib
from visionfm_jax.convert import stack_layers
from visionfm_jax.data.text.tokenizer import BOS_ID, EOS_ID, PAD_ID
from visionfm_jax.models import aurora, layers, swinv2, text

torch = pytest.importorskip("torch")

jax.config.update("jax_default_matmul_precision", "highest")

ATOL = 1e-5
MUTATION = 1e-2  # a mutated reference must differ by at least this much


# --- torch -> our param trees ------------------------------------------------------------------------------------


def _np(t):
  return t.detach().numpy().astype(np.float32)


def _randomize(module, seed):
  """Every parameter random: LayerNorm scales 1 + 0.3 N, biases and 1-d tensors 0.3 N, matrices N / sqrt(fan_in)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(noise / math.sqrt(p.shape[-1]) if p.ndim >= 2 else 0.3 * noise)
    for m in module.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=gen))
  return module.eval()


def _ln(m):
  return {"ln": {"scale": _np(m.weight), "bias": _np(m.bias)}}


def _linear(m):
  out = {"kernel": _np(m.weight).T}
  if m.bias is not None:
    out["bias"] = _np(m.bias)
  return out


def _mlp(fc1, fc2):
  return {"fc1": _linear(fc1), "fc2": _linear(fc2)}


def _split_heads(weight, heads):
  """Linear weight (W, in) -> kernel (in, heads, head_dim)."""
  return _np(weight).T.reshape(weight.shape[1], heads, weight.shape[0] // heads)


def _qkv_weights(mha):
  """(q, k, v) projection weights (W, in) of a MultiheadAttention, fused (kdim == embed_dim) or separate."""
  if mha._qkv_same_embed_dim:  # pylint: disable=protected-access
    return mha.in_proj_weight.chunk(3)
  return mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight


def _out_proj(mha, heads):
  w = _np(mha.out_proj.weight)  # (W, W): out x (heads * head_dim)
  return {"kernel": w.T.reshape(heads, w.shape[1] // heads, w.shape[0]), "bias": _np(mha.out_proj.bias)}


def cross_attention_params(mha, *, swap_kv=False):
  """torch MultiheadAttention -> layers.CrossAttention params {'q', 'kv', 'out'}."""
  heads, width = mha.num_heads, mha.embed_dim
  wq, wk, wv = _qkv_weights(mha)
  bq, bk, bv = (_np(b) for b in mha.in_proj_bias.chunk(3))
  if swap_kv:
    wk, wv, bk, bv = wv, wk, bv, bk
  return {
    "q": {"kernel": _split_heads(wq, heads), "bias": bq.reshape(heads, width // heads)},
    "kv": {
      "kernel": np.stack([_split_heads(wk, heads), _split_heads(wv, heads)], axis=1),
      "bias": np.stack([bk, bv]).reshape(2, heads, width // heads),
    },
    "out": _out_proj(mha, heads),
  }


def self_attention_params(mha):
  """torch MultiheadAttention (fused in_proj, rows [q; k; v], head-major) -> layers.SelfAttention {'qkv', 'out'}."""
  heads, width = mha.num_heads, mha.embed_dim
  return {
    "qkv": {
      "kernel": _np(mha.in_proj_weight).T.reshape(width, 3, heads, width // heads),
      "bias": _np(mha.in_proj_bias).reshape(3, heads, width // heads),
    },
    "out": _out_proj(mha, heads),
  }


def _assert_same_layout(params, model, *args, method=None):
  """The copied tree has exactly the structure and shapes `model.init` makes."""
  init = functools.partial(model.init, method=method) if method else model.init
  expected = nn.unbox(jax.eval_shape(lambda: init(jax.random.key(0), *args)))["params"]
  shapes = lambda tree: jax.tree.map(lambda a: tuple(np.shape(a)), tree)  # noqa: E731
  assert shapes(params) == jax.tree.map(lambda a: a.shape, expected)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _mha(*args, **kwargs):
  return torch.nn.MultiheadAttention(*args, batch_first=True, **kwargs)


def _attend(mha, q, kv, mask=None):
  return mha(q, kv, kv, attn_mask=mask, need_weights=False)[0]


def _causal(length):
  """Bool attn_mask for torch: True = NOT allowed (keys after the query)."""
  return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)


RNG = np.random.default_rng(0)


def _randn(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


# --- 1. CrossAttention ---------------------------------------------------------------------------------------------

W, HEADS, MEM_W = 16, 4, 12  # memory width != W: torch keeps separate q/k/v projection weights


@pytest.fixture(scope="module")
def cross():
  mha = _randomize(_mha(W, HEADS, kdim=MEM_W, vdim=MEM_W), seed=1)
  assert not mha._qkv_same_embed_dim  # pylint: disable=protected-access
  return mha


def test_cross_attention_matches_torch(cross):
  model = layers.CrossAttention(W, HEADS)
  x, memory, learned = _randn(3, 5, W), _randn(3, 7, MEM_W), _randn(6, W)
  params = cross_attention_params(cross)
  _assert_same_layout(params, model, x, memory)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, memory))
  with torch.no_grad():
    ref = _np(_attend(cross, torch.from_numpy(x), torch.from_numpy(memory)))
    ref_learned = _np(_attend(cross, torch.from_numpy(learned).expand(3, -1, -1), torch.from_numpy(memory)))
  np.testing.assert_allclose(apply(params, x), ref, atol=ATOL, rtol=0)
  # Learned queries (T, W) shared by the batch.
  out = apply(params, learned)
  assert out.shape == (3, 6, W)
  np.testing.assert_allclose(out, ref_learned, atol=ATOL, rtol=0)
  # Cached keys/values (decoding) give the same output as projecting the memory.
  kv = jax.jit(lambda p: model.apply({"params": p}, memory, method=layers.CrossAttention.project_kv))(params)
  np.testing.assert_allclose(model.apply({"params": params}, x, kv=kv), ref, atol=ATOL, rtol=0)
  # Mutation: keys and values swapped.
  assert _max_diff(apply(cross_attention_params(cross, swap_kv=True), x), ref) > MUTATION


# --- 2. AttentionalPooler ------------------------------------------------------------------------------------------


class TorchPooler(torch.nn.Module):
  def __init__(self, width, num_queries, heads, token_width):
    super().__init__()
    self.queries = torch.nn.Parameter(torch.zeros(num_queries, width))
    self.norm_q = torch.nn.LayerNorm(width, eps=1e-5)
    self.norm_kv = torch.nn.LayerNorm(token_width, eps=1e-5)
    self.attn = _mha(width, heads, kdim=token_width, vdim=token_width)
    self.norm = torch.nn.LayerNorm(width, eps=1e-5)

  def forward(self, tokens):
    q = self.norm_q(self.queries).unsqueeze(0).expand(tokens.shape[0], -1, -1)
    return self.norm(_attend(self.attn, q, self.norm_kv(tokens)))

  def jax_params(self):
    return {
      "queries": _np(self.queries),
      "norm_q": _ln(self.norm_q),
      "norm_kv": _ln(self.norm_kv),
      "attn": cross_attention_params(self.attn),
      "norm": _ln(self.norm),
    }


@pytest.mark.parametrize("num_queries", [1, 5])
def test_attentional_pooler_matches_torch(num_queries):
  ref_model = _randomize(TorchPooler(W, num_queries, HEADS, MEM_W), seed=2 + num_queries)
  model = aurora.AttentionalPooler(W, num_queries, HEADS)
  tokens = 2.0 * _randn(3, 9, MEM_W) + 0.5
  params = ref_model.jax_params()
  _assert_same_layout(params, model, tokens)
  out = jax.jit(model.apply)({"params": params}, tokens)
  with torch.no_grad():
    ref = _np(ref_model(torch.from_numpy(tokens)))
  assert out.shape == (3, num_queries, W)
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


# --- 3, 4. pixel shuffle and the SimMIM head -----------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
def test_pixel_shuffle_matches_torch(factor):
  nchw = _randn(2, 3 * factor * factor, 3, 5)
  with torch.no_grad():
    ref = _np(torch.nn.PixelShuffle(factor)(torch.from_numpy(nchw))).transpose(0, 2, 3, 1)
  ours = aurora.pixel_shuffle(jnp.asarray(nchw.transpose(0, 2, 3, 1)), factor)
  assert ours.shape == (2, 3 * factor, 5 * factor, 3)
  np.testing.assert_array_equal(ours, ref)
  # Mutation: channels last within each output pixel (c fastest) is another order.
  b, h, w = 2, 3, 5
  other = nchw.transpose(0, 2, 3, 1).reshape(b, h, w, factor, factor, 3).transpose(0, 1, 3, 2, 4, 5)
  assert _max_diff(other.reshape(b, h * factor, w * factor, 3), ref) > MUTATION


def _tiny_aurora():
  """Stride 8 (patch 4, 2 stages), final width 16 = the text width, so the MIM head maps 16 -> 8*8*3."""
  encoder = swinv2.SwinV2(
    embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2, image_size=16, mask_token=True, scan=False
  )  # odd depths: unrolled
  text_tower = text.TextTransformer(**text.parse_variant("pico"), embed_dim=16, vocab_size=40, max_len=9, pool="cls")
  decoder = aurora.MultimodalDecoder(depth=1, num_heads=2, mlp_dim=64, vocab_size=40)
  return aurora.Aurora(encoder=encoder, text=text_tower, decoder=decoder, embed_dim=16, caption_queries=4)


@pytest.mark.parametrize("image_hw", [(16, 16), (24, 16)])
def test_mim_head_is_a_1x1_conv_and_pixel_shuffle(image_hw):
  model = _tiny_aurora()
  stride, channels = model.stride, 16
  assert stride == 8
  grid = (image_hw[0] // stride, image_hw[1] // stride)
  tokens = _randn(2, grid[0] * grid[1], channels)  # row-major over the (h, w) grid, as SwinV2 emits them
  conv = _randomize(torch.nn.Conv2d(channels, stride * stride * 3, 1), seed=5)
  params = {
    "mim_head": {"kernel": _np(conv.weight)[:, :, 0, 0].T, "bias": _np(conv.bias)},
    "logit_scale": np.float32(config_lib.LOGIT_SCALE_INIT),
  }
  _assert_same_layout(params, model, tokens, image_hw, method=aurora.Aurora.reconstruct)
  out = jax.jit(lambda p, t: model.apply({"params": p}, t, image_hw, method=aurora.Aurora.reconstruct))(params, tokens)
  with torch.no_grad():
    nchw = torch.from_numpy(tokens).reshape(2, *grid, channels).permute(0, 3, 1, 2)
    ref = _np(torch.nn.PixelShuffle(stride)(conv(nchw))).transpose(0, 2, 3, 1)
  assert out.shape == (2, *image_hw, 3)
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


# --- 5. the CoCa text encoder with a CLS token ---------------------------------------------------------------------

VOCAB, MAX_LEN, T_WIDTH, T_HEADS, T_DEPTH, EMBED = 40, 9, 32, 2, 2, 24


def _captions(rows, length):
  out = np.zeros((len(rows), length), np.int32)
  for i, words in enumerate(rows):
    seq = [BOS_ID, *words, EOS_ID]
    out[i, : len(seq)] = seq
  return out


# Different padding lengths (one row without padding), shorter than max_len so the CLS takes position L.
CAPTIONS = _captions([[4, 17, 9], [], [30, 31, 32, 33, 34], [39]], 7)


class TorchClsText(torch.nn.Module):
  """Tokens + a learned CLS appended, + positions (max_len + 1), pre-norm encoder layers, LN; CLS -> proj."""

  def __init__(self):
    super().__init__()
    self.token_embed = torch.nn.Embedding(VOCAB, T_WIDTH)
    self.pos_embed = torch.nn.Parameter(torch.zeros(MAX_LEN + 1, T_WIDTH))
    self.cls_token = torch.nn.Parameter(torch.zeros(T_WIDTH))
    self.blocks = torch.nn.ModuleList(
      torch.nn.TransformerEncoderLayer(
        T_WIDTH,
        T_HEADS,
        dim_feedforward=4 * T_WIDTH,
        dropout=0.0,
        activation="gelu",
        layer_norm_eps=1e-5,
        batch_first=True,
        norm_first=True,
      )
      for _ in range(T_DEPTH)
    )
    self.norm = torch.nn.LayerNorm(T_WIDTH, eps=1e-5)
    self.proj = torch.nn.Parameter(torch.zeros(T_WIDTH, EMBED))

  def forward(self, tokens, pad_mask=True):
    b, length = tokens.shape
    x = torch.cat([self.token_embed(tokens), self.cls_token.expand(b, 1, -1)], dim=1) + self.pos_embed[: length + 1]
    allowed = ~_causal(length + 1)[None]
    if pad_mask:
      keys = torch.cat([tokens != PAD_ID, torch.ones(b, 1, dtype=torch.bool)], dim=1)
      allowed = allowed & (keys[:, None, :] | torch.eye(length + 1, dtype=torch.bool))
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    mask = mask.expand(b, -1, -1).repeat_interleave(T_HEADS, dim=0)  # (B * heads, L+1, L+1), batch-major
    for block in self.blocks:
      x = block(x, src_mask=mask)
    x = self.norm(x)
    return {"tokens": x[:, :-1], "pooled": x[:, -1], "embedding": x[:, -1] @ self.proj}

  def jax_params(self, scan):
    blocks = {
      f"blocks_{i}": {
        "norm1": _ln(b.norm1),
        "attn": self_attention_params(b.self_attn),
        "norm2": _ln(b.norm2),
        "mlp": _mlp(b.linear1, b.linear2),
      }
      for i, b in enumerate(self.blocks)
    }
    params = {
      "token_embed": {"embedding": _np(self.token_embed.weight)},
      "pos_embed": _np(self.pos_embed),
      "cls_token": _np(self.cls_token),
      **blocks,
      "norm": _ln(self.norm),
      "proj": {"kernel": _np(self.proj)},
    }
    return stack_layers(params, T_DEPTH) if scan else params


def _torch_reference(module, *args, **kwargs):
  """Runs `module` on the documented (non-fused) path: the encoder layers' inference fast path is off."""
  fastpath = torch.backends.mha.get_fastpath_enabled()
  torch.backends.mha.set_fastpath_enabled(False)
  try:
    with torch.no_grad():
      return jax.tree.map(_np, module(*args, **kwargs))
  finally:
    torch.backends.mha.set_fastpath_enabled(fastpath)


@pytest.fixture(scope="module")
def torch_text():
  module = _randomize(TorchClsText(), seed=7)
  assert all(b.norm1.eps == b.norm2.eps == 1e-5 for b in module.blocks)
  assert module.blocks[0].activation is torch.nn.functional.gelu  # exact (erf) GELU
  return module


@pytest.mark.parametrize("scan", [True, False])
def test_cls_text_encoder_matches_torch(torch_text, scan):
  model = text.TextTransformer(
    T_WIDTH, T_DEPTH, T_HEADS, 4 * T_WIDTH, embed_dim=EMBED, vocab_size=VOCAB, max_len=MAX_LEN, pool="cls", scan=scan
  )
  params = torch_text.jax_params(scan)
  _assert_same_layout(params, model, CAPTIONS)
  ours = jax.jit(model.apply)({"params": params}, CAPTIONS)
  ref = _torch_reference(torch_text, torch.as_tensor(CAPTIONS, dtype=torch.long))
  assert ours["tokens"].shape == (4, 7, T_WIDTH) and ours["embedding"].shape == (4, EMBED)
  for key in ("tokens", "pooled", "embedding"):
    np.testing.assert_allclose(ours[key], ref[key], atol=ATOL, rtol=0, err_msg=key)
  if scan:  # Mutation: without the key-not-pad mask the CLS of every padded row sees its padding.
    loose = _torch_reference(torch_text, torch.as_tensor(CAPTIONS, dtype=torch.long), pad_mask=False)
    padded = [0, 1, 3]
    assert min(_max_diff(ours["pooled"][i], loose["pooled"][i]) for i in padded) > MUTATION
    np.testing.assert_allclose(ours["pooled"][2], loose["pooled"][2], atol=ATOL, rtol=0)  # no padding: same


def test_torch_fast_path_agrees_with_reference(torch_text):
  """The reference does not hinge on which torch kernel runs it (the fused inference path, masks included)."""
  tokens = torch.as_tensor(CAPTIONS, dtype=torch.long)
  with torch.no_grad():
    fast = jax.tree.map(_np, torch_text(tokens))
  slow = _torch_reference(torch_text, tokens)
  for key in fast:
    np.testing.assert_allclose(fast[key], slow[key], atol=ATOL, rtol=0, err_msg=key)


# --- 6. DecoderBlock and MultimodalDecoder -------------------------------------------------------------------------

D_WIDTH, D_HEADS, D_MLP, D_VOCAB, D_MEMORY = 16, 2, 40, 30, 5


class TorchDecoderBlock(torch.nn.Module):
  def __init__(self, causal=True):
    super().__init__()
    self.causal = causal
    for i in range(1, 5):
      setattr(self, f"norm{i}", torch.nn.LayerNorm(D_WIDTH, eps=1e-5))
    self.attn, self.cross_attn = _mha(D_WIDTH, D_HEADS), _mha(D_WIDTH, D_HEADS)
    mlp = lambda: torch.nn.Sequential(
      torch.nn.Linear(D_WIDTH, D_MLP),
      torch.nn.GELU(),  # noqa: E731
      torch.nn.Linear(D_MLP, D_WIDTH),
    )
    self.mlp, self.cross_mlp = mlp(), mlp()

  def forward(self, x, memory):
    y = self.norm1(x)
    x = x + _attend(self.attn, y, y, _causal(x.shape[1]) if self.causal else None)
    x = x + self.mlp(self.norm2(x))
    x = x + _attend(self.cross_attn, self.norm3(x), memory)
    return x + self.cross_mlp(self.norm4(x))

  def jax_params(self, swap_norms=False):
    norm3, norm4 = (self.norm4, self.norm3) if swap_norms else (self.norm3, self.norm4)
    return {
      "norm1": _ln(self.norm1),
      "attn": self_attention_params(self.attn),
      "norm2": _ln(self.norm2),
      "mlp": _mlp(self.mlp[0], self.mlp[2]),
      "norm3": _ln(norm3),
      "cross_attn": cross_attention_params(self.cross_attn),
      "norm4": _ln(norm4),
      "cross_mlp": _mlp(self.cross_mlp[0], self.cross_mlp[2]),
    }


class TorchDecoder(torch.nn.Module):
  def __init__(self, depth):
    super().__init__()
    self.blocks = torch.nn.ModuleList(TorchDecoderBlock() for _ in range(depth))
    self.norm = torch.nn.LayerNorm(D_WIDTH, eps=1e-5)
    self.vocab_proj = torch.nn.Linear(D_WIDTH, D_VOCAB, bias=False)

  def forward(self, x, memory):
    for block in self.blocks:
      x = block(x, memory)
    return self.vocab_proj(self.norm(x))

  def jax_params(self, scan):
    params = {
      **{f"blocks_{i}": b.jax_params() for i, b in enumerate(self.blocks)},
      "norm": _ln(self.norm),
      "vocab_proj": _linear(self.vocab_proj),
    }
    return stack_layers(params, len(self.blocks)) if scan else params


DEC_X, DEC_MEMORY = _randn(3, 6, D_WIDTH), _randn(3, D_MEMORY, D_WIDTH)


def test_decoder_block_matches_torch():
  ref_block = _randomize(TorchDecoderBlock(), seed=11)
  model = aurora.DecoderBlock(D_HEADS, D_MLP)
  params = ref_block.jax_params()
  _assert_same_layout(params, model, DEC_X, None, DEC_MEMORY)
  apply = jax.jit(lambda p: model.apply({"params": p}, DEC_X, None, DEC_MEMORY))
  out, cache = apply(params)
  assert cache is None
  ref = _torch_reference(ref_block, torch.from_numpy(DEC_X), torch.from_numpy(DEC_MEMORY))
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
  # Mutations: norm3 and norm4 swapped; self-attention without the causal mask.
  assert _max_diff(apply(ref_block.jax_params(swap_norms=True))[0], ref) > MUTATION
  ref_block.causal = False
  full = _torch_reference(ref_block, torch.from_numpy(DEC_X), torch.from_numpy(DEC_MEMORY))
  assert _max_diff(out, full) > MUTATION
  np.testing.assert_allclose(out[:, -1], full[:, -1], atol=ATOL, rtol=0)  # the last query sees everything anyway


@pytest.fixture(scope="module")
def torch_decoder():
  module = _randomize(TorchDecoder(2), seed=13)
  return module, _torch_reference(module, torch.from_numpy(DEC_X), torch.from_numpy(DEC_MEMORY))


@pytest.mark.parametrize("scan", [False, True])
def test_multimodal_decoder_matches_torch(torch_decoder, scan):
  ref_model, ref = torch_decoder
  model = aurora.MultimodalDecoder(depth=2, num_heads=D_HEADS, mlp_dim=D_MLP, vocab_size=D_VOCAB, scan=scan)
  params = ref_model.jax_params(scan)
  assert ("blocks" in params) == scan and ("blocks_1" in params) != scan
  _assert_same_layout(params, model, DEC_X, DEC_MEMORY)
  logits, cache = jax.jit(lambda p: model.apply({"params": p}, DEC_X, DEC_MEMORY))(params)
  assert cache is None and logits.shape == (3, 6, D_VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref, atol=ATOL, rtol=0)
