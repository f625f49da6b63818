"""Prices a GPU program's kernels (bench/hlo_cost.py) with the calibrated roofline: each kernel the max of its FLOPs
over the peak times its class's efficiency and its bytes over the memory bandwidth times the memory efficiency, plus
a launch cost; each collective its payload over the link its group crosses (NVLink or the network), less what the
kernels the schedule runs beside it hide. Collectives in flight together run one after another: XLA's GPU runtime
issues them all on one stream (`Priced.collective_times`). bench/roofline.py fits the prices (`--calibrate`) and
reports; bench/memory_plan.py ranks candidates by the predicted step. Every figure is a prediction."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from visionfm_jax.bench import gemm_efficiency, gpu_target, hlo_cost

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


def _done(position: int, kernel: hlo_cost.Kernel) -> int:
  """The position in Program.kernels a collective's done precedes: after the kernels it overlaps, else at once."""
  if kernel.done >= 0:
    return kernel.done
  return kernel.overlap[-1] + 1 if kernel.overlap else position + 1


class Priced:
  """A program's kernels as arrays, so that a step is priced at once for any Prices (the fit prices each
  calibration row thousands of times)."""

  def __init__(self, program: hlo_cost.Program, target: gpu_target.Target, fitted_on: str | None = None):
    import numpy as np  # pylint: disable=g-import-not-at-top

    self.kernels = program.kernels
    positions = [i for i, k in enumerate(program.kernels) if k.kind != "collective"]
    compute = [program.kernels[i] for i in positions]
    self.compute_index = {position: i for i, position in enumerate(positions)}
    self.flops = np.array([k.flops for k in compute], np.float64)
    self.bytes = np.array([k.bytes for k in compute], np.float64)
    self.count = np.array([k.count for k in compute], np.float64)
    self.peak = np.array([peak_flops(k.dtype, target) for k in compute], np.float64)
    # prices fitted on another GPU (`fitted_on`): its 16-bit GEMMs at this GPU's efficiency at their shape
    self.peak *= [
      gemm_efficiency.relative_rate(target.name, fitted_on, k.shape)
      if k.kind == "gemm" and k.dtype in SIXTEEN_BIT
      else 1.0
      for k in compute
    ]
    self.is_attention = np.array([k.kind == "attention" for k in compute])
    self.is_fp8 = np.array([k.kind == "gemm" and is_fp8(k.dtype, target) for k in compute])
    self.kinds = [k.kind for k in compute]
    self.collectives = [
      (i, k, [self.compute_index[o] for o in k.overlap])
      for i, k in enumerate(program.kernels)
      if k.kind == "collective"
    ]
    # each collective's start and done as (position in Program.kernels, done first), in schedule order
    self.events = sorted(
      [(i, 1, c) for c, (i, _, _) in enumerate(self.collectives)]
      + [(_done(i, k), 0, c) for c, (i, k, _) in enumerate(self.collectives)]
    )
    is_compute = [k.kind != "collective" for k in program.kernels]
    self.compute_before = np.cumsum([0] + is_compute)  # compute kernels before each position
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
    scheduled between its start and done (`per_launch`: `kernel_seconds`) do not hide.

    One launch of each kernel on a clock: a collective starts where its start sits among the compute kernels,
    transfers once the collectives started before it are done (XLA's GPU runtime runs them on one stream, whatever
    link each crosses), and its done waits for it; the wait is its exposed time, times its launches. With one
    collective in flight at a time that is what the kernels between its start and done do not cover."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    clock = np.concatenate([[0.0], np.cumsum(per_launch)])  # compute time before the k-th compute kernel
    seconds = [collective_seconds(k, self.target, prices) for _, k, _ in self.collectives]
    end, exposed = [0.0] * len(seconds), [0.0] * len(seconds)
    stream_free = 0.0  # when the collective stream has finished what it was given
    stalls = 0.0  # the waits so far, which move every later point of the compute stream
    for position, is_start, c in self.events:
      now = clock[self.compute_before[position]] + stalls
      kernel = self.collectives[c][1]
      if not is_start:
        exposed[c] = max(0.0, end[c] - now)
        stalls += exposed[c]
      elif kernel.group_size > 1:
        end[c] = stream_free = max(now, stream_free) + seconds[c]
      else:
        end[c] = now + seconds[c]
    return [(s * k.count, e * k.count) for s, e, (_, k, _) in zip(seconds, exposed, self.collectives)]

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
    ordered = [
      seconds_of[i] if k.kind == "collective" else float(per_kernel[self.compute_index[i]])
      for i, k in enumerate(self.kernels)
    ]
    return {
      "step_s": compute + exposed,
      "compute_s": compute,
      "exposed_collective_s": exposed,
      "by_class_s": dict(by_class),
      "per_kernel_s": ordered,
    }


def predict(program: hlo_cost.Program, target: gpu_target.Target, prices: Prices, fitted_on: str | None = None) -> dict:
  """The predicted step (`Priced.predict`) with prices fitted on the rows of GPU `fitted_on` (None: `target`'s)."""
  return Priced(program, target, fitted_on).predict(prices)
