"""A run's evaluations: the task's evaluators (`Task.evaluators`) on the params and their EMA, its panel, and the
final evaluation of a run found complete. The loop (training/train.py) and tools.evaluate both run them here, so
that a metric has one name, `eval/[<weights>/]<evaluator>/<metric>`, wherever it is made."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from absl import logging
import jax

from visionfm_jax.tasks.base import EvalContext
from visionfm_jax.training.infra import console, faults


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The task's evaluators ({name: params -> {metric: value}}) and its panel (params -> picture, or None)."""

  evaluators: dict[str, Callable[[Any], dict[str, float]]]
  panel: Callable[[Any], Any] | None = None

  def of_params(self, params, step, weights: str = "") -> dict[str, float]:
    """{eval/<weights/><evaluator>/<metric>: value} of `params`; `weights` names other weights than the params
    ('ema'). `step` (None outside a run) is for the log."""
    results = {}
    for name, evaluate in self.evaluators.items():
      t0 = time.perf_counter()
      prefix = f"eval/{weights + '/' if weights else ''}{name}/"
      for metric, value in evaluate(params).items():
        results[f"{prefix}{metric}"] = value
      logging.info(
        "%seval %s%s: %s (%.1fs)",
        "" if step is None else f"step {step} ",
        weights + " " if weights else "",
        name,
        console.format_metrics(results, prefix),
        time.perf_counter() - t0,
      )
    return results

  def of_state(self, state, step: int) -> dict[str, float]:
    """The evaluations of the params and, when the state has one, of their EMA (laid out as the params)."""
    results = self.of_params(state.params, step)
    if state.ema_params is not None:
      ema_params = jax.device_put(state.ema_params, jax.tree.map(lambda p: p.sharding, state.params))
      results.update(self.of_params(ema_params, step, "ema"))
    return results

  def draw(self, params, step: int, writer) -> None:
    assert self.panel is not None  # its callers draw only where the task has a panel
    t0 = time.perf_counter()
    writer.panel(step, self.panel(params))
    logging.info("step %d panel: panels/step_%d.png (%.1fs)", step, step, time.perf_counter() - t0)

  def write(self, state, step: int, writer) -> dict[str, float]:
    """Evaluates `state` at `step`, writes the results and draws the panel; returns the results."""
    results = self.of_state(state, step)
    writer.write(step, results)
    if self.panel is not None:
      self.draw(state.params, step, writer)
    return results

  def complete(self, state, step: int, writer, watchdog) -> dict[str, float]:
    """The last metrics of a run found at its last step (a rerun, or a requeue after a process stopped between
    its last checkpoint and its final evaluation): metrics.jsonl's, the latest value of each, with the final
    evaluation and panel that the last step makes where the workdir lacks them. Process 0 reads metrics.jsonl and
    decides for all."""
    logged = {k for row in writer.start.kept if row["step"] == step for k in row}
    evaluated = not self.evaluators or faults.agreed(not writer.enabled or any(k.startswith("eval/") for k in logged))
    drawn = self.panel is None or faults.agreed(not writer.enabled or any(at == step for at, _ in writer.start.panels))
    missing = " and ".join(what for what, made in (("evaluation", evaluated), ("panel", drawn)) if not made)
    logging.info("step %d: the run was already complete%s", step, f"; making its final {missing}" if missing else "")
    last = {
      k: float(v) for row in writer.start.kept for k, v in row.items() if k != "step" and isinstance(v, (int, float))
    }
    if missing:
      watchdog.phase("an evaluation", step)
    if not evaluated:
      results = self.of_state(state, step)
      writer.write(step, results)
      last.update(results)
    if not drawn:
      self.draw(state.params, step, writer)
    return last


def build(task, mesh, batch_size: int, *, panel: bool = True) -> Evaluation:
  """The task's evaluators and, with `panel`, its panel, on `mesh` in global batches of `batch_size`: their
  sources are opened now, once (`EvalContext.open_eval_source`), so that a missing dataset stops a run at
  start-up."""
  ctx = EvalContext(mesh, batch_size, jax.process_index(), jax.process_count())
  return Evaluation(task.evaluators(ctx), task.panel(ctx) if panel else None)
