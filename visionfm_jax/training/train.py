"""The one training loop. Everything model-specific comes from the task (`tasks/`).

run(config, workdir):
  mesh -> task -> sharded state (restored from the newest checkpoint, else created sharded and optionally
  initialised from `init_from`) -> loop of jitted train steps over global batches -> metrics, evaluators,
  async checkpoints of state + data iterator.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from visionfm_jax import atomic, parallel, tasks

from visionfm_jax.training import checkpoint, data_record, ema, flops, guards, health, init_from
from visionfm_jax.training.infra import compile_cache, console, faults
from visionfm_jax.training.infra import metrics
from visionfm_jax.training import checks, optim, plan as plan_lib, precision, prefetch, resume
from visionfm_jax.training.infra import workdir as workdir_lib
from visionfm_jax.errors import CheckpointError, UserError, WorkdirError
from visionfm_jax.tasks.base import EvalContext
from visionfm_jax.training.state import TrainState


class NonFiniteLossError(UserError):
  pass


# ------------------------------------------------------------------------------------------------ state

def make_init_fn(task: tasks.Task, tx: optax.GradientTransformation, config) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState whose params/opt_state (and EMA) leaves are boxed with logical axis names."""

  def init(rng):
    params = task.init_variables(rng)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      loss_scale=precision.maybe_loss_scale(config.precision), health=health.maybe_create(config),
                      ema_params=params if config.optim.ema_decay else None)

  return init


@functools.lru_cache(maxsize=4)
def abstract_state(init_fn):
  """The boxed state `init_fn` makes, from shapes only (`jax.eval_shape`): traced once per init_fn, and every
  sharding of the run (the state's, the gradients') derives from it."""
  return jax.eval_shape(init_fn, jax.random.key(0))


def state_shardings(init_fn, mesh, config):
  """(abstract unboxed state, its NamedShardings, its PartitionSpecs), from shapes only (no allocation)."""
  abstract_boxed = abstract_state(init_fn)
  shape = parallel.mesh_shape(config.mesh, mesh.size)
  specs = parallel.state_specs(abstract_boxed, shape, config.strategy)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  abstract = nn.unbox(abstract_boxed)
  return abstract, shardings, specs


# ------------------------------------------------------------------------------------------- train step

def split_microbatches(batch, steps: int):
  """(B, ...) -> (steps, B / steps, ...) taking rows i*steps + j into micro-batch j, each micro-batch split over
  the data-parallel devices as the batch is.

  Each device keeps its own rows (no communication) when B / steps divides over the data-parallel devices.
  """
  def split(x):
    x = x.reshape((x.shape[0] // steps, steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  micro_batches = jax.tree.map(split, batch)
  micro_spec = P(None, *parallel.BATCH_SPEC)
  return jax.lax.with_sharding_constraint(micro_batches, jax.tree.map(lambda _: micro_spec, micro_batches))


def grads_of(task: tasks.Task, params, batch, rng, scale, grad_shardings):
  """(gradient of `scale` x the task's loss on `batch`, constrained to `grad_shardings` (None: left as it is); the
  loss; its aux)."""
  def scaled_loss(p):
    loss, aux = task.loss(p, batch, rng)
    return loss * scale, (loss, aux)
  grads, (loss, aux) = jax.grad(scaled_loss, has_aux=True)(params)
  return _constrained(grads, grad_shardings), loss, aux


def _constrained(tree, shardings):
  return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def accumulates_per_device(task: tasks.Task, config) -> bool:
  """Whether the step sums each device's gradients over the micro-batches unreduced and reduces them once
  (`config.accumulate_unreduced`, with micro-batches, for a loss that per-device sums give exactly: a split
  loss, or one that does not couple examples)."""
  return (config.accumulate_unreduced and config.grad_accum_steps > 1
          and (task.splits_loss or not task.couples_examples))


def per_device(fn, mesh, node_grad_specs=None):
  """fn(rows, rng, *row_args) run by each device of `mesh` on its own rows (a shard_map manual over the whole
  mesh: no collective inside, so each device's gradient stays its own), device d drawing from `rng` folded with
  d; results stacked on a leading device axis that `sum_devices` reduces. mesh None: fn itself.

  `node_grad_specs` (the gradients' PartitionSpecs; `node_local_specs`): the first result, the gradients, is
  reduce-scattered over `fsdp` inside (a node's GPUs when fsdp is the node) to each device's shard of its spec,
  and stacked over `data` only: what each node accumulates, with one reduction across nodes left for the step."""
  if mesh is None:
    return fn
  rows_spec = P(parallel.BATCH_AXES)
  out_specs = rows_spec
  if node_grad_specs is not None:
    out_specs = (jax.tree.map(lambda spec: P("data", *spec), node_grad_specs, is_leaf=_is_spec),) + (rows_spec,) * 2

  def local(rows, rngs, row_args):
    with parallel.device_local():
      out = fn(rows, rngs[0], *row_args)
    if node_grad_specs is not None:
      out = (jax.tree.map(_sum_within_fsdp, out[0], node_grad_specs), *out[1:])
    return jax.tree.map(lambda x: x[None], out)

  def run(rows, rng, *row_args):
    rngs = jax.vmap(lambda d: jax.random.fold_in(rng, d))(jnp.arange(mesh.size))
    # one spec for every leaf of each argument and of the result (shard_map takes tree prefixes)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows_spec,) * 3, out_specs=out_specs,
                         check_vma=False)(rows, rngs, row_args)
  return run


def _is_spec(x) -> bool:
  return isinstance(x, P)


def _sum_within_fsdp(grad, spec: P):
  """This device's share of `grad` summed over its fsdp group: the shard of `spec`'s fsdp dimension
  (reduce-scatter), or the whole sum where the spec does not shard over fsdp (all-reduce)."""
  dim = _fsdp_dim(spec)
  if dim is None:
    return jax.lax.psum(grad, "fsdp")
  return jax.lax.psum_scatter(grad, "fsdp", scatter_dimension=dim, tiled=True)


def _fsdp_dim(spec: P) -> int | None:
  """The dimension `spec` shards over fsdp (alone or with tensor, which accumulate_unreduced keeps at 1)."""
  for dim, axes in enumerate(spec):
    if axes == "fsdp" or (isinstance(axes, tuple) and "fsdp" in axes):
      return dim
  return None


def node_local_specs(mesh, grad_shardings):
  """The gradients' PartitionSpecs when per-device accumulation should reduce within fsdp in every micro-batch
  (`per_device`'s node_grad_specs): on a mesh with both data > 1 and fsdp > 1, the hybrid layout of fsdp within
  a node and data across nodes, where a node's GPUs reduce over NVLink and only the nodes' shards wait for the
  step's one cross-node reduction. None otherwise (every device accumulates its whole gradient)."""
  if mesh is None or mesh.shape["data"] == 1 or mesh.shape["fsdp"] == 1:
    return None
  specs = jax.tree.map(lambda s: s.spec, grad_shardings)
  # ddp / zero1 keep gradients whole: a node's sum would be an all-reduce in every micro-batch for no memory
  sharded = any(_fsdp_dim(spec) is not None for spec in jax.tree.leaves(specs, is_leaf=_is_spec))
  return specs if sharded else None


def sum_devices(tree, mesh):
  """The sum over `per_device`'s device axis: the step's one gradient reduction (identity for mesh None)."""
  return tree if mesh is None else jax.tree.map(lambda x: jnp.sum(x, axis=0), tree)


def accumulated_grads(task: tasks.Task, params, batch, accum: int, rng, scale, grad_shardings, device_mesh=None):
  """`grads_of` averaged over `accum` micro-batches (micro-batch i's rng: `rng` folded with i), scanned;
  `device_mesh`: each device's own (`per_device`), averaged over the devices after the scan."""
  micro_batches = split_microbatches(batch, accum)
  inner_shardings = None if device_mesh is not None else grad_shardings
  micro_grads = per_device(lambda rows, r: grads_of(task, params, rows, r, scale, inner_shardings), device_mesh,
                           node_local_specs(device_mesh, grad_shardings))

  def body(carry, xs):
    micro, i = xs
    return jax.tree.map(jnp.add, carry, micro_grads(micro, jax.random.fold_in(rng, i))), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), jax.eval_shape(micro_grads, first, rng))
  (grads, loss, aux), _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(accum)))
  devices = 1 if device_mesh is None else device_mesh.size
  grads, loss, aux = jax.tree.map(lambda x: x / (accum * devices), sum_devices((grads, loss, aux), device_mesh))
  return _constrained(grads, grad_shardings), loss, aux


def two_pass_grads(task: tasks.Task, params, batch, accum: int, rng, scale, grad_shardings, device_mesh=None):
  """Gradient of a `splits_loss` task's whole-batch loss, accumulated over `accum` micro-batches.

  Pass 1 computes micro-batches' features (forward only); the global term (e.g. the contrastive loss over all
  B examples) and its gradient w.r.t. params and features are taken on the whole batch, its features in batch
  order; pass 2 backpropagates each micro-batch's local terms plus <features, their gradient>. Equals the
  unaccumulated gradient up to float reordering.

  Pass 1 leaves out the last micro-batch: pass 2 takes it first, and its forward there, which keeps what the
  backward needs, also completes the batch for the global term, whose gradient w.r.t. the features is taken in
  the loop's first iteration (so that the micro-batch's saved activations live in the loop's own buffers, where
  a forward outside the loop would add a second set) and w.r.t. params after the loop (the temperature: a
  param-sized tree inside the loop would hold 0.8 GiB more in SwinV2-G-CLIP's plan; the second evaluation of the
  global term costs its gathers of the features). The extra forward is of `accum - 1` micro-batches.
  `device_mesh`: both passes run per device (`per_device`, the same draws in each), whose gradients are summed
  once, after the scan; there pass 1 computes every micro-batch's features (a device's saved activations cannot
  leave its shard_map for the global term without a copy of the weights they refer to).
  """
  batch, context = task.whole_batch(batch, rng)
  micro_batches = split_microbatches(batch, accum)
  micro_rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(accum))
  if device_mesh is not None:
    return _two_pass_per_device(task, params, micro_batches, micro_rngs, context, scale, grad_shardings,
                                device_mesh)

  features = jax.lax.map(lambda xs: jax.lax.stop_gradient(task.batch_features(params, *xs, context)),
                         jax.tree.map(lambda x: x[:-1], (micro_batches, micro_rngs)))

  def global_term(last_features):
    whole = _in_batch_order(jax.tree.map(_append_micro_batch, features, jax.lax.stop_gradient(last_features)))
    whole = jax.lax.with_sharding_constraint(whole, jax.tree.map(lambda _: parallel.BATCH_SPEC, whole))
    (loss, aux), feature_grads = jax.value_and_grad(
        lambda f: task.global_loss(params, f, context), has_aux=True)(whole)
    return whole, jax.tree.map(_to_micro(accum), feature_grads), (loss, aux)

  def body(carry, xs):
    grads, loss, aux, whole, feature_grads, global_out = carry
    micro, micro_rng, index = xs
    micro_loss, feats, vjp, micro_aux = _local_vjp(task, params, micro, micro_rng, context)
    # the first iteration's micro-batch is the last: with it the global term has the whole batch
    whole, feature_grads, global_out = jax.lax.cond(
        index == accum - 1, lambda: global_term(feats), lambda: (whole, feature_grads, global_out))
    micro_grads = _backward(vjp, micro_loss, feats, jax.tree.map(lambda g: g[index], feature_grads), scale,
                            grad_shardings)
    grads = jax.tree.map(jnp.add, grads, micro_grads)
    return (grads, loss + micro_loss, jax.tree.map(jnp.add, aux, micro_aux), whole, feature_grads, global_out), None

  last_first = jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), (micro_batches, micro_rngs, jnp.arange(accum)))
  first = jax.tree.map(lambda x: x[0], last_first)
  start = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(lambda: _start_shapes(task, params, first, context, global_term)))
  (grads, loss, aux, whole, _, (global_loss, global_aux)), _ = jax.lax.scan(body, start, last_first)
  global_grads = jax.grad(lambda p: task.global_loss(p, whole, context)[0])(params)
  grads = jax.tree.map(lambda a, g: a + g * scale, grads, global_grads)
  return _constrained(grads, grad_shardings), loss + global_loss, {**aux, **global_aux}


def _start_shapes(task, params, first, context, global_term):
  """two_pass_grads' loop carry (traced for its shapes): (grads, local loss, local metrics, the whole batch's
  features, their gradients, (the global term's loss, metrics))."""
  loss, feats, vjp, aux = _local_vjp(task, params, *first[:2], context)
  whole, feature_grads, global_out = global_term(feats)
  return vjp((loss, feats))[0], loss, aux, whole, feature_grads, global_out


def _append_micro_batch(features, last):
  """(accum - 1, rows, ...) pass-1 features and the last micro-batch's (rows, ...) from `local_loss`, which the
  task contract makes `batch_features`' own (a TypeError where their dtypes differ, instead of a silent cast)."""
  if last.dtype != features.dtype:
    raise TypeError(f"local_loss's features are {last.dtype}, batch_features' {features.dtype}: a split loss's two "
                    "must be the same")
  return jnp.concatenate([features, last[None]])


def _in_batch_order(features):
  """(accum, rows, ...) micro-batch features -> (accum * rows, ...) in batch order: row r of micro j is r*accum + j."""
  return jax.tree.map(lambda f: jnp.swapaxes(f, 0, 1).reshape((-1,) + f.shape[2:]), features)


def _to_micro(accum: int):
  """The inverse of `_in_batch_order` for one array."""
  return lambda g: jnp.swapaxes(g.reshape((-1, accum) + g.shape[1:]), 0, 1)


def _local_vjp(task, params, micro, micro_rng, context):
  """(local loss, features, the vjp of both w.r.t. params, metrics) of one micro-batch."""
  def local(p):
    loss, feats, aux = task.local_loss(p, micro, micro_rng, context)
    return (loss, feats), aux
  (loss, feats), vjp, aux = jax.vjp(local, params, has_aux=True)
  return loss, feats, vjp, aux


def _backward(vjp, loss, feats, feature_grad, scale, grad_shardings):
  """A micro-batch's param gradients: its local loss plus <features, the global term's gradient>, scaled."""
  cotangent = (jnp.asarray(scale, loss.dtype),
               jax.tree.map(lambda g, f: (g * scale).astype(f.dtype), feature_grad, feats))
  return _constrained(vjp(cotangent)[0], grad_shardings)


def _two_pass_per_device(task, params, micro_batches, micro_rngs, context, scale, grad_shardings, device_mesh):
  """two_pass_grads with each device accumulating its own gradients: pass 1 gives every micro-batch's features,
  the global term runs on the whole batch between the passes, pass 2 recomputes every micro-batch."""
  accum = jax.tree.leaves(micro_rngs)[0].shape[0]
  features_of = per_device(
      lambda rows, r: jax.lax.stop_gradient(task.batch_features(params, rows, r, context)), device_mesh)
  rows_of = lambda f: f.reshape((-1,) + f.shape[2:])
  features = jax.lax.map(lambda xs: jax.tree.map(rows_of, features_of(*xs)), (micro_batches, micro_rngs))
  whole = _in_batch_order(features)
  whole = jax.lax.with_sharding_constraint(whole, jax.tree.map(lambda _: parallel.BATCH_SPEC, whole))
  (global_loss, global_aux), (global_grads, feature_grads) = jax.value_and_grad(
      task.global_loss, argnums=(0, 1), has_aux=True)(params, whole, context)
  feature_grads = jax.tree.map(_to_micro(accum), feature_grads)

  def one_micro_batch(micro, micro_rng, feature_grad):
    loss, feats, vjp, aux = _local_vjp(task, params, micro, micro_rng, context)
    return _backward(vjp, loss, feats, feature_grad, scale, None), loss, aux
  micro_grads = per_device(one_micro_batch, device_mesh, node_local_specs(device_mesh, grad_shardings))

  def body(carry, xs):
    return jax.tree.map(jnp.add, carry, micro_grads(*xs)), None

  first = jax.tree.map(lambda x: x[0], (micro_batches, micro_rngs, feature_grads))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro_grads, *first))
  (grads, loss, aux), _ = jax.lax.scan(body, zeros, (micro_batches, micro_rngs, feature_grads))
  grads, loss, aux = sum_devices((grads, loss, aux), device_mesh)
  grads = jax.tree.map(lambda g, gg: g + gg * scale, grads, global_grads)
  return _constrained(grads, grad_shardings), loss + global_loss, {**aux, **global_aux}


def make_train_step(task: tasks.Task, tx: optax.GradientTransformation, config, grad_shardings, device_mesh=None,
                    anchor: optim.Anchor | None = None):
  """The train step; `device_mesh`: the mesh when each device accumulates its own gradients
  (`accumulates_per_device`); `anchor`: the schedule's (the run plan's), for the logged train/lr."""
  accum = config.grad_accum_steps
  base_rng = jax.random.key(config.seed)
  lr_schedule = optim.schedule(config.optim, config.total_steps, anchor)
  zero_frozen = optim.zero_frozen_grads_fn(config.optim.freeze)
  apply_guards = guards.guarded(config)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    scale = state.loss_scale.scale if state.loss_scale is not None else jnp.float32(1.0)
    if accum == 1:
      grads, loss, aux = grads_of(task, state.params, batch, rng, scale, grad_shardings)
    elif task.splits_loss:
      grads, loss, aux = two_pass_grads(task, state.params, batch, accum, rng, scale, grad_shardings, device_mesh)
    else:
      grads, loss, aux = accumulated_grads(task, state.params, batch, accum, rng, scale, grad_shardings, device_mesh)

    grads = zero_frozen(jax.tree.map(lambda g: g / scale, grads))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    proposed = state.replace(step=state.step + 1, params=task.post_update(optax.apply_updates(state.params, updates)),
                             opt_state=opt_state)
    new_state, guard_metrics = apply_guards(state, proposed, guards.Signals(loss, grad_norm, grads))
    # The schedule advances with the optimizer's own count, which a skipped step (an fp16 overflow, a spike)
    # leaves where it was.
    applied_steps = (state.step - (state.loss_scale.skipped if state.loss_scale is not None else 0)
                     - (state.health.skipped if state.health is not None else 0))
    out = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr_schedule(applied_steps), **aux,
           **guard_metrics}
    return new_state, out

  return train_step


def jit_train_step(task: tasks.Task, tx: optax.GradientTransformation, config, mesh, init_fn, shardings,
                   anchor: optim.Anchor | None = None):
  """The jitted train step of `run`: state laid out by `shardings` (and donated), the batch split over
  (data, fsdp), gradients constrained to `grad_specs`. Call or lower it under the mesh and activation rules."""
  boxed_params = abstract_state(init_fn).params
  specs = parallel.grad_specs(boxed_params, parallel.mesh_shape(config.mesh, mesh.size), config.strategy)
  grad_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  device_mesh = mesh if accumulates_per_device(task, config) else None
  return jax.jit(make_train_step(task, tx, config, grad_shardings, device_mesh, anchor),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)), out_shardings=(shardings, None),
                 donate_argnums=0)


def compile_train_step(config, mesh, batch, task: tasks.Task | None = None):
  """The train step of `run` lowered and compiled from shapes only (no state is allocated), for a global `batch`
  of arrays or ShapeDtypeStructs: `.as_text()` is the partitioned HLO, `.memory_analysis()` its buffer sizes."""
  task = task or tasks.build(config, mesh)
  tx = optim.make_optimizer(config.optim, config.total_steps, task.model)
  init_fn = make_init_fn(task, tx, config)
  with mesh, parallel.activation_sharding(mesh):
    abstract, shardings, _ = state_shardings(init_fn, mesh, config)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    return jit_train_step(task, tx, config, mesh, init_fn, shardings).lower(state, batch).compile()


# -------------------------------------------------------------------------------------------------- run

def _write_config(run_plan: plan_lib.RunPlan, workdir, start_step: int) -> None:
  """config.json (the latest launch's config as the user gave it), config.<start_step>.json (this launch's,
  kept) and plan.json (what the run derived), once the resume check has accepted the config."""
  if jax.process_index() == 0:
    atomic.write(os.path.join(workdir, "config.json"), run_plan.config.to_json_best_effort(indent=2))
    resume.keep_launch_config(run_plan.config, workdir, start_step)
    run_plan.write(workdir)


def run(config: ml_collections.ConfigDict, workdir: str, *, validated: bool = False) -> dict[str, float]:
  """Trains per `config` in `workdir`, resuming from its newest checkpoint, holding the workdir's lock (a
  WorkdirError when another run holds it). Returns the last metrics. `config` is only read; it is checked here
  (training/checks.py), or only against the devices when `validated` says the caller has checked the rest
  (main.py, before joining the other processes)."""
  devices, processes = jax.device_count(), jax.process_count()
  if validated:
    checks.check_devices(config, devices, processes)
  else:
    checks.validate(config, devices, processes)
  with workdir_lib.claimed(workdir, config.lock_wait_s), compile_cache.in_use(config.compile_cache, workdir):
    # before anything is built: a resume may refuse the config, or anchor the schedule
    run_plan = plan_lib.make(config, os.path.join(workdir, "checkpoints"), devices, processes)
    last = _train_in(run_plan, workdir)
  if jax.process_index() == 0:
    shown = {k: v for k, v in last.items() if k == "train/loss" or k.startswith("eval/")}
    logging.info("done at step %d: %s", last["step"], console.format_metrics(shown))
  return last


def _train_in(run_plan: plan_lib.RunPlan, workdir: str) -> dict[str, float]:
  config = run_plan.trains_with
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  mesh = parallel.make_mesh(config.mesh)
  mesh_shape = parallel.mesh_shape(config.mesh, mesh.size)
  logging.info("mesh %s, strategy %s, %d process%s", mesh_shape, config.strategy, jax.process_count(),
               "es" if jax.process_count() > 1 else "")
  task = tasks.build(config, mesh)
  # Open the data first: a missing dataset fails in seconds, before any state is built.
  loader = task.train_loader(batch_size=config.global_batch_size // jax.process_count(), seed=config.seed,
                             process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(loader)
  # The evaluators open their sources (zero-shot, retrieval, probe) when built: those fail fast too, before the
  # workdir records the data (a run stopped here leaves a new workdir empty, and so removed).
  eval_context = EvalContext(mesh, config.global_batch_size // config.grad_accum_steps, jax.process_index(),
                             jax.process_count())
  evaluators = task.evaluators(eval_context)
  panel = task.panel(eval_context)
  if data_record.check(config, workdir, loader.identity, checkpoint.newest_committed_step(checkpoint_dir)):
    train_iter.follow_changed_data()
  tx = optim.make_optimizer(config.optim, config.total_steps, task.model, run_plan.anchor)
  init_fn = make_init_fn(task, tx, config)
  batch_sharding = parallel.batch_sharding(mesh)

  with mesh, parallel.activation_sharding(mesh):
    abstract, shardings, _ = state_shardings(init_fn, mesh, config)
    _log_plan(config, abstract, workdir)
    workdir_lib.check_storage(checkpoint_dir, workdir_lib.tree_bytes(abstract), workdir)
    checkpointer = checkpoint.Checkpointer(checkpoint_dir, keep=config.keep_checkpoints,
                                           keep_period=config.checkpoint_keep_period,
                                           run_config=run_plan.trained_config())
    state = _restore_or_init(config, checkpointer, init_fn, abstract, shardings, train_iter, task.model)
    start_step = int(jax.device_get(state.step))
    _write_config(run_plan, workdir, start_step)

    train_step = jit_train_step(task, tx, config, mesh, init_fn, shardings, run_plan.anchor)
    writer = metrics.MetricWriter(workdir, resume_step=start_step, config=config)
    rollbacks = _rollbacks(config, state, checkpointer, start_step, train_iter, list(run_plan.resume_changes))
    final = None
    try:
      last = _loop(config, state, start_step, train_step, train_iter, batch_sharding, evaluators, panel,
                   checkpointer, writer, task, rollbacks)
      checkpointer.close()
      if writer.failure is not None:  # the last steps' metrics, written after the loop's last agreed point
        raise writer.failure
      final = last
    finally:  # a run that stops on an error still closes its metric files, and its tracker runs as failed
      writer.close(final=final)
  return last


def _log_plan(config, abstract: TrainState, workdir: str) -> None:
  params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract.params))
  logging.info("model %s: %s params; %d steps of %d examples (%s)", config.model.name, f"{params:,}",
               config.total_steps, config.global_batch_size, config.precision.compute_dtype)
  logging.info("workdir %s: metrics.jsonl, tensorboard/, checkpoints/ every %d steps (keeping %d%s)", workdir,
               config.checkpoint_every, config.keep_checkpoints,
               f", and every {config.checkpoint_keep_period} for good" if config.checkpoint_keep_period else "")


def _restore_or_init(config, checkpointer, init_fn, abstract, shardings, train_iter, model) -> TrainState:
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  newest = checkpointer.latest_step()
  saved = checkpoint.saved_config(checkpointer.directory, newest) if newest is not None else None
  target, health_afresh = health.checkpoint_layout(target, config, saved)
  restored = checkpointer.restore_newest_readable(ema.checkpoint_target(target, saved), train_iter)
  if restored is not None:
    step, state = restored
    logging.info("resuming from %s/%d", checkpointer.directory, step)
    state = ema.adopt(state, config.optim.ema_decay, shardings, f"{checkpointer.directory}/{step}")
    state = precision.adopt(state, config.precision, shardings.loss_scale, f"{checkpointer.directory}/{step}")
    return health.afresh(state, config) if health_afresh else state
  logging.info("no checkpoint in %s: starting from step 0", checkpointer.directory)
  state = jax.jit(lambda rng: nn.unbox(init_fn(rng)), out_shardings=shardings)(jax.random.key(config.seed))
  if config.init_from:
    logging.info("initialising params from %s", config.init_from)
    params = init_from.load(config, state.params, model)
    state = state.replace(params=params, ema_params=ema.start(params, shardings.ema_params)
                          if state.ema_params is not None else None)
  return state


def _evaluate(evaluators, params, step, weights: str = "") -> dict[str, float]:
  """{eval/<weights/><evaluator>/<metric>: value} of `params`; `weights` names other weights than the params
  ('ema')."""
  results = {}
  for name, evaluate in evaluators.items():
    t0 = time.perf_counter()
    prefix = f"eval/{weights + '/' if weights else ''}{name}/"
    for metric, value in evaluate(params).items():
      results[f"{prefix}{metric}"] = value
    logging.info("step %d eval %s%s: %s (%.1fs)", step, weights + " " if weights else "", name,
                 console.format_metrics(results, prefix), time.perf_counter() - t0)
  return results


def _evaluate_state(evaluators, state, step) -> dict[str, float]:
  """The evaluations of the params and, when the state has one, of their EMA (laid out as the params)."""
  results = _evaluate(evaluators, state.params, step)
  if state.ema_params is not None:
    ema_params = jax.device_put(state.ema_params, jax.tree.map(lambda p: p.sharding, state.params))
    results.update(_evaluate(evaluators, ema_params, step, "ema"))
  return results


def _draw_panel(panel, params, step: int, writer) -> None:
  t0 = time.perf_counter()
  writer.panel(step, panel(params))
  logging.info("step %d panel: panels/step_%d.png (%.1fs)", step, step, time.perf_counter() - t0)


def _check_finite(step_metrics, state, step, checkpointer, max_consecutive_skips: int) -> None:
  """Raises NonFiniteLossError when the step's loss or gradient norm is not finite (without loss scaling: an
  fp16 run skips such steps instead). A non-finite gradient leaves NaN params, so the run stops before it
  can save them; the checkpoints already written are all from good steps. With loss scaling, raises it once
  `max_consecutive_skips` steps in a row overflowed at the minimum scale: such a run would skip forever."""
  if state.loss_scale is not None:
    skips = int(jax.device_get(step_metrics["train/skips_at_min_scale"]))
    if skips >= max_consecutive_skips:
      raise NonFiniteLossError(
          f"{skips} consecutive fp16 steps overflowed at the minimum loss scale (precision.loss_scale_min="
          f"{state.loss_scale.min_scale}) up to step {step}; stopping "
          f"(precision.max_consecutive_skips={max_consecutive_skips}). The last good checkpoint: "
          f"{_last_checkpoint(checkpointer)}; lower config.optim.lr, train in bfloat16, or check the data.")
    return
  loss, grad_norm = (float(v) for v in jax.device_get((step_metrics["train/loss"],
                                                       step_metrics.get("train/grad_norm", 0.0))))
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    raise NonFiniteLossError(f"non-finite loss {loss} or gradient norm {grad_norm} at step {step}; stopping. The "
                             f"last good checkpoint: {_last_checkpoint(checkpointer)}; lower config.optim.lr or "
                             f"check the data.")


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


def _loop(config, state, start_step, train_step, train_iter, batch_sharding, evaluators, panel, checkpointer,
          writer, task, rollbacks: health.Rollbacks | None) -> dict[str, float]:
  total = config.total_steps
  flops_per_example = task.train_flops_per_example()
  peak = flops.device_peak_flops(config.precision.compute_dtype)
  progress = console.Progress(total, start_step, enabled=config.progress_bar, process_index=jax.process_index())
  preemption = faults.Preemption()
  watchdog = faults.Watchdog(config.step_timeout_s)
  last: dict[str, float] = {}
  window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
  batches = prefetch.DevicePrefetch(train_iter, batch_sharding, config.data.device_prefetch)
  step = start_step
  try:
    if step == total:
      last.update(_complete(state, step, evaluators, panel, writer, watchdog))
    while step < total:
      # Between logging steps the host only feeds the device: any read of a device value here would stall
      # the pipeline, and is an error on accelerators (the guard does not act on the CPU backend).
      with jax.transfer_guard_device_to_host("disallow"):
        if step == start_step:
          watchdog.idle()  # the first call compiles (minutes for a large model) and waits on no other process
        else:
          watchdog.phase("a train step", step + 1)
        wait_start = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - wait_start
        state, step_metrics = train_step(state, batch)
        step += 1
        window_steps += 1
        # The one read of the stop flag: every process gets the same answer for the same step, so all of
        # them log, save and stop together.
        preempted = preemption.reached(step)
      is_last = step == total
      will_save = step % config.checkpoint_every == 0 or is_last or preempted
      will_log = step % config.log_every == 0 or is_last or preempted
      if will_log or will_save:
        trigger = health.read_trigger(state) if rollbacks is not None else None
        if trigger is not None:  # before a save: the steps since it fired applied nothing
          watchdog.phase("a rollback", step)
          position = health.agreed_position(batches.get_state())
          try:
            step, state = rollbacks.roll_back(trigger, state, checkpointer, train_iter, position)
          except health.HealthError:
            moved = rollbacks.set_aside(checkpointer.directory)
            if moved:
              writer.note(step, {"health/set_aside": moved})
            raise
          batches = prefetch.DevicePrefetch(train_iter, batch_sharding, config.data.device_prefetch)
          writer.rewind(step, "trained again after a rollback")
          writer.write(step, rollbacks.counts())
          writer.note(step, {"health/set_aside": rollbacks.set_aside(checkpointer.directory)})  # all so far
          window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
          if preempted:  # the rerun resumes from the same checkpoint and takes the same rollback
            logging.warning("preemption notice at a rollback: exiting at step %d without a save", step)
            break
          continue
        if rollbacks is None:  # before a save: never checkpoint NaN params (health skips such steps instead)
          _check_finite(step_metrics, state, step, checkpointer, config.precision.max_consecutive_skips)
        _stop_on_workdir_faults(checkpointer, writer)
      if will_log:
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        elapsed = time.perf_counter() - window_start
        img_per_sec = window_steps * config.global_batch_size / max(elapsed, 1e-9)
        values["train/img_per_sec"] = img_per_sec
        values["train/data_wait_fraction"] = data_wait / max(elapsed, 1e-9)
        if flops_per_example and peak:
          values["train/mfu"] = img_per_sec * flops_per_example / (peak * jax.device_count())
        values.update(data_counts(batches))
        if rollbacks is not None:
          values.update(rollbacks.counts())
          rollbacks.note_skips(step, values["health/skipped_steps"])
        writer.write(step, values)
        progress.update(step, values["train/loss"], img_per_sec)
        last.update(values)
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
      if will_save:
        watchdog.phase("a checkpoint save", step)
        checkpointer.save(step, state, batches, health=rollbacks.record() if rollbacks is not None else None)
        if jax.process_index() == 0 and not preempted:
          logging.info("step %d: saving a checkpoint to %s", step, checkpointer.directory / str(step))
      if step % config.eval_every == 0 or is_last:
        watchdog.phase("an evaluation", step)
        results = _evaluate_state(evaluators, state, step)
        writer.write(step, results)
        if panel is not None:
          _draw_panel(panel, state.params, step, writer)
        last.update(results)
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
      if preempted:
        watchdog.phase("committing the preemption checkpoint", step)
        where = _committed(checkpointer, step)
        logging.warning("preemption notice: saved step %d (%s); exiting so the job can be requeued", step, where)
        break
  finally:
    watchdog.phase("committing the last checkpoint", step)
    try:
      checkpointer.wait()  # also after an error: the saves in flight are of good steps
    finally:
      watchdog.close()
      progress.close()
      preemption.close()
  last["step"] = step
  return last


def _complete(state, step: int, evaluators, panel, writer, watchdog) -> dict[str, float]:
  """The last metrics of a run found at its last step (a rerun, or a requeue after a process stopped between its last
  checkpoint and its final evaluation): metrics.jsonl's, the latest value of each, with the final evaluation and
  panel that the last step makes where the workdir lacks them. Process 0 reads metrics.jsonl and decides for all."""
  logged = {k for row in writer.start.kept if row["step"] == step for k in row}
  evaluated = not evaluators or faults.agreed(not writer.enabled or any(k.startswith("eval/") for k in logged))
  drawn = panel is None or faults.agreed(not writer.enabled or any(at == step for at, _ in writer.start.panels))
  missing = " and ".join(what for what, made in (("evaluation", evaluated), ("panel", drawn)) if not made)
  logging.info("step %d: the run was already complete%s", step, f"; making its final {missing}" if missing else "")
  last = {k: float(v) for row in writer.start.kept for k, v in row.items()
          if k != "step" and isinstance(v, (int, float))}
  if missing:
    watchdog.phase("an evaluation", step)
  if not evaluated:
    results = _evaluate_state(evaluators, state, step)
    writer.write(step, results)
    last.update(results)
  if not drawn:
    _draw_panel(panel, state.params, step, writer)
  return last


def _stop_on_workdir_faults(checkpointer, writer) -> None:
  """Every process raises here when a save failed in the background on any of them, or process 0 could not
  write its metrics: a run that cannot keep its checkpoints or its record stops now, not at its end."""
  faults.raise_together(checkpointer.failed_save() or writer.failure,
                        WorkdirError(f"another process could not write to {checkpointer.directory.parent} (its "
                                     f"error line says why)"))


def _rollbacks(config, state, checkpointer, start_step: int, train_iter, changes: list[str]
               ) -> health.Rollbacks | None:
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
