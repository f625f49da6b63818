r"""SwinV2's window attention alone, forward and backward, per implementation: the Pallas window kernel
(models/kernels.py `window_attention`), cuDNN through `jax.nn.dot_product_attention` and the softmax path, on one
stage of a SwinV2 size at an image size, as WindowAttention runs them (cosine-normalised q and k, the per-head logit
scale, the position bias gathered from its per-offset table, the shift mask of a shifted stage).

  python -m visionfm_jax.bench.window_attention --image_size=224 --window=7 [--variant=G] [--stage=2] \
      [--batch=32] [--implementations=pallas,cudnn,softmax] [--steps=10] [--warmup=2] [--dtype=bfloat16]

The stage's geometry is models/swinv2.py's (`stage_windows`, patch 4): SwinV2-G's stage 2 (42 blocks) at 224 px,
window 7: 4 windows of 49 tokens an image, 64 heads of 32, shifted; at 640 px, window 40: one window of 1,600 tokens,
unshifted. The gradient is taken with respect to q, k, v, the logit scale and the per-offset table (the kernel sums
the table's inside; the other two through the gathered (heads, N, N) bias). One JSON line per implementation:
`fwd_bwd_ms` (the median of `--steps` timed calls after `--warmup`; also min and max), `compile_s` (lowering and
compiling), `tflops` (4 N^2 D per window and head forward, 3.5 times that with the backward's five matmuls, over
the median), or `failed` with the first line of why (e.g. cuDNN off a GPU). Exit status 1 when any failed, 2 on bad
flags.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax import cli
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import kernels, swinv2

IMPLEMENTATIONS = ("pallas", "cudnn", "softmax", "jax")
PATCH = 4


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_integer("image_size", 224, "Image size (px) whose stage is timed.", flag_values=fv)
  flags.DEFINE_integer("window", 7, "config.model.window_size.", flag_values=fv)
  flags.DEFINE_string("variant", "G", "SwinV2 size (models/swinv2.py SIZES): the stage's heads and width.",
                      flag_values=fv)
  flags.DEFINE_integer("stage", 2, "The stage (0-based) whose attention is timed.", flag_values=fv)
  flags.DEFINE_integer("batch", 32, "Images.", flag_values=fv)
  flags.DEFINE_list("implementations", "pallas,cudnn,softmax", "Of " + ", ".join(IMPLEMENTATIONS) + ".",
                    flag_values=fv)
  flags.DEFINE_integer("steps", 10, "Timed calls.", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed calls after compiling.", flag_values=fv)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "q, k, v's dtype.", flag_values=fv)
  return fv


def geometry(variant: str, image_size: int, window: int, stage: int) -> dict:
  """The stage's attention shape: windows an image, tokens a window, heads, head dim, window side and shift."""
  if variant not in swinv2.SIZES:
    raise ConfigError(f"--variant={variant}: expected one of {list(swinv2.SIZES)}")
  embed_dim, depths, heads = swinv2.SIZES[variant]
  if not 0 <= stage < len(depths):
    raise ConfigError(f"--stage={stage}: SwinV2-{variant} has stages 0 to {len(depths) - 1}")
  try:
    feature, side, shift = swinv2.stage_windows(image_size, window, len(depths), PATCH)[stage]
  except ValueError as e:
    raise ConfigError(f"--image_size={image_size} --window={window}: {e}") from e
  width = embed_dim * 2**stage
  return dict(windows=(feature // side) ** 2, tokens=side * side, heads=heads[stage], head_dim=width // heads[stage],
              side=side, shift=shift, feature=feature)


def inputs(shape: dict, batch: int, dtype, seed: int = 0):
  """(q, k, v, logit scale, per-offset table, cotangent) as WindowAttention makes them, and the shift regions (None
  for an unshifted stage)."""
  rng = np.random.default_rng(seed)
  dims = (batch, shape["windows"], shape["tokens"], shape["heads"], shape["head_dim"])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (jnp.asarray(unit(rng.normal(size=dims)), dtype) for _ in range(2))
  v, cotangent = (jnp.asarray(rng.normal(size=dims), dtype) for _ in range(2))
  logit_scale = jnp.asarray(rng.uniform(np.log(5.0), swinv2.MAX_LOGIT_SCALE, shape["heads"]), jnp.float32)
  table = jnp.asarray(16.0 * rng.uniform(size=(shape["heads"], (2 * shape["side"] - 1) ** 2)), jnp.float32)
  regions = (swinv2.shift_regions(shape["feature"], shape["feature"], shape["side"], shape["shift"])
             if shape["shift"] else None)
  return (q, k, v, logit_scale, table, cotangent), regions


def attend(implementation: str, side: int, regions):
  """f(q, k, v, logit scale, table) -> the windows' outputs, as WindowAttention computes them with `implementation`."""
  mask = None if regions is None else jnp.where(regions[:, :, None] == regions[:, None, :], 0.0, swinv2.MASK_VALUE)

  def f(q, k, v, logit_scale, table):
    scale = jnp.exp(jnp.minimum(logit_scale, swinv2.MAX_LOGIT_SCALE))
    if implementation == kernels.WINDOW_KERNEL:
      return kernels.window_attention(q, k, v, scale, table, regions, mask_value=swinv2.MASK_VALUE)
    bias = swinv2.bias_of_offsets(table, side)
    if implementation == "softmax":
      return swinv2.window_attention(q, k, v, scale, bias, mask)
    return swinv2.fused_window_attention(q, k, v, scale, bias, mask, implementation)
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
  flops = 3.5 * 4 * batch * shape["windows"] * shape["heads"] * shape["tokens"] ** 2 * shape["head_dim"]
  return dict(fwd_bwd_ms=round(1e3 * median, 3), min_ms=round(1e3 * min(seconds), 3),
              max_ms=round(1e3 * max(seconds), 3), compile_s=round(compile_s, 2),
              tflops=round(flops / median / 1e12, 4))


def run(fv) -> bool:
  """Prints a JSON line per implementation; True when one failed."""
  unknown = [name for name in fv.implementations if name not in IMPLEMENTATIONS]
  if unknown:
    raise ConfigError(f"--implementations={','.join(fv.implementations)}: {unknown} not in {IMPLEMENTATIONS}")
  if fv.steps < 1 or fv.warmup < 0 or fv.batch < 1:
    raise ConfigError(f"--steps={fv.steps} --warmup={fv.warmup} --batch={fv.batch}: expected steps and batch >= 1, "
                      f"warmup >= 0")
  shape = geometry(fv.variant, fv.image_size, fv.window, fv.stage)
  args, regions = inputs(shape, fv.batch, jnp.dtype(fv.dtype))
  device = jax.devices()[0].device_kind
  failed = False
  for implementation in fv.implementations:
    row = dict(implementation=implementation, image_size=fv.image_size, window=shape["side"], stage=fv.stage,
               variant=fv.variant, batch=fv.batch, windows=shape["windows"], tokens=shape["tokens"],
               heads=shape["heads"], head_dim=shape["head_dim"], shifted=bool(shape["shift"]), dtype=fv.dtype,
               device=device)
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
