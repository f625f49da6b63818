"""The gradient of a train step's loss, by the strategy the config and task call for (`of_batch`).

Without micro-batches: one `grads_of` the whole batch. With `grad_accum_steps` micro-batches: `accumulated_grads`
scans them, averaging their gradients; a task whose loss couples the whole batch (`splits_loss`, e.g. a contrastive
loss) goes through `two_pass_grads`. With `accumulate_unreduced`, each device sums its own gradients over the
micro-batches (`per_device`) and the step reduces them once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from visionfm_jax import parallel, tasks
from visionfm_jax.models import fp8


def of_batch(task: tasks.Task, params, batch, rng, scale, grad_shardings, config, mesh):
  """(gradient of `scale` x the task's loss on the global `batch`, constrained to `grad_shardings`; the loss; its
  aux), by `config.grad_accum_steps` micro-batches, per device on `mesh` where `_accumulates_per_device`."""
  accum = config.grad_accum_steps
  if accum == 1:
    return grads_of(task, params, batch, rng, scale, grad_shardings)
  device_mesh = mesh if _accumulates_per_device(task, config) else None
  # Both take the same arguments; two_pass_grads a SplitLossTask, the class whose tasks set `splits_loss`.
  accumulate: Callable[..., Any] = two_pass_grads if task.splits_loss else accumulated_grads
  return accumulate(task, params, batch, accum, rng, scale, grad_shardings, device_mesh)


def split_microbatches(batch, steps: int):
  """(B, ...) -> (steps, B / steps, ...) taking rows i*steps + j into micro-batch j, each micro-batch split over
  the data-parallel devices as the batch is (under `parallel.activation_sharding`; elsewhere left to XLA).

  Each device keeps its own rows (no communication) when B / steps divides over the data-parallel devices.
  """

  def split(x):
    x = x.reshape((x.shape[0] // steps, steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  micro_batches = jax.tree.map(split, batch)
  return parallel.constrain_to(micro_batches, P(None, *parallel.BATCH_SPEC))


def grads_of(task: tasks.Task, params, batch, rng, scale, grad_shardings):
  """(gradient of `scale` x the task's loss on `batch`, constrained to `grad_shardings` (None: left as it is); the
  loss; its aux)."""

  def scaled_loss(p):
    loss, aux = task.loss(p, batch, rng)
    return loss * scale, (loss, aux)

  grads, (loss, aux) = jax.grad(scaled_loss, has_aux=True)(params)
  return _constrained(grads, grad_shardings), loss, aux


def with_amax_histories(task: tasks.Task, params, histories, batch, rng, scale, grad_shardings):
  """`grads_of` under delayed FP8 scaling (models/fp8.py): the model reads the amax `histories` merged into the
  params, and their cotangents are the histories updated with this step's amaxes. (gradients, loss, aux, the
  updated histories). One pass over the whole batch (config_lib's checks refuse micro-batches with the recipe:
  the histories' cotangents would be summed over them, where their amaxes take a max)."""

  def scaled_loss(p, h):
    loss, aux = task.loss(fp8.with_histories(p, h), batch, rng)
    return loss * scale, (loss, aux)

  (grads, updated), (loss, aux) = jax.grad(scaled_loss, argnums=(0, 1), has_aux=True)(params, histories)
  return _constrained(grads, grad_shardings), loss, aux, updated


def traced_once(fn):
  """`fn` as its own inlined jit: the loop's carry, shaped by `jax.eval_shape(fn, ...)`, and the loop's body then
  share one trace of the micro-batch's forward and backward (traces are cached by function and argument types),
  where two calls of a plain function trace the model twice. Inlined, the step's program is the same."""
  return jax.jit(fn, inline=True)


def _constrained(tree, shardings):
  return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def _accumulates_per_device(task: tasks.Task, config) -> bool:
  """Whether the step sums each device's gradients over the micro-batches unreduced and reduces them once
  (`config.accumulate_unreduced`, with micro-batches, for a loss that per-device sums give exactly: a split
  loss, or one that does not couple examples)."""
  return config.accumulate_unreduced and config.grad_accum_steps > 1 and (task.splits_loss or not task.couples_examples)


def per_device(fn, mesh, node_grad_specs=None):
  """fn(params, rows, rng, *row_args) run by each device of `mesh` on its own rows (a shard_map manual over the
  whole mesh: no collective inside, so each device's gradient stays its own), device d drawing from `rng` folded
  with d; results stacked on a leading device axis that `sum_devices` reduces. mesh None: fn itself.

  `params` enter as an argument, replicated, as a closed-over array would: a closed-over array keeps its
  automatic-sharding type inside, and the gradient of a loop unrolled k < depth blocks at a time (scan_unroll)
  then fails to lower (JAX 0.10: "context mesh ... should match the aval mesh").

  `node_grad_specs` (the gradients' PartitionSpecs; `node_local_specs`): the first result, the gradients, is
  reduce-scattered over `fsdp` inside (a node's GPUs when fsdp is the node) to each device's shard of its spec,
  and stacked over `data` only: what each node accumulates, with one reduction across nodes left for the step."""
  if mesh is None:
    return fn
  rows_spec = P(parallel.BATCH_AXES)
  out_specs = rows_spec
  if node_grad_specs is not None:
    out_specs = (jax.tree.map(lambda spec: P("data", *spec), node_grad_specs, is_leaf=_is_spec),) + (rows_spec,) * 2

  def local(params, rows, rngs, row_args):
    with parallel.device_local():
      out = fn(params, rows, rngs[0], *row_args)
    if node_grad_specs is not None:
      out = (jax.tree.map(_sum_within_fsdp, out[0], node_grad_specs), *out[1:])
    return jax.tree.map(lambda x: x[None], out)

  def run(params, rows, rng, *row_args):
    rngs = jax.vmap(lambda d: jax.random.fold_in(rng, d))(jnp.arange(mesh.size))
    # one spec for every leaf of each argument and of the result (shard_map takes tree prefixes)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(),) + (rows_spec,) * 3, out_specs=out_specs, check_vma=False)(
      params, rows, rngs, row_args
    )

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
  micro_grads = traced_once(
    per_device(
      lambda p, rows, r: grads_of(task, p, rows, r, scale, inner_shardings),
      device_mesh,
      node_local_specs(device_mesh, grad_shardings),
    )
  )

  def body(carry, xs):
    micro, i = xs
    return jax.tree.map(jnp.add, carry, micro_grads(params, micro, jax.random.fold_in(rng, i))), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), jax.eval_shape(micro_grads, params, first, rng))
  (grads, loss, aux), _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(accum)))
  devices = 1 if device_mesh is None else device_mesh.size
  grads, loss, aux = jax.tree.map(lambda x: x / (accum * devices), sum_devices((grads, loss, aux), device_mesh))
  return _constrained(grads, grad_shardings), loss, aux


def two_pass_grads(task: tasks.SplitLossTask, params, batch, accum: int, rng, scale, grad_shardings, device_mesh=None):
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
    return _two_pass_per_device(task, params, micro_batches, micro_rngs, context, scale, grad_shardings, device_mesh)

  features = jax.lax.map(
    lambda xs: jax.lax.stop_gradient(task.batch_features(params, xs[0], xs[1], context)),
    jax.tree.map(lambda x: x[:-1], (micro_batches, micro_rngs)),
  )

  def global_term(last_features):
    whole = _in_batch_order(jax.tree.map(_append_micro_batch, features, jax.lax.stop_gradient(last_features)))
    whole = parallel.constrain_to(whole, parallel.BATCH_SPEC)
    (loss, aux), feature_grads = jax.value_and_grad(lambda f: task.global_loss(params, f, context), has_aux=True)(whole)
    return whole, jax.tree.map(_to_micro(accum), feature_grads), (loss, aux)

  def body(carry, xs):
    grads, loss, aux, whole, feature_grads, global_out = carry
    micro, micro_rng, index = xs
    micro_loss, feats, vjp, micro_aux = _local_vjp(task, params, micro, micro_rng, context)
    # the first iteration's micro-batch is the last: with it the global term has the whole batch
    whole, feature_grads, global_out = jax.lax.cond(
      index == accum - 1, lambda: global_term(feats), lambda: (whole, feature_grads, global_out)
    )
    micro_grads = _backward(
      vjp, micro_loss, feats, jax.tree.map(lambda g: g[index], feature_grads), scale, grad_shardings
    )
    grads = jax.tree.map(jnp.add, grads, micro_grads)
    return (grads, loss + micro_loss, jax.tree.map(jnp.add, aux, micro_aux), whole, feature_grads, global_out), None

  last_first = jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), (micro_batches, micro_rngs, jnp.arange(accum)))
  first = jax.tree.map(lambda x: x[0], last_first)
  start = jax.tree.map(
    lambda s: jnp.zeros(s.shape, s.dtype),
    jax.eval_shape(lambda: _start_shapes(task, params, first, context, global_term)),
  )
  (grads, loss, aux, whole, _, (global_loss, global_aux)), _ = jax.lax.scan(body, start, last_first)
  global_grads = jax.grad(lambda p: task.global_loss(p, whole, context)[0])(params)
  grads = jax.tree.map(lambda a, g: a + g * scale, grads, global_grads)
  return _constrained(grads, grad_shardings), loss + global_loss, {**aux, **global_aux}


def _start_shapes(task, params, first, context, global_term):
  """two_pass_grads' loop carry (traced for its shapes): (grads, local loss, local metrics, the whole batch's
  features, their gradients, (the global term's loss, metrics)). The forward alone: gradients have their params'
  shapes and dtypes, and the loop body traces the backward."""
  loss, feats, aux = task.local_loss(params, *first[:2], context)
  whole, feature_grads, global_out = global_term(feats)
  return params, loss, aux, whole, feature_grads, global_out


def _append_micro_batch(features, last):
  """(accum - 1, rows, ...) pass-1 features and the last micro-batch's (rows, ...) from `local_loss`, which the
  task contract makes `batch_features`' own (a TypeError where their dtypes differ, instead of a silent cast)."""
  if last.dtype != features.dtype:
    raise TypeError(
      f"local_loss's features are {last.dtype}, batch_features' {features.dtype}: a split loss's two must be the same"
    )
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
  cotangent = (
    jnp.asarray(scale, loss.dtype),
    jax.tree.map(lambda g, f: (g * scale).astype(f.dtype), feature_grad, feats),
  )
  return _constrained(vjp(cotangent)[0], grad_shardings)


def _two_pass_per_device(task, params, micro_batches, micro_rngs, context, scale, grad_shardings, device_mesh):
  """two_pass_grads with each device accumulating its own gradients: pass 1 gives every micro-batch's features,
  the global term runs on the whole batch between the passes, pass 2 recomputes every micro-batch."""
  accum = jax.tree.leaves(micro_rngs)[0].shape[0]
  features_of = per_device(
    lambda p, rows, r: jax.lax.stop_gradient(task.batch_features(p, rows, r, context)), device_mesh
  )
  rows_of = lambda f: f.reshape((-1,) + f.shape[2:])
  features = jax.lax.map(lambda xs: jax.tree.map(rows_of, features_of(params, *xs)), (micro_batches, micro_rngs))
  whole = _in_batch_order(features)
  whole = parallel.constrain_to(whole, parallel.BATCH_SPEC)
  (global_loss, global_aux), (global_grads, feature_grads) = jax.value_and_grad(
    task.global_loss, argnums=(0, 1), has_aux=True
  )(params, whole, context)
  feature_grads = jax.tree.map(_to_micro(accum), feature_grads)

  def one_micro_batch(p, micro, micro_rng, feature_grad):
    loss, feats, vjp, aux = _local_vjp(task, p, micro, micro_rng, context)
    return _backward(vjp, loss, feats, feature_grad, scale, None), loss, aux

  micro_grads = traced_once(per_device(one_micro_batch, device_mesh, node_local_specs(device_mesh, grad_shardings)))

  def body(carry, xs):
    return jax.tree.map(jnp.add, carry, micro_grads(params, *xs)), None

  first = jax.tree.map(lambda x: x[0], (micro_batches, micro_rngs, feature_grads))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro_grads, params, *first))
  (grads, loss, aux), _ = jax.lax.scan(body, zeros, (micro_batches, micro_rngs, feature_grads))
  grads, loss, aux = sum_devices((grads, loss, aux), device_mesh)
  grads = jax.tree.map(lambda g, gg: g + gg * scale, grads, global_grads)
  return _constrained(grads, grad_shardings), loss + global_loss, {**aux, **global_aux}
