"""A resume continues the run that saved the checkpoint, with that run's config unless told otherwise.

Every checkpoint carries the config it was trained with (training/checkpoint.py). Before restoring, the
newest checkpoint's config is compared with the one launched, field by field (`config_lib.RESUME_RULES`):
another model, task, compute dtype or data is refused, naming each field old -> new (the checkpoint does not
continue such a run: a new workdir does, or `init_from`); a changed schedule or optimiser field needs its name
in `config.resume.allow_changes`, and is then logged with the learning rate before and after; how the run is
laid out, logged and evaluated may change freely. Each launch's config is kept as `config.<step>.json` (the
step it started from), never overwritten; `config.json` is the latest.
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

from visionfm_jax import atomic, config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.training import optim


def as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as the JSON dict a checkpoint carries (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _listed(changes) -> str:
  return ", ".join(f"config.{path} {old!r} -> {new!r}" for path, old, new in changes)


def check_changes(config: ml_collections.ConfigDict, checkpointer) -> None:
  """ConfigError when `config` may not resume `checkpointer`'s newest checkpoint (module docstring); logs the
  accepted changes. Nothing to compare without a checkpoint, or with one saved without its config."""
  step = checkpointer.latest_step()
  if step is None:
    return
  where = f"{checkpointer.directory}/{step}"
  saved = checkpointer.saved_config(step)
  if saved is None:
    logging.warning("%s carries no config (saved by an older version): this run's config is not compared with it",
                    where)
    return
  changes = config_lib.resume_changes(saved, as_json(config))
  if changes[config_lib.REFUSED]:
    raise ConfigError(f"cannot resume {where}: it was trained with another model, task, precision or data: "
                      f"{_listed(changes[config_lib.REFUSED])}; give this run another --workdir (with "
                      f"config.init_from=<this workdir> to start from its weights)")
  schedule = changes[config_lib.OPT_IN]
  unasked = [path for path, _, _ in schedule if path not in config_lib.allowed_changes(config)]
  if unasked:
    raise ConfigError(f"resuming {where} with a changed schedule or optimiser: {_listed(schedule)}; to continue "
                      f"with these, pass --config.resume.allow_changes={','.join(p for p, _, _ in schedule)}")
  if config.total_steps <= step and any(path == "total_steps" for path, _, _ in schedule):
    raise ConfigError(f"config.total_steps={config.total_steps} is at or below the step of {where}: nothing "
                      f"would be trained")
  if schedule:
    logging.warning("resuming %s with %s (config.resume.allow_changes); train/lr at step %d: %.3g -> %.3g", where,
                    _listed(schedule), step, _lr_at(saved, step), _lr_at(as_json(config), step))


def _lr_at(config_json: dict, step: int) -> float:
  return float(optim.schedule(ml_collections.ConfigDict(config_json["optim"]), config_json["total_steps"])(step))


def keep_launch_config(config: ml_collections.ConfigDict, workdir: str, start_step: int) -> str:
  """Writes the config of this launch to `<workdir>/config.<start_step>.json` (`.<n>` added when a launch from
  that step already wrote one) and returns the path."""
  base = os.path.join(workdir, f"config.{start_step}")
  path, n = base + ".json", 1
  while os.path.exists(path):
    path, n = f"{base}.{n}.json", n + 1
  atomic.write(path, config.to_json_best_effort(indent=2))
  return path
