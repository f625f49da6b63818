"""The primitives a CPU training step is made of, ours (XLA) against PyTorch's, on this machine.

  python -m visionfm_jax.bench.primitives [--gemm=1576x384x1536,...] [--reduce=8x16x3x196x196:2,...] [--repeats=N]

`--gemm=MxKxN`: an (M, K) x (K, N) fp32 matmul, jitted, against `torch.matmul` (intra-op threads = the cores
XLA uses), interleaved; GFLOP/s of each. The defaults are ViT-S/16's dense layers at batch 8 (M = 8 x 197
tokens): qkv, fc1, fc2 and the attention output.
`--reduce=SHAPE:AXES`: the sum over the leading AXES axes of an fp32 array, as `jnp.sum` and as
`layers.sum_leading` (a ones-vector matmul), in ms. The default is SwinV2-T stage 0's position-bias gradient
(batch 8, 16 windows, 3 heads, 196 x 196).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import flags

from visionfm_jax.errors import UserError
from visionfm_jax.tools import cli

DEFAULT_GEMMS = "1576x384x1152,1576x384x1536,1576x1536x384,1576x384x384"
DEFAULT_REDUCTIONS = "8x16x3x196x196:2"


def _parse_dims(text: str, flag: str) -> tuple[int, ...]:
  try:
    dims = tuple(int(d) for d in text.split("x"))
  except ValueError:
    dims = ()
  if not dims or min(dims) < 1:
    raise UserError(f"--{flag}: {text!r} is not a shape like 1576x384x1536")
  return dims


def parse_gemms(text: str) -> list[tuple[int, int, int]]:
  gemms = [_parse_dims(item, "gemm") for item in text.split(",") if item]
  for dims in gemms:
    if len(dims) != 3:
      raise UserError(f"--gemm: {'x'.join(map(str, dims))} is not MxKxN")
  return gemms


def parse_reductions(text: str) -> list[tuple[tuple[int, ...], int]]:
  out = []
  for item in filter(None, text.split(",")):
    shape_text, sep, axes = item.partition(":")
    shape = _parse_dims(shape_text, "reduce")
    if not sep or not axes.isdigit() or not 0 < int(axes) < len(shape):
      raise UserError(f"--reduce: {item!r}: expected SHAPE:AXES with 0 < AXES < rank, e.g. 8x16x3x196x196:2")
    out.append((shape, int(axes)))
  return out


def _elapsed_ms(fn) -> float:
  start = time.perf_counter()
  fn()
  return (time.perf_counter() - start) * 1e3


def _median_ms(fn, repeats: int) -> float:
  return float(np.median([_elapsed_ms(fn) for _ in range(repeats)]))


def time_gemms(gemms, repeats: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"--gemm compares with PyTorch, which is not installed ({e}); pass --gemm='' to skip") from e
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  rng = np.random.default_rng(0)
  rows = []
  for m, k, n in gemms:
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ja, jb, ta, tb = jax.numpy.asarray(a), jax.numpy.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    matmul = jax.jit(lambda x, y: x @ y)
    ours = lambda: matmul(ja, jb).block_until_ready()
    theirs = lambda: torch.matmul(ta, tb)
    ours(), theirs()
    ours_times, torch_times = [], []
    for _ in range(repeats):  # interleaved, so that load from other jobs falls on both alike
      ours_times.append(_elapsed_ms(ours))
      torch_times.append(_elapsed_ms(theirs))
    flop = 2.0 * m * k * n
    ours_ms, torch_ms = float(np.median(ours_times)), float(np.median(torch_times))
    rows.append({"gemm": f"{m}x{k}x{n}", "ours_ms": ours_ms, "torch_ms": torch_ms,
                 "ours_gflops": flop / ours_ms / 1e6, "torch_gflops": flop / torch_ms / 1e6})
  return rows


def time_reductions(reductions, repeats: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from visionfm_jax.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = []
  for shape, axes in reductions:
    x = jax.numpy.asarray(rng.standard_normal(shape, np.float32))
    reduce = jax.jit(lambda t, axes=axes: jax.numpy.sum(t, axis=tuple(range(axes))))
    matmul = jax.jit(lambda t, axes=axes: layers.sum_leading(t, axes))
    np.testing.assert_allclose(np.asarray(reduce(x)), np.asarray(matmul(x)), rtol=1e-3, atol=1e-2)
    rows.append({"reduce": f"{'x'.join(map(str, shape))}:{axes}",
                 "jnp_sum_ms": _median_ms(lambda: reduce(x).block_until_ready(), repeats),
                 "sum_leading_ms": _median_ms(lambda: matmul(x).block_until_ready(), repeats)})
  return rows


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("gemm", DEFAULT_GEMMS, "comma-separated MxKxN matmuls ('' for none)", flag_values=fv)
  flags.DEFINE_string("reduce", DEFAULT_REDUCTIONS, "comma-separated SHAPE:AXES leading-axis sums ('' for none)",
                      flag_values=fv)
  flags.DEFINE_integer("repeats", 20, "timed runs of each primitive (the median is reported)", lower_bound=1,
                       flag_values=fv)
  return fv


def _body(fv, rest):
  del rest
  gemms, reductions = parse_gemms(fv.gemm), parse_reductions(fv.reduce)
  result = {"gemm": time_gemms(gemms, fv.repeats), "reduce": time_reductions(reductions, fv.repeats)}
  for row in result["gemm"]:
    print(f"gemm {row['gemm']:>18}: ours {row['ours_gflops']:6.1f} GFLOP/s ({row['ours_ms']:.2f} ms), "
          f"torch {row['torch_gflops']:6.1f} GFLOP/s ({row['torch_ms']:.2f} ms)")
  for row in result["reduce"]:
    print(f"sum {row['reduce']:>19}: jnp.sum {row['jnp_sum_ms']:.2f} ms, sum_leading {row['sum_leading_ms']:.2f} ms")
  print(json.dumps(result, sort_keys=True))


def main(argv) -> int:
  return cli.run(argv, make_flags(), __doc__, _body)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
