"""Shared building blocks: fp32 LayerNorm, multi-head attention, MLP, stochastic depth, remat policies.

Every parameter carries logical axis names (see `parallel/sharding.py` for the rules that map them onto the
mesh). Parameters are fp32; `dtype` is the compute dtype. Norms, softmax and losses run in fp32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
from flax.core import meta
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax import config_lib
from visionfm_jax.parallel import sharding

Dtype = Any

# Logical axis names used by parameters and activations.
BATCH, LENGTH, EMBED, MLP, HEADS, KV, LAYERS, CLASSES = "batch", "length", "embed", "mlp", "heads", "kv", "layers", "classes"
VOCAB = "vocab"
ACT_EMBED, ACT_MLP, ACT_HEADS = "act_embed", "act_mlp", "act_heads"

# The remat policy of each name config_lib.REMAT_POLICIES allows (the one list); 'none' (no remat) has none.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    name: None if name == "none" else getattr(jax.checkpoint_policies, name) for name in config_lib.REMAT_POLICIES}


def logical(init: Callable[..., Any], names: tuple[str | None, ...]) -> Callable[..., Any]:
  return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Activation sharding constraint at a block boundary; a no-op outside `parallel.activation_sharding`."""
  mesh = sharding.activation_mesh()
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, names, mesh=mesh)


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` computed as one 2-D matmul when it is a dense layer's contraction (lhs's trailing axes
  against rhs's leading axes, in order, no batch axes): (..., K) @ (K, N). XLA's CPU backend runs the
  forward and backward of such a layer ~1.6x faster on the flattened form than on the multi-axis one (the
  qkv projection's (tokens, C) x (C, 3, heads, head_dim)); on GPU both compile to the same GEMM."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
  k = len(lhs_contract)
  is_dense = (not lhs_batch and not rhs_batch and lhs_contract == tuple(range(lhs.ndim - k, lhs.ndim))
              and rhs_contract == tuple(range(k)))
  if not is_dense:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  free_lhs, free_rhs = lhs.shape[:lhs.ndim - k], rhs.shape[k:]
  contract = math.prod(lhs.shape[lhs.ndim - k:])
  out = jax.lax.dot_general(lhs.reshape(-1, contract), rhs.reshape(contract, -1), (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)
  return out.reshape(free_lhs + free_rhs)


def sum_leading(x: jax.Array, num_axes: int) -> jax.Array:
  """Sums `x` over its first `num_axes` axes as a ones-vector matmul (fp32 accumulation, full precision).

  This is the gradient of every parameter broadcast over tokens (biases, norm scales, position embeddings and
  biases). XLA's CPU backend reduces over leading axes up to 50x slower than it multiplies by a ones vector
  (a (128, 3*196*196) sum: 170-260 ms vs 3 ms on 2 cores, jaxlib 0.10); on GPU both are a cheap pass."""
  if num_axes == 0:
    return x
  leading = tuple(range(num_axes))  # contracted in place (no reshape), so sharded axes stay as they are
  total = jax.lax.dot_general(jnp.ones(x.shape[:num_axes], x.dtype), x, ((leading, leading), ((), ())),
                              precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return total.astype(x.dtype)


def broadcast_leading(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`jnp.broadcast_to(x, shape)` for an `x` whose shape is a suffix of `shape` (a bias over tokens), whose
  gradient is `sum_leading` instead of XLA's reduction."""
  shape = tuple(shape)
  if tuple(shape[len(shape) - x.ndim:]) != tuple(x.shape):
    raise ValueError(f"broadcast_leading: {x.shape} is not a suffix of {shape}")
  return _broadcast_leading(x, shape, len(shape) - x.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _broadcast_leading(x, shape, num_leading):
  del num_leading
  return jnp.broadcast_to(x, shape)


def _broadcast_leading_fwd(x, shape, num_leading):
  return _broadcast_leading(x, shape, num_leading), None


def _broadcast_leading_bwd(shape, num_leading, _, grad):
  del shape
  return (sum_leading(grad, num_leading),)


_broadcast_leading.defvjp(_broadcast_leading_fwd, _broadcast_leading_bwd)


def _flat_init(init: Callable[..., Any], num_in: int) -> Callable[..., Any]:
  """Calls `init` with the (inputs, outputs) matrix shape and reshapes (as flax's DenseGeneral does), so a
  (C, 3, heads, head_dim) kernel has the fan-in/fan-out of a C x 3C matrix."""
  def wrapped(rng, shape, dtype=jnp.float32):
    flat = (math.prod(shape[:num_in]), math.prod(shape[num_in:])) if num_in else (math.prod(shape),)
    value = init(rng, flat, dtype)
    if isinstance(value, meta.AxisMetadata):
      return meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
    return jnp.reshape(value, shape)
  return wrapped


class Dense(nn.Module):
  """y = x . kernel + bias over the input axes `axis` (params `kernel` (in axes..., features...) and `bias`
  (features...), as flax's DenseGeneral). The product is one 2-D matmul (`flat_dot_general`) and the bias
  broadcasts with `broadcast_leading`, whose gradient is a matmul rather than XLA's slow CPU reduction."""
  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Any] = nn.initializers.xavier_uniform()
  bias_init: Callable[..., Any] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axes = tuple(sorted(a % x.ndim for a in axes))
    if axes != tuple(range(x.ndim - len(axes), x.ndim)):
      raise ValueError(f"Dense contracts trailing axes only; got axis={self.axis} for an input of rank {x.ndim}")
    kernel_shape = tuple(x.shape[a] for a in axes) + features
    kernel = self.param("kernel", _flat_init(self.kernel_init, len(axes)), kernel_shape, self.param_dtype)
    contract = tuple(range(len(axes)))
    y = flat_dot_general(x.astype(self.dtype), kernel.astype(self.dtype), ((axes, contract), ((), ())))
    if self.use_bias:
      bias = self.param("bias", _flat_init(self.bias_init, 0), features, self.param_dtype)
      y = y + broadcast_leading(bias.astype(self.dtype), y.shape)
    return y


def dense(features: int | tuple[int, ...], names: tuple[str | None, ...], dtype: Dtype, *, axis: int | tuple[int, ...] = -1,
          use_bias: bool = True, kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros,
          name: str | None = None) -> Dense:
  """A `Dense` whose kernel axes are `names` (input axes then output axes) and bias the output axes."""
  out_ndim = 1 if isinstance(features, int) else len(features)
  return Dense(features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
               kernel_init=logical(kernel_init, names), bias_init=logical(bias_init, names[-out_ndim:]), name=name)


def patchify_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                  feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for flax's NHWC x HWIO convolutions; a patch embedding (stride = kernel size,
  VALID, undilated) becomes patches @ kernel, which XLA's CPU backend differentiates ~2x faster than the strided
  convolution. Anything else goes to the convolution."""
  patch = tuple(rhs.shape[:-2])
  nhwc = (dimension_numbers is None or tuple(dimension_numbers.lhs_spec) == (0, lhs.ndim - 1) + tuple(range(1, lhs.ndim - 1)))
  undilated = all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  no_padding = padding == "VALID" or all(tuple(p) == (0, 0) for p in padding)
  divisible = all(size % p == 0 for size, p in zip(lhs.shape[1:-1], patch))
  if not (lhs.ndim == 4 and tuple(window_strides) == patch and nhwc and undilated and no_padding and divisible
          and feature_group_count == 1):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision)
  (b, h, w, c), (ph, pw) = lhs.shape, patch
  patches = lhs.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return flat_dot_general(patches, rhs, (((3, 4, 5), (0, 1, 2)), ((), ())), precision=precision)


def patch_embed(images, width: int, patch_size: int, dtype: Dtype, name: str = "patch_embed") -> jax.Array:
  """Non-overlapping patches -> (B, H/p, W/p, width) by a p x p, stride p conv with bias (call in a compact
  method: the conv's params land under `name` in the caller)."""
  if images.shape[1] % patch_size or images.shape[2] % patch_size:
    raise ValueError(f"image size {images.shape[1:3]} is not divisible by patch size {patch_size}")
  return nn.Conv(width, (patch_size,) * 2, strides=(patch_size,) * 2, padding="VALID", dtype=dtype,
                 param_dtype=jnp.float32, name=name, conv_general_dilated=patchify_conv,
                 kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, EMBED)),
                 bias_init=logical(nn.initializers.zeros, (EMBED,)))(images.astype(dtype))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis, in fp32 (fp16 squared norms overflow). Written with rsqrt of the
  clamped squared norm: `jnp.linalg.norm`'s gradient is 0/0 at an all-zero vector (a black patch in SwinV2's
  cosine attention), which made the whole step NaN; this is finite there, like torch's F.normalize."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def classifier_head(pooled, num_classes: int, bias_init: float = 0.0, name: str = "head") -> jax.Array:
  """The fp32 linear head of the classifiers: zero-initialised kernel, constant bias (call in a compact method)."""
  return dense(num_classes, (EMBED, CLASSES), jnp.float32, name=name, kernel_init=nn.initializers.zeros,
               bias_init=nn.initializers.constant(bias_init))(pooled)


class LayerNorm(nn.Module):
  """LayerNorm computed in fp32 whatever the compute dtype; output cast back to `dtype`. Params live under
  `ln/` (`scale`, `bias`)."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  axis_name: str = EMBED
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    scale_init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
    return _Normalize(self.epsilon, scale_init, self.axis_name, name="ln")(x).astype(self.dtype)


class _Normalize(nn.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in fp32; scale and bias broadcast with
  `broadcast_leading` (their gradients are matmuls)."""
  epsilon: float
  scale_init: Callable[..., Any]
  axis_name: str

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    width = x.shape[-1]
    scale = self.param("scale", logical(self.scale_init, (self.axis_name,)), (width,), jnp.float32)
    bias = self.param("bias", logical(nn.initializers.zeros, (self.axis_name,)), (width,), jnp.float32)
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    normed = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.epsilon)
    return normed * broadcast_leading(scale, x.shape) + broadcast_leading(bias, x.shape)


def dot_product_attention(q, k, v, *, bias=None, mask=None, causal: bool = False, implementation: str = "xla"):
  """Softmax attention over (B, T, H, D) inputs with 1/sqrt(D) scaling; softmax in fp32.

  `mask` (boolean, True = may attend) broadcasts to (B, H, T_q, T_k); `causal` lets query i see keys <= i.
  `implementation='cudnn'` routes to `jax.nn.dot_product_attention` (cuDNN flash attention on GPU), 'auto' to
  the same function letting JAX choose (cuDNN where it applies, else XLA); 'xla' to `softmax_attention`.
  """
  if implementation in ("cudnn", "auto"):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal,
                                        implementation="cudnn" if implementation == "cudnn" else None)
  if causal:
    below = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), jnp.bool_))
    mask = below if mask is None else jnp.logical_and(mask, below)
  heads_first = lambda t: jnp.swapaxes(t, 1, 2)
  scale = q.shape[-1] ** -0.5
  out = softmax_attention(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v),
                          bias=bias, mask=mask)
  return heads_first(out)


def softmax_attention(q, k, v, *, bias=None, mask=None):
  """softmax(q k^T + bias, masked) v over (..., H, T, D) inputs (q already scaled), logits and softmax in fp32.

  `bias` (differentiable) is an additive term whose shape is a suffix of (..., H, T_q, T_k) (a position bias
  (H, T_q, T_k), or per window (nW, H, T_q, T_k)); `mask` (boolean, True = may attend) broadcasts to the
  logits. A custom VJP written from the softmax's Jacobian: the backward is four batched matmuls and one
  elementwise pass, dS = P * (dP - rowsum(dO * O)), instead of the several passes over the (T_q, T_k)
  matrices autodiff makes of the softmax; the bias gradient is `sum_leading` of dS.
  """
  lead = q.ndim - 2
  if bias is not None and tuple(bias.shape) != tuple(q.shape[:lead] + (q.shape[-2], k.shape[-2]))[-bias.ndim:]:
    raise ValueError(f"attention bias {bias.shape} is not a suffix of the logits' shape "
                     f"{q.shape[:lead] + (q.shape[-2], k.shape[-2])}")
  return _softmax_attention(q, k, v, bias, mask)


def _attention_probs(q, k, bias, mask):
  logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  unnormalised = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)


@jax.custom_vjp
def _softmax_attention(q, k, v, bias, mask):
  return _softmax_attention_fwd(q, k, v, bias, mask)[0]


def _softmax_attention_fwd(q, k, v, bias, mask):
  probs = _attention_probs(q, k, bias, mask).astype(v.dtype)
  out = jnp.einsum("...qk,...kd->...qd", probs, v)
  return out, (q, k, v, probs, out, bias, mask)


def _softmax_attention_bwd(residuals, grad_out):
  q, k, v, probs, out, bias, mask = residuals
  grad_v = jnp.einsum("...qk,...qd->...kd", probs, grad_out)
  grad_probs = jnp.einsum("...qd,...kd->...qk", grad_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(grad_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  grad_logits = probs.astype(jnp.float32) * (grad_probs - row)
  grad_q = jnp.einsum("...qk,...kd->...qd", grad_logits.astype(q.dtype), k)
  grad_k = jnp.einsum("...qk,...qd->...kd", grad_logits.astype(q.dtype), q)
  grad_bias = None if bias is None else sum_leading(grad_logits, grad_logits.ndim - bias.ndim).astype(bias.dtype)
  grad_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
  return grad_q, grad_k, grad_v, grad_bias, grad_mask


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (kernel: embed x 3 x heads x head_dim).

  `causal`: token i attends to tokens <= i (text towers); `mask` as in `dot_product_attention`.
  Incremental decoding: with `cache` = {'k', 'v'} of shape (B, T_max, heads, head_dim), `x` holds the tokens
  at positions index..index+t-1; their keys and values are written into the cache, queries attend to cached
  positions up to their own, and the call returns (out, new cache) instead of out.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  qkv_bias: bool = True
  implementation: str = "xla"
  causal: bool = False

  @nn.compact
  def __call__(self, x, mask=None, cache=None, index=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    qkv = dense((3, self.num_heads, head_dim), (EMBED, None, HEADS, KV), self.dtype, use_bias=self.qkv_bias, name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    project = dense(width, (HEADS, KV, EMBED), self.dtype, axis=(-2, -1), name="out")
    if cache is not None:
      out, cache = cached_attention(q, k, v, cache, index)
      return project(out), cache
    out = dot_product_attention(q, k, v, mask=mask, causal=self.causal, implementation=self.implementation)
    out = constrain(out, (BATCH, LENGTH, ACT_HEADS, None))
    return project(out)


def init_kv_cache(batch: int, length: int, num_heads: int, head_dim: int, dtype: Dtype) -> dict[str, jax.Array]:
  """An empty {'k', 'v'} cache of `length` positions for `SelfAttention`."""
  zeros = jnp.zeros((batch, length, num_heads, head_dim), dtype)
  return {"k": zeros, "v": zeros}


def cached_attention(q, k, v, cache: dict[str, jax.Array], index):
  """Causal attention of t new tokens at positions index.. over a key/value cache; returns (out, new cache)."""
  t, length = q.shape[1], cache["k"].shape[1]
  k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
  v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
  visible = jnp.arange(length)[None, :] <= index + jnp.arange(t)[:, None]
  out = dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask=visible)
  return out, {"k": k_all, "v": v_all}


class CrossAttention(nn.Module):
  """Multi-head attention of queries `x` (..., T, width) over `memory` (B, M, memory width).

  `project_kv(memory)` -> (k, v) each (B, M, heads, head_dim); `__call__(x, memory=None, kv=None)` uses the
  given `kv` (cached across decoding steps) or projects `memory`. Returns (B, T, width).
  """
  width: int
  num_heads: int
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    head_dim = self.width // self.num_heads
    self.q = dense((self.num_heads, head_dim), (EMBED, HEADS, KV), self.dtype)
    self.kv = dense((2, self.num_heads, head_dim), (EMBED, None, HEADS, KV), self.dtype)
    self.out = dense(self.width, (HEADS, KV, EMBED), self.dtype, axis=(-2, -1))

  def project_kv(self, memory):
    kv = self.kv(memory)
    return kv[:, :, 0], kv[:, :, 1]

  def __call__(self, x, memory=None, kv=None):
    k, v = self.project_kv(memory) if kv is None else kv
    q = self.q(x)
    if q.ndim == 3:  # learned queries (T, width) shared by the batch
      q = jnp.broadcast_to(q, (k.shape[0],) + q.shape)
    out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype))
    return self.out(out)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, x * Phi(x), written as x/2 * (1 + erf(x / sqrt 2)) as in PyTorch and transformers.
  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA's CPU backend runs as three passes over the
  MLP activations (forward) where erf's polynomial fuses into one."""
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


class Mlp(nn.Module):
  """Linear -> exact GELU -> Linear."""
  hidden: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = dense(self.hidden, (EMBED, MLP), self.dtype, name="fc1", bias_init=nn.initializers.normal(1e-6))(x)
    y = gelu(y)
    y = constrain(y, (BATCH, LENGTH, ACT_MLP))
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    y = dense(width, (MLP, EMBED), self.dtype, name="fc2", bias_init=nn.initializers.normal(1e-6))(y)
    return nn.Dropout(self.dropout)(y, deterministic=self.deterministic)


def drop_path(module: nn.Module, x: jax.Array, rate, deterministic: bool) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per example with probability `rate`.

  `rate` may be a traced scalar (a per-layer rate fed through `nn.scan`).
  """
  if deterministic:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def stochastic_depth_rates(max_rate: float, depth: int) -> jnp.ndarray:
  """Rates rising linearly from 0 (first block) to `max_rate` (last block)."""
  if depth == 1:
    return jnp.full((1,), max_rate, jnp.float32)
  return jnp.linspace(0.0, max_rate, depth, dtype=jnp.float32)


def remat(block: type[nn.Module], policy: str) -> type[nn.Module]:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; known: {', '.join(REMAT_POLICIES)}")
  if policy == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=False)


def stack_blocks(block: type[nn.Module], *, depth: int, scan: bool, remat_policy: str, name: str,
                 num_broadcast: int = 0, with_outputs: bool = False, **block_kwargs):
  """Returns a function (x, per_block, *broadcast) -> x that runs `depth` blocks, scanned (one compiled body)
  or unrolled.

  `per_block` is an array (or pytree, or None) with a leading `depth` axis: block i receives `per_block[i]`
  (its stochastic-depth rate; for SwinV2 whether it shifts its windows; for decoders its key/value cache).
  The `num_broadcast` trailing arguments (masks, memories, decode positions) go to every block as they are.
  Each block returns (x, output); with `with_outputs` the runner returns (x, outputs stacked over blocks).
  Scanned params have a leading `layers` axis under `name`; unrolled params live under `{name}_{i}`. Both
  layouts hold the same numbers (`convert.stack_layers` / `unstack_layers` move between them).
  """
  block = remat(block, remat_policy)
  if scan:
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0,) + (nn.broadcast,) * num_broadcast, length=depth,
                      metadata_params={nn.PARTITION_NAME: LAYERS})(name=name, **block_kwargs)

    def run_scanned(x, per_block, *broadcast):
      x, outputs = scanned(x, per_block, *broadcast)
      return (x, outputs) if with_outputs else x
    return run_scanned

  blocks = [block(name=f"{name}_{i}", **block_kwargs) for i in range(depth)]

  def run_unrolled(x, per_block, *broadcast):
    outputs = []
    for i, b in enumerate(blocks):
      x, out = b(x, jax.tree.map(lambda a, i=i: a[i], per_block), *broadcast)
      outputs.append(out)
    if not with_outputs:
      return x
    return x, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs) if outputs and outputs[0] is not None else None
  return run_unrolled
