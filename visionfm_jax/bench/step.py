"""Times the run's own train step (training/step.py: same jit, shardings, donation, optimizer) on synthetic batches.

`JaxStep(config)` compiles the step ahead of time (the compile time is one of the figures; `compiler_options` are
XLA options for this executable alone; `kernel_forms` forces models/kernels.py's forms, e.g. 'plain';
`try_kernels` traces it with those kernel candidates, `kernels.trying`), then `timed_step()` runs one step to
completion and returns (wall seconds, CPU seconds of this process).
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np

from visionfm_jax import parallel, tasks
from visionfm_jax.models import kernels
from visionfm_jax.training import optim
from visionfm_jax.training import step as step_lib


class JaxStep:
  def __init__(self, config, devices=None, compiler_options=None, kernel_forms: str | None = None, try_kernels=()):
    self.config = config
    self.mesh = parallel.make_mesh(config.mesh, devices)
    self.task = tasks.build(config, self.mesh)
    self.task.check_training_devices()
    tx, lr_schedule = optim.fresh_optimizer(config, self.task.model)
    init_fn = step_lib.make_init_fn(self.task, tx, config)
    batch = parallel.BatchGeometry.of(config, dict(self.mesh.shape), jax.process_count())
    local_batch = self.task.synthetic_batch(batch.per_process, np.random.default_rng(config.seed + jax.process_index()))
    with parallel.activation_sharding(self.mesh):  # what train.run traces the step under
      _, shardings, _ = step_lib.state_shardings(init_fn, self.mesh, config)
      self.state = step_lib.init_state(init_fn, shardings, jax.random.key(config.seed))
      self.batch = parallel.host_to_global(local_batch, parallel.batch_sharding(self.mesh))
      start = time.perf_counter()
      step = step_lib.jit_train_step(self.task, tx, config, self.mesh, init_fn, shardings, lr_schedule)
      with kernels.forced(kernel_forms) if kernel_forms else contextlib.nullcontext(), kernels.trying(try_kernels):
        self.compiled = step.lower(self.state, self.batch).compile(compiler_options=compiler_options)
      self.compile_seconds = time.perf_counter() - start

  def timed_step(self) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - wall, time.process_time() - cpu

  def loss(self) -> float:
    """The loss of one more step (to check that the benchmark trains a finite model)."""
    self.state, metrics = self.compiled(self.state, self.batch)
    return float(metrics["train/loss"])

  def flops_per_step(self) -> float | None:
    per_example = self.task.train_flops_per_example()
    return None if per_example is None else per_example * self.config.global_batch_size

  def memory(self) -> dict[str, int | None]:
    """Per-device bytes: the compiled plan (arguments + outputs - donated aliases + temporaries) and, where the
    runtime reports it (GPU), the peak the allocator actually held."""
    analysis = self.compiled.memory_analysis()
    plan = None
    if analysis is not None:
      plan = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
      )
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"memory_plan_bytes": plan, "peak_bytes_in_use": stats.get("peak_bytes_in_use")}
