"""`python -m visionfm_jax.main --dry_run ...`: everything a run checks before its first step, and its plan, with
nothing trained, allocated or written.

The config (validated by main.py) is checked against the planned devices and processes (training/checks.py),
init_from must exist, and the run plan is made as `train.run` makes it (training/plan.py: init_from's checkpoint
must agree with the model fields the config states; the workdir's newest checkpoint must accept this config,
training/resume.py); the task is
built and opens its data as a run does at start-up (the training data, every mixture entry, and every
evaluator's sources: a missing or empty one is a DataError naming it, zero-shot on images without labels or with
an unreadable class-names file a ConfigError naming the field, as the run would meet them at its first evaluation).
The train state
is planned from shapes only (`jax.eval_shape`): its bytes per device under the strategy on the mesh of the
planned devices (parallel/memory.py); the activations are left to bench/memory_plan.py, which compiles the step,
but for a NaFlex token budget whose largest product alone outgrows this host's device (training/checks.py
`check_naflex_budget`, as the run checks it).

One process answers for a whole job: the checks depend on the device and process counts only (given as numbers),
and no collective is joined. The launch scripts therefore run one process for `--dry_run` (launch/).

A cluster job is planned before its data arrives: where a training source's folder does not exist yet
(data/loader/checks.py `check_found`; main's check lets it through unless a field is sized from the data), the plan
opens no data and takes the examples' shapes from the config (the task's synthetic batch, which the state and the
input bytes are planned from anyway); the examples per epoch, the evaluators and the input's open files are left to
a dry run once the data is there, and the report says so, naming the folders.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from visionfm_jax import parallel, tasks
from visionfm_jax.data.loader import checks as data_checks
from visionfm_jax.data.loader import mixture as mixture_lib
from visionfm_jax.data.loader import open_files
from visionfm_jax.errors import CheckpointError, WorkdirError
from visionfm_jax.parallel.sharding import unbox
from visionfm_jax.tasks.base import EvalContext
from visionfm_jax.training import checkpoint, checks, optim, stored
from visionfm_jax.training import plan as plan_lib
from visionfm_jax.training import step as step_lib
from visionfm_jax.training.infra import workdir as workdir_lib


def plan(config, workdir: str, num_devices: int, num_processes: int, class_names: list[str] | None = None) -> dict:
  """The run's plan (see `report`) for a `config` that main.py has validated but for the devices (that check
  read the training data's `class_names` where it sized the head: the task takes them); a UserError naming the
  culprit when it could not start."""
  checks.check_devices(config, num_devices, num_processes)
  if config.init_from and not os.path.exists(os.path.expanduser(config.init_from)):
    raise CheckpointError(f"init_from={config.init_from!r}: no such directory")
  checkpoint_dir = stored.checkpoints_dir(workdir)
  _check_workdir(workdir)
  run_plan = plan_lib.make(config, checkpoint_dir, num_devices, num_processes)
  mesh = run_plan.mesh
  start_step = checkpoint.newest_committed_step(checkpoint_dir) or 0

  task = tasks.build(config, class_names=class_names)
  batch = run_plan.batch
  checks.check_naflex_budget(config, batch.micro_batch_per_device, checks.device_memory_bytes(), class_names)
  shell_limits = open_files.limits()  # before the loader raises them
  absent = data_checks.check_found(config.data, absent_ok=True)
  opened = (
    _open_data(task, config, batch, num_processes)
    if not absent
    else dict(examples_per_epoch=None, evaluators=None, open_files=None)
  )

  tx = optim.make_optimizer(config.optim, run_plan.lr_schedule, task.model)
  abstract = jax.eval_shape(step_lib.make_init_fn(task, tx, config), jax.random.key(0))
  per_device = parallel.bytes_per_device(
    abstract, mesh, config.strategy, config.optimizer_over_data, config.sharding.overrides
  )
  example = task.synthetic_batch(1, np.random.default_rng(0))  # shapes from the config, as the data's will be
  per_example = sum(math.prod(x.shape[1:]) * x.dtype.itemsize for x in example.values())
  unboxed = unbox(abstract)
  return dict(
    task=config.task,
    model=config.model.name,
    strategy=config.strategy,
    mesh=mesh,
    devices=num_devices,
    processes=num_processes,
    params=sum(math.prod(x.shape) for x in jax.tree.leaves(unboxed.params)),
    bytes_per_device=per_device,
    batch_bytes_per_device=batch.micro_batch_per_device * per_example,
    micro_batch=batch.micro_batch,
    total_steps=config.total_steps,
    start_step=start_step,
    global_batch=batch.global_batch,
    grad_accum_steps=batch.accum_steps,
    checkpoint_every=config.checkpoint_every,
    keep_checkpoints=config.keep_checkpoints,
    keep_period=config.checkpoint_keep_period,
    checkpoint_bytes=workdir_lib.tree_bytes(unboxed),
    eval_every=config.eval_every,
    workdir=workdir,
    shell_limits=shell_limits,
    absent_data=absent,
    example_shapes={key: (x.shape[1:], x.dtype.name) for key, x in example.items()},
    **opened,
  )


def _open_data(task, config, batch, num_processes: int) -> dict:
  """What the plan reads from the data, opened as a run opens it at start-up: the training loader (its open
  files), every evaluator's sources, the examples of an epoch."""
  loader = task.train_loader(
    batch_size=batch.per_process, seed=config.seed, process_index=0, process_count=num_processes
  )
  evaluators = task.evaluators(EvalContext(_one_device_mesh(), batch.micro_batch, 0, num_processes))
  return dict(
    examples_per_epoch=mixture_lib.open_train(config.data, config.data.train_split).records,
    evaluators=sorted(evaluators),
    open_files=loader.open_files,
  )


def mesh_devices(mesh_cfg) -> int | None:
  """The devices config.mesh names, None when an axis takes the devices left (-1)."""
  sizes = [int(mesh_cfg[axis]) for axis in parallel.AXES]
  return None if -1 in sizes else math.prod(sizes)


def _check_workdir(workdir: str) -> None:
  """WorkdirError when the workdir could not be created or written: its nearest existing ancestor is no
  writable directory (nothing is created here)."""
  path = os.path.abspath(os.path.expanduser(workdir))
  ancestor = path
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise WorkdirError(f"--workdir={workdir}: {ancestor} is a file, not a directory")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir}: {ancestor} is not writable")


def _one_device_mesh():
  """A mesh of one device for building the evaluators: they open their sources when built and never run here."""
  return parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def human_bytes(n: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
    if n >= size:
      return f"{n / size:.{3 if unit == 'GiB' else 1}f} {unit}"
  return f"{n / 2**10:.1f} KiB"


def report(p: dict) -> list[str]:
  """The plan as the lines `main --dry_run` prints."""
  b = p["bytes_per_device"]
  mesh = " x ".join(f"{axis} {size}" for axis, size in p["mesh"].items())
  steps_left = p["total_steps"] - p["start_step"]
  return [
    f"task {p['task']}, model {p['model']}: {p['params']:,} params",
    f"mesh {mesh} over {p['devices']} devices in {p['processes']} process{'es' if p['processes'] > 1 else ''}, "
    f"strategy {p['strategy']}",
    f"bytes per device: params {human_bytes(b['params'])}, grads {human_bytes(b['grads'])}, optimizer "
    f"{human_bytes(b['opt_state'])}, state {human_bytes(b['total'])}; "
    f"input {human_bytes(p['batch_bytes_per_device'])} per micro-batch; activations not planned "
    f"(python -m visionfm_jax.bench.memory_plan compiles the step)",
    f"steps: {p['total_steps']:,} of {p['global_batch']:,} examples ({p['grad_accum_steps']} micro-batch"
    f"{'es' if p['grad_accum_steps'] > 1 else ''} of {p['micro_batch']:,}); "
    + (f"resuming at step {p['start_step']:,}, {steps_left:,} to go" if p["start_step"] else "starting at step 0"),
    *_data_lines(p),
    f"checkpoints: every {p['checkpoint_every']:,} steps in {stored.checkpoints_dir(p['workdir'])}, keeping "
    f"{p['keep_checkpoints']}"
    + (f" and every {p['keep_period']:,} for good" if p["keep_period"] else "")
    + f", {human_bytes(p['checkpoint_bytes'])} each; evaluation every {p['eval_every']:,} steps: "
    + (
      f"{', '.join(p['evaluators']) or 'none'}"
      if p["evaluators"] is not None
      else "its evaluators open their data, which is not there yet"
    ),
  ]


def _data_lines(p: dict) -> list[str]:
  """The plan's lines about the data: the epoch and the open files, or, before the data exists, what the plan
  took from the config in its place."""
  if p["absent_data"]:
    shapes = ", ".join(
      f"{key} {'x'.join(map(str, shape)) or 'scalar'} {dtype}" for key, (shape, dtype) in p["example_shapes"].items()
    )
    verb = "do" if len(p["absent_data"]) > 1 else "does"
    return [
      f"data: {', '.join(p['absent_data'])} {verb} not exist yet: planned without it, an example's shapes from "
      f"the config ({shapes}); the examples per epoch, the evaluators and the open files the input needs are "
      f"checked by this dry run once the data is there"
    ]
  epoch_steps = p["examples_per_epoch"] / p["global_batch"]
  return [
    f"examples per epoch: {p['examples_per_epoch']:,} (an epoch is {epoch_steps:,.0f} steps; the run is "
    f"{p['total_steps'] / epoch_steps:,.2f} epochs)",
    open_files.describe(p["open_files"], p["shell_limits"]),
  ]
