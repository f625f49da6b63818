"""The train step and the state it steps: its init, its abstract shapes and shardings, the jitted step, and the
step compiled from shapes only (for the benchmarks, planners and tools, which import this and not the loop)."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from visionfm_jax import models, parallel, tasks
from visionfm_jax.parallel.sharding import Partitioned, unbox
from visionfm_jax.training import grads as grads_lib
from visionfm_jax.training import guards, optim
from visionfm_jax.training import state as state_lib
from visionfm_jax.training.state import TrainState


def make_init_fn(task: tasks.Task, tx: optax.GradientTransformation, config) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState whose params/opt_state (and EMA) leaves are boxed with logical axis names, with the
  optional parts its config turns on (training/state.py, `PARTS`). The init traces under the run's GEMMs, so
  that delayed FP8 scaling's layers create their amax histories (models/fp8.py)."""

  def init(rng):
    # rolled: the same params as the run's form, from a program of one loop body
    with models.layers.rolled_stacks(), task.training_gemms():
      variables = task.init_variables(rng)
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), **state_lib.created(config, variables)
    )

  return init


@functools.lru_cache(maxsize=4)
def abstract_state(init_fn):
  """The boxed state `init_fn` makes, from shapes only (`jax.eval_shape`): traced once per init_fn, and every
  sharding of the run (the state's, the gradients') derives from it."""
  return jax.eval_shape(init_fn, jax.random.key(0))


def state_shardings(init_fn, mesh, config):
  """(abstract unboxed state, its NamedShardings, its PartitionSpecs), from shapes only (no allocation)."""
  specs = parallel.state_specs(
    abstract_state(init_fn), dict(mesh.shape), config.strategy, config.optimizer_over_data, config.sharding.overrides
  )
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  return unbox(abstract_state(init_fn)), shardings, specs


def init_state(init_fn, shardings, rng: jax.Array) -> TrainState:
  """The state `init_fn` makes from `rng`, laid out by `shardings` (`state_shardings`' second)."""
  return unbox(jit_init(init_fn, shardings)(rng))


def jit_init(init_fn, shardings):
  """rng -> boxed state laid out by `shardings`: `init_fn` itself jitted, its output boxed as `abstract_state` saw
  it, so that JAX reuses the trace `abstract_state` made (traces are cached by function) instead of tracing the
  model's init a second time."""
  boxed_shardings = jax.tree.map(
    lambda box, s: box.replace_boxed(s) if isinstance(box, Partitioned) else s,
    abstract_state(init_fn),
    shardings,
    is_leaf=lambda x: isinstance(x, Partitioned),
  )
  return jax.jit(init_fn, out_shardings=boxed_shardings)


def make_train_step(
  task: tasks.Task, tx: optax.GradientTransformation, config, grad_shardings, mesh, lr_schedule: optax.Schedule
):
  """The train step; `mesh`: the run's, where each device may accumulate its own gradients (`grads.of_batch`);
  `lr_schedule`: the one `tx` applies, read at the optimizer's count for the logged train/lr."""
  base_rng = jax.random.key(config.seed)
  zero_frozen = optim.zero_frozen_grads_fn(config.optim.freeze)
  apply_guards = guards.guarded(config)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    scale = state.loss_scale.scale if state.loss_scale is not None else jnp.float32(1.0)
    fp8_history = state.fp8_history
    with task.training_gemms():
      if fp8_history is None:
        grads, loss, aux = grads_lib.of_batch(task, state.params, batch, rng, scale, grad_shardings, config, mesh)
      else:
        grads, loss, aux, fp8_history = grads_lib.with_amax_histories(
          task, state.params, fp8_history, batch, rng, scale, grad_shardings
        )
    grads = zero_frozen(jax.tree.map(lambda g: g / scale, grads))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    proposed = state.replace(
      step=state.step + 1,
      params=task.post_update(optax.apply_updates(state.params, updates)),
      opt_state=opt_state,
      fp8_history=fp8_history,
    )
    new_state, guard_metrics = apply_guards(state, proposed, guards.Signals(loss, grad_norm, grads))
    out = {
      "train/loss": loss,
      "train/grad_norm": grad_norm,
      "train/lr": optim.learning_rate(lr_schedule, state.opt_state),
      **aux,
      **guard_metrics,
    }
    return new_state, out

  return train_step


def jit_train_step(
  task: tasks.Task, tx: optax.GradientTransformation, config, mesh, init_fn, shardings, lr_schedule: optax.Schedule
):
  """The jitted train step of `run`: state laid out by `shardings` (and donated), the batch split over
  (data, fsdp), gradients constrained to `grad_specs`. Call or lower it under `parallel.activation_sharding(mesh)`."""
  boxed_params = abstract_state(init_fn).params
  specs = parallel.grad_specs(boxed_params, dict(mesh.shape), config.strategy, config.sharding.overrides)
  grad_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  return jax.jit(
    make_train_step(task, tx, config, grad_shardings, mesh, lr_schedule),
    in_shardings=(shardings, parallel.batch_sharding(mesh)),
    out_shardings=(shardings, None),
    donate_argnums=0,
  )


def compile_train_step(config, mesh, batch, task: tasks.Task | None = None):
  """The train step of `run` lowered and compiled from shapes only (no state is allocated), for a global `batch`
  of arrays or ShapeDtypeStructs: `.as_text()` is the partitioned HLO, `.memory_analysis()` its buffer sizes."""
  task = task or tasks.build(config, mesh)
  tx, lr_schedule = optim.fresh_optimizer(config, task.model)
  init_fn = make_init_fn(task, tx, config)
  with parallel.activation_sharding(mesh):
    abstract, shardings, _ = state_shardings(init_fn, mesh, config)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    return jit_train_step(task, tx, config, mesh, init_fn, shardings, lr_schedule).lower(state, batch).compile()
