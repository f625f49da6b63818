"""Metric sinks: `metrics.jsonl` and TensorBoard events. Process 0 writes. (The console: `console.py`.)"""

from __future__ import annotations

import contextlib
import json
import os

import jax
from absl import logging

from visionfm_jax import atomic
from visionfm_jax.errors import WorkdirError
from visionfm_jax.training import tensorboard, workdir as workdir_lib


class MetricWriter:
  """Appends `{"step": s, **metrics}` to `<workdir>/metrics.jsonl` and the same scalars to
  `<workdir>/tensorboard/`.

  A run resumed at `resume_step` first drops the rows of later steps: a run that stopped after its last
  checkpoint logged them, and this one logs those steps again. TensorBoard drops them too (`EventFile.restart`).

  A write the storage refuses (a full disk, a lost mount) does not raise: it becomes `failure`, a WorkdirError
  naming the workdir and the errno, which the loop raises on every process at its next agreed point (process 0
  alone writes, so raising at once would leave the others waiting in the next step), and nothing more is
  written."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.failure: WorkdirError | None = None
    if not self.enabled:
      return
    self._workdir = workdir
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = self._tb = None
    with self._storage_faults_named():
      os.makedirs(workdir, exist_ok=True)
      _drop_rows_after(self._path, resume_step)
      self._jsonl = open(self._path, "a", encoding="utf-8")
      self._tb = tensorboard.EventFile(os.path.join(workdir, "tensorboard"))
      if resume_step:
        self._tb.restart(resume_step + 1)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled or not metrics or self.failure is not None:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    with self._storage_faults_named():
      self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
      self._jsonl.flush()
      self._tb.scalars(int(step), clean)

  def note(self, step: int, record: dict) -> None:
    """Appends `{"step": step, **record}` to metrics.jsonl alone: values that are not scalars (the checkpoints
    a rollback moved aside), which TensorBoard does not take."""
    if not self.enabled or self.failure is not None:
      return
    with self._storage_faults_named():
      self._jsonl.write(json.dumps({"step": int(step), **record}) + "\n")
      self._jsonl.flush()

  def rewind(self, step: int, why: str) -> None:
    """Drops the rows of steps after `step` (a rollback to it: those steps are trained again)."""
    if not self.enabled or self.failure is not None:
      return
    with self._storage_faults_named():
      self._jsonl.close()
      _drop_rows_after(self._path, step, why)
      self._jsonl = open(self._path, "a", encoding="utf-8")
      self._tb.restart(step + 1)

  def close(self) -> None:
    if not self.enabled:
      return
    for file in (self._jsonl, self._tb):
      if file is not None:
        try:
          file.close()
        except OSError:  # the failure that stops the run was reported already, or is the next write's to report
          pass

  @contextlib.contextmanager
  def _storage_faults_named(self):
    try:
      yield
    except OSError as e:
      self.failure = workdir_lib.storage_error("cannot write metrics to", self._workdir, e)


def _drop_rows_after(path: str, step: int,
                     why: str = "logged by a run that stopped before its next checkpoint") -> None:
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = [line for line in lines if _step_of(line) <= step]
  if len(kept) < len(lines):
    atomic.write(path, "".join(kept))
    logging.info("metrics.jsonl: dropped %d rows after step %d, %s", len(lines) - len(kept), step, why)


def _step_of(line: str) -> float:
  """The row's step; a line that is not a row (a write cut short) counts as after every step."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")
