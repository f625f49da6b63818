"""FP8 GEMMs for the transformer blocks (`config.precision.gemm='fp8'`): the quantization switch.

The recipe (DINOv3's, with per-tensor scales, which is what Hopper's cuBLASLt FP8 GEMM takes and XLA emits):
- forward, y = x @ w: both operands quantized to e4m3 (3 mantissa bits, range 448);
- input gradient, dx = dy @ w^T: dy quantized to e5m2 (2 mantissa bits, range 57344: a gradient's outliers need
  the range more than the bits), w reused from the forward in e4m3;
- weight gradient, dw = x^T @ dy: in the compute dtype, from the unquantized x and dy, so that the update that
  accumulates in the fp32 params sees no FP8 rounding.

Scales are current (dynamic): each call scales a tensor by its own max |value|, so nothing is carried between steps:
params, optimizer state and checkpoints are the same with or without FP8, and a run may switch it at a resume
(flax's `Fp8DotGeneralOp` keeps amax histories as variables instead). Each scale is a power of two, 2^ceil(log2(amax
/ fp8 max)), so that it is exact in bf16 and dividing by it loses nothing; the cost is at most one binade of the
format's range left unused.

Quantization and dequantization are flax's (`flax.linen.fp8_ops.quantize` / `dequantize`); the product is a dot of
the dequantized operands, convert(f8) x scalar scale, the pattern XLA's GPU compiler rewrites into one cuBLASLt
FP8 GEMM with the scales as its alpha (`bench.roofline --target=h100` shows the `__cublas$lt$matmul$f8` calls). On
a CPU the same arithmetic runs in the compute dtype: the values are those of FP8 operands.

Which GEMMs: the `Dense` layers created with `fp8=True` (the blocks' attention projections and MLPs), and only
while a program is traced under `gemms('fp8')` (the train step sets it from the config). Norms, embeddings, heads,
SwinV2's position-bias MLP, patch merging and the losses stay in the compute dtype or fp32. Evaluation traces
without it, in the compute dtype.
"""

from __future__ import annotations

from flax.linen import fp8_ops
import jax
import jax.numpy as jnp

from visionfm_jax.errors import ConfigError

FORMATS = ("compute_dtype", "fp8")
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
# FP8 GEMMs need Hopper's (or Ada's) tensor cores: CUDA compute capability 8.9 and newer.
MIN_COMPUTE_CAPABILITY = (8, 9)
_GEMMS = jax.make_user_context("compute_dtype")  # part of jit's cache key, as kernels.forced is


def gemms(fmt: str):
  """A context manager under which the `fp8=True` dense layers traced run their GEMMs in `fmt` (FORMATS)."""
  if fmt not in FORMATS:
    raise ValueError(f"precision.gemm={fmt!r}: expected one of {FORMATS}")
  return _GEMMS(fmt)


def active() -> bool:
  return _GEMMS.value == "fp8"


def scale(x: jax.Array, dtype) -> jax.Array:
  """The fp32 power of two that maps max |x| into `dtype`'s range; 1 for an all-zero (or non-finite) x."""
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  exponent = jnp.ceil(jnp.log2(amax / jnp.finfo(dtype).max.astype(jnp.float32)))
  return jnp.where((amax > 0) & jnp.isfinite(amax), jnp.exp2(exponent), jnp.float32(1.0))


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """(x / s in `dtype`, s) with s = `scale(x, dtype)`."""
  s = jax.lax.stop_gradient(scale(x, dtype))
  return fp8_ops.quantize(x.astype(jnp.float32), dtype, s, jnp.float32), s


def _product(a_q, a_scale, b_q, b_scale, out_dtype) -> jax.Array:
  """dequantized a @ dequantized b, (M, K) x (K, N): the form XLA rewrites into one FP8 GEMM."""
  a = fp8_ops.dequantize(a_q, out_dtype, a_scale)
  b = fp8_ops.dequantize(b_q, out_dtype, b_scale)
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x (M, K) @ w (K, N), both of one dtype, with the module docstring's FP8 recipe; the result in that dtype."""
  return _matmul_fwd(x, w)[0]


def _matmul_fwd(x, w):
  if x.dtype != w.dtype:
    raise ValueError(f"fp8.matmul: operands of one dtype expected, got {x.dtype} and {w.dtype}")
  x_q, x_scale = quantize(x, E4M3)
  w_q, w_scale = quantize(w, E4M3)
  return _product(x_q, x_scale, w_q, w_scale, x.dtype), (x, w_q, w_scale)


def _matmul_bwd(residuals, g):
  x, w_q, w_scale = residuals
  g_q, g_scale = quantize(g, E5M2)
  dx = _product(g_q, g_scale, w_q.T, w_scale, x.dtype)
  dw = jax.lax.dot_general(x, g.astype(x.dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx, dw.astype(x.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def check_device(fmt: str, device) -> None:
  """ConfigError when `fmt` is 'fp8' and `device` is a GPU without FP8 tensor cores. A CPU runs the same
  arithmetic in its compute dtype (the tests'); other platforms are left to their compilers."""
  if fmt != "fp8" or getattr(device, "platform", "") not in ("gpu", "cuda"):
    return
  capability = getattr(device, "compute_capability", None)
  if capability is None:
    return
  major, minor = (int(p) for p in str(capability).split(".")[:2])
  if (major, minor) < MIN_COMPUTE_CAPABILITY:
    raise ConfigError(f"config.precision.gemm=fp8: {getattr(device, 'device_kind', 'this GPU')} (compute "
                      f"capability {major}.{minor}) has no FP8 tensor cores; FP8 GEMMs need "
                      f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer (H100, H200, L40S): set "
                      f"--config.precision.gemm=compute_dtype")
