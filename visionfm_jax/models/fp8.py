"""FP8 GEMMs for the transformer blocks (`config.precision.gemm`): the quantization switch.

Two recipes (scaled by powers of two that Hopper's cuBLASLt FP8 GEMM takes, or that multiply its output's rows):
- 'fp8' (Transformer Engine's hybrid recipe, the one NeMo and Megatron train with): all three GEMMs of a dense layer
  in FP8. Forward y = x @ w with x and w in e4m3 (3 mantissa bits, range 448); input gradient dx = dy @ w^T and
  weight gradient dw = x^T @ dy with dy in e5m2 (2 mantissa bits, range 57344: a gradient's outliers need the range
  more than the bits). The backward reuses the forward's e4m3 x and w, so a layer keeps x in one byte, not two.
- 'fp8_bf16_wgrad' (DINOv3's, which trained a ViT-7B so): the forward and input-gradient GEMMs in e4m3 with x and dy
  scaled row by row (each token's own max: its range is its own, so dy too takes e4m3's bits), each product's rows
  multiplied by their scales; the weight gradient in the compute dtype from the unquantized x and dy, so that the
  update the fp32 params accumulate sees no FP8 rounding; a third of the GEMM FLOPs stay at the 16-bit rate and x is
  kept in the compute dtype.

Scales are current (dynamic): each call scales a tensor by its own max |value|, so nothing is carried between steps:
params, optimizer state and checkpoints are the same with or without FP8, and a run may switch recipes at a resume
(flax's `Fp8DotGeneralOp` keeps amax histories as variables instead). In 'fp8', activations and gradients are scaled
by each device's rows (`parallel.sharding.batch_local`): a max over the whole batch would be an all-reduce over its
devices before every cast, 256 a ViT-H/14 step, each on the critical path; each device's weight-gradient share is summed
where the data-parallel gradients are. A weight is scaled whole, and each device takes its FP8 values whole (XLA
would otherwise dequantize an fsdp shard and gather it in bf16 into a product no FP8 GEMM takes). Each scale is a
power of two, 2^ceil(log2(amax / fp8 max)), so that it is exact in bf16 and dividing by it loses nothing; the cost
is at most one binade of the format's range left unused.

Quantization and dequantization are flax's (`flax.linen.fp8_ops.quantize` / `dequantize`); each product is a dot
of dequantized operands, convert(f8) x scalar scale, the pattern XLA's GPU compiler rewrites into one cuBLASLt FP8
GEMM with the scales as its alpha (`bench.roofline --target=h100` shows the `__cublas$lt$matmul$f8` calls). On a
CPU the same arithmetic runs in the compute dtype: the values are those of FP8 operands.

Which GEMMs: the `Dense` layers created with `fp8=True` (the blocks' attention projections and MLPs), and only
while a program is traced under `gemms(recipe)` (the train step sets it from the config). Norms, embeddings, heads,
SwinV2's position-bias MLP, patch merging and the losses stay in the compute dtype or fp32. Evaluation traces
without it, in the compute dtype.
"""

from __future__ import annotations

import functools

from flax.linen import fp8_ops
import jax
import jax.numpy as jnp

from visionfm_jax.errors import ConfigError
from visionfm_jax.parallel import sharding

RECIPES = ("fp8", "fp8_bf16_wgrad")
FORMATS = ("compute_dtype",) + RECIPES
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
# FP8 GEMMs need Hopper's (or Ada's) tensor cores: CUDA compute capability 8.9 and newer.
MIN_COMPUTE_CAPABILITY = (8, 9)
_GEMMS = jax.make_user_context("compute_dtype")  # part of jit's cache key, as kernels.forced is


def gemms(fmt: str):
  """A context manager under which the `fp8=True` dense layers traced run their GEMMs in `fmt` (FORMATS)."""
  if fmt not in FORMATS:
    raise ValueError(f"precision.gemm={fmt!r}: expected one of {FORMATS}")
  return _GEMMS(fmt)


def active() -> str | None:
  """The FP8 recipe of what is being traced (RECIPES), or None."""
  return _GEMMS.value if _GEMMS.value in RECIPES else None


def matmul_of(recipe: str | None):
  """(x, w) -> x @ w in `recipe`'s FP8 GEMMs; None for none."""
  return None if recipe is None else functools.partial(matmul, bf16_wgrad=recipe == "fp8_bf16_wgrad")


def scale(x: jax.Array, dtype, by_row: bool = False) -> jax.Array:
  """The fp32 power of two that maps max |x| into `dtype`'s range (`by_row`: each row's max, an (M, 1) column); 1 for
  an all-zero x. A non-finite x keeps a non-finite scale, so that its infinities and NaNs reach the product as NaNs
  instead of being clipped to the format's largest value: fp16's loss scaling and the health guard see an overflow
  through an FP8 GEMM."""
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True) if by_row else jnp.max(jnp.abs(x))
  amax = amax.astype(jnp.float32)
  exponent = jnp.ceil(jnp.log2(amax / jnp.finfo(dtype).max.astype(jnp.float32)))
  return jnp.where(amax > 0, jnp.exp2(exponent), jnp.float32(1.0))


def quantize(x: jax.Array, dtype, by_row: bool = False) -> tuple[jax.Array, jax.Array]:
  """(x / s in `dtype`, s) with s = `scale(x, dtype, by_row)`. A bf16 or fp32 x is divided in its own dtype: a power
  of two divides exactly in either, so the values are the exact quotient's, and XLA does not write an fp32 copy of x
  for the max and the cast to read (it did for the MLP's input gradient: 4 bytes an element written, read twice).
  fp16 goes through fp32, whose range holds every scale."""
  s = jax.lax.stop_gradient(scale(x, dtype, by_row))
  compute = x.dtype if x.dtype in (jnp.bfloat16, jnp.float32) else jnp.float32
  return fp8_ops.quantize(x.astype(compute), dtype, s, compute), s


def _product(a_q, a_scale, b_q, b_scale, out_dtype) -> jax.Array:
  """dequantized a @ dequantized b, (M, K) x (K, N): the form XLA rewrites into one FP8 GEMM. An (M, 1) `a_scale`
  (a's rows scaled) multiplies the product's rows instead, as no FP8 GEMM takes a scale per row."""
  rows = a_scale.ndim == 2
  a = a_q.astype(out_dtype) if rows else fp8_ops.dequantize(a_q, out_dtype, a_scale)
  b = fp8_ops.dequantize(b_q, out_dtype, b_scale)
  y = jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)
  return y * a_scale.astype(out_dtype) if rows else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, bf16_wgrad: bool = False) -> jax.Array:
  """x (M, K) @ w (K, N), both of one dtype, in the module docstring's FP8 GEMMs ('fp8', or with `bf16_wgrad`
  'fp8_bf16_wgrad'); the result in that dtype."""
  return _matmul_fwd(x, w, bf16_wgrad)[0]


def _matmul_fwd(x, w, bf16_wgrad):
  if x.dtype != w.dtype:
    raise ValueError(f"fp8.matmul: operands of one dtype expected, got {x.dtype} and {w.dtype}")
  w_q, w_scale = quantize(w, E4M3)
  y, x_q, x_scale = sharding.batch_local(functools.partial(_rows_times, dtype=E4M3, by_row=bf16_wgrad), (x,),
                                         (w_q, w_scale))
  kept_x = (x,) if bf16_wgrad else (x_q, x_scale)
  return y, (kept_x, w_q, w_scale)


def _rows_times(a, b_q, b_scale, dtype, by_row):
  """One device's rows of a @ b: a quantized to `dtype` by its own max (no all-reduce over the batch's devices), or
  each of its rows by their own (`by_row`); with a's FP8 values and scale, the latter as one row."""
  a_q, a_scale = quantize(a, dtype, by_row)
  return _product(a_q, a_scale, b_q, b_scale, a.dtype), a_q, a_scale.reshape(1, -1)


def _matmul_bwd(bf16_wgrad, residuals, g):
  kept_x, w_q, w_scale = residuals
  dtype = g.dtype  # y's, which is x's and w's
  # rows scaled by their own max take e4m3's bits: the range a row needs is its own
  g_format = E4M3 if bf16_wgrad else E5M2
  dx, g_q, g_scale = sharding.batch_local(functools.partial(_rows_times, dtype=g_format, by_row=bf16_wgrad), (g,),
                                          (w_q.T, w_scale))
  if bf16_wgrad:
    dw = jax.lax.dot_general(kept_x[0], g.astype(dtype), (((0,), (0,)), ((), ())),
                             preferred_element_type=dtype)
  else:
    x_q, x_scale = kept_x
    dw = sharding.batch_local(functools.partial(_weight_gradient_share, dtype=dtype), (x_q, x_scale, g_q, g_scale),
                              ()).sum(0, dtype=dtype)
  return dx, dw


def _weight_gradient_share(x_q, x_scale, g_q, g_scale, dtype):
  """One device's share of the weight gradient, x^T g over its rows under their own two scales, as one row."""
  return _product(x_q.T, x_scale.reshape(()), g_q, g_scale.reshape(()), dtype)[None]


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def check_device(fmt: str, device) -> None:
  """ConfigError when `fmt` is 'fp8' and `device` is a GPU without FP8 tensor cores. A CPU runs the same
  arithmetic in its compute dtype (the tests'); other platforms are left to their compilers."""
  if fmt not in RECIPES or getattr(device, "platform", "") not in ("gpu", "cuda"):
    return
  capability = getattr(device, "compute_capability", None)
  if capability is None:
    return
  major, minor = (int(p) for p in str(capability).split(".")[:2])
  if (major, minor) < MIN_COMPUTE_CAPABILITY:
    raise ConfigError(f"config.precision.gemm={fmt}: {getattr(device, 'device_kind', 'this GPU')} (compute "
                      f"capability {major}.{minor}) has no FP8 tensor cores; FP8 GEMMs need "
                      f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer (H100, H200, L40S): set "
                      f"--config.precision.gemm=compute_dtype")
