"""The soak's verdicts (bench/soak.py): whether a sampled quantity grows past its tolerance over the judged steps
(`judge`, `TOLERANCES`), whether throughput falls between the first and the last window (`judge_throughput`), and
what a soak's samples come to (`assess`, `Findings`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from visionfm_jax.bench.proc_probe import Sample


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """What a quantity may rise over the judged steps: the most of `fixed`, `per_1000_steps` x steps / 1000 and
  `fraction` of the judged values' mean, per process when `per_process` (the main process: one; the children: as
  many as there are). `per_interval`: the quantity is a rate over each interval between samples, not a level, so
  one interval's spike is noise and its slope the robust one (`robust_slope`); a level keeps least squares, under
  which a step late in the run, a leak that began there, still counts."""

  fixed: float
  per_1000_steps: float = 0.0
  per_process: bool = True
  fraction: float = 0.0
  per_interval: bool = False

  def allowed(self, steps: float, processes: int, level: float = 0.0) -> float:
    scale = max(1, processes) if self.per_process else 1
    return scale * max(self.fixed, self.per_1000_steps * steps / 1000, self.fraction * abs(level))


# Bytes read per record: a tenth of their mean or 1 KiB, whichever is more. Their scale is the shards' (a reader
# reads a shard's index and blocks, not a record alone), so the tolerance is a fraction; samples of 200 records of
# 3,000 tiny shards scatter by some 3% about their mean.
TOLERANCES = {
  "descriptors": Tolerance(32),
  "RSS MB": Tolerance(16, per_1000_steps=4),
  "threads": Tolerance(4),
  "processes": Tolerance(0.5, per_process=False),
  "/dev/shm entries": Tolerance(16, per_process=False),
  "bytes read per record": Tolerance(1024, per_process=False, fraction=0.1, per_interval=True),
}


def tolerance_of(quantity: str) -> Tolerance:
  return TOLERANCES[quantity.split(" (")[0]]


@dataclasses.dataclass(frozen=True)
class Verdict:
  quantity: str
  first: float  # the judged samples' first and last values
  last: float
  slope_per_1000: float  # `slope`'s, or `robust_slope`'s for a per-interval rate, per 1000 steps
  rise: float  # the fitted line's, from the first judged step to the last
  allowed: float
  growing: bool

  def line(self) -> str:
    return (
      f"{self.quantity:<24} {'GROWING' if self.growing else 'flat':<8} {self.first:>10,.1f} -> "
      f"{self.last:>10,.1f}, slope {self.slope_per_1000:+,.1f} per 1000 steps, fitted rise {self.rise:+,.1f} "
      f"(tolerance {self.allowed:,.1f})"
    )


def slope(xs, ys) -> float:
  """The least-squares slope of ys over xs (0 for fewer than two distinct xs)."""
  x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  spread = float(((x - x.mean()) ** 2).sum())
  return float(((x - x.mean()) * (y - y.mean())).sum() / spread) if spread else 0.0


ROBUST_SAMPLES = 1000  # 499,500 pairs


def robust_slope(xs, ys) -> float:
  """The Theil-Sen slope of ys over xs: the median of the slopes between every two samples of distinct xs (0 for
  fewer than two). It holds while under about 29% of the samples are outliers, such as an interval in which a
  prefetch buffer refilled after the consumer stalled on a loaded machine, which would tilt a least-squares line;
  a steady rise is a line's slope either way. Over `ROBUST_SAMPLES` samples, that many evenly spaced ones: the
  pairs grow as the square of the samples (a week's soak sampled every 10 steps would hold gigabytes of them)."""
  x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  if len(x) > ROBUST_SAMPLES:
    kept = np.linspace(0, len(x) - 1, ROBUST_SAMPLES).round().astype(int)
    x, y = x[kept], y[kept]
  first, second = np.triu_indices(len(x), k=1)
  dx = x[second] - x[first]
  distinct = dx != 0
  return float(np.median((y[second] - y[first])[distinct] / dx[distinct])) if distinct.any() else 0.0


def judge(quantity: str, steps, values, tolerance: Tolerance, processes: int = 1) -> Verdict:
  """Whether `values` (sampled at `steps`) grow: their fitted rise over the steps beyond `tolerance`."""
  per_step = (robust_slope if tolerance.per_interval else slope)(steps, values)
  span = float(steps[-1] - steps[0])
  allowed = tolerance.allowed(span, processes, float(np.mean(np.asarray(values, np.float64))))
  return Verdict(
    quantity,
    float(values[0]),
    float(values[-1]),
    per_step * 1000,
    per_step * span,
    allowed,
    bool(per_step * span > allowed),
  )


@dataclasses.dataclass(frozen=True)
class Throughput:
  first: float  # records/s over the first and the last window
  last: float
  first_per_cpu_s: float  # records per CPU second of the process tree over the same windows
  last_per_cpu_s: float
  window_s: float
  tolerance: float
  falling: bool

  def line(self) -> str:
    ratio = lambda a, b: f"{b / a:.0%}" if a else "-"  # noqa: E731
    cpu = ratio(self.first_per_cpu_s, self.last_per_cpu_s)
    return (
      f"{'throughput':<24} {'FALLING' if self.falling else 'flat':<8} {self.first:>10,.1f} -> "
      f"{self.last:>10,.1f} records/s ({ratio(self.first, self.last)}), per CPU second "
      f"{self.first_per_cpu_s:,.1f} -> {self.last_per_cpu_s:,.1f} ({cpu}) over the first and the last "
      f"{self.window_s:.0f} s (tolerance {self.tolerance:.0%})"
    )


def judge_throughput(seconds, steps, cpu_s, batch_size: int, window_s: float, tolerance: float) -> Throughput:
  """Records/s and records per CPU second (`cpu_s`: the process tree's, at each sample) over the first and the
  last `window_s` of the samples at `seconds` (steps drawn by then); the window shrinks to a third of the time
  sampled when that is shorter than three windows. Falling: both below the first window's by more than
  `tolerance` (other jobs' load moves the wall-clock rate alone)."""
  t, n, c = (np.asarray(v, np.float64) for v in (seconds, steps, cpu_s))
  window = min(window_s, (t[-1] - t[0]) / 3)
  head = max(1, int(np.searchsorted(t, t[0] + window, side="left")))  # the first sample at or after its end
  tail = max(0, min(int(np.searchsorted(t, t[-1] - window, side="right")) - 1, len(t) - 2))  # last before its start

  def per(clock, a, b):
    return (n[b] - n[a]) * batch_size / (clock[b] - clock[a]) if clock[b] > clock[a] else 0.0

  first, last = per(t, 0, head), per(t, tail, len(t) - 1)
  first_cpu, last_cpu = per(c, 0, head), per(c, tail, len(t) - 1)
  falling = last < (1 - tolerance) * first and last_cpu < (1 - tolerance) * first_cpu
  return Throughput(
    float(first), float(last), float(first_cpu), float(last_cpu), float(window), tolerance, bool(falling)
  )


def verdicts(judged: list[Sample]) -> list[Verdict]:
  """Every quantity of Sample.series judged over the `judged` samples (the descendants' tolerances scaled by the
  most processes sampled)."""
  steps = [s.step for s in judged]
  children = max(len(s.children) for s in judged)
  out = []
  for quantity in judged[0].series():
    values = [s.series()[quantity] for s in judged]
    out.append(judge(quantity, steps, values, tolerance_of(quantity), children if "(children)" in quantity else 1))
  return out


@dataclasses.dataclass(frozen=True)
class Findings:
  judged: list[Sample]  # the samples after the warm-up
  verdicts: list[Verdict]  # empty with fewer than MIN_JUDGED judged samples
  throughput: Throughput | None  # None then, or when the pipeline failed

  def grown(self) -> list[str]:
    """What grew, one phrase each."""
    out = [
      f"{v.quantity} {v.first:,.0f} -> {v.last:,.0f} (fitted rise {v.rise:+,.1f}, tolerance {v.allowed:,.1f})"
      for v in self.verdicts
      if v.growing
    ]
    if self.throughput is not None and self.throughput.falling:
      t = self.throughput
      out.append(
        f"throughput fell {t.first:,.0f} -> {t.last:,.0f} records/s, {t.first_per_cpu_s:,.0f} -> "
        f"{t.last_per_cpu_s:,.0f} per CPU second (below {1 - t.tolerance:.0%} of the first "
        f"{t.window_s:.0f} s)"
      )
    return out


MIN_JUDGED = 3  # samples a slope is judged from


def assess(
  samples: list[Sample], warmup: int, batch_size: int, window_s: float, tolerance: float, failed: bool
) -> Findings:
  judged = [s for s in samples if s.step >= warmup]
  if len(judged) < MIN_JUDGED:
    return Findings(judged, [], None)
  throughput = (
    None
    if failed
    else judge_throughput(
      [s.seconds for s in judged], [s.step for s in judged], [s.cpu_s for s in judged], batch_size, window_s, tolerance
    )
  )
  return Findings(judged, verdicts(judged), throughput)
