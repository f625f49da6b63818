"""The run's metric writer: `metrics.jsonl` and the trackers (training/infra/trackers.py). Process 0 writes.
(The console: `console.py`.)"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

from absl import logging
import jax
import numpy as np
from PIL import Image

from visionfm_jax import atomic
from visionfm_jax.errors import WorkdirError
from visionfm_jax.training.infra import trackers
from visionfm_jax.training.infra import workdir as workdir_lib


class MetricWriter:
  """Appends `{"step": s, **metrics}` to `<workdir>/metrics.jsonl` and the same scalars to each tracker of
  `config.report_to` (training/infra/trackers.py; TensorBoard alone without a config).

  A run resumed at `resume_step` first drops the rows of later steps: a run that stopped after its last
  checkpoint logged them, and this one logs those steps again; the trackers rewind with it. A last line without its
  newline (a write cut short by a crash) is made whole first: kept when it holds a whole row, else dropped, with a
  warning naming the file. `start` (trackers.Start) holds the rows and panels kept.

  A write the storage refuses (a full disk, a lost mount) does not raise: it becomes `failure`, a WorkdirError
  naming the workdir and the errno, which the loop raises on every process at its next agreed point (process 0
  alone writes, so raising at once would leave the others waiting in the next step), and nothing more is
  written. A tracker outside the workdir (W&B, MLflow) that fails is dropped with a warning."""

  def __init__(self, workdir: str, resume_step: int = 0, config=None):
    self.enabled = jax.process_index() == 0
    self.failure: WorkdirError | None = None
    self.start = trackers.Start(resume_step)
    if not self.enabled:
      return
    self._workdir = workdir
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = None
    self._sinks = []
    with self._storage_faults_named():
      os.makedirs(workdir, exist_ok=True)
      dropped, kept, kept_panels = _drop_after(self._path, resume_step)
      self._jsonl = open(self._path, "a", encoding="utf-8")
      self.start = trackers.Start(resume_step, tuple(kept), tuple(kept_panels), dropped > 0)
      self._sinks = trackers.open_sinks(config, workdir, self.start)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled or not metrics or self.failure is not None:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    with self._storage_faults_named():
      self._open_jsonl().write(json.dumps({"step": int(step), **clean}) + "\n")
      self._open_jsonl().flush()
    self._each_sink(lambda sink: sink.scalars(int(step), clean))

  def panel(self, step: int, array: np.ndarray) -> None:
    """The panel of `step` (an HxWx3 uint8 picture: evaluate/panels.py): `<workdir>/panels/step_<step>.png` and
    each tracker's image."""
    if not self.enabled or self.failure is not None:
      return
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path = _panel_path(self._workdir, step)
    with self._storage_faults_named():
      os.makedirs(os.path.dirname(path), exist_ok=True)
      atomic.write(path, buffer.getvalue())
    picture = trackers.Picture(array, buffer.getvalue(), path)
    self._each_sink(lambda sink: sink.panel(int(step), picture))

  def note(self, step: int, record: dict) -> None:
    """Appends `{"step": step, **record}` to metrics.jsonl alone: values that are not scalars (the checkpoints
    a rollback moved aside), which the trackers do not take."""
    if not self.enabled or self.failure is not None:
      return
    with self._storage_faults_named():
      self._open_jsonl().write(json.dumps({"step": int(step), **record}) + "\n")
      self._open_jsonl().flush()

  def rewind(self, step: int, why: str) -> None:
    """Drops the rows of steps after `step` (a rollback to it: those steps are trained again)."""
    if not self.enabled or self.failure is not None:
      return
    with self._storage_faults_named():
      self._open_jsonl().close()
      _, kept, kept_panels = _drop_after(self._path, step, why)
      self._jsonl = open(self._path, "a", encoding="utf-8")
    if self.failure is None:
      self._each_sink(
        lambda sink: sink.rewind(
          step, [row for row in kept if row["step"] == step], [panel for panel in kept_panels if panel[0] == step]
        )
      )

  def close(self, final: dict[str, float] | None = None) -> None:
    """Closes metrics.jsonl and the trackers: `final` (the run's last metrics) ends their runs as finished, with
    `final` as their summary; None (the run stopped on an error) as failed."""
    if not self.enabled:
      return
    for sink in [s for s in self._sinks if s.in_workdir]:
      self._sinks.remove(sink)
      _close_quietly(sink, final)
    self._each_sink(lambda sink: sink.close(final))
    if self._jsonl is not None:
      _close_quietly(self._jsonl)

  def _open_jsonl(self) -> io.TextIOWrapper:
    """metrics.jsonl, open: the writers run only while enabled and nothing failed, so once __init__ opened it."""
    assert self._jsonl is not None
    return self._jsonl

  def _each_sink(self, call) -> None:
    for sink in list(self._sinks):
      if sink.in_workdir:
        with self._storage_faults_named():
          call(sink)
        continue
      try:
        call(sink)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning(
          "%s failed (%s: %s): no more metrics go to it this run; metrics.jsonl has them all",
          sink.name,
          type(e).__name__,
          e,
        )
        self._sinks.remove(sink)

  @contextlib.contextmanager
  def _storage_faults_named(self):
    try:
      yield
    except OSError as e:
      self.failure = workdir_lib.storage_error("cannot write metrics to", self._workdir, e)


def _close_quietly(file, *args) -> None:
  try:
    file.close(*args)
  except OSError:  # the failure that stops the run was reported already, or is the next write's to report
    pass


def _drop_after(
  path: str, step: int, why: str = "logged by a run that stopped before its next checkpoint"
) -> tuple[int, list[dict], list[tuple[int, str]]]:
  """Drops metrics.jsonl's rows (at `path`) and the panels beside it of steps after `step`, and a last line cut
  short (`_whole_lines`); returns how many rows it dropped after `step`, the rows kept and the panels kept ((step,
  file))."""
  lines = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  whole = _whole_lines(path, lines)
  rows = [_row_of(line) for line in whole]
  keep = [row is not None and row["step"] <= step for row in rows]
  if whole != lines or not all(keep):
    atomic.write(path, "".join(line for line, kept in zip(whole, keep) if kept))
  if not all(keep):
    logging.info("metrics.jsonl: dropped %d rows after step %d, %s", keep.count(False), step, why)
  kept_panels = []
  for at, panel in _panels(os.path.dirname(path)):
    if at > step:  # trained again: its evaluation draws it anew
      os.remove(panel)
    else:
      kept_panels.append((at, panel))
  return keep.count(False), [row for row, kept in zip(rows, keep) if kept and row is not None], kept_panels


def _whole_lines(path: str, lines: list[str]) -> list[str]:
  """metrics.jsonl's `lines` (of the file at `path`), each ending in its newline: a last line without one is a write
  cut short (a crash mid-write), which the next write would join into one unparseable line. It is kept, its newline
  added, when it holds a whole row, and dropped otherwise; a warning says which."""
  if not lines or lines[-1].endswith("\n"):
    return lines
  cut = lines[-1]
  row = _row_of(cut)
  if row is not None:
    logging.warning(
      "%s: its last line (a row of step %s) lacked its newline, a write cut short: kept, newline added",
      path,
      row["step"],
    )
    return lines[:-1] + [cut + "\n"]
  logging.warning(
    "%s: dropped its last line, %d bytes without a newline (a write cut short): %.60r",
    path,
    len(cut.encode("utf-8")),
    cut,
  )
  return lines[:-1]


def _panel_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "panels", f"step_{int(step)}.png")


def _panels(workdir: str) -> list[tuple[int, str]]:
  """(step, file) of the workdir's panels, in step order."""
  folder = os.path.join(workdir, "panels")
  matches = [re.fullmatch(r"step_(\d+)\.png", name) for name in (os.listdir(folder) if os.path.isdir(folder) else ())]
  return sorted((int(m.group(1)), os.path.join(folder, m.group(0))) for m in matches if m)


def _row_of(line: str) -> dict | None:
  """The row of a metrics.jsonl line; None for a line that is not one (a write cut short: after every step)."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  return row if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) else None
