r"""SwinV2's window attention alone, forward and backward, per implementation: the Pallas window kernel
(models/kernels.py `window_attention`), cuDNN through `jax.nn.dot_product_attention` and the softmax path, on
windows of a given shape, computed as SwinV2's WindowAttention computes them (cosine-normalised q and k, the
per-head logit scale folded into q, the position bias gathered from its per-offset table by `kernels.relative_offsets`,
the shift mask of a shifted map).

  python -m visionfm_jax.bench.window_attention --window=7 --windows=4 --heads=64 --head_dim=32 --shifted \
      [--batch=32] [--implementations=pallas,cudnn,softmax] [--steps=10] [--warmup=2] [--dtype=bfloat16]

SwinV2-G's 42-block stage (stage 2, models/swinv2.py `stage_windows`): at 224 px 4 windows of 7x7 tokens an image,
64 heads of 32, shifted every other block; at 640 px one window of 40x40 tokens, unshifted (launch/gpu_next.sh runs
both; tests/integration/test_gpu_next.py holds them to the model's geometry). The windows of a shifted map tile a
square, so --windows is a square. The gradient is taken with respect to q, k, v, the logit scale and the per-offset
table (the kernel sums the table's inside; the other two through the gathered (heads, N, N) bias). One JSON line
per implementation: `fwd_bwd_ms` (the median of `--steps` timed calls after `--warmup`; also min and max),
`compile_s` (lowering and compiling), `tflops` (4 N^2 D per window and head forward, 3.5 times that with the
backward's five matmuls, over the median), or `failed` with the first line of why (e.g. cuDNN off a GPU). Exit
status 1 when any failed, 2 on bad flags.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

from absl import flags
import einops
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax import cli
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import kernels

IMPLEMENTATIONS = ("pallas", "cudnn", "softmax", "jax")
MASK_VALUE = -100.0  # the logit SwinV2 gives pairs of different regions of a shifted map (models/swinv2.py's)
MAX_LOGIT_SCALE = math.log(100.0)  # SwinV2's clamp of the logit scale


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_integer("window", 7, "Tokens along a window's side (N = window^2).", flag_values=fv)
  flags.DEFINE_integer("windows", 4, "Windows an image (a square with --shifted).", flag_values=fv)
  flags.DEFINE_integer("heads", 64, "Heads.", flag_values=fv)
  flags.DEFINE_integer("head_dim", 32, "Head dimension.", flag_values=fv)
  flags.DEFINE_bool("shifted", True, "A shifted map: pairs of tokens of different regions masked.", flag_values=fv)
  flags.DEFINE_integer("batch", 32, "Images.", flag_values=fv)
  flags.DEFINE_list("implementations", "pallas,cudnn,softmax", "Of " + ", ".join(IMPLEMENTATIONS) + ".", flag_values=fv)
  flags.DEFINE_integer("steps", 10, "Timed calls.", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed calls after compiling.", flag_values=fv)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "q, k, v's dtype.", flag_values=fv)
  return fv


def shift_regions(windows: int, side: int) -> np.ndarray:
  """(windows, side^2) region ids of a square map of `windows` windows rolled by half a window: along each axis the
  last window's first half, its second half (the rolled-in border) and the rest are three regions."""
  per_axis = math.isqrt(windows) * side
  position = np.arange(per_axis)
  axis = (position >= per_axis - side).astype(np.int32) + (position >= per_axis - side // 2).astype(np.int32)
  ids = axis[:, None] * 3 + axis[None, :]
  return einops.rearrange(ids, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=side, ww=side)


def inputs(shape: dict, batch: int, dtype, seed: int = 0):
  """(q, k, v, logit scale, per-offset table, cotangent) as WindowAttention makes them, and the shift regions (None
  for an unshifted map)."""
  rng = np.random.default_rng(seed)
  dims = (batch, shape["windows"], shape["side"] ** 2, shape["heads"], shape["head_dim"])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (jnp.asarray(unit(rng.normal(size=dims)), dtype) for _ in range(2))
  v, cotangent = (jnp.asarray(rng.normal(size=dims), dtype) for _ in range(2))
  logit_scale = jnp.asarray(rng.uniform(np.log(5.0), MAX_LOGIT_SCALE, shape["heads"]), jnp.float32)
  table = jnp.asarray(16.0 * rng.uniform(size=(shape["heads"], (2 * shape["side"] - 1) ** 2)), jnp.float32)
  regions = jnp.asarray(shift_regions(shape["windows"], shape["side"])) if shape["shifted"] else None
  return (q, k, v, logit_scale, table, cotangent), regions


def attend(implementation: str, side: int, regions):
  """f(q, k, v, logit scale, table) -> the windows' outputs (B, nW, N, H, D), by `implementation`."""
  tokens = np.arange(side * side)
  offsets = kernels.relative_offsets(tokens[:, None], tokens[None, :], side)  # (N, N) into the table
  mask = None if regions is None else jnp.where(regions[:, :, None] == regions[:, None, :], 0.0, MASK_VALUE)

  def f(q, k, v, logit_scale, table):
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    if implementation == kernels.WINDOW_KERNEL:
      return kernels.window_attention(q, k, v, scale, table, regions, mask_value=MASK_VALUE)
    q = (q.astype(jnp.float32) * scale[:, None]).astype(q.dtype)
    bias = table[:, offsets]  # (H, N, N)
    bias = bias if mask is None else bias[None] + mask[:, None]  # (nW, H, N, N) with the mask
    if implementation == "softmax":
      first = kernels.heads_first
      return first(kernels.softmax_attention(first(q), first(k), first(v), bias=bias))
    # the windows folded into the heads: the bias broadcasts over the batch as (1, nW x H, N, N)
    windows, heads = q.shape[1], q.shape[3]
    fold = lambda t: einops.rearrange(t, "b w n h d -> b n (w h) d")
    bias = jnp.broadcast_to(bias, (windows, heads) + bias.shape[-2:]).reshape((1, windows * heads) + bias.shape[-2:])
    out = kernels.fused_attention(
      fold(q), fold(k), fold(v), bias=bias.astype(q.dtype), scale=1.0, implementation=implementation
    )
    return einops.rearrange(out, "b n (w h) d -> b w n h d", w=windows)

  return f


def forward_backward(f):
  """(q, k, v, logit scale, table, cotangent) -> the gradients of <f(...), cotangent> with respect to the five."""

  def step(q, k, v, logit_scale, table, cotangent):
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cotangent.astype(jnp.float32))
    return jax.grad(loss, argnums=tuple(range(5)))(q, k, v, logit_scale, table)

  return jax.jit(step)


def time_one(implementation: str, shape: dict, args, regions, steps: int, warmup: int) -> dict:
  start = time.perf_counter()
  compiled = forward_backward(attend(implementation, shape["side"], regions)).lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - start)
  median = statistics.median(seconds)
  batch = args[0].shape[0]
  flops = 3.5 * 4 * batch * shape["windows"] * shape["heads"] * shape["side"] ** 4 * shape["head_dim"]
  return dict(
    fwd_bwd_ms=round(1e3 * median, 3),
    min_ms=round(1e3 * min(seconds), 3),
    max_ms=round(1e3 * max(seconds), 3),
    compile_s=round(compile_s, 2),
    tflops=round(flops / median / 1e12, 4),
  )


def run(fv) -> bool:
  """Prints a JSON line per implementation; True when one failed."""
  unknown = [name for name in fv.implementations if name not in IMPLEMENTATIONS]
  if unknown:
    raise ConfigError(f"--implementations={','.join(fv.implementations)}: {unknown} not in {IMPLEMENTATIONS}")
  if fv.steps < 1 or fv.warmup < 0 or fv.batch < 1:
    raise ConfigError(
      f"--steps={fv.steps} --warmup={fv.warmup} --batch={fv.batch}: expected steps and batch >= 1, warmup >= 0"
    )
  if min(fv.window, fv.windows, fv.heads, fv.head_dim) < 1:
    raise ConfigError(
      f"--window={fv.window} --windows={fv.windows} --heads={fv.heads} --head_dim={fv.head_dim}: expected each >= 1"
    )
  if fv.shifted and math.isqrt(fv.windows) ** 2 != fv.windows:
    raise ConfigError(f"--windows={fv.windows} with --shifted: the windows of a shifted map tile a square")
  shape = dict(side=fv.window, windows=fv.windows, heads=fv.heads, head_dim=fv.head_dim, shifted=fv.shifted)
  args, regions = inputs(shape, fv.batch, jnp.dtype(fv.dtype))
  device = jax.devices()[0].device_kind
  failed = False
  for implementation in fv.implementations:
    row = dict(
      implementation=implementation,
      window=fv.window,
      tokens=fv.window**2,
      windows=fv.windows,
      heads=fv.heads,
      head_dim=fv.head_dim,
      shifted=fv.shifted,
      batch=fv.batch,
      dtype=fv.dtype,
      device=device,
    )
    try:
      row.update(time_one(implementation, shape, args, regions, fv.steps, fv.warmup))
    except Exception as e:  # pylint: disable=broad-except  # a row saying why; the other implementations still run
      row["failed"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
      failed = True
    print(json.dumps(row), flush=True)
  return failed


def main(argv) -> int:
  failed = []

  def body(fv, rest):
    cli.check_args(fv, rest)
    failed.append(run(fv))

  code = cli.run(argv, make_flags(), __doc__, body)
  return code or int(any(failed))


if __name__ == "__main__":
  sys.exit(main(sys.argv))
