"""The roofline's 16-bit GEMM efficiency by shape (M, N, K), one GPU against another, from public cuBLAS figures
(`gpu_targets/gemm_efficiency.json`, which cites them).

cuBLAS computes a GEMM's M x N output in tiles, one thread block each, and runs the tiles in waves of one per
streaming multiprocessor (NVIDIA's Matrix Multiplication Background guide): a GEMM whose last wave is partly empty,
or whose edge tiles are partly outside the output, wastes that share of its time. A GPU's efficiency at a shape is
then its ceiling times that utilisation, the ceiling read off its published maximum achievable matmul rate (MAMF)
divided by the utilisation of the shape that rate was found at.

The roofline fits one GEMM efficiency on the measured rows of one GPU (bench/pricing.py, `--calibrate`); another
GPU's GEMMs are priced at that efficiency times `relative_rate`: the ratio of the two GPUs' efficiencies at the
GEMM's own shape (the A100's 108 SMs quantise other shapes than the H100's 132). The K dimension, which sets how
much of a tile's time its prologue and epilogue take, is not modelled: the published figures do not separate it.
Every figure this gives is a prediction."""

from __future__ import annotations

import functools
import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = os.path.join(HERE, "gpu_targets", "gemm_efficiency.json")


@functools.lru_cache(maxsize=None)
def table(path: str = TABLE) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def utilisation(m: int, n: int, sms: int, tiles: list) -> float:
  """The share of the tiles' work, in whole waves over `sms` SMs, that lies inside the M x N output, for the best of
  `tiles` (cuBLAS's heuristics pick a tile per shape; the large tiles are taken as equally efficient)."""

  def share(tile):
    count = math.ceil(m / tile[0]) * math.ceil(n / tile[1])
    return m * n / (math.ceil(count / sms) * sms * tile[0] * tile[1])

  return max(share(tile) for tile in tiles)


def efficiency(target: str, shape: tuple[int, int, int], path: str = TABLE) -> float:
  """The fraction of `target`'s 16-bit peak cuBLAS reaches on an (M, N, K) GEMM (batch folded into M)."""
  spec, tiles = table(path)["targets"][target], table(path)["tiles"]
  best_m, best_n, _ = spec["mamf_shape"]
  ceiling = spec["mamf_tflops"] / spec["peak_tflops"] / utilisation(best_m, best_n, spec["sms"], tiles)
  return ceiling * utilisation(shape[0], shape[1], spec["sms"], tiles)


def relative_rate(target: str, fitted_on: str | None, shape: tuple[int, ...], path: str = TABLE) -> float:
  """`target`'s efficiency over `fitted_on`'s at `shape`: what an efficiency fitted on `fitted_on`'s rows is
  multiplied by on `target`. 1 for the fitted GPU itself, a GEMM of unknown shape, or a GPU the table lacks."""
  targets = table(path)["targets"]
  if not fitted_on or target == fitted_on or len(shape) != 3 or target not in targets or fitted_on not in targets:
    return 1.0
  return efficiency(target, shape, path) / efficiency(fitted_on, shape, path)
