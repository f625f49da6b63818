"""Metric sinks: `metrics.jsonl`, TensorBoard events, and a one-line progress bar. Process 0 writes."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
from absl import logging


class MetricWriter:
  """Appends `{"step": s, **metrics}` to `<workdir>/metrics.jsonl` and writes TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # pragma: no cover - tensorboardX is a dependency; keep training without it
      logging.warning("tensorboardX is not installed; TensorBoard events are not written")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled or not metrics:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """A progress line: step, loss, img/s and ETA. Redrawn in place on a terminal, logged otherwise."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
    self.total = total_steps
    self.enabled = enabled and jax.process_index() == 0
    self.tty = sys.stderr.isatty()
    self._t0 = time.perf_counter()
    self._start = start_step

  def update(self, step: int, loss: float, img_per_sec: float) -> None:
    if not self.enabled:
      return
    done = step - self._start
    rate = done / max(time.perf_counter() - self._t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    width = 24
    filled = int(width * step / self.total)
    line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4f} "
            f"{img_per_sec:,.0f} img/s eta {_duration(eta)}")
    if self.tty:
      sys.stderr.write("\r" + line)
      sys.stderr.flush()
    else:
      logging.info(line)

  def close(self) -> None:
    if self.enabled and self.tty:
      sys.stderr.write("\n")
