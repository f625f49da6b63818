"""FP8 GEMMs for the transformer blocks (`config.precision.gemm`): the quantization switch.

Three recipes (scaled by powers of two that Hopper's cuBLASLt FP8 GEMM takes, or that multiply its output's rows):
- 'fp8' (Transformer Engine's hybrid recipe, the one NeMo and Megatron train with): all three GEMMs of a dense layer
  in FP8. Forward y = x @ w with x and w in e4m3 (3 mantissa bits, range 448); input gradient dx = dy @ w^T and
  weight gradient dw = x^T @ dy with dy in e5m2 (2 mantissa bits, range 57344: a gradient's outliers need the range
  more than the bits). The backward reuses the forward's e4m3 x and w, so a layer keeps x in one byte, not two.
- 'fp8_bf16_wgrad' (DINOv3's, which trained a ViT-7B so): the forward and input-gradient GEMMs in e4m3 with x and dy
  scaled row by row (each token's own max: its range is its own, so dy too takes e4m3's bits), each product's rows
  multiplied by their scales; the weight gradient in the compute dtype from the unquantized x and dy, so that the
  update the fp32 params accumulate sees no FP8 rounding; a third of the GEMM FLOPs stay at the 16-bit rate and x is
  kept in the compute dtype.
- 'fp8_delayed' (Transformer Engine's `DelayedScaling`, flax's `Fp8DirectDotGeneralOp`): the GEMMs and formats of
  'fp8', with x and dy scaled from an amax history instead of their own max (below); the one that pays on Hopper.

Scales are current (dynamic) in 'fp8' and 'fp8_bf16_wgrad': each call scales a tensor by its own max |value|, so
nothing is carried between steps: params, optimizer state and checkpoints are the same with or without them, and a
run may switch recipes at a resume ('fp8_delayed' adds its histories to the state). In 'fp8', activations and
gradients are scaled by each device's rows (`parallel.sharding.batch_local`): a max over the whole batch would be an
all-reduce over its devices before every cast, 256 a ViT-H/14 step, each on the critical path; each device's weight-
gradient share is summed where the data-parallel gradients are. A weight is scaled whole, and each device takes its
FP8 values whole (XLA would otherwise dequantize an fsdp shard and gather it in bf16 into a product no FP8 GEMM
takes). Each scale is a power of two, 2^ceil(log2(amax / fp8 max)), so that it is exact in bf16 and dividing by it
loses nothing; the cost is at most one binade of the format's range left unused.

Delayed scaling ('fp8_delayed'): current scaling reads each input once for its max and again for the cast, and XLA
often leaves the max a pass of its own over the whole activation (openxla/xla #7432). Here x's scale (and dy's) is the
power of two of the largest amax its layer recorded over the last HISTORY_LENGTH steps, known before the tensor is:
the cast needs nothing but the tensor, so it fuses into the op producing it (LayerNorm, GELU, the residual add's
gradient), and the tensor's own amax, recorded for the steps to come, is off the critical path (nothing waits for it
until the next step). Each FP8 tensor is materialized where it is cast (`_materialized`), so that XLA 0.10.2's GPU
compiler makes the cast and the amax one fusion reading its input once. fc2's output gradient is the exception: XLA's
Triton LayerNorm-backward fusion produces it and no sibling joins that, so its amax (and in all but the last block its
cast) stays a pass of its own (tests/integration/test_fp8_delayed_h100.py counts them). A value beyond the history's
range saturates at the format's largest.
An empty history (the first step, or a resume that turns the recipe on) scales by 1: a gradient's first step with a
new layer leaves its values below e5m2's 2^-16 at 0, once. A weight is scaled by its own max: it is quantized once a
step (its FP8 copy kept for the input-gradient GEMM), so that costs a pass over the weight, not over an activation.
Each `fp8=True` Dense keeps two histories (its input's and its output gradient's, HISTORY_LENGTH fp32 each, newest
first; an attention's output projection, K = N = width, where Transformer Engine's profile finds FP8 pays least, stays
in the compute dtype), created by the model's init in the `HISTORY` collection and kept in the train state
(training/fp8_history.py), replicated; the step merges them into the params the model reads (`with_histories`) and
takes the updated ones as their cotangents, as flax's "overwrite with gradient" variables are: `delayed_matmul`'s
backward returns each history with its new amax in front. A max over the whole batch is global (the all-reduce of one
scalar, which nothing waits for until the next step).

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

from collections.abc import Mapping
import functools

from flax.linen import fp8_ops
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from visionfm_jax.errors import ConfigError
from visionfm_jax.parallel import sharding

DELAYED = "fp8_delayed"
CURRENT = ("fp8", "fp8_bf16_wgrad")  # the recipes scaled by each call's own values
RECIPES = CURRENT + (DELAYED,)
FORMATS = ("compute_dtype",) + RECIPES
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
# FP8 GEMMs need Hopper's (or Ada's) tensor cores: CUDA compute capability 8.9 and newer.
MIN_COMPUTE_CAPABILITY = (8, 9)
_GEMMS = jax.make_user_context("compute_dtype")  # part of jit's cache key, as kernels.forced is
# Delayed scaling: the flax collection the model's init creates the amax histories in, their names within a Dense,
# and their length in steps (Transformer Engine's DelayedScaling example's amax_history_len).
HISTORY = "fp8_history"
INPUT_HISTORY, GRAD_HISTORY = "amax_history_input", "amax_history_grad"
HISTORY_LENGTH = 16


def gemms(fmt: str):
  """A context manager under which the `fp8=True` dense layers traced run their GEMMs in `fmt` (FORMATS)."""
  if fmt not in FORMATS:
    raise ValueError(f"precision.gemm={fmt!r}: expected one of {FORMATS}")
  return _GEMMS(fmt)


def active() -> str | None:
  """The FP8 recipe of what is being traced (RECIPES), or None."""
  return _GEMMS.value if _GEMMS.value in RECIPES else None


def matmul_of(recipe: str | None, histories: tuple[jax.Array, jax.Array] | None = None):
  """(x, w) -> x @ w in `recipe`'s FP8 GEMMs; None for none. `histories`: the layer's (input, gradient) amax
  histories, which DELAYED scales from."""
  if recipe == DELAYED:
    if histories is None:
      raise ValueError(f"precision.gemm={DELAYED}: a GEMM needs its amax histories (fp8.with_histories)")
    return lambda x, w: delayed_matmul(x, w, *histories)
  return None if recipe is None else functools.partial(matmul, bf16_wgrad=recipe == "fp8_bf16_wgrad")


def scale(x: jax.Array, dtype, by_row: bool = False) -> jax.Array:
  """The fp32 power of two that maps max |x| into `dtype`'s range (`by_row`: each row's max, an (M, 1) column); 1 for
  an all-zero x. A non-finite x keeps a non-finite scale, so that its infinities and NaNs reach the product as NaNs
  instead of being clipped to the format's largest value: fp16's loss scaling and the health guard see an overflow
  through an FP8 GEMM."""
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True) if by_row else jnp.max(jnp.abs(x))
  return scale_of_amax(amax.astype(jnp.float32), dtype)


def scale_of_amax(amax: jax.Array, dtype) -> jax.Array:
  """The fp32 power of two that maps `amax` (fp32) into `dtype`'s range; 1 where it is 0."""
  exponent = jnp.ceil(jnp.log2(amax / jnp.finfo(dtype).max.astype(jnp.float32)))
  # ldexp, exact where XLA's exp2 is an approximation (2^-25.0 came out 5e-7 off on a CPU)
  power = jnp.ldexp(jnp.float32(1.0), jnp.where(jnp.isfinite(exponent), exponent, 0).astype(jnp.int32))
  return jnp.where(amax > 0, jnp.where(jnp.isfinite(exponent), power, exponent), jnp.float32(1.0))


def quantize(x: jax.Array, dtype, by_row: bool = False) -> tuple[jax.Array, jax.Array]:
  """(x / s in `dtype`, s) with s = `scale(x, dtype, by_row)`. A bf16 or fp32 x is divided in its own dtype: a power
  of two divides exactly in either, so the values are the exact quotient's, and XLA does not write an fp32 copy of x
  for the max and the cast to read (it did for the MLP's input gradient: 4 bytes an element written, read twice).
  fp16 goes through fp32, whose range holds every scale."""
  s = jax.lax.stop_gradient(scale(x, dtype, by_row))
  return quantized_by(x, dtype, s), s


def quantized_by(x: jax.Array, dtype, s: jax.Array) -> jax.Array:
  """x / s in `dtype`, clipped to its range (flax's quantize), divided in x's dtype where that is bf16 or fp32
  (`quantize`)."""
  compute = x.dtype if x.dtype in (jnp.bfloat16, jnp.float32) else jnp.float32
  return fp8_ops.quantize(x.astype(compute), dtype, s, compute)


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
  y, x_q, x_scale = sharding.batch_local(
    functools.partial(_rows_times, dtype=E4M3, by_row=bf16_wgrad), (x,), (w_q, w_scale)
  )
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
  dx, g_q, g_scale = sharding.batch_local(
    functools.partial(_rows_times, dtype=g_format, by_row=bf16_wgrad), (g,), (w_q.T, w_scale)
  )
  if bf16_wgrad:
    dw = jax.lax.dot_general(kept_x[0], g.astype(dtype), (((0,), (0,)), ((), ())), preferred_element_type=dtype)
  else:
    x_q, x_scale = kept_x
    dw = sharding.batch_local(
      functools.partial(_weight_gradient_share, dtype=dtype), (x_q, x_scale, g_q, g_scale), ()
    ).sum(0, dtype=dtype)
  return dx, dw


def _weight_gradient_share(x_q, x_scale, g_q, g_scale, dtype):
  """One device's share of the weight gradient, x^T g over its rows under their own two scales, as one row."""
  return _product(x_q.T, x_scale.reshape(()), g_q, g_scale.reshape(()), dtype)[None]


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def fresh_history(*_) -> jax.Array:
  """An empty amax history (zeros: nothing recorded, scale 1); flax's init signature (rng, ...) ignored."""
  return jnp.zeros((HISTORY_LENGTH,), jnp.float32)


def history_scale(history: jax.Array, dtype) -> jax.Array:
  """The delayed scale of a tensor whose recent amaxes are `history`: that of their max."""
  return scale_of_amax(jnp.max(history), dtype)


def recorded(history: jax.Array, amax: jax.Array) -> jax.Array:
  """`history` with `amax` (fp32 scalar) in front and its oldest entry dropped. A non-finite amax (an fp16
  overflow, which the loss scale skips) is recorded as 0, so that it does not set the scale of the steps after."""
  amax = amax.astype(jnp.float32)
  return jnp.concatenate([jnp.where(jnp.isfinite(amax), amax, 0.0)[None], history[:-1]])


def _materialized(q: jax.Array) -> jax.Array:
  """`q`, written once in FP8 where it is made. The weight-gradient GEMM takes its operand transposed (cuBLASLt's
  FP8 GEMMs take only the TN layout); without the barrier XLA folds the cast into that transpose's fusion and computes
  the amax in a pass of its own, re-reading the 16-bit input (and recomputing a LayerNorm) three times. With it, the
  cast and the amax are one fusion reading the input once, and the transpose copies one byte an element."""
  return jax.lax.optimization_barrier(q)


def _amax(x: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(x)).astype(jnp.float32)


@jax.custom_vjp
def delayed_matmul(x: jax.Array, w: jax.Array, x_history: jax.Array, g_history: jax.Array) -> jax.Array:
  """x (M, K) @ w (K, N), both of one dtype, in 'fp8_delayed' (module docstring): x in e4m3 scaled from
  `x_history`, w in e4m3 by its own max, the output gradient in e5m2 scaled from `g_history`. The histories'
  cotangents are the histories updated (`recorded`) with x's amax and the gradient's, not derivatives."""
  return _delayed_fwd(x, w, x_history, g_history)[0]


def _delayed_fwd(x, w, x_history, g_history):
  if x.dtype != w.dtype:
    raise ValueError(f"fp8.delayed_matmul: operands of one dtype expected, got {x.dtype} and {w.dtype}")
  w_q, w_scale = quantize(w, E4M3)
  # every device takes the weight's FP8 values whole (an fsdp shard is gathered in one byte, not dequantized)
  w_q = sharding.constrain_to(w_q, P())
  x_scale = history_scale(x_history, E4M3)
  x_q = _materialized(quantized_by(x, E4M3, x_scale))
  y = _product(x_q, x_scale, w_q, w_scale, x.dtype)
  return y, (x_q, x_scale, w_q, w_scale, _amax(x), x_history, g_history)


def _delayed_bwd(residuals, g):
  x_q, x_scale, w_q, w_scale, x_amax, x_history, g_history = residuals
  g_scale = history_scale(g_history, E5M2)
  g_q = _materialized(quantized_by(g, E5M2, g_scale))
  dx = _product(g_q, g_scale, w_q.T, w_scale, g.dtype)
  dw = _product(x_q.T, x_scale, g_q, g_scale, g.dtype)
  return dx, dw, recorded(x_history, x_amax), recorded(g_history, _amax(g))


delayed_matmul.defvjp(_delayed_fwd, _delayed_bwd)


def with_histories(params, histories):
  """`params` with the amax `histories` (a tree of the HISTORY collection's shape) merged in beside each Dense's
  kernel, where the model reads them under 'fp8_delayed'."""
  if not isinstance(histories, Mapping):
    return histories
  merged = dict(params)
  for key, value in histories.items():
    merged[key] = with_histories(params.get(key, {}), value)
  return merged


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
    raise ConfigError(
      f"config.precision.gemm={fmt}: {getattr(device, 'device_kind', 'this GPU')} (compute "
      f"capability {major}.{minor}) has no FP8 tensor cores; FP8 GEMMs need "
      f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer (H100, H200, L40S): set "
      f"--config.precision.gemm=compute_dtype"
    )
