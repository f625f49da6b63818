"""The primitives a CPU training step is made of, ours (XLA) against PyTorch's, on this machine.

  python -m visionfm_jax.bench.primitives [--gemm=1576x384x1536,...] [--backends=default,onednn,...] [--train]
      [--reduce=8x16x3x196x196:2,...] [--repeats=N]

`--gemm=MxKxN`: an (M, K) x (K, N) fp32 matmul, jitted, against `torch.matmul` (intra-op threads = the cores
XLA uses), interleaved; GFLOP/s of each and the median of the per-pair time ratios (ours / PyTorch's). The
defaults are ViT-S/16's dense layers at batch 8 (M = 8 x 197 tokens): qkv, fc1, fc2 and the attention output.
`--train` times the three products of a dense layer's training step instead: y = x W, dx = dy W^T, dW = x^T dy.
`--backends`: the XLA CPU library each matmul is compiled for, per executable (XLA compiler options):
  default  XLA's own choice (YNNPACK where it takes the dot, Eigen otherwise)
  onednn   oneDNN for every dot (--xla_cpu_use_onednn, fusion type dot, YNNPACK off)
  xnn      XNNPACK for the dots it takes, Eigen otherwise (YNNPACK off)
  eigen    Eigen (YNNPACK off)
`--reduce=SHAPE:AXES`: the sum over the leading AXES axes of an fp32 array, as `jnp.sum` and as
`kernels.sum_leading_as_matmul` (the CPU path of `kernels.sum_leading`), in ms. The default is SwinV2-T stage 0's
position-bias gradient (batch 8, 16 windows, 3 heads, 196 x 196).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
import numpy as np

from visionfm_jax import cli
from visionfm_jax.errors import UserError

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


# Per-executable XLA options that route a CPU dot to one library (names as in xla/debug_options_flags.cc).
CPU_DOT_BACKENDS = {
  "default": {},
  "onednn": {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    "xla_cpu_experimental_ynn_fusion_type": "",
  },
  "xnn": {
    "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    "xla_cpu_experimental_ynn_fusion_type": "",
  },
  "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


def parse_backends(text: str) -> list[str]:
  backends = [item for item in text.split(",") if item]
  unknown = sorted(set(backends) - set(CPU_DOT_BACKENDS))
  if unknown or not backends:
    raise UserError(f"--backends: {text!r}: expected a comma-separated subset of {', '.join(CPU_DOT_BACKENDS)}")
  return backends


def _elapsed_ms(fn) -> float:
  start = time.perf_counter()
  fn()
  return (time.perf_counter() - start) * 1e3


def _median_ms(fn, repeats: int) -> float:
  return float(np.median([_elapsed_ms(fn) for _ in range(repeats)]))


def _dense_products(x, w, dy, train: bool):
  """The forward product, or with `train` the three products of a dense layer's training step."""
  if not train:
    return x @ w
  return x @ w, dy @ w.T, x.T @ dy


def time_gemms(gemms, repeats: int, backends=("default",), train: bool = False) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top

  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"--gemm compares with PyTorch, which is not installed ({e}); pass --gemm='' to skip") from e
  if jax.default_backend() != "cpu" and list(backends) != ["default"]:
    raise UserError(
      f"--backends={','.join(backends)} selects XLA CPU libraries; this backend is {jax.default_backend()}"
    )
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  rng = np.random.default_rng(0)
  rows = []
  for m, k, n in gemms:
    arrays = [rng.standard_normal(shape, np.float32) for shape in ((m, k), (k, n), (m, n))]
    jax_args, torch_args = [jax.numpy.asarray(a) for a in arrays], [torch.from_numpy(a) for a in arrays]
    lowered = jax.jit(lambda x, w, dy: _dense_products(x, w, dy, train)).lower(*jax_args)
    sides = {name: lowered.compile(compiler_options=CPU_DOT_BACKENDS[name]) for name in backends}
    runs = {name: (lambda c=compiled: jax.block_until_ready(c(*jax_args))) for name, compiled in sides.items()}
    runs["torch"] = lambda: _dense_products(*torch_args, train)
    times = {name: [] for name in runs}
    for name, run in runs.items():
      run()
    for i in range(repeats):  # interleaved, alternating the order, so load from other jobs falls on all alike
      for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
        times[name].append(_elapsed_ms(runs[name]))
    flop = 2.0 * m * k * n * (3 if train else 1)
    torch_ms = np.array(times["torch"])
    row = {
      "gemm": f"{m}x{k}x{n}",
      "train": train,
      "torch_ms": float(np.median(torch_ms)),
      "torch_gflops": flop / float(np.median(torch_ms)) / 1e6,
      "xla": {},
    }
    for name in backends:
      ms = np.array(times[name])
      row["xla"][name] = {
        "ms": float(np.median(ms)),
        "gflops": flop / float(np.median(ms)) / 1e6,
        "ratio_to_torch": float(np.median(ms / torch_ms)),
      }
    rows.append(row)
  return rows


def time_reductions(reductions, repeats: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top

  from visionfm_jax.models import kernels  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  rows = []
  for shape, axes in reductions:
    x = jax.numpy.asarray(rng.standard_normal(shape, np.float32))
    reduce = jax.jit(lambda t, axes=axes: jax.numpy.sum(t, axis=tuple(range(axes))))
    matmul = jax.jit(lambda t, axes=axes: kernels.sum_leading_as_matmul(t, axes))
    np.testing.assert_allclose(np.asarray(reduce(x)), np.asarray(matmul(x)), rtol=1e-3, atol=1e-2)
    rows.append(
      {
        "reduce": f"{'x'.join(map(str, shape))}:{axes}",
        "jnp_sum_ms": _median_ms(lambda: reduce(x).block_until_ready(), repeats),
        "sum_leading_ms": _median_ms(lambda: matmul(x).block_until_ready(), repeats),
      }
    )
  return rows


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("gemm", DEFAULT_GEMMS, "comma-separated MxKxN matmuls ('' for none)", flag_values=fv)
  flags.DEFINE_string(
    "backends", "default", f"comma-separated XLA CPU dot libraries: {', '.join(CPU_DOT_BACKENDS)}", flag_values=fv
  )
  flags.DEFINE_bool("train", False, "time a dense layer's three training products (y, dx, dW) per GEMM", flag_values=fv)
  flags.DEFINE_string(
    "reduce", DEFAULT_REDUCTIONS, "comma-separated SHAPE:AXES leading-axis sums ('' for none)", flag_values=fv
  )
  flags.DEFINE_integer(
    "repeats", 20, "timed runs of each primitive (the median is reported)", lower_bound=1, flag_values=fv
  )
  return fv


def _body(fv, rest):
  del rest
  gemms, reductions, backends = parse_gemms(fv.gemm), parse_reductions(fv.reduce), parse_backends(fv.backends)
  result = {
    "gemm": time_gemms(gemms, fv.repeats, backends, fv.train),
    "reduce": time_reductions(reductions, fv.repeats),
  }
  for row in result["gemm"]:
    ours = ", ".join(
      f"{name} {side['gflops']:6.1f} GFLOP/s (x{side['ratio_to_torch']:.2f})" for name, side in row["xla"].items()
    )
    print(f"gemm {row['gemm']:>18}{' train' if row['train'] else ''}: {ours}; torch {row['torch_gflops']:6.1f} GFLOP/s")
  for row in result["reduce"]:
    print(f"sum {row['reduce']:>19}: jnp.sum {row['jnp_sum_ms']:.2f} ms, sum_leading {row['sum_leading_ms']:.2f} ms")
  print(json.dumps(result, sort_keys=True))


def main(argv) -> int:
  return cli.run(argv, make_flags(), __doc__, _body)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
