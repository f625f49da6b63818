"""Shared building blocks: dense layers, fp32 LayerNorm, multi-head attention, MLP, stochastic depth, remat policies.

Every parameter carries logical axis names (see `parallel/sharding.py` for the rules that map them onto the
mesh). Parameters are fp32; `dtype` is the compute dtype. Norms, softmax and losses run in fp32. Where a primitive
has a faster form on the CPU, models/kernels.py picks it; the modules here never choose.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable

from flax.core import meta
import flax.linen as nn
import jax
import jax.numpy as jnp

from visionfm_jax import config_lib
from visionfm_jax.models import fp8 as fp8_lib
from visionfm_jax.models import kernels as kernels_lib
from visionfm_jax.parallel import sharding

Dtype = Any

# Logical axis names used by parameters and activations.
BATCH, LENGTH, EMBED, MLP, HEADS, KV = "batch", "length", "embed", "mlp", "heads", "kv"
LAYERS, CLASSES, VOCAB = "layers", "classes", "vocab"
ACT_EMBED, ACT_MLP, ACT_HEADS = "act_embed", "act_mlp", "act_heads"


def _remat_policy(name: str) -> Callable[..., bool] | None:
  if name == "none":
    return None
  if name == "dots_with_no_batch_dims_and_attention_saveable":
    return kernels_lib.saving_cudnn_attention(jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return getattr(jax.checkpoint_policies, name)


# The remat policy of each name config_lib.REMAT_POLICIES allows (the one list); 'none' (no remat) has none.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  name: _remat_policy(name) for name in config_lib.REMAT_POLICIES
}


def logical(init: Callable[..., Any], names: tuple[str | None, ...]) -> Callable[..., Any]:
  return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Activation sharding constraint at a block boundary; a no-op outside `parallel.activation_sharding`."""
  sharding.check_axis_names(names, sharding.ACTIVATION_AXES, "activation")
  mesh = sharding.activation_mesh()
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, names, mesh=mesh)


def _flat_init(init: Callable[..., Any], num_in: int) -> Callable[..., Any]:
  """Calls `init` with the (inputs, outputs) matrix shape and reshapes (as flax's DenseGeneral does), so a
  (C, 3, heads, head_dim) kernel has the fan-in/fan-out of a C x 3C matrix."""

  def wrapped(rng, shape, dtype=jnp.float32):
    flat = (math.prod(shape[:num_in]), math.prod(shape[num_in:])) if num_in else (math.prod(shape),)
    value = init(rng, flat, dtype)
    if isinstance(value, meta.AxisMetadata):  # reshaped before its names (and their constraint) apply
      return value.replace_boxed(jnp.reshape(value.unbox(apply_constraint=False), shape))
    return jnp.reshape(value, shape)

  return wrapped


class Dense(nn.Module):
  """y = x . kernel + bias over the input axes `axis` (params `kernel` (in axes..., features...) and `bias`
  (features...), as flax's DenseGeneral), computed as one 2-D product with a 1-D bias (`kernels.flat_dense`)."""

  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Any] = nn.initializers.xavier_uniform()
  bias_init: Callable[..., Any] = nn.initializers.zeros
  # The first feature axis indexes separate projections (q, k, v of one kernel): a tuple of one product each,
  # so each lands contiguous, where slicing one fused output would copy them (cuDNN attention takes them apart).
  separate: bool = False
  fp8: bool = False  # a block's GEMM: FP8 where the program is traced under an FP8 recipe (models/fp8.py)
  # False: in the compute dtype under 'fp8_delayed' (an attention's output projection, K = N = width, where
  # Transformer Engine's profile finds FP8 pays least: models/fp8.py)
  fp8_delayed: bool = True

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axes = tuple(sorted(a % x.ndim for a in axes))
    if axes != tuple(range(x.ndim - len(axes), x.ndim)):
      raise ValueError(f"Dense contracts trailing axes only; got axis={self.axis} for an input of rank {x.ndim}")
    kernel_shape = tuple(x.shape[a] for a in axes) + features
    kernel = self.param("kernel", _flat_init(self.kernel_init, len(axes)), kernel_shape, self.param_dtype)
    bias = self.param("bias", _flat_init(self.bias_init, 0), features, self.param_dtype) if self.use_bias else None
    x = x.astype(self.dtype)
    cast = lambda a: None if a is None else a.astype(self.dtype)
    recipe = fp8_lib.active() if self.fp8 else None
    recipe = None if recipe == fp8_lib.DELAYED and not self.fp8_delayed else recipe
    matmul = fp8_lib.matmul_of(recipe, self._amax_histories() if recipe == fp8_lib.DELAYED else None)
    if not self.separate:
      return kernels_lib.flat_dense(x, cast(kernel), cast(bias), len(axes), matmul)
    if recipe:  # one FP8 GEMM under one scale, then split: XLA merges separate products sharing x into one dot
      # of their dequantized weights concatenated, which no FP8 GEMM takes, and runs it in the compute dtype
      y = kernels_lib.flat_dense(x, cast(kernel), cast(bias), len(axes), matmul)
      return tuple(y[(Ellipsis, i) + (slice(None),) * (len(features) - 1)] for i in range(features[0]))
    pick = lambda i: (slice(None),) * len(axes) + (i,)
    return tuple(
      kernels_lib.flat_dense(x, cast(kernel[pick(i)]), None if bias is None else cast(bias[i]), len(axes), matmul)
      for i in range(features[0])
    )

  def _amax_histories(self) -> tuple[jax.Array, jax.Array]:
    """(input, gradient) amax histories of delayed FP8 scaling (models/fp8.py): fresh ones in the HISTORY
    collection at init; the train step's, merged into the params (`fp8.with_histories`), when applied."""
    names = (fp8_lib.INPUT_HISTORY, fp8_lib.GRAD_HISTORY)
    if self.is_initializing():
      return tuple(self.variable(fp8_lib.HISTORY, n, fp8_lib.fresh_history).value for n in names)
    if not all(self.has_variable("params", n) for n in names):
      raise ValueError(
        f"{'/'.join(self.path)}: precision.gemm={fp8_lib.DELAYED} needs the layer's amax histories "
        f"among its params (fp8.with_histories)"
      )
    return tuple(self.get_variable("params", n) for n in names)


def dense(
  features: int | tuple[int, ...],
  names: tuple[str | None, ...],
  dtype: Dtype,
  *,
  axis: int | tuple[int, ...] = -1,
  use_bias: bool = True,
  kernel_init=nn.initializers.xavier_uniform(),
  bias_init=nn.initializers.zeros,
  separate: bool = False,
  name: str | None = None,
  fp8: bool = False,
  fp8_delayed: bool = True,
) -> Dense:
  """A `Dense` whose kernel axes are `names` (input axes then output axes) and bias the output axes; `fp8`: one of
  a block's GEMMs, `fp8_delayed` False leaving it out of 'fp8_delayed' (models/fp8.py)."""
  out_ndim = 1 if isinstance(features, int) else len(features)
  return Dense(
    features=features,
    axis=axis,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=logical(kernel_init, names),
    bias_init=logical(bias_init, names[-out_ndim:]),
    separate=separate,
    name=name,
    fp8=fp8,
    fp8_delayed=fp8_delayed,
  )


def patch_embed(
  images, width: int, patch_size: int, dtype: Dtype, name: str = "patch_embed", use_bias: bool = True
) -> jax.Array:
  """Non-overlapping patches -> (B, H/p, W/p, width) by a p x p, stride p conv, with a bias unless `use_bias`
  is False (CLIP's) (call in a compact method: the conv's params land under `name` in the caller)."""
  if images.shape[1] % patch_size or images.shape[2] % patch_size:
    raise ValueError(f"image size {images.shape[1:3]} is not divisible by patch size {patch_size}")
  return nn.Conv(
    width,
    (patch_size,) * 2,
    strides=(patch_size,) * 2,
    padding="VALID",
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
    conv_general_dilated=kernels_lib.patch_conv,
    use_bias=use_bias,
    kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, EMBED)),
    bias_init=logical(nn.initializers.zeros, (EMBED,)),
  )(images.astype(dtype))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis, in fp32 (fp16 squared norms overflow). Written with rsqrt of the
  clamped squared norm: `jnp.linalg.norm`'s gradient is 0/0 at an all-zero vector (a black patch in SwinV2's
  cosine attention), which made the whole step NaN; this is finite there, like torch's F.normalize."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def classifier_head(pooled, num_classes: int, bias_init: float = 0.0, name: str = "head") -> jax.Array:
  """The fp32 linear head of the classifiers: zero-initialised kernel, constant bias (call in a compact method)."""
  return dense(
    num_classes,
    (EMBED, CLASSES),
    jnp.float32,
    name=name,
    kernel_init=nn.initializers.zeros,
    bias_init=nn.initializers.constant(bias_init),
  )(pooled)


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
    return _Normalize(self.epsilon, scale_init, self.axis_name, self.dtype, name="ln")(x)


class _Normalize(nn.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in fp32, returned in `dtype`."""

  epsilon: float
  scale_init: Callable[..., Any]
  axis_name: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", logical(self.scale_init, (self.axis_name,)), (width,), jnp.float32)
    bias = self.param("bias", logical(nn.initializers.zeros, (self.axis_name,)), (width,), jnp.float32)
    return kernels_lib.layer_norm(x, scale, bias, self.epsilon, self.dtype)


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
  implementation: str = "softmax"  # kernels.ATTENTION
  causal: bool = False
  kv_length: int | None = None  # the first kv_length tokens are real, the rest `pad_tokens`' padding

  @nn.compact
  def __call__(self, x, mask=None, cache=None, index=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    q, k, v = dense(
      (3, self.num_heads, head_dim),
      (EMBED, None, HEADS, KV),
      self.dtype,
      use_bias=self.qkv_bias,
      separate=True,
      name="qkv",
      fp8=True,
    )(x)
    project = dense(width, (HEADS, KV, EMBED), self.dtype, axis=(-2, -1), name="out", fp8=True, fp8_delayed=False)
    if cache is not None:
      out, cache = cached_attention(q, k, v, cache, index)
      return project(out), cache
    out = kernels_lib.attention(
      q, k, v, mask=mask, causal=self.causal, implementation=self.implementation, kv_length=self.kv_length
    )
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
  out = kernels_lib.attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask=visible)
  return out, {"k": k_all, "v": v_all}


class CrossAttention(nn.Module):
  """Multi-head attention of queries `x` (..., T, width) over `memory` (B, M, memory width).

  `project_kv(memory)` -> (k, v) each (B, M, heads, head_dim); `__call__(x, memory=None, kv=None)` uses the
  given `kv` (cached across decoding steps) or projects `memory`. Returns (B, T, width).
  """

  width: int
  num_heads: int
  dtype: Dtype = jnp.float32
  fp8: bool = False  # a block's (a decoder's), whose projections may run in FP8 (models/fp8.py)

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    head_dim = self.width // self.num_heads
    self.q = dense((self.num_heads, head_dim), (EMBED, HEADS, KV), self.dtype, fp8=self.fp8)
    self.kv = dense((2, self.num_heads, head_dim), (EMBED, None, HEADS, KV), self.dtype, fp8=self.fp8)
    self.out = dense(self.width, (HEADS, KV, EMBED), self.dtype, axis=(-2, -1), fp8=self.fp8)

  def project_kv(self, memory):
    kv = self.kv(memory)
    return kv[:, :, 0], kv[:, :, 1]

  def __call__(self, x, memory=None, kv=None):
    k, v = self.project_kv(memory) if kv is None else kv
    q = self.q(x)
    if q.ndim == 3:  # learned queries (T, width) shared by the batch
      q = jnp.broadcast_to(q, (k.shape[0],) + q.shape)
    out = kernels_lib.attention(q, k.astype(q.dtype), v.astype(q.dtype))
    return self.out(out)


def size_spec(width: int, depth: int, mlp_dim: int, heads: int) -> str:
  """The inverse of `config_lib.custom_size`."""
  return f"{width}x{depth}x{mlp_dim}x{heads}"


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x): OpenAI CLIP's approximation of GELU, which its checkpoints were trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x Phi(x) (`jax.nn.gelu(x, approximate=False)`, the same values), whose backward keeps only x.

  A memory plan, not a backend trick: autodiff of x * erfc(-x / sqrt 2) / 2 keeps the erfc term beside x, one more
  (tokens, mlp) tensor written in the forward and read in the backward of every MLP. Here the backward recomputes
  Phi and phi from x, in fp32, inside the fusion that reads x and the incoming gradient anyway."""
  return nn.gelu(x, approximate=False)


def _gelu_fwd(x):
  return nn.gelu(x, approximate=False), x


def _gelu_bwd(x, g):
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * jax.lax.erfc(-x32 * math.sqrt(0.5))
  pdf = jnp.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
  # The slope rounded to g's dtype before the product: an fp32 product left XLA writing it, 4 bytes an element,
  # for the FP8 quantization's max and cast to read.
  return (g * (cdf + x32 * pdf).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# The MLPs' activations by config name ('gelu' is exact, erf; transformers calls the others the same).
# 'gelu_pytorch_tanh', GELU's tanh approximation, changes the math (by up to 4.7e-4 per activation): an opt-in GPU
# speed candidate (a cheaper epilogue for XLA's GEMM fusions; launch/bench_gpu.sh leads measures it), never a
# default.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": gelu,
  "quick_gelu": quick_gelu,
  "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}


def check_activation(act: str, field: str = "act") -> str:
  """`act` when it is a key of ACTIVATIONS, else a ValueError naming `field`."""
  if act not in ACTIVATIONS:
    raise ValueError(f"{field}={act!r}: expected one of {tuple(ACTIVATIONS)}")
  return act


class Mlp(nn.Module):
  """Linear -> activation (exact GELU unless `act` names another of ACTIVATIONS) -> Linear."""

  hidden: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  deterministic: bool = True
  act: str = "gelu"

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = dense(self.hidden, (EMBED, MLP), self.dtype, name="fc1", bias_init=nn.initializers.normal(1e-6), fp8=True)(x)
    y = ACTIVATIONS[self.act](y)
    y = constrain(y, (BATCH, LENGTH, ACT_MLP))
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    y = dense(width, (MLP, EMBED), self.dtype, name="fc2", bias_init=nn.initializers.normal(1e-6), fp8=True)(y)
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


def remat(block: type[nn.Module], policy: str, prevent_cse: bool = False) -> type[nn.Module]:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; known: {', '.join(REMAT_POLICIES)}")
  if policy == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)


def check_scan_unroll(unroll: int) -> int:
  if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 0:
    raise ValueError(f"scan_unroll={unroll!r}: expected blocks per loop iteration >= 1, or 0 for the whole stack")
  return unroll


_ROLLED = contextvars.ContextVar("rolled_stacks", default=False)


@contextlib.contextmanager
def rolled_stacks():
  """Within it every scanned stack runs as a rolled loop (lax.scan's unroll 1) whatever its `unroll`. The params
  do not depend on the form (`stack_blocks`), so the state's init traces the rolled one: straight-line, a stack's
  init would be one copy of a block's random draws per block for XLA to compile."""
  token = _ROLLED.set(True)
  try:
    yield
  finally:
    _ROLLED.reset(token)


def straight_line_blocks(depth: int, scan: bool, unroll: int) -> bool:
  """Whether some block of a stack runs outside a loop: unrolled, a scan unrolled whole (`unroll` 0 or >= depth,
  which includes a one-block stack: XLA inlines a loop of one trip), or the remainder of depth / unroll (lax.scan
  runs it after the loop). Such a block's recomputation sits in the same straight-line program as its forward,
  where XLA's CSE merges the two and the remat policy is lost (the deviceless H100 compile of two 1024-wide blocks
  at batch 8192: 216 MiB of temporaries as without remat, 120 MiB with CSE prevented), so its checkpoint
  prevents CSE; inside a loop the loop boundary does."""
  return not scan or unroll == 0 or unroll >= depth or depth % unroll != 0


def stack_blocks(
  block: type[nn.Module],
  *,
  depth: int,
  scan: bool,
  remat_policy: str,
  name: str,
  num_broadcast: int = 0,
  with_outputs: bool = False,
  unroll: int = 1,
  **block_kwargs,
):
  """Returns a function (x, per_block, *broadcast) -> x that runs `depth` blocks, scanned (one compiled body)
  or unrolled.

  `per_block` is an array (or pytree, or None) with a leading `depth` axis: block i receives `per_block[i]`
  (its stochastic-depth rate; for SwinV2 whether it shifts its windows; for decoders its key/value cache).
  The `num_broadcast` trailing arguments (masks, memories, decode positions) go to every block as they are.
  Each block returns (x, output); with `with_outputs` the runner returns (x, outputs stacked over blocks).
  Scanned params have a leading `layers` axis under `name`; unrolled params live under `{name}_{i}`. Both
  layouts hold the same numbers (`convert.stack_layers` / `unstack_layers` move between them).

  `unroll` (scanned only) is lax.scan's: blocks per iteration of the loop, 0 for all of them. It changes the
  program, never the params: `unroll=0` is straight-line code over the stacked params (no per-layer dynamic
  slices of weights or gradients), with each block's remat policy kept (`straight_line_blocks`).
  """
  check_scan_unroll(unroll)
  unroll = 1 if _ROLLED.get() else unroll
  block = remat(block, remat_policy, prevent_cse=straight_line_blocks(depth, scan, unroll))
  if scan:
    # delayed FP8 scaling's amax histories (models/fp8.py) are per block too
    scanned = nn.scan(
      block,
      variable_axes={"params": 0, fp8_lib.HISTORY: 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(0,) + (nn.broadcast,) * num_broadcast,
      length=depth,
      unroll=min(unroll, depth),
      metadata_params={nn.PARTITION_NAME: LAYERS},
    )(name=name, **block_kwargs)

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
