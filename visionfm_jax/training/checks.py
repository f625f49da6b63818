"""Every check of a config before a run builds anything: the config's own (config_lib.check: each field a row of
its schema, in its domain), then each owner's between fields: the data section (data/loader/checks.py), the
schedule (training/optim.py), the batch and the mesh (parallel/checks.py), the form of the recipe's sharding
overrides (parallel/sharding.py), the model fields init_from's checkpoint was trained with (training/init_from.py).
What only a model or a task knows is checked when it is built (tasks.build); the sharding overrides against the
model's params and the mesh, when the state's shardings are (`parallel.param_specs`: the run's start-up, main's
--dry_run, the planners). A run checks its config once: `main` calls `validate` before joining the other
processes and setting up the devices, and `train.run` then only `check_devices` once it knows them; a run started
from Python (`train.run` without `validated`) calls `validate` there. A NaFlex token budget is checked against a
device's memory once the task is built, before the first compile (`check_naflex_budget`: main's start-up and
`--dry_run` alike)."""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from visionfm_jax import config_lib, tasks
from visionfm_jax.data.loader import checks as data_checks
from visionfm_jax.errors import ConfigError
from visionfm_jax.parallel import checks as parallel_checks
from visionfm_jax.parallel import sharding
from visionfm_jax.parallel.sharding import unbox
from visionfm_jax.training import init_from, optim, sizing
from visionfm_jax.training.infra import trackers

# What `validate` asks of the training data's paths (`data=`).
DATA_UNREAD = "unread"  # a config alone (a recipe checked for its cluster): not looked at, unless sizing reads them
DATA_PRESENT = "present"  # a run (main, train.run): a path that matches nothing is the first error, naming it
DATA_PLANNED = "planned"  # main --dry_run: as present, but a folder that does not exist yet is no error (the plan
# goes without the data), unless a field is sized from the data


def validate(
  config, num_devices: int | None = None, num_processes: int = 1, *, data: str = DATA_UNREAD
) -> list[str] | None:
  """ConfigError naming the field of the first check `config` fails. With `num_devices` (over `num_processes`
  processes), also that the batch divides over the mesh and its batch axes over the processes. First, as `data`
  says (DATA_*), a training data path that matches nothing is a DataError naming it (data/loader/checks.py
  `check_found`), before anything reads the data; then fills, in place, the fields the recipe leaves to the run
  (training/sizing.py); returns the training class names that this read (`sizing.fill`), else None."""
  sized_from_data = config_lib.is_sized(config, config_lib.NUM_CLASSES)
  if data != DATA_UNREAD or sized_from_data:
    data_checks.check_found(config.data, absent_ok=data == DATA_PLANNED and not sized_from_data)
  class_names = sizing.fill(config)
  config_lib.check(config)
  trackers.check_installed(config)
  data_checks.check(config.data)
  optim.check_schedule(config.optim, config.total_steps)
  check_checkpoint_cadence(config)
  parallel_checks.check_batch(config)
  sharding.Overrides(config.sharding.overrides)  # a bad regex or layout: a ConfigError naming the rule
  init_from.check_model_fields(config)
  if num_devices is not None:
    check_devices(config, num_devices, num_processes)
  return class_names


def check_devices(config, num_devices: int, num_processes: int) -> None:
  """ConfigError unless the batch divides over the mesh of `num_devices` devices and its batch axes over the
  `num_processes` processes."""
  parallel_checks.check_mesh(config, num_devices, num_processes)


def check_checkpoint_cadence(config) -> None:
  """The kept history (checkpoint_keep_period) falls on saved steps."""
  if config.checkpoint_keep_period % config.checkpoint_every:
    raise ConfigError(
      f"config.checkpoint_keep_period={config.checkpoint_keep_period} is not a multiple of "
      f"config.checkpoint_every={config.checkpoint_every}: no checkpoint would be kept at those steps"
    )


def device_memory_bytes() -> int | None:
  """What one local device may hold: its allocator's limit (a GPU's), else for CPU devices the host's physical
  memory shared among them; None when neither is known."""
  device = jax.local_devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if limit:
    return int(limit)
  if device.platform == "cpu":
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
  return None


def largest_product(task, batch_size: int) -> jax.ShapeDtypeStruct:
  """The largest matrix product's output in `task`'s loss of a micro-batch of `batch_size` (a softmax attention's
  scores (batch, heads, tokens, tokens)), from the traced program alone (shapes; nothing compiled or allocated). An
  XLA program holds every product's output at once at least, whatever it fuses around it, so its bytes are a lower
  bound on one device's peak."""
  params = jax.eval_shape(lambda: unbox(task.init_variables(jax.random.key(0))["params"]))
  one = task.synthetic_batch(1, np.random.default_rng(0))
  batch = {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype) for k, v in one.items()}
  jaxpr = jax.make_jaxpr(lambda p, b: task.loss(p, b, jax.random.key(0)))(params, batch).jaxpr
  products = [v.aval for e in _equations(jaxpr) if e.primitive.name == "dot_general" for v in e.outvars]
  largest = max(products, key=lambda a: math.prod(a.shape) * a.dtype.itemsize)
  return jax.ShapeDtypeStruct(largest.shape, largest.dtype)


def _equations(jaxpr):
  """Every equation of `jaxpr` and of the programs nested in it (scan and remat bodies, custom gradients)."""
  for equation in jaxpr.eqns:
    yield equation
    for param in equation.params.values():
      for inner in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(inner, jax.extend.core.ClosedJaxpr):
          yield from _equations(inner.jaxpr)
        elif isinstance(inner, jax.extend.core.Jaxpr):
          yield from _equations(inner)


def check_naflex_budget(
  config, micro_batch_per_device: int, device_bytes: int | None, class_names: list[str] | None = None
) -> None:
  """ConfigError naming config.data.naflex.max_tokens when the largest product of a micro-batch's loss on one
  device (`largest_product` of the task on no mesh: the attention scores, quadratic in the budget) alone exceeds
  `device_bytes`: the first compile would otherwise end the run in an out-of-memory error. Nothing for images of a
  fixed size, whose products bench/memory_plan.py plans."""
  naflex = config.data.get("naflex")
  if not naflex or not naflex.max_tokens or not device_bytes:
    return
  largest = largest_product(tasks.build(config, class_names=class_names), micro_batch_per_device)
  need = math.prod(largest.shape) * largest.dtype.itemsize
  if need > device_bytes:
    raise ConfigError(
      f"config.data.naflex.max_tokens={naflex.max_tokens}: one matrix product of the loss, {largest.dtype.name}"
      f"{tuple(largest.shape)} for a micro-batch of {micro_batch_per_device} on one device, takes "
      f"{need / 2**30:,.1f} GiB, over a device's {device_bytes / 2**30:,.1f} GiB; lower the token budget or "
      f"the micro-batch (config.grad_accum_steps)"
    )
