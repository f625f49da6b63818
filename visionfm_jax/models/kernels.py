"""Backend speed tricks, decided here and nowhere else: each function below computes the same numbers in two
forms. 'plain' is the textbook form (broadcasting, `dot_general`, a convolution, autodiff gradients): XLA's natural
path, the one a GPU wants. 'cpu' swaps in forms that XLA's CPU backend (jaxlib 0.10) runs faster. Models call
these functions and never choose, and nothing here asks which backend the process has: both forms are traced
into the program (`by_platform`, `jax.lax.platform_dependent`) and the platform it is lowered for keeps its own,
'cpu' for the CPU and 'plain' for any other, so a deviceless GPU compile on a CPU host gets the GPU's program.

`forced(forms)` traces one form alone, for a test or a benchmark against the plain path (`bench
--compare=plain`). It is a `jax.make_user_context`: its value is part of every jit's cache key, so a function
traced under one choice is traced again under the other and one jit cache never holds both paths (a
module-level flag read at trace time could not promise that).

The CPU tricks are measured against 'plain' on the train step, as a set and one at a time (BENCHMARKS.md, "The
CPU forms against the plain path"); three that did not pay there are not among them: a matmul gradient for dense
biases, norm params and ViT's position embedding, an erf-written GELU, and a diagonal-sum gradient for SwinV2's
position-bias gather. A dense layer's multi-axis contraction as one 2-D matmul (`contract_trailing`, 1.65x on the
CPU for qkv's forward + backward) is not a trick but the one form: the deviceless GPU compile (bench/roofline.py)
makes the same cuBLAS GEMMs of both forms, and with the bias added to the 2-D product (`flat_dense`) cuBLASLt adds
it in its epilogue. What stays behind the choice compiles to another GPU program (the patch embedding as a GEMM
instead of one cuDNN convolution):
  patch_conv             the stride = kernel patch embedding as patches @ kernel (its gradient 2.4x faster)
  broadcast_leading      SwinV2's position bias broadcast over windows, whose gradient (like the attention
  sum_leading            bias's) is a ones-vector matmul: XLA's CPU reduction over leading axes ran 64x slower
                         on a SwinV2-T stage-0 block's (128, 3, 196, 196) bias gradient (216 vs 3.4 ms)

Attention comes in through one entry point, `attention` (what each `config.model.attention` name runs, 'auto'
resolved by models.build for the devices, `resolve_attention`): the softmax path below, or
`jax.nn.dot_product_attention` with cuDNN (`fused_attention`: its even-token padding) or JAX's choice. A SwinV2's
window attention has one more (attention='pallas', `window_attention`): Pallas Triton kernels that sum the position
bias's gradient over the windows inside them, so that no per-window score gradient reaches memory; no recipe's
default until a GPU measures it, refused by a run off a GPU (`check_platform`), run by Pallas's interpreter in a
program lowered for the CPU (the tests' check of its numbers).

Kernel candidates (`CANDIDATES`, traced under `trying(names)`) are GPU kernels kept off by default until a GPU
measures them against XLA's (`bench --try_kernels`, the leads of `launch/bench_gpu.sh`): a program lowered for a
GPU gets the kernel, one lowered for the CPU Pallas's interpreter of it (the tests' check of its numbers).

`softmax_attention` (attention='softmax') has a hand-written backward on every backend. It is not a backend
trick but a memory plan: it keeps the probabilities in the compute dtype and makes one fp32 pass (dS) where
autodiff of the softmax keeps several fp32 (T_q, T_k) tensors alive; that took SwinV2-G-CLIP's per-device plan
from 95.5 to 60.6 GiB (docs/tried_and_dropped.md, autodiff's backward), which decides whether it fits an
80 GB GPU at all. The forms only pick how its bias gradient is summed. `layer_norm`'s written-out backward is
the same kind of plan: it keeps the forward's row statistics, which XLA would otherwise recompute inside kernels
that then cannot also sum the scale's gradient. So is `saving_cudnn_attention`, the remat policy
`dots_with_no_batch_dims_and_attention_saveable`: it names cuDNN's forward primitives, which remat cannot
otherwise keep.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import einops
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

from visionfm_jax import config_lib

FORMS = ("plain", "cpu")
_FORCED = jax.make_user_context(None)  # None: the backend's forms


def forced(forms: str):
  """A context manager under which programs are traced with `forms` ('plain' | 'cpu') whatever the backend
  (part of jit's cache key: see the module docstring)."""
  if forms not in FORMS:
    raise ValueError(f"kernel forms {forms!r}: expected one of {FORMS}")
  return _FORCED(forms)


def forced_forms() -> str | None:
  """The forms `forced` on what is being traced; None: each lowering platform's own."""
  return _FORCED.value


def by_platform(cpu_form, plain_form, *args):
  """cpu_form(*args) in a program lowered for the CPU, plain_form(*args) in one lowered for any other platform
  (`jax.lax.platform_dependent`: both are traced, only the lowering platform's is compiled); under `forced`,
  the forced one alone."""
  forms = _FORCED.value
  if forms is not None:
    return (cpu_form if forms == "cpu" else plain_form)(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu_form, default=plain_form)


# ----------------------------------------------------------------------------------------------- dense layers


def contract_trailing(
  x: jax.Array, kernel: jax.Array, num_axes: int, precision=None, preferred_element_type=None, matmul=None
) -> jax.Array:
  """y[..., out...] = sum over k of x[..., k...] kernel[k..., out...]: x's last `num_axes` axes against the
  kernel's first `num_axes`, in order, as one (prod ..., K) @ (K, N) matmul. XLA's CPU backend differentiates that
  ~1.6x faster than the multi-axis `dot_general`; XLA's GPU compiler makes the same cuBLAS GEMMs of both (the
  deviceless H100 compile of ViT-H/14: identical kernels and bytes), so every backend takes this form. `matmul`
  (a, b) -> a @ b replaces the 2-D product (fp8.matmul)."""
  if x.shape[x.ndim - num_axes :] != kernel.shape[:num_axes]:
    raise ValueError(
      f"contract_trailing: trailing axes {x.shape[x.ndim - num_axes :]} of the input do not match "
      f"the kernel's leading axes {kernel.shape[:num_axes]}"
    )
  free_x, free_kernel = x.shape[: x.ndim - num_axes], kernel.shape[num_axes:]
  contracted = math.prod(kernel.shape[:num_axes])
  if matmul is not None:
    out = matmul(x.reshape(-1, contracted), kernel.reshape(contracted, -1))
  else:
    out = jax.lax.dot_general(
      x.reshape(-1, contracted),
      kernel.reshape(contracted, -1),
      (((1,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  return out.reshape(free_x + free_kernel)


def flat_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, num_axes: int, matmul=None) -> jax.Array:
  """`contract_trailing` plus a bias over the kernel's output axes, added to the 2-D product before it takes its
  output shape: XLA's GPU compiler then folds the add into the cuBLASLt GEMM (its BIAS epilogue), where a bias of
  several axes (qkv's (3, heads, head_dim)) is a separate broadcast pass over the output."""
  free_x, free_kernel = x.shape[: x.ndim - num_axes], kernel.shape[num_axes:]
  flat = contract_trailing(x, kernel, num_axes, matmul=matmul).reshape(-1, math.prod(free_kernel))
  if bias is not None:
    flat = flat + bias.reshape(-1)
  return flat.reshape(free_x + free_kernel)


# ---------------------------------------------------------------------------------- params broadcast over tokens


def sum_leading_as_matmul(x: jax.Array, num_axes: int) -> jax.Array:
  """sum of `x` over its first `num_axes` axes, as a ones-vector matmul (fp32 accumulation, full precision).
  The leading axes are contracted in place (no reshape), so sharded axes stay as they are."""
  if num_axes == 0:
    return x
  leading = tuple(range(num_axes))
  total = jax.lax.dot_general(
    jnp.ones(x.shape[:num_axes], x.dtype),
    x,
    ((leading, leading), ((), ())),
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )
  return total.astype(x.dtype)


def sum_leading(x: jax.Array, num_axes: int) -> jax.Array:
  """sum of `x` over its first `num_axes` axes: `jnp.sum` ('plain') or `sum_leading_as_matmul` ('cpu': XLA's
  CPU backend reduces over leading axes up to 50x slower than it multiplies by a ones vector)."""
  if num_axes == 0:
    return x
  return by_platform(
    functools.partial(sum_leading_as_matmul, num_axes=num_axes),
    functools.partial(jnp.sum, axis=tuple(range(num_axes))),
    x,
  )


def broadcast_leading(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`jnp.broadcast_to(x, shape)` for an `x` whose shape is a suffix of `shape` (a bias over tokens). 'cpu':
  its gradient, the sum over the leading axes, is `sum_leading_as_matmul` instead of XLA's reduction."""
  shape = tuple(shape)
  if shape[len(shape) - x.ndim :] != tuple(x.shape):
    raise ValueError(f"broadcast_leading: {x.shape} is not a suffix of {shape}")
  if _FORCED.value == "plain":
    return jnp.broadcast_to(x, shape)
  return _broadcast_with_matmul_grad(x, shape, len(shape) - x.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _broadcast_with_matmul_grad(x, shape, num_leading):
  del num_leading
  return jnp.broadcast_to(x, shape)


def _broadcast_with_matmul_grad_fwd(x, shape, num_leading):
  return _broadcast_with_matmul_grad(x, shape, num_leading), None


def _broadcast_with_matmul_grad_bwd(shape, num_leading, _, grad):
  del shape
  return (sum_leading(grad, num_leading),)


_broadcast_with_matmul_grad.defvjp(_broadcast_with_matmul_grad_fwd, _broadcast_with_matmul_grad_bwd)


# ------------------------------------------------------------------------------------------------ LayerNorm


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, computed in fp32, returned in `dtype`,
  with the backward written out (`_layer_norm_bwd`). Under `trying('pallas_layer_norm')`, where `dtype` is x's
  own, JAX's Pallas Triton kernel instead (`pallas_layer_norm`)."""
  if PALLAS_LAYER_NORM in _TRYING.value and jnp.dtype(x.dtype) == jnp.dtype(dtype) and x.ndim >= 2:
    kernel = functools.partial(pallas_layer_norm, epsilon=epsilon)
    return jax.lax.platform_dependent(
      x,
      scale,
      bias,
      cpu=functools.partial(kernel, interpret=True),
      cuda=kernel,
      default=lambda *a: plain_layer_norm(*a, epsilon).astype(dtype),
    )
  return _layer_norm(x, scale, bias, epsilon, jnp.dtype(dtype))


def plain_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  return _normalized(*_row_statistics(x, epsilon)) * scale + bias


def _row_statistics(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x in fp32, its mean over the last axis and 1 / sqrt(var + epsilon), the two-pass way."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centered = x - mean
  return x, mean, jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + epsilon)


def _normalized(x: jax.Array, mean: jax.Array, inv_std: jax.Array) -> jax.Array:
  return (x.astype(jnp.float32) - mean) * inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, epsilon, dtype):
  return plain_layer_norm(x, scale, bias, epsilon).astype(dtype)


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  x32, mean, inv_std = _row_statistics(x, epsilon)
  y = (_normalized(x32, mean, inv_std) * scale + bias).astype(dtype)
  # The barrier keeps the statistics (two floats a row) for the backward. Left to itself XLA recomputes them in
  # each backward fusion that reads x, and a row reduction cannot share a kernel with the column reduction of
  # the scale's gradient, so that product goes out to memory in fp32 and back (docs/performance.md).
  mean, inv_std = jax.lax.optimization_barrier((mean, inv_std))
  return y, (x, mean, inv_std, scale, bias)


def _layer_norm_bwd(epsilon, dtype, residuals, grad):
  """dx = (g - mean(g) - normed * mean(g * normed)) / std with g = grad * scale; dscale = sum(grad * normed)
  and dbias = sum(grad) over all leading axes; all in fp32."""
  del epsilon, dtype
  x, mean, inv_std, scale, bias = residuals
  normed = _normalized(x, mean, inv_std)
  grad = grad.astype(jnp.float32)
  g = grad * scale
  dx = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True) - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
  leading = tuple(range(x.ndim - 1))
  return (
    dx.astype(x.dtype),
    jnp.sum(grad * normed, axis=leading).astype(scale.dtype),
    jnp.sum(grad, axis=leading).astype(bias.dtype),
  )


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def pallas_layer_norm(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, interpret: bool = False
) -> jax.Array:
  """JAX's Pallas Triton LayerNorm (`jax.experimental.pallas.ops.gpu.layer_norm`): one forward kernel, and two
  backward ones (dx; dscale and dbias), where XLA makes seven fusions of autodiff's backward. Statistics in fp32,
  output in x's dtype; unlike `plain_layer_norm` it keeps the mean and 1/std for the backward in x's dtype (bf16:
  a relative error of 2^-9 in the gradient's scaling). `interpret`: Pallas's interpreter (any backend; the CPU
  tests). The kernel has no sharding rule: XLA's partitioner gathers its input, so it is a one-device candidate."""
  from jax.experimental.pallas.ops.gpu import layer_norm as pallas_ln  # pylint: disable=g-import-not-at-top

  rows = x.reshape((x.shape[0], -1, x.shape[-1]))  # the kernel takes (batch, tokens, channels)
  return pallas_ln.layer_norm(rows, scale, bias, eps=epsilon, interpret=interpret).reshape(x.shape)


# ------------------------------------------------------------------------------------------------ candidates

PALLAS_LAYER_NORM = "pallas_layer_norm"
CANDIDATES = {
  PALLAS_LAYER_NORM: "JAX's Pallas Triton LayerNorm on a GPU where XLA fuses autodiff's (layer_norm)",
}
_TRYING = jax.make_user_context(frozenset())


def check_candidates(names, field: str = "try_kernels") -> None:
  """ValueError naming `field` unless every one of `names` (a list, not one string) is a kernel candidate."""
  if isinstance(names, str):
    raise ValueError(f"{field}={names!r}: a list of candidate names, not one string")
  unknown = sorted(set(names) - set(CANDIDATES))
  if unknown:
    raise ValueError(
      f"{field}={','.join(names)}: {', '.join(unknown)} is not a kernel candidate; the candidates: "
      + "; ".join(f"{name} ({what})" for name, what in CANDIDATES.items())
    )


def trying(names):
  """A context manager under which programs are traced with the kernel candidates `names` (of `CANDIDATES`) in
  place of XLA's own, on the GPU (Pallas's interpreter on the CPU): for a GPU to measure one against the
  default (`python -m visionfm_jax.bench --try_kernels=...`, `launch/bench_gpu.sh leads`) before it becomes
  one. Part of jit's cache key, like `forced`."""
  check_candidates(names, "kernel candidates")
  return _TRYING(frozenset(names))


# ------------------------------------------------------------------------------------------- patch embedding


def patch_conv(lhs, rhs, window_strides, padding, **kwargs):
  """The `conv_general_dilated` of a patch embedding's `nn.Conv`: `jax.lax.conv_general_dilated` ('plain') or
  `patch_conv_as_matmul` ('cpu')."""
  return by_platform(
    functools.partial(patch_conv_as_matmul, window_strides=window_strides, padding=padding, **kwargs),
    functools.partial(jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding, **kwargs),
    lhs,
    rhs,
  )


def patch_conv_as_matmul(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
):
  """`jax.lax.conv_general_dilated` for flax's NHWC x HWIO convolutions, where a patch embedding (stride =
  kernel size, VALID, undilated, sizes divisible) is patches @ kernel: XLA's CPU backend differentiates that
  ~2x faster than the strided convolution. Any other convolution goes to `conv_general_dilated`."""
  patch = tuple(rhs.shape[:-2])
  nhwc = dimension_numbers is None or tuple(dimension_numbers.lhs_spec) == (0, lhs.ndim - 1) + tuple(
    range(1, lhs.ndim - 1)
  )
  undilated = all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  no_padding = padding == "VALID" or all(tuple(p) == (0, 0) for p in padding)
  divisible = all(size % p == 0 for size, p in zip(lhs.shape[1:-1], patch))
  if not (
    lhs.ndim == 4
    and tuple(window_strides) == patch
    and nhwc
    and undilated
    and no_padding
    and divisible
    and feature_group_count == 1
  ):
    return jax.lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
    )
  patches = einops.rearrange(lhs, "b (h ph) (w pw) c -> b h w ph pw c", ph=patch[0], pw=patch[1])
  return contract_trailing(patches, rhs, 3, precision=precision)


# ------------------------------------------------------------------------------------------------- attention


def softmax_attention(q, k, v, *, bias=None, mask=None):
  """softmax(q k^T + bias, masked) v over (..., H, T, D) inputs (q already scaled), logits and softmax in fp32.

  `bias` (differentiable) is an additive term whose shape is a suffix of (..., H, T_q, T_k) (a position bias
  (H, T_q, T_k), or per window (nW, H, T_q, T_k)); `mask` (boolean, True = may attend) broadcasts to the
  logits. The backward is written from the softmax's Jacobian: four batched matmuls and one elementwise pass,
  dS = P * (dP - rowsum(dO * O)), keeping P in the compute dtype (see the module docstring); the bias gradient
  is `sum_leading` of dS in the forms of the forward's trace.
  """
  logits_shape = q.shape[:-2] + (q.shape[-2], k.shape[-2])
  if bias is not None and tuple(bias.shape) != tuple(logits_shape[len(logits_shape) - bias.ndim :]):
    raise ValueError(f"attention bias {bias.shape} is not a suffix of the logits' shape {logits_shape}")
  return _softmax_attention(q, k, v, bias, mask, _FORCED.value)


def _attention_probs(q, k, bias, mask):
  logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  unnormalised = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _softmax_attention(q, k, v, bias, mask, forms):
  return _softmax_attention_fwd(q, k, v, bias, mask, forms)[0]


def _softmax_attention_fwd(q, k, v, bias, mask, forms):
  del forms
  probs = _attention_probs(q, k, bias, mask).astype(v.dtype)
  out = jnp.einsum("...qk,...kd->...qd", probs, v)
  return out, (q, k, v, probs, out, bias, mask)


def _softmax_attention_bwd(forms, residuals, grad_out):
  q, k, v, probs, out, bias, mask = residuals
  grad_v = jnp.einsum("...qk,...qd->...kd", probs, grad_out)
  grad_probs = jnp.einsum("...qd,...kd->...qk", grad_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(grad_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  grad_logits = probs.astype(jnp.float32) * (grad_probs - row)
  grad_q = jnp.einsum("...qk,...kd->...qd", grad_logits.astype(q.dtype), k)
  grad_k = jnp.einsum("...qk,...qd->...kd", grad_logits.astype(q.dtype), q)
  grad_bias = None
  if bias is not None:
    with _FORCED(forms):  # the forms the forward was traced with (None: the lowering platform's)
      grad_bias = sum_leading(grad_logits, grad_logits.ndim - bias.ndim).astype(bias.dtype)
  grad_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
  return grad_q, grad_k, grad_v, grad_bias, grad_mask


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


# ------------------------------------------------------------------------------- attention implementations

# attention=...: 'auto' (cuDNN flash attention where the platform has it and the compute dtype is 16-bit, else
# 'softmax'); einsum-softmax-einsum (`kernels.softmax_attention`); cuDNN flash attention; or
# `jax.nn.dot_product_attention` choosing (cuDNN where it applies, else XLA). The names: config_lib's, the rows' domain.
ATTENTION = config_lib.ATTENTION
# A SwinV2's choices: ATTENTION and its window attention as Pallas kernels (`window_attention`, 'pallas').
WINDOW_ATTENTION = config_lib.WINDOW_ATTENTION
WINDOW_KERNEL = "pallas"  # the last of WINDOW_ATTENTION
GPU_ONLY_ATTENTION = ("cudnn", WINDOW_KERNEL)  # no kernel on other backends: bench.memory_plan does not plan these
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
SIXTEEN_BIT = (jnp.bfloat16, jnp.float16)


def check_attention(implementation: str, field: str = "attention", choices: tuple[str, ...] = ATTENTION) -> None:
  """ValueError naming `field` unless `implementation` is one of `choices` (ATTENTION; a SwinV2's:
  WINDOW_ATTENTION)."""
  if implementation not in choices:
    raise ValueError(f"{field}={implementation!r}: expected one of {choices}")


def resolved_attention(implementation: str, choices: tuple[str, ...] = ATTENTION) -> str:
  """`implementation` as a module runs it: one of `choices` but 'auto', which models.build resolves for the devices
  the model will run on (`resolve_attention`) before any module sees it."""
  check_attention(implementation, choices=choices)
  if implementation == "auto":
    raise ValueError(
      "attention='auto' reached a module: models.build resolves it for the devices the model runs "
      "on (kernels.resolve_attention); a module takes softmax, cudnn or jax"
    )
  return implementation


def check_platform(implementation: str, platform: str, field: str = "attention") -> None:
  """ValueError naming `field` when `implementation` has no kernel on `platform` that a run should take: the
  window kernel ('pallas') anywhere but a GPU, where the CPU would run Pallas's interpreter of it, made for the
  tests' checks and orders of magnitude slower than the softmax path."""
  if implementation == WINDOW_KERNEL and platform not in GPU_PLATFORMS:
    raise ValueError(
      f"{field}={implementation!r}: SwinV2's Pallas window kernel runs on a GPU, and these devices "
      f"are {platform}; set {field}=auto"
    )


def resolve_attention(implementation: str, platform: str, dtype) -> str:
  """'auto' as it runs on `platform` ('gpu', 'cpu', ...) in compute `dtype`: cuDNN on a GPU in bf16 / fp16 (it
  has no fp32 kernel), the softmax path elsewhere; any other implementation as it is."""
  if implementation != "auto":
    return implementation
  return "cudnn" if platform in ("gpu", "cuda") and jnp.dtype(dtype) in SIXTEEN_BIT else "softmax"


def token_multiple(implementation: str) -> int:
  """What a token count must be a multiple of for `implementation` to take it as it is: cuDNN's training kernels
  take only even counts (jax 0.11); any count for the others."""
  return 2 if implementation == "cudnn" else 1


def pad_tokens(x: jax.Array, multiple: int) -> tuple[jax.Array, int]:
  """(B, T, C) zero-padded along T to a multiple of `multiple`, and T. A model pads once before its blocks and
  slices after them, its attention masking the padded keys (`kv_length`), instead of every layer padding and
  slicing q, k, v and the output around the kernel: per-token layers (norms, MLPs) leave real tokens exact."""
  tokens = x.shape[1]
  extra = -tokens % multiple
  return (jnp.pad(x, [(0, 0), (0, extra), (0, 0)]) if extra else x), tokens


def heads_first(x: jax.Array) -> jax.Array:
  """(..., T, H, D) -> (..., H, T, D) (and back): the head axis before the token axis."""
  return einops.rearrange(x, "... t h d -> ... h t d")


def attention(
  q, k, v, *, bias=None, mask=None, causal: bool = False, implementation: str = "softmax", kv_length: int | None = None
):
  """Softmax attention over (B, T, H, D) inputs with 1/sqrt(D) scaling; softmax in fp32.

  `mask` (boolean, True = may attend) broadcasts to (B, H, T_q, T_k); `causal` lets query i see keys <= i;
  `kv_length`: only the first kv_length keys are real (the rest is `pad_tokens`' padding).
  `implementation` (`resolved_attention`: models.build has resolved 'auto' for the devices): 'softmax' runs
  `kernels.softmax_attention`;
  'cudnn' routes to `jax.nn.dot_product_attention` with cuDNN flash attention (GPU), 'jax' to the same function letting
  JAX choose (cuDNN where it applies, else XLA).
  """
  implementation = resolved_attention(implementation)
  if implementation != "softmax":
    return fused_attention(
      q, k, v, bias=bias, mask=mask, causal=causal, implementation=implementation, kv_length=kv_length
    )
  if kv_length is not None and kv_length < k.shape[1]:
    real = jnp.arange(k.shape[1]) < kv_length
    mask = real if mask is None else jnp.logical_and(mask, real)
  if causal:
    below = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), jnp.bool_))
    mask = below if mask is None else jnp.logical_and(mask, below)
  scale = q.shape[-1] ** -0.5
  out = softmax_attention(
    heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), bias=bias, mask=mask
  )
  return heads_first(out)


# The primitives of cuDNN's attention forward as `jax.nn.dot_product_attention` binds them (jax 0.10-0.11): their
# outputs, the attention output and the softmax's log-sum-exp per row, are what cuDNN's backward kernel reads.
CUDNN_ATTENTION_FORWARD = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd")


def saving_cudnn_attention(policy: Callable[..., bool]) -> Callable[..., bool]:
  """The remat policy `policy` that also keeps cuDNN attention's forward outputs for the backward.

  Remat keeps no custom call's outputs by name, so under `dots_with_no_batch_dims_saveable` the backward runs each
  block's attention forward again to get them; kept, they cost a (tokens, width) output and a (heads, tokens)
  statistic a block. Other attention forms (`softmax_attention`, XLA's) are as under `policy`."""

  def save(prim, *args, **params) -> bool:
    return prim.name in CUDNN_ATTENTION_FORWARD or policy(prim, *args, **params)

  return save


def fused_attention(
  q,
  k,
  v,
  *,
  bias=None,
  mask=None,
  causal: bool = False,
  implementation: str = "jax",
  scale: float | None = None,
  kv_length: int | None = None,
):
  """`jax.nn.dot_product_attention` over (B, T, H, D): 'cudnn' forces cuDNN flash attention, 'jax' lets JAX choose.

  For cuDNN (as of jax 0.11) a bias or mask must come at its full (T, S) size, and its training kernels take
  only even token counts whenever a bias is present, which jax always reports: an odd T or S (ViT-H/14's 257
  tokens, SwinV2's 7x7 windows, 77-token captions) is padded by one token that cuDNN's sequence lengths hide,
  and the padded query row is sliced off. `kv_length` masks keys from that position on (a model's own padding,
  `pad_tokens`), through cuDNN's sequence lengths.
  """
  if implementation != "cudnn":
    if kv_length is not None and kv_length < k.shape[1]:
      real = jnp.arange(k.shape[1]) < kv_length
      mask = real if mask is None else jnp.logical_and(mask, real)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal, scale=scale)
  batch, t, s = q.shape[0], q.shape[1], k.shape[1]
  full = lambda x: (
    None
    if x is None
    else jnp.broadcast_to(x.reshape((1,) * (4 - x.ndim) + x.shape), (1,) * (4 - x.ndim) + x.shape[:-2] + (t, s))
  )
  bias, mask = full(bias), full(mask)
  pad_t, pad_s = t % 2, s % 2
  lengths = {}
  if kv_length is not None and kv_length < s:
    lengths = dict(
      query_seq_lengths=jnp.full((batch,), t, jnp.int32), key_value_seq_lengths=jnp.full((batch,), kv_length, jnp.int32)
    )
  if pad_t or pad_s:
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
    q, k, v = pad(q, pad_t), pad(k, pad_s), pad(v, pad_s)
    pad_ts = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, pad_t), (0, pad_s)], constant_values=value)
    bias = None if bias is None else pad_ts(bias, 0)
    mask = None if mask is None else pad_ts(mask, True)
    lengths = dict(
      query_seq_lengths=jnp.full((batch,), t, jnp.int32),
      key_value_seq_lengths=jnp.full((batch,), min(s, kv_length or s), jnp.int32),
    )
  out = jax.nn.dot_product_attention(
    q, k, v, bias=bias, mask=mask, is_causal=causal, scale=scale, implementation="cudnn", **lengths
  )
  return out[:, :t]


# ------------------------------------------------------------------------------ SwinV2's window attention kernel

WINDOW_BLOCK = 64  # tokens per query and per key tile of the window kernels
# Programs that fill an H100/H200 twice over (132 SMs): the bias-gradient kernel splits its sum over the windows into
# this many programs' worth of partial sums where heads x query tiles alone are fewer.
WINDOW_PROGRAMS = 512
_PADDED_KEY = -0.7 * float(np.finfo(np.float32).max)  # a padded key's logit: its exp is 0, and never inf - inf


def window_attention(q, k, v, scale, table, regions=None, *, mask_value: float, block: int = WINDOW_BLOCK):
  """SwinV2's window attention as Pallas kernels: softmax(scale_h q k^T + bias + shift mask) v per window and head.

  q, k (cosine-normalised) and v: (B, nW, N = W^2, H, D) in the compute dtype; scale (H,): the per-head logit
  scale; table (H, (2W-1)^2): the position bias per offset (SwinV2's log-CPB MLP), which the kernels gather for
  each pair of tokens by their offset as `swinv2.bias_of_offsets` does; regions (nW, N) int32: the region of every
  token of a shifted map (pairs of different regions get `mask_value`), None for an unshifted one. The same numbers
  as the softmax path (`softmax_attention` after SwinV2's `window_attention`), with its backward by kernels that
  keep the bias gradient inside: a (H, N, N) sum over the batch's windows, mapped onto the table after them, never
  a per-window (B, nW, H, N, N) score gradient in memory (`_window_attention_bwd`). Lowered for a GPU: Triton
  kernels; lowered for the CPU: Pallas's interpreter of them (the tests' check; a run refuses it off a GPU,
  `check_platform`).
  """
  if q.ndim != 5 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"window_attention: q, k, v of one (B, nW, N, H, D) shape; got {q.shape}, {k.shape}, {v.shape}")
  _, windows, tokens, heads, _ = q.shape
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f"window_attention: {tokens} tokens a window are not a square window's")
  if table.shape != (heads, (2 * side - 1) ** 2) or scale.shape != (heads,):
    raise ValueError(
      f"window_attention: table {table.shape} and scale {scale.shape} for {heads} heads of a {side}x{side} window"
    )
  if regions is not None and regions.shape != (windows, tokens):
    raise ValueError(f"window_attention: regions {regions.shape} for {windows} windows of {tokens} tokens")
  if block < 16 or block & (block - 1):
    raise ValueError(f"window_attention: block={block}: a power of two >= 16 (Triton's tiles)")
  masked = regions is not None
  regions = regions.astype(jnp.int32) if masked else jnp.zeros((1, tokens), jnp.int32)
  settings = _WindowSettings(masked, float(mask_value), block)

  def run(interpret, *args):
    return _window_attention(*args, dataclasses.replace(settings, interpret=interpret))

  args = (q, k, v, scale.astype(jnp.float32), table.astype(jnp.float32), regions)
  return jax.lax.platform_dependent(
    *args, cpu=functools.partial(run, True), cuda=functools.partial(run, False), rocm=functools.partial(run, False)
  )


@dataclasses.dataclass(frozen=True)
class _WindowSettings:
  """What the window kernels are specialised on (hashable: custom_vjp's static argument)."""

  masked: bool  # a shifted map: the kernel masks pairs of different regions
  mask_value: float
  block: int
  interpret: bool = False


@dataclasses.dataclass(frozen=True)
class _WindowShape:
  """The sizes a kernel's grid and tiles follow: windows (B x nW) of `tokens` (`side` x `side`), `heads` heads of
  `dim`."""

  windows: int
  tokens: int
  heads: int
  dim: int
  block: int

  @property
  def side(self) -> int:
    return math.isqrt(self.tokens)

  @property
  def tiles(self) -> int:
    return pl.cdiv(self.tokens, self.block)

  @property
  def padded_tokens(self) -> int:
    return self.tiles * self.block

  @property
  def padded_dim(self) -> int:  # Triton's dot takes operands of 16 and more along each axis, in powers of two
    return max(16, pl.next_power_of_2(self.dim))


def _shape_of(q, block: int) -> _WindowShape:
  batch, windows, tokens, heads, dim = q.shape
  return _WindowShape(batch * windows, tokens, heads, dim, block)


def relative_offsets(q_positions, k_positions, side: int):
  """The index into a (2W-1)^2 offset table (W = `side`) of pairs of query and key positions (row-major in their
  window): (dh + W-1)(2W-1) + (dw + W-1), as `swinv2.relative_position_index`; on numpy or jax arrays, in a kernel
  too."""
  rows = q_positions // side - k_positions // side + side - 1
  cols = q_positions % side - k_positions % side + side - 1
  return rows * (2 * side - 1) + cols


# Tiles of the kernels' refs: a (tokens, padded dim) ref of one window and head, read a tile of rows at a time, zero
# past the real tokens and head dims.


def _token_tile(ref, tile, shape: _WindowShape, window=None):
  """Rows `tile` of the ref, or of its window `window` where it holds every window (one indexer: Triton's
  lowering takes no indexer of an indexed ref)."""
  rows = tile * shape.block + jnp.arange(shape.block)
  cols = jnp.arange(ref.shape[-1])
  mask = (rows < shape.tokens)[:, None] & (cols < shape.dim)[None, :]
  index = (pl.ds(tile * shape.block, shape.block), slice(None))
  return plgpu.load(ref.at[index if window is None else (window,) + index], mask=mask, other=0.0)


def _store_token_tile(ref, tile, value, shape: _WindowShape):
  rows = tile * shape.block + jnp.arange(shape.block)
  cols = jnp.arange(ref.shape[-1])
  mask = (rows < shape.tokens)[:, None] & (cols < shape.dim)[None, :]
  plgpu.store(ref.at[pl.ds(tile * shape.block, shape.block), :], value.astype(ref.dtype), mask=mask)


def _scaled_queries(q_ref, scale_ref, head, tile, shape: _WindowShape, window=None):
  """The query tile times its head's logit scale, rounded to the compute dtype as the softmax path rounds it."""
  q = _token_tile(q_ref, tile, shape, window)
  return (q.astype(jnp.float32) * scale_ref[head]).astype(q.dtype)


def _tile_logits(
  q, k, table_ref, regions_ref, q_tile, k_tile, shape: _WindowShape, settings: _WindowSettings, region_row=None
):
  """(block, block) fp32 logits of a query tile against a key tile: scaled cosines + the position bias gathered
  from the head's table by each pair's offset (+ the shift mask, from row `region_row` of a regions ref that holds
  every window's); keys past the window's tokens get `_PADDED_KEY`."""
  block = shape.block
  q_rows, k_rows = q_tile * block + jnp.arange(block), k_tile * block + jnp.arange(block)
  q_real, k_real = q_rows < shape.tokens, k_rows < shape.tokens
  last = shape.tokens - 1  # padded rows and columns read the table at a real pair's offset; their logits go unused
  offsets = relative_offsets(jnp.minimum(q_rows, last)[:, None], jnp.minimum(k_rows, last)[None, :], shape.side)
  logits = plgpu.dot(q, k, trans_b=True) + plgpu.load(table_ref.at[offsets])
  if settings.masked:
    at = lambda tile: regions_ref.at[
      (pl.ds(tile * block, block),) if region_row is None else (region_row, pl.ds(tile * block, block))
    ]
    q_regions = plgpu.load(at(q_tile), mask=q_real, other=0)
    k_regions = plgpu.load(at(k_tile), mask=k_real, other=0)
    logits = logits + jnp.where(q_regions[:, None] == k_regions[None, :], 0.0, settings.mask_value)
  return jnp.where(k_real[None, :], logits, _PADDED_KEY)


def _probs_and_grad_logits(
  q,
  k,
  v,
  grad_out,
  log_sums,
  deltas,
  table_ref,
  regions_ref,
  q_tile,
  k_tile,
  shape: _WindowShape,
  settings: _WindowSettings,
  region_row=None,
):
  """The tile's probabilities P = exp(logits - logsumexp) and dS = P * (dO V^T - rowsum(dO * O)), both fp32."""
  logits = _tile_logits(q, k, table_ref, regions_ref, q_tile, k_tile, shape, settings, region_row)
  probs = jnp.exp(logits - log_sums[:, None])
  return probs, probs * (plgpu.dot(grad_out, v, trans_b=True) - deltas[:, None])


def _window_forward_kernel(
  scale_ref, q_ref, k_ref, v_ref, table_ref, *refs, shape: _WindowShape, settings: _WindowSettings
):
  """One (window, head, query tile): online softmax over the key tiles (FlashAttention's forward); writes the
  output rows and their log-sum-exp for the backward."""
  regions_ref, out_ref, log_sum_ref = refs if settings.masked else (None, *refs)
  head, q_tile = pl.program_id(1), pl.program_id(2)
  q = _scaled_queries(q_ref, scale_ref, head, q_tile, shape)

  def key_tile(k_tile, carry):
    out, row_max, row_sum = carry
    k, v = _token_tile(k_ref, k_tile, shape), _token_tile(v_ref, k_tile, shape)
    logits = _tile_logits(q, k, table_ref, regions_ref, q_tile, k_tile, shape, settings)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    probs = jnp.exp(logits - new_max[:, None])
    rescale = jnp.exp(row_max - new_max)
    out = out * rescale[:, None] + plgpu.dot(probs.astype(v.dtype), v)
    return out, new_max, row_sum * rescale + jnp.sum(probs, axis=1)

  init = (
    jnp.zeros((shape.block, shape.padded_dim), jnp.float32),
    jnp.full((shape.block,), -jnp.inf, jnp.float32),
    jnp.zeros((shape.block,), jnp.float32),
  )
  out, row_max, row_sum = jax.lax.fori_loop(0, shape.tiles, key_tile, init)
  _store_token_tile(out_ref, q_tile, out / row_sum[:, None], shape)
  log_sum_ref[pl.ds(q_tile * shape.block, shape.block)] = row_max + jnp.log(row_sum)


def _window_grad_kv_kernel(
  scale_ref, q_ref, k_ref, v_ref, table_ref, *refs, shape: _WindowShape, settings: _WindowSettings
):
  """One (window, head, key tile): dK and dV summed over the query tiles."""
  regions_ref, grad_out_ref, log_sum_ref, delta_ref, grad_k_ref, grad_v_ref = refs if settings.masked else (None, *refs)
  head, k_tile = pl.program_id(1), pl.program_id(2)
  k, v = _token_tile(k_ref, k_tile, shape), _token_tile(v_ref, k_tile, shape)

  def query_tile(q_tile, carry):
    grad_k, grad_v = carry
    q = _scaled_queries(q_ref, scale_ref, head, q_tile, shape)
    grad_out = _token_tile(grad_out_ref, q_tile, shape)
    rows = pl.ds(q_tile * shape.block, shape.block)
    probs, grad_logits = _probs_and_grad_logits(
      q, k, v, grad_out, log_sum_ref[rows], delta_ref[rows], table_ref, regions_ref, q_tile, k_tile, shape, settings
    )
    grad_v = grad_v + plgpu.dot(probs.astype(grad_out.dtype), grad_out, trans_a=True)
    return grad_k + plgpu.dot(grad_logits.astype(q.dtype), q, trans_a=True), grad_v

  zeros = jnp.zeros((shape.block, shape.padded_dim), jnp.float32)
  grad_k, grad_v = jax.lax.fori_loop(0, shape.tiles, query_tile, (zeros, zeros))
  _store_token_tile(grad_k_ref, k_tile, grad_k, shape)
  _store_token_tile(grad_v_ref, k_tile, grad_v, shape)


def _window_grad_q_bias_kernel(
  scale_ref,
  q_ref,
  k_ref,
  v_ref,
  table_ref,
  *refs,
  shape: _WindowShape,
  settings: _WindowSettings,
  groups: int,
  windows_per_map: int,
):
  """One (head, query tile, group of windows): for each key tile, dS over the group's windows (windows g, g +
  groups, ...) summed in registers into that tile of the position bias's gradient, written once; dQ (of the scaled
  queries, fp32) added per key tile into its rows, atomically (the same rows again after a group's pass: a
  pipelined load must not overtake the last store)."""
  regions_ref, grad_out_ref, log_sum_ref, delta_ref, _, grad_q_ref, grad_bias_ref = (
    refs if settings.masked else (None, *refs)
  )
  head, q_tile, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(q_tile * shape.block, shape.block)
  group_windows = (shape.windows - group + groups - 1) // groups

  def key_tile(k_tile, carry):
    def window(i, grad_bias):
      w = group + i * groups
      q = _scaled_queries(q_ref, scale_ref, head, q_tile, shape, w)
      k, v = _token_tile(k_ref, k_tile, shape, w), _token_tile(v_ref, k_tile, shape, w)
      grad_out = _token_tile(grad_out_ref, q_tile, shape, w)
      _, grad_logits = _probs_and_grad_logits(
        q,
        k,
        v,
        grad_out,
        log_sum_ref[w, rows],
        delta_ref[w, rows],
        table_ref,
        regions_ref,
        q_tile,
        k_tile,
        shape,
        settings,
        w % windows_per_map,
      )
      plgpu.atomic_add(grad_q_ref, (w, rows, slice(None)), plgpu.dot(grad_logits.astype(k.dtype), k))
      return grad_bias + grad_logits

    grad_bias = jax.lax.fori_loop(0, group_windows, window, jnp.zeros((shape.block, shape.block), jnp.float32))
    grad_bias_ref[rows, pl.ds(k_tile * shape.block, shape.block)] = grad_bias
    return carry

  jax.lax.fori_loop(0, shape.tiles, key_tile, 0)


def _window_call(kernel, grid, in_specs, out_specs, out_shape, settings: _WindowSettings, name: str, **kwargs):
  return pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    interpret=settings.interpret,
    name=name,
    **kwargs,
  )


def _window_specs(shape: _WindowShape, settings: _WindowSettings, windows_per_map: int, per_window: bool):
  """The BlockSpecs of (scale, q, k, v, table[, regions]) and of a per-row statistic (B x nW, H, padded N): one
  window's rows of a head (`per_window`, grids of (window, head, tile)) or every window's (grids of (head, tile,
  group)); the head's row of the table."""
  n, dim, offsets = shape.tokens, shape.padded_dim, (2 * shape.side - 1) ** 2
  whole_scale = pl.BlockSpec((shape.heads,), lambda *_: (0,))
  if per_window:
    rows = pl.BlockSpec((None, n, None, dim), lambda w, h, t: (w, 0, h, 0))
    table = pl.BlockSpec((None, offsets), lambda w, h, t: (h, 0))
    regions = pl.BlockSpec((None, n), lambda w, h, t: (w % windows_per_map, 0))
    row_stats = pl.BlockSpec((None, None, shape.padded_tokens), lambda w, h, t: (w, h, 0))
  else:
    rows = pl.BlockSpec((shape.windows, n, None, dim), lambda h, t, g: (0, 0, h, 0))
    table = pl.BlockSpec((None, offsets), lambda h, t, g: (h, 0))
    regions = pl.BlockSpec((windows_per_map, n), lambda *_: (0, 0))
    row_stats = pl.BlockSpec((shape.windows, None, shape.padded_tokens), lambda h, t, g: (0, h, 0))
  return [whole_scale, rows, rows, rows, table] + ([regions] if settings.masked else []), row_stats


def _window_operands(q, k, v, scale, table, regions, shape: _WindowShape, settings: _WindowSettings):
  """(scale, q, k, v, table[, regions]) as the kernels take them: the batch's windows on one axis."""
  return [scale] + [_flat_windows(x, shape) for x in (q, k, v)] + [table] + ([regions] if settings.masked else [])


def _flat_windows(x, shape: _WindowShape):
  return x.reshape((shape.windows,) + x.shape[2:])


def _window_forward(q, k, v, scale, table, regions, settings: _WindowSettings):
  """(output (B, nW, N, H, D), log-sum-exp (B x nW, H, padded N) fp32)."""
  shape = _shape_of(q, settings.block)
  inputs, row_stats = _window_specs(shape, settings, regions.shape[0], per_window=True)
  out, log_sums = _window_call(
    functools.partial(_window_forward_kernel, shape=shape, settings=settings),
    (shape.windows, shape.heads, shape.tiles),
    inputs,
    [inputs[1], row_stats],
    [
      jax.ShapeDtypeStruct(_flat_windows(v, shape).shape, v.dtype),
      jax.ShapeDtypeStruct((shape.windows, shape.heads, shape.padded_tokens), jnp.float32),
    ],
    settings,
    "swin_window_attention_fwd",
  )(*_window_operands(q, k, v, scale, table, regions, shape, settings))
  return out.reshape(v.shape), log_sums


def _window_grad_kv(q, k, v, scale, table, regions, grad_out, log_sums, deltas, settings: _WindowSettings):
  shape = _shape_of(q, settings.block)
  inputs, row_stats = _window_specs(shape, settings, regions.shape[0], per_window=True)
  grad_k, grad_v = _window_call(
    functools.partial(_window_grad_kv_kernel, shape=shape, settings=settings),
    (shape.windows, shape.heads, shape.tiles),
    inputs + [inputs[1], row_stats, row_stats],
    [inputs[1], inputs[1]],
    [jax.ShapeDtypeStruct(_flat_windows(x, shape).shape, x.dtype) for x in (k, v)],
    settings,
    "swin_window_attention_bwd_kv",
  )(
    *_window_operands(q, k, v, scale, table, regions, shape, settings), _flat_windows(grad_out, shape), log_sums, deltas
  )
  return grad_k.reshape(k.shape), grad_v.reshape(v.shape)


def _window_grad_q_bias(q, k, v, scale, table, regions, grad_out, log_sums, deltas, settings: _WindowSettings):
  """(dQ of the scaled queries (B x nW, H, padded N, padded D) fp32, the bias's gradient (H, N, N) fp32)."""
  shape = _shape_of(q, settings.block)
  groups = max(1, min(shape.windows, pl.cdiv(WINDOW_PROGRAMS, shape.heads * shape.tiles)))
  n_pad = shape.padded_tokens
  inputs, row_stats = _window_specs(shape, settings, regions.shape[0], per_window=False)
  grad_q_spec = pl.BlockSpec((shape.windows, None, n_pad, shape.padded_dim), lambda h, t, g: (0, h, 0, 0))
  grad_q_zeros = jnp.zeros((shape.windows, shape.heads, n_pad, shape.padded_dim), jnp.float32)
  grad_q, partial_grad_bias = _window_call(
    functools.partial(
      _window_grad_q_bias_kernel, shape=shape, settings=settings, groups=groups, windows_per_map=regions.shape[0]
    ),
    (shape.heads, shape.tiles, groups),
    inputs + [inputs[1], row_stats, row_stats, grad_q_spec],
    [grad_q_spec, pl.BlockSpec((None, None, n_pad, n_pad), lambda h, t, g: (g, h, 0, 0))],
    [
      jax.ShapeDtypeStruct(grad_q_zeros.shape, jnp.float32),
      jax.ShapeDtypeStruct((groups, shape.heads, n_pad, n_pad), jnp.float32),
    ],
    settings,
    "swin_window_attention_bwd_q_bias",
    input_output_aliases={len(inputs) + 3: 0},
  )(
    *_window_operands(q, k, v, scale, table, regions, shape, settings),
    _flat_windows(grad_out, shape),
    log_sums,
    deltas,
    grad_q_zeros,
  )
  n = shape.tokens
  return grad_q, jnp.sum(partial_grad_bias, axis=0)[:, :n, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _window_attention(q, k, v, scale, table, regions, settings: _WindowSettings):
  return _window_forward(q, k, v, scale, table, regions, settings)[0]


def _window_attention_fwd(q, k, v, scale, table, regions, settings: _WindowSettings):
  out, log_sums = _window_forward(q, k, v, scale, table, regions, settings)
  return out, (q, k, v, scale, table, regions, out, log_sums)


def _window_attention_bwd(settings: _WindowSettings, residuals, grad_out):
  """dQ, dK, dV, the logit scale's and the table's gradients: the kernels' dK and dV; dQ of the scaled queries
  (fp32) times the scale, and the scale's gradient its sum against the queries; the (H, N, N) bias gradient summed
  over the windows in the kernel (`_window_grad_q_bias_kernel`), then added onto the table by each pair's offset."""
  q, k, v, scale, table, regions, out, log_sums = residuals
  shape = _shape_of(q, settings.block)
  flat = lambda x: _flat_windows(x, shape).astype(jnp.float32)
  # Sums of products rather than einsums: an fp32 contraction may take TF32 on a GPU.
  deltas = jnp.swapaxes(jnp.sum(flat(grad_out) * flat(out), axis=-1), 1, 2)
  deltas = jnp.pad(deltas, [(0, 0), (0, 0), (0, shape.padded_tokens - shape.tokens)])
  args = (q, k, v, scale, table, regions, grad_out, log_sums, deltas, settings)
  grad_k, grad_v = _window_grad_kv(*args)
  grad_scaled_q, grad_bias = _window_grad_q_bias(*args)
  grad_scaled_q = grad_scaled_q[:, :, : shape.tokens, : shape.dim]
  grad_scale = jnp.sum(grad_scaled_q * jnp.swapaxes(flat(q), 1, 2), axis=(0, 2, 3))
  grad_q = jnp.einsum("whnd,h->wnhd", grad_scaled_q, scale).astype(q.dtype).reshape(q.shape)
  positions = np.arange(shape.tokens)
  offsets = relative_offsets(positions[:, None], positions[None, :], shape.side).reshape(-1)
  grad_table = jnp.zeros(table.shape, jnp.float32).at[:, offsets].add(grad_bias.reshape(shape.heads, -1))
  return grad_q, grad_k, grad_v, grad_scale, grad_table, None


_window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)
