"""Metric sinks: `metrics.jsonl` and TensorBoard events. Process 0 writes. (The console: `console.py`.)"""

from __future__ import annotations

import json
import os

import jax
from absl import logging


class MetricWriter:
  """Appends `{"step": s, **metrics}` to `<workdir>/metrics.jsonl` and writes TensorBoard scalars."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
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
