"""A resume continues the run that saved the checkpoint, with that run's config unless told otherwise.

Every checkpoint carries the config it was trained with (training/checkpoint.py). Before restoring, the
newest checkpoint's config is compared with the one launched, field by field (`config_lib.RESUME_RULES`):
another model, task, compute dtype or data is refused, naming each field old -> new (the checkpoint does not
continue such a run: a new workdir does, or `init_from`); a changed schedule or optimiser field needs its name
in `config.resume.allow_changes`, and is then logged with the learning rate before and after: a new length
(total_steps, warmup_steps, end_lr) continues from the rate reached, decaying to end_lr over the new length
(the run plan's schedule anchor, `optim.Anchor`), while a new optim.lr takes the new schedule as it is (the
jump asked for); how the run is laid out, logged and evaluated may change freely. A newest checkpoint refused so
while the one before it matches the run is named as another run's step folder copied in, to be moved aside. Each
launch's config is kept as `config.<step>.json` (the step it started from), never overwritten; `config.json` is
the latest. A checkpoint without its config (deleted, emptied) is refused naming the file: nothing could be
compared; `missing_config` in `config.resume.allow_changes` resumes it unchecked.

A checkpoint's config is the one the run trained with (training/plan.py, `RunPlan.trained_config`): the user's;
the schedule's anchor is a record of its own beside it
(`checkpoint.saved_schedule_anchor`), which the next resume carries on.
"""

from __future__ import annotations

import json
import os

from absl import logging
import ml_collections

from visionfm_jax import atomic, config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.training import checkpoint, optim


def as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as the JSON dict a checkpoint carries (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _described(changes) -> list[str]:
  return [f"config.{path} {old!r} -> {new!r}" for path, old, new in changes]


def _listed(changes) -> str:
  return ", ".join(_described(changes))


def check_changes(config: ml_collections.ConfigDict, checkpoint_dir: str) -> tuple[list[str], optim.Anchor | None]:
  """ConfigError when a run of `config` (the config it trains with, read only) may not resume the newest
  checkpoint in `checkpoint_dir` (module docstring); logs the accepted changes. Returns (the accepted schedule
  and optimiser changes, 'config.<path> <old> -> <new>', which health (training/health.py) takes as the likely
  cause of a divergence soon after; the schedule's anchor, so that the learning rate goes on from where it
  was, None for the schedule as it is). Nothing to compare without a checkpoint; one without its config is refused
  unless config.resume.allow_changes names MISSING_CONFIG."""
  step = checkpoint.newest_committed_step(checkpoint_dir)
  if step is None:
    return [], None
  where = f"{checkpoint_dir}/{step}"
  saved = checkpoint.saved_config(checkpoint_dir, step)
  if saved is None:
    _accept_missing_config(config, checkpoint_dir, step)
    return [], None
  config_json = as_json(config)
  changes = config_lib.resume_changes(saved, config_json)
  if changes[config_lib.REFUSED]:
    raise ConfigError(
      _foreign_step_refusal(checkpoint_dir, step, config_json, changes[config_lib.REFUSED])
      or f"cannot resume {where}: it was trained with another model, task, precision or data: "
      f"{_listed(changes[config_lib.REFUSED])}; give this run another --workdir (with "
      f"config.init_from=<this workdir> to start from its weights)"
    )
  schedule = changes[config_lib.OPT_IN]
  unasked = [path for path, _, _ in schedule if path not in config_lib.allowed_changes(config)]
  if unasked:
    raise ConfigError(
      f"resuming {where} with a changed schedule or optimiser: {_listed(schedule)}; to continue "
      f"with these, pass --config.resume.allow_changes={','.join(p for p, _, _ in schedule)}"
    )
  changed = {path for path, _, _ in schedule}
  if config.total_steps <= step and "total_steps" in changed:
    raise ConfigError(
      f"config.total_steps={config.total_steps} is at or below the step of {where}: nothing would be trained"
    )
  record = checkpoint.saved_schedule_anchor(checkpoint_dir, step)
  saved_anchor = optim.Anchor(record["step"], record["lr"]) if record is not None else None
  anchor = _anchor(config_json, saved, saved_anchor, step, changed)
  if schedule:
    logging.warning(
      "resuming %s with %s (config.resume.allow_changes); train/lr at step %d: %.3g -> %.3g",
      where,
      _listed(schedule),
      step,
      _lr_at(saved, step, saved_anchor),
      _lr_at(config_json, step, anchor),
    )
  return _described(schedule), anchor


def _accept_missing_config(config: ml_collections.ConfigDict, checkpoint_dir: str, step: int) -> None:
  """ConfigError naming the checkpoint's config file, unless config.resume.allow_changes names MISSING_CONFIG:
  without that file no change of this run is compared, refused or anchored, and every later resume compares with
  what this one saves."""
  where, why = f"{checkpoint_dir}/{step}", checkpoint.missing_config(checkpoint_dir, step)
  allowed = config_lib.allowed_changes(config)
  if config_lib.MISSING_CONFIG not in allowed:
    raise ConfigError(
      f"cannot resume {where}: {why}, so this run's config cannot be compared with the one it "
      f"trained with; restore that file, or pass --config.resume.allow_changes="
      f"{','.join([*allowed, config_lib.MISSING_CONFIG])} to resume it unchecked"
    )
  logging.warning(
    "resuming %s, which carries no config (%s), unchecked (config.resume.allow_changes=%s): this "
    "run's config is not compared with it",
    where,
    why,
    config_lib.MISSING_CONFIG,
  )


def _foreign_step_refusal(checkpoint_dir: str, step: int, config_json: dict, refused) -> str | None:
  """The refusal of a newest checkpoint `step` that another run saved (a step folder copied in): the step before
  it was trained as this run is (no refused change), so the workdir is this run's and that folder is not. None
  when there is no such earlier step."""
  earlier = [s for s in checkpoint.committed_steps(checkpoint_dir) if s < step]
  before = checkpoint.saved_config(checkpoint_dir, earlier[-1]) if earlier else None
  if before is None or config_lib.resume_changes(before, config_json)[config_lib.REFUSED]:
    return None
  where, previous = f"{checkpoint_dir}/{step}", f"{checkpoint_dir}/{earlier[-1]}"
  return (
    f"cannot resume {where}: another run saved it, with another model, task, precision or data than this "
    f"run and {previous} before it: {_listed(refused)}; move it aside (mv -T {where} {where}.foreign) to "
    f"resume from {previous}"
  )


def _anchor(
  config_json: dict, saved: dict, saved_anchor: optim.Anchor | None, step: int, changed: set[str]
) -> optim.Anchor | None:
  """The rate the checkpoint's run had reached at `step` when the schedule's length changed (total_steps,
  warmup_steps, end_lr) past the warmup; None when a new optim.lr asks for the new schedule as it is;
  otherwise the checkpoint's own anchor (`saved_anchor`), if any, carries on."""
  if "optim.lr" in changed:
    return None
  if changed & {"total_steps", "optim.warmup_steps", "optim.end_lr"} and step >= config_json["optim"]["warmup_steps"]:
    return optim.Anchor(step, _lr_at(saved, step, saved_anchor))
  return saved_anchor


def _lr_at(config_json: dict, step: int, anchor: optim.Anchor | None) -> float:
  """The learning rate at `step` of the schedule `config_json` describes, anchored at `anchor`."""
  optim_cfg = ml_collections.ConfigDict(config_json["optim"])
  return float(optim.schedule(optim_cfg, config_json["total_steps"], anchor)(step))


def keep_launch_config(config: ml_collections.ConfigDict, workdir: str, start_step: int) -> str:
  """Writes the config of this launch to `<workdir>/config.<start_step>.json` (`.<n>` added when a launch from
  that step already wrote one) and returns the path."""
  base = os.path.join(workdir, f"config.{start_step}")
  path, n = base + ".json", 1
  while os.path.exists(path):
    path, n = f"{base}.{n}.json", n + 1
  atomic.write(path, config.to_json_best_effort(indent=2))
  return path
