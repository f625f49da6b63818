"""Run health (`config.health`): loss-spike skipping inside the step, rollback past bad data outside it.

In the step (`HealthState.observe`, jitted, identical on every process): the loss and the gradient norm of
every applied step enter a rolling window of the last `window` applied steps. Once `warmup` steps have been
applied, a step whose loss or gradient norm exceeds the window's mean by more than `z` standard deviations is a
spike: its update is not applied (params, optimizer state and the optimizer's count stay, as for an fp16
overflow) and it is counted (`health/skipped_steps`); spikes stay out of the window.

Some things skipping cannot absorb; each sets the state's trigger (the first one fired, with its step and
loss), after which no further update is applied until the loop acts on it at its next logging or saving step:
  burst      `burst_skips` skipped steps within `burst_window` steps
  rise       the window's mean loss above `rise` x the lowest window mean seen (a slow divergence)
  nonfinite  a non-finite loss or gradient norm (bf16/fp32; fp16 skips those as overflows)
  stall      fp16 overflowing at the minimum loss scale `precision.max_consecutive_skips` steps in a row

The loop then rolls back (`Rollbacks.roll_back`): it restores the newest checkpoint at least `restore_before`
steps before the trigger, moves the checkpoints after it aside (`<step>.rolled_back`), and continues the data
stream past everything read since that checkpoint plus `skip_margin` batches. Every checkpoint carries the
rollbacks so far (`<step>/health/health.json`: step, rule, loss, restored step, skipped stream positions, the
names of the checkpoints moved aside), so a resume goes on exactly. More than `max_rollbacks` rollbacks within
`max_rollbacks_window` steps stop the run with a HealthError naming their steps and the last good checkpoint; so
does a trigger with `rollback` False.

Rolling back past data assumes the data caused the trigger. A resume that changed something is the likelier
cause of a trigger soon after it: a schedule or optimiser field (`resume.allow_changes`), the process count, the
jax or jaxlib version, the device kind (the record keeps the launch's, `environment`). Such a resume is kept in
the record (`changes`), and no later trigger rolls back past its checkpoint: a checkpoint trained before a change
is never moved aside for a divergence after it. A trigger within `window` steps of the change rolls back to that
checkpoint at most; if one fires again within that window, the run stops with a HealthError naming the change
and the checkpoint to resume from with the old settings, having moved aside what it trained since.

Each rollback's row in `metrics.jsonl` (`health/set_aside`) and every HealthError list the checkpoints moved
aside so far, with the one-line command that brings the newest of them back.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Collection, Sequence

from absl import logging
import flax.struct
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

from visionfm_jax.data.loader import skipping
from visionfm_jax.errors import UserError
from visionfm_jax.training import checkpoint

RULES = {1: "burst", 2: "rise", 3: "nonfinite", 4: "stall"}
_NEVER = -(2**30)  # the step of a skip that has not happened


class HealthError(UserError):
  """The run stops: a trigger with rollback off, no checkpoint to roll back to, or too many rollbacks."""


class HealthState(flax.struct.PyTreeNode):
  losses: jax.Array  # f32 (window,): the loss of the last `window` applied steps, a ring
  grad_norms: jax.Array  # f32 (window,)
  count: jax.Array  # i32: steps applied so far (the ring's next slot: count % window)
  lowest_mean: jax.Array  # f32: the lowest window mean of the loss since the window filled
  skipped: jax.Array  # i32: steps whose update health did not apply
  recent_skips: jax.Array  # i32 (max(burst_skips, 1),): the steps of the last skips, a ring
  trigger: jax.Array  # i32: 0, or the key in RULES of the first rule that fired
  trigger_step: jax.Array  # i32
  trigger_loss: jax.Array  # f32
  z: float = flax.struct.field(pytree_node=False)
  warmup: int = flax.struct.field(pytree_node=False)
  burst_skips: int = flax.struct.field(pytree_node=False)
  burst_window: int = flax.struct.field(pytree_node=False)
  rise: float = flax.struct.field(pytree_node=False)
  stall_after: int = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, health_cfg, max_consecutive_skips: int) -> "HealthState":
    window, ring = int(health_cfg.window), max(int(health_cfg.burst_skips), 1)
    return cls(
      losses=jnp.zeros((window,), jnp.float32),
      grad_norms=jnp.zeros((window,), jnp.float32),
      count=jnp.zeros((), jnp.int32),
      lowest_mean=jnp.asarray(np.finfo(np.float32).max, jnp.float32),
      skipped=jnp.zeros((), jnp.int32),
      recent_skips=jnp.full((ring,), _NEVER, jnp.int32),
      trigger=jnp.zeros((), jnp.int32),
      trigger_step=jnp.zeros((), jnp.int32),
      trigger_loss=jnp.zeros((), jnp.float32),
      z=float(health_cfg.z),
      warmup=int(health_cfg.warmup),
      burst_skips=int(health_cfg.burst_skips),
      burst_window=int(health_cfg.burst_window),
      rise=float(health_cfg.rise),
      stall_after=int(max_consecutive_skips),
    )

  def _window_stats(self, values, count):
    filled = jnp.arange(values.shape[0]) < jnp.minimum(count, values.shape[0])
    n = jnp.maximum(jnp.minimum(count, values.shape[0]), 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(filled, values, 0.0)) / n
    var = jnp.sum(jnp.where(filled, jnp.square(values - mean), 0.0)) / n
    return mean, jnp.sqrt(var)

  def observe(self, step, loss, grad_norm, overflowed, stalled, fp16: bool):
    """(the state after step `step` (1-based) with this `loss` and `grad_norm`, whether its update applies).
    `overflowed`: the fp16 loss scale skips this step already; `stalled`: it has skipped too many at its
    minimum; `fp16`: non-finite numbers are overflows (the loss scale's business), not a trigger."""
    loss, grad_norm = jnp.asarray(loss, jnp.float32), jnp.asarray(grad_norm, jnp.float32)
    numbers_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    loss_mean, loss_std = self._window_stats(self.losses, self.count)
    norm_mean, norm_std = self._window_stats(self.grad_norms, self.count)
    spike = (
      (self.count >= self.warmup)
      & numbers_finite
      & ~overflowed
      & ((loss > loss_mean + self.z * loss_std) | (grad_norm > norm_mean + self.z * norm_std))
    )
    frozen = self.trigger != 0
    apply = ~overflowed & numbers_finite & ~spike & ~frozen
    health_skip = ~apply & ~overflowed

    oldest = jnp.argmin(self.recent_skips)
    recent = jnp.where(spike, self.recent_skips.at[oldest].set(step), self.recent_skips)
    burst = spike & (self.burst_skips > 0) & (step - jnp.min(recent) < self.burst_window)

    slot = self.count % self.losses.shape[0]
    losses = jnp.where(apply, self.losses.at[slot].set(loss), self.losses)
    grad_norms = jnp.where(apply, self.grad_norms.at[slot].set(grad_norm), self.grad_norms)
    count = self.count + apply.astype(jnp.int32)
    new_mean, _ = self._window_stats(losses, count)
    tracked = apply & (count >= max(self.warmup, self.losses.shape[0]))
    rise = tracked & (self.rise > 0) & (self.lowest_mean > 0) & (new_mean > self.rise * self.lowest_mean)
    lowest = jnp.where(tracked, jnp.minimum(self.lowest_mean, new_mean), self.lowest_mean)

    nonfinite = ~numbers_finite if not fp16 else jnp.asarray(False)
    fired = jnp.select([nonfinite, stalled, burst, rise], [3, 4, 1, 2], 0)
    new_trigger = ~frozen & (fired != 0)
    return self.replace(
      losses=losses,
      grad_norms=grad_norms,
      count=count,
      lowest_mean=lowest,
      skipped=self.skipped + health_skip.astype(jnp.int32),
      recent_skips=recent,
      trigger=jnp.where(new_trigger, fired, self.trigger).astype(jnp.int32),
      trigger_step=jnp.where(new_trigger, step, self.trigger_step).astype(jnp.int32),
      trigger_loss=jnp.where(new_trigger, loss, self.trigger_loss),
    ), apply


def create(config, variables=None) -> HealthState | None:
  """The health statistics of a fresh state (training/state.py, `StatePart`), None when health is off."""
  del variables
  if not config.health.enabled:
    return None
  return HealthState.create(config.health, config.precision.max_consecutive_skips)


def guard_step(state, new_state, loss, grad_norm, apply):
  """In the train step: (`new_state` with the health statistics updated, whether its update applies, the
  step's metrics). `apply`: whether the fp16 loss scale applies it (True without one); the caller keeps the old
  params and optimizer state where the answer is False."""
  overflowed = ~apply
  stalled = (
    new_state.loss_scale.skips_at_min >= state.health.stall_after
    if state.loss_scale is not None
    else jnp.asarray(False)
  )
  health, apply = state.health.observe(
    state.step + 1, loss, grad_norm, overflowed, stalled, fp16=state.loss_scale is not None
  )
  return new_state.replace(health=health), apply, {"health/skipped_steps": health.skipped}


# ------------------------------------------------------------------------------------------ the loop's side


@dataclasses.dataclass(frozen=True)
class Trigger:
  step: int
  rule: str
  loss: float

  def describe(self, health_cfg, max_consecutive_skips: int) -> str:
    why = {
      "burst": f"{health_cfg.burst_skips} steps skipped as spikes within {health_cfg.burst_window} steps",
      "rise": f"the mean loss of the last {health_cfg.window} steps rose above {health_cfg.rise:g}x its lowest",
      "nonfinite": "a non-finite loss or gradient norm",
      "stall": f"{max_consecutive_skips} fp16 steps in a row overflowed at the minimum loss scale",
    }[self.rule]
    return f"step {self.step}, loss {self.loss:.4g}, rule {self.rule} ({why})"


def read_trigger(state) -> Trigger | None:
  """The trigger the state carries, as process 0 reads it (every process calls this at the same step and acts
  on the same answer)."""
  # float32, as the gather carries it (without jax_enable_x64): exact for steps below 2^24
  values = np.array(
    jax.device_get((state.health.trigger, state.health.trigger_step, state.health.trigger_loss)), np.float32
  )
  if jax.process_count() > 1:
    values = np.asarray(multihost_utils.process_allgather(values)).reshape(-1, 3)[0]
  code, step, loss = int(values[0]), int(values[1]), float(values[2])
  return Trigger(step, RULES[code], loss) if code else None


def environment() -> dict:
  """What a run computes on besides its config: compared at a resume, saved in the record."""
  return {
    "processes": jax.process_count(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "device_kind": jax.devices()[0].device_kind,
  }


def environment_changes(saved: dict | None, now: dict) -> list[str]:
  """'<what> <old> -> <new>' for each field of `now` that the checkpoint's record (`saved`) holds otherwise."""
  return [
    f"{key} {saved[key]} -> {value}"
    for key, value in now.items()
    if saved is not None and key in saved and saved[key] != value
  ]


class Rollbacks:
  """The rollbacks of this run so far (`history`, saved with every checkpoint), the resumes that changed
  something (`changes`), and the rollback itself."""

  def __init__(self, config, saved: dict | None = None, start_step: int = 0, changes: Sequence[str] = ()):
    """`saved`: the health record of the checkpoint resumed from (step `start_step`); `changes`: the config
    changes this launch made to it ('config.<path> <old> -> <new>')."""
    self.cfg, self.config = config.health, config
    saved = saved or {}
    self.history = list(saved.get("rollbacks", []))
    self.changes = list(saved.get("changes", []))
    self.environment = environment()
    changed = list(changes) + environment_changes(saved.get("environment"), self.environment)
    if start_step and changed:
      self.changes.append({"step": start_step, "what": changed})
      logging.warning(
        "health: resumed at step %d with %s: no rollback goes past checkpoint %d, and a trigger "
        "repeated within %d steps stops the run naming the change",
        start_step,
        "; ".join(changed),
        start_step,
        self.cfg.window,
      )
    self.moved_at_stop: list[str] = []
    self._skipped_seen: int | None = None

  def note_skips(self, step: int, skipped: float) -> None:
    """A console line when steps were skipped since the last logging step."""
    skipped = int(skipped)
    if self._skipped_seen is not None and skipped > self._skipped_seen:
      logging.warning(
        "health: %d step(s) up to step %d skipped as loss or gradient-norm spikes (above the mean + "
        "%g std of the last %d steps); %d so far",
        skipped - self._skipped_seen,
        step,
        self.cfg.z,
        self.cfg.window,
        skipped,
      )
    self._skipped_seen = skipped

  def record(self) -> dict:
    return {"rollbacks": self.history, "changes": self.changes, "environment": self.environment}

  def counts(self) -> dict[str, float]:
    return {
      "health/rollbacks": float(len(self.history)),
      "health/skipped_examples": float(sum(r["skipped_examples"] for r in self.history)),
    }

  def set_aside(self, directory) -> list[str]:
    """The paths of every checkpoint in `directory` that the rollbacks so far (and a stop for a change) moved
    aside, oldest first."""
    names = [name for r in self.history for name in r.get("set_aside", [])] + self.moved_at_stop
    return [os.path.join(directory, name) for name in names]

  def _change_before(self, step: int) -> dict | None:
    """The newest resume before `step` that changed something, None when there was none."""
    before = [c for c in self.changes if c["step"] < step]
    return max(before, key=lambda c: c["step"]) if before else None

  def restore_step(self, trigger: Trigger, steps: list[int], directory, vouched: Collection[int] = ()) -> int:
    """The newest of the checkpoint `steps` at least `restore_before` steps before the trigger and not before
    the last resume that changed something (else that resume's own checkpoint); HealthError when rolling back
    is off, when there is none, when it would be one rollback too many, or when the trigger repeats within
    `window` steps of a change. `vouched`: the steps this run verified (`Checkpointer.vouched_steps`), the only ones
    its stop lines call good."""
    what = trigger.describe(self.cfg, self.config.precision.max_consecutive_skips)
    change = self._change_before(trigger.step)
    floor = change["step"] if change else 0
    good = [s for s in steps if floor <= s <= trigger.step - self.cfg.restore_before]
    if change and not good and floor in steps:  # the change's own checkpoint, however recent
      good = [floor]
    in_window = change is not None and trigger.step <= floor + self.cfg.window
    last_good = checkpoint.last_good_text(directory, good, vouched)
    if not self.cfg.rollback:
      raise HealthError(
        f"health: {what}; stopping (config.health.rollback=False). The last good checkpoint: "
        f"{last_good}; lower config.optim.lr or check the data.{self._set_aside_note(directory)}"
      )
    if in_window and any(floor < r["step"] <= floor + self.cfg.window for r in self.history):
      assert change is not None  # in_window: after a change
      raise ChangeError(self._blame(what, change, directory), floor)
    if not good:
      raise HealthError(
        f"health: {what}; no checkpoint at least config.health.restore_before="
        f"{self.cfg.restore_before} steps before it{f' and not before step {floor}' if change else ''} "
        f"to roll back to (checkpoints: {steps or 'none'}); stopping."
        f"{self._set_aside_note(directory)}"
      )
    recent = [r["step"] for r in self.history if r["step"] > trigger.step - self.cfg.max_rollbacks_window]
    if len(recent) >= self.cfg.max_rollbacks:
      raise HealthError(
        f"health: {what}: {len(recent) + 1} rollbacks within {self.cfg.max_rollbacks_window} steps (at steps "
        f"{', '.join(map(str, recent + [trigger.step]))}; config.health.max_rollbacks={self.cfg.max_rollbacks}); "
        f"stopping. The last good checkpoint: {last_good}; lower config.optim.lr or check the data."
        f"{self._set_aside_note(directory)}"
      )
    return max(good)

  def _blame(self, what: str, change: dict, directory) -> str:
    return (
      f"health: {what}, within {self.cfg.window} steps of the resume from {directory}/{change['step']} "
      f"that changed {'; '.join(change['what'])}, after a rollback to it: the likely cause is that change, "
      f"not the data; stopping. {directory}/{change['step']} was trained before it: resume from it with the "
      f"old settings (the checkpoints trained since are moved aside)."
    )

  def _set_aside_note(self, directory) -> str:
    paths = self.set_aside(directory)
    if not paths:
      return ""
    return (
      f" Moved aside: {', '.join(paths)}; to resume from the newest of them instead: "
      f"{bring_back_command(paths[-1], directory)}"
    )

  def roll_back(self, trigger: Trigger, state, checkpointer, data_iterator, position_now: int):
    """Restores the checkpoint of `restore_step` into `state`'s layout and `data_iterator` (the loader, not its
    prefetch buffer), moves the later checkpoints aside, and continues the data stream `skip_margin` batches
    past `position_now` (`agreed_position` of the data handed out up to now). Returns (the restored
    step, its state); every process calls it at the same step."""
    checkpointer.wait()
    try:
      restored = self.restore_step(
        trigger, checkpointer.all_steps(), checkpointer.directory, checkpointer.vouched_steps()
      )
    except ChangeError as stop:
      self.moved_at_stop = checkpointer.set_aside_after(stop.resume_from, "after_change")
      raise HealthError(f"{stop}{self._set_aside_note(checkpointer.directory)}") from None
    moved = checkpointer.set_aside_after(restored, "rolled_back")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    for leaf in jax.tree.leaves(state):  # its memory, before the restored state takes as much again
      leaf.delete()
    state = checkpointer.restore(restored, target, data_iterator)
    start = agreed_position(data_iterator.get_state())
    end = data_iterator.skip_to(position_now + self.cfg.skip_margin * self.config.global_batch_size)
    entry = {
      "step": trigger.step,
      "rule": trigger.rule,
      "loss": trigger.loss,
      "restored": restored,
      "skipped_positions": [start, end],
      "skipped_examples": end - start,
      "set_aside": moved,
    }
    self.history.append(entry)
    logging.warning(
      "health: rolling back at %s: restored %s/%d, skipping data stream positions %d-%d (%d examples; rollback %d)",
      trigger.describe(self.cfg, self.config.precision.max_consecutive_skips),
      checkpointer.directory,
      restored,
      start,
      end - 1,
      end - start,
      len(self.history),
    )
    return restored, state


class ChangeError(Exception):
  """A trigger repeated within the window after a resume that changed something (`resume_from`: its step)."""

  def __init__(self, message: str, resume_from: int):
    super().__init__(message)
    self.resume_from = resume_from


def bring_back_command(set_aside_path: str, directory) -> str:
  """The shell line that makes the checkpoint moved aside to `set_aside_path` the newest again: the ones of its
  step and after move aside (`.superseded`), it takes its step's name back; the next launch resumes from it."""
  step = int(os.path.basename(set_aside_path).split(".", 1)[0])
  folder = shlex.quote(str(directory))
  return (
    f'for c in {folder}/*; do s=${{c##*/}}; case $s in *[!0-9]*) ;; *) [ "$s" -ge {step} ] && '
    f'mv -T "$c" "$c.superseded";; esac; done; mv -T {shlex.quote(set_aside_path)} {folder}/{step}'
  )


def agreed_position(data_state) -> int:
  """One past the furthest global stream position any process has handed out, from each one's data
  iterator state (`SkippingIterator.get_state`)."""
  position = np.int64(skipping.position_of(data_state, jax.process_count()))
  if jax.process_count() > 1:
    position = np.max(multihost_utils.process_allgather(position))
  return int(position)


def check_iterator(data_iterator) -> None:
  if not hasattr(data_iterator, "skip_to"):
    raise HealthError(
      f"config.health.enabled: this task's training data ({type(data_iterator).__name__}) cannot "
      f"skip ahead in its stream, which a rollback needs; set config.health.rollback=False"
    )


def checkpoint_target(target, config, saved_config: dict | None) -> HealthState | None:
  """The health part of the restore target for a checkpoint trained with `saved_config` (`target`: the state of
  this run's config): that checkpoint's layout, which a run that turns health on or off, or changes the window,
  resumes (`adopt` then starts the statistics afresh)."""
  saved = _saved_health_config(saved_config)
  if not _layout_changed(config, saved):
    return target.health
  if _layout(saved) is None:
    return None
  shapes = jax.eval_shape(lambda: HealthState.create(ml_collections.ConfigDict(saved), 1))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target.step.sharding), shapes)


def adopt(state, resumed) -> HealthState | None:
  """The restored health statistics, or new ones per this run's config (None when off, laid out as the step)
  where its layout differs from the checkpoint's."""
  if not _layout_changed(resumed.config, _saved_health_config(resumed.saved_config)):
    return state.health
  logging.info("health statistics start afresh (config.health changed since the checkpoint)")
  fresh = create(resumed.config)
  return None if fresh is None else jax.device_put(fresh, state.step.sharding)


def _saved_health_config(saved_config: dict | None) -> dict:
  return (saved_config or {}).get("health") or {}


def _layout(health_cfg: dict):
  """The shapes of the health statistics of `health_cfg` (a dict), None when it is off."""
  return (int(health_cfg["window"]), max(int(health_cfg["burst_skips"]), 1)) if health_cfg.get("enabled") else None


def _layout_changed(config, saved: dict) -> bool:
  return _layout(saved) != _layout(config.health.to_dict())
