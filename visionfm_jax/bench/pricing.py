"""Prices a GPU program's kernels (bench/hlo_cost.py) with the calibrated roofline: each kernel the max of its FLOPs
over the peak times its class's efficiency and its bytes over the memory bandwidth times the memory efficiency,
plus a launch cost; each collective its payload over the link its group crosses, less what the kernels the
schedule runs beside it hide. bench/roofline.py fits the prices (`--calibrate`) and reports; bench/memory_plan.py
ranks candidates by the predicted step. Every figure is a prediction."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from visionfm_jax.bench import gpu_target, hlo_cost

HERE = os.path.dirname(os.path.abspath(__file__))
CALIBRATION = os.path.join(HERE, "gpu_targets", "calibration.json")
SIXTEEN_BIT = ("bf16", "f16")
EIGHT_BIT_FLOAT = "f8"  # the prefix of HLO's FP8 element types (f8e4m3fn, f8e5m2)


@dataclasses.dataclass
class Prices:
  """Fractions of the datasheet peaks that kernels of each class reach, and a fixed cost per launch. `gemm_fp8`, FP8
  GEMMs' fraction of the FP8 peak, is fitted only where an FP8 row is measured; None prices them as `gemm`."""
  gemm: float = 0.7
  attention: float = 0.5
  memory: float = 0.8
  launch_us: float = 3.0
  gemm_fp8: float | None = None


def load_prices(path: str = CALIBRATION) -> tuple[Prices, dict]:
  """The calibrated prices and the calibration's record; the uncalibrated defaults and {} without a file."""
  if not os.path.exists(path):
    return Prices(), {}
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  return Prices(**record["prices"]), record


# ------------------------------------------------------------------------------------------------ pricing

def collective_seconds(kernel: hlo_cost.Kernel, target: gpu_target.Target, prices: Prices) -> float:
  """One collective over its group's slowest link (ring algorithms)."""
  n = kernel.group_size
  if n <= 1:
    return prices.launch_us * 1e-6
  link = target.network_bandwidth if kernel.group_spans_nodes else target.nvlink_bandwidth
  factor = 2 * (n - 1) / n if kernel.collective == "all-reduce" else (n - 1) / n
  return kernel.bytes * factor / link + prices.launch_us * 1e-6


def is_fp8(dtype: str, target: gpu_target.Target) -> bool:
  return dtype.startswith(EIGHT_BIT_FLOAT) and bool(target.peak_flops_fp8)


def peak_flops(dtype: str, target: gpu_target.Target) -> float:
  """The tensor-core peak a GEMM or attention kernel of input `dtype` runs against (FP8 GEMMs: the FP8 peak, which
  Prices.gemm_fp8 scales)."""
  if dtype in SIXTEEN_BIT:
    return target.peak_flops_16bit
  if is_fp8(dtype, target):
    return target.peak_flops_fp8
  return target.peak_flops_tf32


class Priced:
  """A program's kernels as arrays, so that a step is priced at once for any Prices (the fit prices each
  calibration row thousands of times)."""

  def __init__(self, program: hlo_cost.Program, target: gpu_target.Target):
    import numpy as np  # pylint: disable=g-import-not-at-top
    self.kernels = program.kernels
    positions = [i for i, k in enumerate(program.kernels) if k.kind != "collective"]
    compute = [program.kernels[i] for i in positions]
    self.compute_index = {position: i for i, position in enumerate(positions)}
    self.flops = np.array([k.flops for k in compute], np.float64)
    self.bytes = np.array([k.bytes for k in compute], np.float64)
    self.count = np.array([k.count for k in compute], np.float64)
    self.peak = np.array([peak_flops(k.dtype, target) for k in compute], np.float64)
    self.is_attention = np.array([k.kind == "attention" for k in compute])
    self.is_fp8 = np.array([k.kind == "gemm" and is_fp8(k.dtype, target) for k in compute])
    self.kinds = [k.kind for k in compute]
    self.collectives = [(i, k, [self.compute_index[o] for o in k.overlap])
                        for i, k in enumerate(program.kernels) if k.kind == "collective"]
    self.target = target

  def kernel_seconds(self, prices: Prices):
    """Seconds of one launch of each compute kernel."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    gemm_fp8 = prices.gemm if prices.gemm_fp8 is None else prices.gemm_fp8
    efficiency = np.where(self.is_attention, prices.attention, np.where(self.is_fp8, gemm_fp8, prices.gemm))
    compute = self.flops / (self.peak * efficiency)
    memory = self.bytes / (self.target.memory_bandwidth * prices.memory)
    return np.maximum(compute, memory) + prices.launch_us * 1e-6

  def collective_times(self, prices: Prices, per_launch) -> list[tuple[float, float]]:
    """(seconds, exposed seconds) of each collective's launches: its transfer, and what of it the kernels
    scheduled between its start and done (`per_launch`: `kernel_seconds`) do not hide."""
    out = []
    for _, kernel, overlapped in self.collectives:
      seconds = collective_seconds(kernel, self.target, prices)
      out.append((seconds * kernel.count, max(0.0, seconds - float(per_launch[overlapped].sum())) * kernel.count))
    return out

  def step_seconds(self, prices: Prices) -> float:
    """The predicted step alone (what the fit evaluates thousands of times)."""
    per_launch = self.kernel_seconds(prices)
    return float((per_launch * self.count).sum()) + sum(e for _, e in self.collective_times(prices, per_launch))

  def predict(self, prices: Prices) -> dict:
    """Predicted seconds of one step: per class, per kernel (in Program.kernels' order), the exposed part of the
    collectives, the total."""
    per_launch = self.kernel_seconds(prices)
    per_kernel = per_launch * self.count
    by_class = collections.Counter()
    for kind, seconds in zip(self.kinds, per_kernel):
      by_class[kind] += float(seconds)
    collectives = self.collective_times(prices, per_launch)
    if collectives:
      by_class["collective (total)"] = sum(s for s, _ in collectives)
    exposed = sum(e for _, e in collectives)
    compute = float(per_kernel.sum())
    seconds_of = dict(zip((position for position, _, _ in self.collectives), (s for s, _ in collectives)))
    ordered = [seconds_of[i] if k.kind == "collective" else float(per_kernel[self.compute_index[i]])
               for i, k in enumerate(self.kernels)]
    return {"step_s": compute + exposed, "compute_s": compute, "exposed_collective_s": exposed,
            "by_class_s": dict(by_class), "per_kernel_s": ordered}


def predict(program: hlo_cost.Program, target: gpu_target.Target, prices: Prices) -> dict:
  return Priced(program, target).predict(prices)
