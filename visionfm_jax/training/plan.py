"""The run plan: what a run derives from the user's config, computed once by `make` and passed down. The user's
config is only read: `config.json` holds what was asked, `plan.json` beside it what the run derived.

  config          the user's config, as parsed from the command line: what the task, the optimizer and the
                  checkpoints read
  anchor          where the schedule decays from after a resume that changed its length (training/resume.py,
                  `optim.Anchor`); None: the schedule as drawn
  lr_schedule     the learning-rate schedule of `config` from `anchor` (`optim.schedule`): the optimizer
                  applies it and the train step logs it
  resume_changes  the schedule and optimiser changes the resume accepted, 'config.<path> <old> -> <new>'
  mesh            the mesh's axis sizes on the run's devices
  batch           the batch's sizes on that mesh (`parallel.BatchGeometry`): per process, per micro-batch, ...

A checkpoint carries `trained_config()`, `config` as JSON, and `anchor_record()`, the anchor as its own record, so
that the next resume reads its anchor back. config.json alone rebuilds the run's model: init_from's checkpoint
must agree with the model fields the config states (training/checks.py runs training/init_from.py's
`check_model_fields`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
import optax

from visionfm_jax import atomic, parallel
from visionfm_jax.training import optim, resume

PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class RunPlan:
  config: ml_collections.ConfigDict
  anchor: optim.Anchor | None
  lr_schedule: optax.Schedule
  resume_changes: tuple[str, ...]
  mesh: dict[str, int]
  batch: parallel.BatchGeometry
  num_devices: int
  num_processes: int

  def trained_config(self) -> dict:
    """The config a checkpoint carries: `config` as JSON."""
    return resume.as_json(self.config)

  def anchor_record(self) -> dict | None:
    """The schedule's anchor as a checkpoint and plan.json carry it ({'step', 'lr'}), None without one."""
    return self.anchor._asdict() if self.anchor else None

  def as_json(self) -> dict:
    """plan.json: the anchor, the accepted changes, the mesh and the devices."""
    return dict(
      schedule_anchor=self.anchor_record(),
      resume_changes=list(self.resume_changes),
      mesh=self.mesh,
      devices=self.num_devices,
      processes=self.num_processes,
    )

  def write(self, workdir: str, start_step: int) -> None:
    """config.json (the latest launch's config as the user gave it), config.<start_step>.json (this launch's,
    kept) and plan.json (`as_json`)."""
    atomic.write(os.path.join(workdir, "config.json"), self.config.to_json_best_effort(indent=2))
    resume.keep_launch_config(self.config, workdir, start_step)
    atomic.write(os.path.join(workdir, PLAN_FILE), json.dumps(self.as_json(), indent=2))


def make(config: ml_collections.ConfigDict, checkpoint_dir: str, num_devices: int, num_processes: int) -> RunPlan:
  """The plan of a run of `config` (validated: training/checks.py) on `num_devices` devices in `num_processes`
  processes, resuming the newest checkpoint in `checkpoint_dir` if there is one (a ConfigError when that
  checkpoint does not take this config: training/resume.py)."""
  changes, anchor = resume.check_changes(config, checkpoint_dir)
  mesh = parallel.mesh_shape(config.mesh, num_devices)
  return RunPlan(
    config=config,
    anchor=anchor,
    lr_schedule=optim.schedule(config.optim, config.total_steps, anchor),
    resume_changes=tuple(changes),
    mesh=mesh,
    batch=parallel.BatchGeometry.of(config, mesh, num_processes),
    num_devices=num_devices,
    num_processes=num_processes,
  )
