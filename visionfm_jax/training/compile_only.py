"""`python -m visionfm_jax.main --compile_only ...`: the run's programs compiled into its compile cache, with
nothing trained, no data read and nothing else written.

The programs are those `train.run` compiles first and longest: the state's init and the train step, lowered from
shapes only (no state is allocated) on the mesh of this job's devices, exactly as the run lowers them (the same
functions of training/step.py, the same shardings, the batch in the layout of the task's loader), so that the run
of the same config on the same devices and processes, with the same XLA flags, loads them from the cache
(training/infra/compile_cache.py: the cache's key). The evaluators' programs are left to the run: they are built
with the evaluation data and compile in a fraction of the step's time.

A job starts it as it starts the run (launch/slurm.sbatch, one process per node): the topology is part of the
cache's key, and each process compiles the SPMD program as the run will. With a cache folder that every node sees
(the workdir's `compile_cache/` on a shared filesystem, or `config.compile_cache`), the first job and each requeue,
on whatever nodes, skip the compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator

import jax
import numpy as np

from visionfm_jax import parallel, tasks
from visionfm_jax.errors import ConfigError
from visionfm_jax.training import checks, optim, stored
from visionfm_jax.training import plan as plan_lib
from visionfm_jax.training import step as step_lib
from visionfm_jax.training.infra import compile_cache


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One program: its name as the cache files it (`jit_<name>-<key>-cache`), its seconds to compile or load,
  and whether it was loaded from the cache."""

  name: str
  seconds: float
  loaded: bool


def run(config, workdir: str, class_names: list[str] | None = None) -> tuple[str, list[Compiled]]:
  """Compiles the programs of a run of `config` (validated by main.py) in `workdir` on this job's devices into its
  compile cache; returns (the cache's folder, the programs)."""
  folder = compile_cache.directory(config.compile_cache, workdir)
  if folder is None:
    raise ConfigError(
      f"--compile_only with config.compile_cache={config.compile_cache!r}: there is no cache to "
      f"fill; leave it '' (<workdir>/compile_cache) or name a folder"
    )
  devices, processes = jax.device_count(), jax.process_count()
  checks.check_devices(config, devices, processes)
  with compile_cache.in_use(config.compile_cache, workdir), _every_program_written():
    run_plan = plan_lib.make(config, stored.checkpoints_dir(workdir), devices, processes)
    return folder, _compile(run_plan, class_names)


def _compile(run_plan: plan_lib.RunPlan, class_names: list[str] | None) -> list[Compiled]:
  """The init and the train step as `train._train_in` builds them, each lowered and compiled from shapes."""
  config = run_plan.config
  mesh = parallel.make_mesh(run_plan.mesh)
  task = tasks.build(config, mesh, class_names)
  task.check_training_devices()
  tx = optim.make_optimizer(config.optim, run_plan.lr_schedule, task.model)
  init_fn = step_lib.make_init_fn(task, tx, config)
  with parallel.activation_sharding(mesh):
    abstract, shardings, _ = step_lib.state_shardings(init_fn, mesh, config)
    rng = jax.eval_shape(jax.random.key, config.seed)
    state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s, weak_type=a.weak_type), abstract, shardings
    )
    batch = _batch_shapes(task, run_plan.batch, parallel.batch_sharding(mesh))
    train_step = step_lib.jit_train_step(task, tx, config, mesh, init_fn, shardings, run_plan.lr_schedule)
    return [
      _timed("init", lambda: step_lib.jit_init(init_fn, shardings).lower(rng).compile()),
      _timed("train_step", lambda: train_step.lower(state, batch).compile()),
    ]


def _batch_shapes(task, geometry: parallel.BatchGeometry, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the run's loader feeds the step (`Task.synthetic_batch` has its layout), as shapes."""
  one = task.synthetic_batch(1, np.random.default_rng(0))
  return {
    k: jax.ShapeDtypeStruct((geometry.global_batch,) + v.shape[1:], v.dtype, sharding=sharding) for k, v in one.items()
  }


def _timed(name: str, compile_program) -> Compiled:
  hits = []

  def count(event: str, **_) -> None:
    if event == compile_cache.HIT:
      hits.append(event)

  jax.monitoring.register_event_listener(count)
  start = time.perf_counter()
  try:
    compile_program()
  finally:
    jax.monitoring.unregister_event_listener(count)
  return Compiled(name, time.perf_counter() - start, loaded=bool(hits))


@contextlib.contextmanager
def _every_program_written() -> Iterator[None]:
  """JAX writes only the programs that took `jax_persistent_cache_min_compile_time_secs` (1 s) or more to compile:
  here every program is written, as filling the cache is the point."""
  # jax.config sets its flags as attributes at run time; its class declares none
  before = jax.config.jax_persistent_cache_min_compile_time_secs  # type: ignore[attr-defined]
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def report(folder: str, programs: list[Compiled]) -> str:
  """The one line `main --compile_only` prints."""
  each = ", ".join(
    f"{p.name} {p.seconds:.1f} s ({'loaded: already in the cache' if p.loaded else 'compiled'})" for p in programs
  )
  return (
    f"compile only: {each}, for {jax.device_count()} {jax.devices()[0].device_kind} devices in "
    f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}; cache {folder}; nothing was "
    f"trained"
  )
