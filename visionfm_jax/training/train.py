"""The one training loop. Everything model-specific comes from the task (`tasks/`).

run(config, workdir):
  mesh -> task -> sharded state (restored from the newest checkpoint, else created sharded and optionally
  initialised from `init_from`) -> loop of jitted train steps (training/step.py) over global batches, each
  followed by the periodic actions that are due (`_periodic_actions`: checks, metrics, async checkpoints of
  state + data iterator, evaluations).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from visionfm_jax import cli, parallel, tasks
from visionfm_jax.errors import CheckpointError, UserError, WorkdirError
from visionfm_jax.training import (
  checkpoint,
  checks,
  data_record,
  flops,
  health,
  init_from,
  optim,
  prefetch,
  stored,
)
from visionfm_jax.training import evaluation as evaluation_lib
from visionfm_jax.training import plan as plan_lib
from visionfm_jax.training import state as state_lib
from visionfm_jax.training import step as step_lib
from visionfm_jax.training.infra import compile_cache, console, faults, metrics
from visionfm_jax.training.infra import workdir as workdir_lib
from visionfm_jax.training.state import TrainState


class NonFiniteLossError(UserError):
  pass


def run(
  config: ml_collections.ConfigDict, workdir: str, *, validated: bool = False, class_names: list[str] | None = None
) -> dict[str, float]:
  """Trains per `config` in `workdir`, resuming from its newest checkpoint, holding the workdir's lock (a
  WorkdirError when another run holds it). Returns the last metrics. `config` is only read; it is checked here
  (training/checks.py), or only against the devices when `validated` says the caller has checked the rest
  (main.py, before joining the other processes), handing down the `class_names` its check read."""
  devices, processes = jax.device_count(), jax.process_count()
  if validated:
    checks.check_devices(config, devices, processes)
  else:
    class_names = checks.validate(config, devices, processes, data=checks.DATA_PRESENT)
  interrupt = faults.Interrupt(functools.partial(checkpoint.newest_committed_step, stored.checkpoints_dir(workdir)))
  with workdir_lib.claimed(workdir, config.lock_wait_s), compile_cache.in_use(config.compile_cache, workdir):
    # before anything is built: a resume may refuse the config, or anchor the schedule
    run_plan = plan_lib.make(config, stored.checkpoints_dir(workdir), devices, processes)
    last = _train_in(run_plan, workdir, class_names, interrupt)
  if jax.process_index() == 0:
    shown = {k: v for k, v in last.items() if k == "train/loss" or k.startswith("eval/")}
    logging.info("done at step %d: %s", last["step"], console.format_metrics(shown))
  return last


def _train_in(
  run_plan: plan_lib.RunPlan, workdir: str, class_names: list[str] | None, interrupt: faults.Interrupt
) -> dict[str, float]:
  config = run_plan.config
  checkpoint_dir = stored.checkpoints_dir(workdir)
  mesh = parallel.make_mesh(run_plan.mesh)
  logging.info(
    "mesh %s, strategy %s, %d process%s",
    run_plan.mesh,
    config.strategy,
    jax.process_count(),
    "es" if jax.process_count() > 1 else "",
  )
  task = tasks.build(config, mesh, class_names)
  task.check_training_devices()
  checks.check_naflex_budget(config, run_plan.batch.micro_batch_per_device, checks.device_memory_bytes(), class_names)
  # Open the data first: a missing dataset fails in seconds, before any state is built.
  loader = task.train_loader(
    batch_size=run_plan.batch.per_process,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  train_iter = iter(loader)
  # The evaluators open their sources (zero-shot, retrieval, probe) when built: those fail fast too, before the
  # workdir records the data (a run stopped here leaves a new workdir empty, and so removed).
  evaluation = evaluation_lib.build(task, mesh, run_plan.batch.micro_batch)
  if data_record.check(config, workdir, loader.identity, checkpoint.newest_committed_step(checkpoint_dir)):
    train_iter.follow_changed_data()
  tx = optim.make_optimizer(config.optim, run_plan.lr_schedule, task.model)
  init_fn = step_lib.make_init_fn(task, tx, config)
  batch_sharding = parallel.batch_sharding(mesh)

  with parallel.activation_sharding(mesh):
    abstract, shardings, _ = step_lib.state_shardings(init_fn, mesh, config)
    _log_plan(config, abstract, workdir)
    workdir_lib.check_storage(checkpoint_dir, workdir_lib.tree_bytes(abstract), workdir)
    checkpointer = checkpoint.Checkpointer(
      checkpoint_dir,
      keep=config.keep_checkpoints,
      keep_period=config.checkpoint_keep_period,
      run_config=run_plan.trained_config(),
      schedule_anchor=run_plan.anchor_record(),
    )
    state = _restore_or_init(config, checkpointer, init_fn, abstract, shardings, train_iter, task.model)
    start_step = interrupt.step = int(jax.device_get(state.step))
    if jax.process_index() == 0:  # once the resume check has accepted the config
      run_plan.write(workdir, start_step)

    train_step = step_lib.jit_train_step(task, tx, config, mesh, init_fn, shardings, run_plan.lr_schedule)
    writer = metrics.MetricWriter(workdir, resume_step=start_step, config=config)
    rollbacks = _rollbacks(config, state, checkpointer, start_step, train_iter, list(run_plan.resume_changes))
    final = None
    try:
      last = _loop(
        config,
        state,
        start_step,
        train_step,
        train_iter,
        batch_sharding,
        evaluation,
        checkpointer,
        writer,
        task,
        rollbacks,
        interrupt,
      )
      checkpointer.close()
      if writer.failure is not None:  # the last steps' metrics, written after the loop's last agreed point
        raise writer.failure
      final = last
    finally:  # a run that stops on an error still closes its metric files, and its tracker runs as failed
      writer.close(final=final)
  return last


def _loop(
  config,
  state,
  start_step,
  train_step,
  train_iter,
  batch_sharding,
  evaluation,
  checkpointer,
  writer,
  task,
  rollbacks: health.Rollbacks | None,
  interrupt: faults.Interrupt,
) -> dict[str, float]:
  """Trains from `start_step` to config.total_steps, running after each step the periodic actions that are due
  (`_periodic_actions`, in their order; an action that returns False skips the step's later ones). A Ctrl-C stops it
  after the step in progress, before that step's actions (cli.Interrupted): the checkpoints committed stay the
  newest, and a save in flight commits first."""
  total = config.total_steps
  progress = console.Progress(total, start_step, enabled=config.progress_bar, process_index=jax.process_index())
  preemption = faults.Preemption()
  batches = prefetch.DevicePrefetch(train_iter, batch_sharding, config.data.device_prefetch)
  loop = _Loop(
    config,
    state,
    start_step,
    batches,
    _Window(config, task),
    checkpointer,
    writer,
    faults.Watchdog(config.step_timeout_s),
    rollbacks,
  )
  actions = _periodic_actions(config, rollbacks, progress, evaluation, train_iter, batch_sharding, start_step)
  interrupt.step = start_step
  interrupt.polling()
  try:
    if loop.step == total:
      loop.last.update(evaluation.complete(state, loop.step, writer, loop.watchdog))
    while loop.step < total and not loop.stopped:
      loop.train_one_step(train_step, preemption, start_step)
      if loop.compile_s is not None:  # the first step's call returned: its compile is over
        progress.compiled(loop.compile_s, start_step)
        loop.compile_s = None
      interrupt.step = loop.step
      if interrupt.requested():  # the line is said once the saves in flight have committed
        raise cli.Interrupted()
      for every, action in actions:
        if every.due(loop.step, loop.preempted) and not action(loop):
          break
  finally:
    interrupt.polling(False)
    loop.watchdog.phase("committing the last checkpoint", loop.step)
    try:
      checkpointer.wait()  # also after an error: the saves in flight are of good steps
    finally:
      loop.watchdog.close()
      progress.close()
      preemption.close()
  loop.last["step"] = loop.step
  return loop.last


def _periodic_actions(config, rollbacks, progress, evaluation, train_iter, batch_sharding, start_step: int):
  """((when, action(loop) -> whether the step's later actions run), ...) in the order they run after a step:
  before a log or save the checks that keep a bad state out of checkpoints (a rollback where health fired, else
  a stop on a non-finite loss) and a stop on workdir faults; then log (and the first progress line, a few steps
  after the compile), save, evaluate, and exit at a preemption."""
  total = config.total_steps
  before_save = _Every((config.log_every, config.checkpoint_every), total, at_preemption=True)
  check_state: Callable[[_Loop], bool]
  if rollbacks is not None:
    check_state = functools.partial(_roll_back_where_fired, train_iter=train_iter, batch_sharding=batch_sharding)
  else:
    check_state = _stop_if_not_finite
  return (
    (before_save, check_state),
    (before_save, _stop_on_workdir_faults),
    (_Every((config.log_every,), total, at_preemption=True), functools.partial(_log, progress=progress)),
    (_Every((), start_step + 1 + console.FIRST_LINE_AFTER), functools.partial(_first_progress, progress=progress)),
    (_Every((config.checkpoint_every,), total, at_preemption=True), _save),
    (_Every((config.eval_every,), total), functools.partial(_evaluate, evaluation=evaluation)),
    (_Every((), at_preemption=True), _exit_at_preemption),
  )


@dataclasses.dataclass(frozen=True)
class _Every:
  """When a periodic action is due: at the multiples of any of `periods`, at step `last`, and at a preemption's
  step when `at_preemption`."""

  periods: tuple[int, ...]
  last: int | None = None
  at_preemption: bool = False

  def due(self, step: int, preempted: bool) -> bool:
    return any(step % p == 0 for p in self.periods) or step == self.last or (preempted and self.at_preemption)


@dataclasses.dataclass
class _Loop:
  """What the loop's periodic actions read and change: the state at `step`, the device batches, the step's
  metrics (on the device), the last metrics of each name, the timing window, and whether it stops."""

  config: ml_collections.ConfigDict
  state: TrainState
  step: int
  batches: prefetch.DevicePrefetch
  window: _Window
  checkpointer: checkpoint.Checkpointer
  writer: metrics.MetricWriter
  watchdog: faults.Watchdog
  rollbacks: health.Rollbacks | None
  metrics: dict = dataclasses.field(default_factory=dict)
  last: dict[str, float] = dataclasses.field(default_factory=dict)
  preempted: bool = False
  stopped: bool = False
  compile_s: float | None = None  # how long the first step's call took, until the progress line has it
  timed_compile: bool = False

  def train_one_step(self, train_step, preemption: faults.Preemption, first_step: int) -> None:
    # Between logging steps the host only feeds the device: any read of a device value here would stall
    # the pipeline, and is an error on accelerators (the guard does not act on the CPU backend).
    with jax.transfer_guard_device_to_host("disallow"):
      if self.step == first_step:
        self.watchdog.idle()  # the first call compiles (minutes for a large model) and waits on no other process
      else:
        self.watchdog.phase("a train step", self.step + 1)
      batch = self.window.next_batch(self.batches)
      called = time.perf_counter()
      self.state, self.metrics = train_step(self.state, batch)
      if not self.timed_compile:
        self.compile_s, self.timed_compile = time.perf_counter() - called, True
      self.step += 1
      self.window.steps += 1
      # The one read of the stop flag: every process gets the same answer for the same step, so all of
      # them log, save and stop together.
      self.preempted = preemption.reached(self.step)


class _Window:
  """The span the logged throughput covers: the steps trained and the time spent waiting for data since it
  (re)started (at the loop's start and after each log, evaluation and rollback)."""

  def __init__(self, config, task):
    self.batch_size = config.global_batch_size
    self.flops_per_example = task.train_flops_per_example()
    self.peak = flops.device_peak_flops(config.precision.compute_dtype)
    self.restart()

  def restart(self) -> None:
    self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

  def next_batch(self, batches):
    wait_start = time.perf_counter()
    batch = next(batches)
    self.data_wait += time.perf_counter() - wait_start
    return batch

  def metrics(self) -> dict[str, float]:
    """train/img_per_sec, train/data_wait_fraction and, where the device's peak is known, train/mfu."""
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    img_per_sec = self.steps * self.batch_size / elapsed
    values = {"train/img_per_sec": img_per_sec, "train/data_wait_fraction": self.data_wait / elapsed}
    if self.flops_per_example and self.peak:
      values["train/mfu"] = img_per_sec * self.flops_per_example / (self.peak * jax.device_count())
    return values


def _roll_back_where_fired(loop: _Loop, train_iter, batch_sharding) -> bool:
  """Rolls back where the health trigger fired, before a save (the steps since it fired applied nothing); the
  step's later actions follow where it did not."""
  assert loop.rollbacks is not None  # `_periodic_actions` picks this action only for a run with rollbacks
  trigger = health.read_trigger(loop.state)
  if trigger is None:
    return True
  loop.watchdog.phase("a rollback", loop.step)
  position = health.agreed_position(loop.batches.get_state())
  try:
    loop.step, loop.state = loop.rollbacks.roll_back(trigger, loop.state, loop.checkpointer, train_iter, position)
  except health.HealthError:
    moved = loop.rollbacks.set_aside(loop.checkpointer.directory)
    if moved:
      loop.writer.note(loop.step, {"health/set_aside": moved})
    raise
  loop.batches = prefetch.DevicePrefetch(train_iter, batch_sharding, loop.config.data.device_prefetch)
  loop.writer.rewind(loop.step, "trained again after a rollback")
  loop.writer.write(loop.step, loop.rollbacks.counts())
  loop.writer.note(loop.step, {"health/set_aside": loop.rollbacks.set_aside(loop.checkpointer.directory)})  # all so far
  loop.window.restart()
  if loop.preempted:  # the rerun resumes from the same checkpoint and takes the same rollback
    logging.warning("preemption notice at a rollback: exiting at step %d without a save", loop.step)
    loop.stopped = True
  return False


def _stop_if_not_finite(loop: _Loop) -> bool:
  """Raises NonFiniteLossError when the step's loss or gradient norm is not finite (without loss scaling: an
  fp16 run skips such steps instead). A non-finite gradient leaves NaN params, so the run stops before it
  can save them; the checkpoints already written are all from good steps. With loss scaling, raises it once
  `max_consecutive_skips` steps in a row overflowed at the minimum scale: such a run would skip forever."""
  step, max_consecutive_skips = loop.step, loop.config.precision.max_consecutive_skips
  if loop.state.loss_scale is not None:
    skips = int(jax.device_get(loop.metrics["train/skips_at_min_scale"]))
    if skips >= max_consecutive_skips:
      raise NonFiniteLossError(
        f"{skips} consecutive fp16 steps overflowed at the minimum loss scale (precision.loss_scale_min="
        f"{loop.state.loss_scale.min_scale}) up to step {step}; stopping "
        f"(precision.max_consecutive_skips={max_consecutive_skips}). The last good checkpoint: "
        f"{_last_checkpoint(loop.checkpointer)}; lower config.optim.lr, train in bfloat16, or check the data."
      )
    return True
  loss, grad_norm = (
    float(v) for v in jax.device_get((loop.metrics["train/loss"], loop.metrics.get("train/grad_norm", 0.0)))
  )
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    raise NonFiniteLossError(
      f"non-finite loss {loss} or gradient norm {grad_norm} at step {step}; stopping. The "
      f"last good checkpoint: {_last_checkpoint(loop.checkpointer)}; lower config.optim.lr "
      f"or check the data."
    )
  return True


def _stop_on_workdir_faults(loop: _Loop) -> bool:
  """Every process raises here when a save failed in the background on any of them, or process 0 could not
  write its metrics: a run that cannot keep its checkpoints or its record stops now, not at its end."""
  faults.raise_together(
    loop.checkpointer.failed_save() or loop.writer.failure,
    WorkdirError(f"another process could not write to {loop.checkpointer.directory.parent} (its error line says why)"),
  )
  return True


def _log(loop: _Loop, progress: console.Progress) -> bool:
  values = {k: float(v) for k, v in jax.device_get(loop.metrics).items()}
  values.update(loop.window.metrics())
  values.update(data_counts(loop.batches))
  if loop.rollbacks is not None:
    values.update(loop.rollbacks.counts())
    loop.rollbacks.note_skips(loop.step, values["health/skipped_steps"])
  loop.writer.write(loop.step, values)
  progress.update(loop.step, values["train/loss"], values["train/img_per_sec"])
  loop.last.update(values)
  loop.window.restart()
  return True


def _first_progress(loop: _Loop, progress: console.Progress) -> bool:
  """The first progress line, a few steps after the compile, where no log step draws one: the step's loss (a wait
  for the step) and the pace since the compile."""
  if loop.step % loop.config.log_every:
    loss = float(jax.device_get(loop.metrics["train/loss"]))
    progress.update(loop.step, loss, loop.config.global_batch_size / progress.seconds_per_step(loop.step))
  return True


def _save(loop: _Loop) -> bool:
  loop.watchdog.phase("a checkpoint save", loop.step)
  loop.checkpointer.save(
    loop.step, loop.state, loop.batches, health=loop.rollbacks.record() if loop.rollbacks is not None else None
  )
  if jax.process_index() == 0 and not loop.preempted:
    logging.info("step %d: saving a checkpoint to %s", loop.step, loop.checkpointer.directory / str(loop.step))
  return True


def _evaluate(loop: _Loop, evaluation: evaluation_lib.Evaluation) -> bool:
  loop.watchdog.phase("an evaluation", loop.step)
  loop.last.update(evaluation.write(loop.state, loop.step, loop.writer))
  loop.window.restart()
  return True


def _exit_at_preemption(loop: _Loop) -> bool:
  loop.watchdog.phase("committing the preemption checkpoint", loop.step)
  where = _committed(loop.checkpointer, loop.step)
  logging.warning("preemption notice: saved step %d (%s); exiting so the job can be requeued", loop.step, where)
  loop.stopped = True
  return False


def _log_plan(config, abstract: TrainState, workdir: str) -> None:
  params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract.params))
  logging.info(
    "model %s: %s params; %d steps of %d examples (%s)",
    config.model.name,
    f"{params:,}",
    config.total_steps,
    config.global_batch_size,
    config.precision.compute_dtype,
  )
  logging.info(
    "workdir %s: metrics.jsonl, tensorboard/, checkpoints/ every %d steps (keeping %d%s)",
    workdir,
    config.checkpoint_every,
    config.keep_checkpoints,
    f", and every {config.checkpoint_keep_period} for good" if config.checkpoint_keep_period else "",
  )


def _restore_or_init(config, checkpointer, init_fn, abstract, shardings, train_iter, model) -> TrainState:
  """The newest readable checkpoint restored with each optional part of the state (training/state.py, `PARTS`)
  in its layout and fitted to this run, else a fresh state (its params from `init_from` when set)."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  newest = checkpointer.latest_step()
  saved = checkpoint.saved_config(checkpointer.directory, newest) if newest is not None else None
  restored = checkpointer.restore_newest_readable(state_lib.checkpoint_target(target, config, saved), train_iter)
  if restored is not None:
    step, state = restored
    logging.info("resuming from %s/%d", checkpointer.directory, step)
    return state_lib.adopted(state, state_lib.Resumed(config, saved, shardings, f"{checkpointer.directory}/{step}"))
  logging.info("no checkpoint in %s: starting from step 0", checkpointer.directory)
  state = step_lib.init_state(init_fn, shardings, jax.random.key(config.seed))
  if config.init_from:
    logging.info("initialising params from %s", config.init_from)
    state = state_lib.follow_params(state.replace(params=init_from.load(config, state.params, model)), shardings)
  return state


def _last_checkpoint(checkpointer) -> str:
  """The newest committed checkpoint (after the saves in flight commit) that this run verified
  (`checkpoint.last_good_text`)."""
  vouched = checkpointer.vouched_steps()
  return checkpoint.last_good_text(checkpointer.directory, checkpointer.all_steps(), vouched)


def data_counts(train_iter) -> dict[str, float]:
  """{'data/skipped': corrupt or undecodable training records skipped so far by all processes,
  'data/skipped_fraction': of the records read}; {} for iterators that do not count (a collective when
  there are several processes: every process calls it at the same steps)."""
  if not hasattr(train_iter, "skipped"):
    return {}
  counts = np.array([train_iter.skipped, train_iter.read], np.int64)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(0)
  return {"data/skipped": float(counts[0]), "data/skipped_fraction": float(counts[0] / max(counts[1], 1))}


def _rollbacks(config, state, checkpointer, start_step: int, train_iter, changes: list[str]) -> health.Rollbacks | None:
  """The run's rollbacks so far (from the checkpoint it resumed; `changes`: the config changes this launch made to
  it), None when health is off."""
  if state.health is None:
    return None
  if config.health.rollback:
    health.check_iterator(train_iter)
  saved = checkpoint.saved_health(checkpointer.directory, start_step) if start_step else None
  return health.Rollbacks(config, saved, start_step, changes)


def _committed(checkpointer, step: int) -> str:
  """Waits for the save of `step` to commit and returns its directory; raises when it did not."""
  checkpointer.wait()
  where = checkpointer.directory / str(step)
  if not where.exists():
    raise CheckpointError(f"the checkpoint of step {step} did not commit: {where} does not exist")
  return str(where)
