"""Logical-axis rules that turn parameter axis names into PartitionSpecs, per ZeRO strategy.

| strategy      | params             | gradients          | optimizer state |
|---------------|--------------------|--------------------|-----------------|
| ddp           | replicated         | all-reduced        | replicated      |
| zero1         | replicated         | all-reduced        | sharded (fsdp)  |
| zero2         | replicated         | reduce-scattered   | sharded (fsdp)  |
| zero3 / fsdp  | sharded (fsdp)     | reduce-scattered   | sharded (fsdp)  |

"Sharded" means split over the `fsdp` mesh axis; `tensor` splits matmul widths under every strategy, and
the batch splits over (data, fsdp). A logical axis whose size does not divide over its mesh axis stays
replicated; when the preferred (`embed`) axis of a parameter cannot take `fsdp`, the largest divisible free
axis takes it instead, so odd-sized parameters (a 21,841-class head) still shard.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

# strategy -> which parts of the train state are sharded over fsdp
STRATEGY_SHARDS: dict[str, dict[str, bool]] = {
    "ddp": dict(params=False, grads=False, opt_state=False),
    "zero1": dict(params=False, grads=False, opt_state=True),
    "zero2": dict(params=False, grads=True, opt_state=True),
    "zero3": dict(params=True, grads=True, opt_state=True),
    "fsdp": dict(params=True, grads=True, opt_state=True),
}

# logical parameter axis -> mesh axis, in order of preference
PARAM_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "classes": "tensor",
    "vocab": "tensor",
    "kv": None,
    "layers": None,
}


def activation_rules() -> tuple[tuple[str, Any], ...]:
  """Rules for `nn.with_logical_constraint` on activations."""
  return (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None), ("act_mlp", "tensor"),
          ("act_heads", "tensor"))


_ACTIVATION_MESH = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh):
  """Within it, `models.layers.constrain` shards activations over `mesh` by `activation_rules()`.

  The mesh is passed to flax explicitly: under jax 0.10 / flax 0.12 `nn.with_logical_constraint` looks only
  at the abstract mesh that `jax.set_mesh` sets, so inside a plain `with mesh:` it constrains nothing, and
  XLA is free to shard a scanned zero3 model over its embedding instead of gathering weights per layer.
  """
  token = _ACTIVATION_MESH.set(mesh)
  try:
    with nn.logical_axis_rules(activation_rules()):
      yield
  finally:
    _ACTIVATION_MESH.reset(token)


def activation_mesh():
  """The mesh of the innermost `activation_sharding`, else None."""
  return _ACTIVATION_MESH.get()


def partition_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh_shape: dict[str, int],
                   shard_fsdp: bool) -> P:
  """PartitionSpec for one parameter with logical axis `names` and `shape`."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match shape {shape}")
  spec: list[str | None] = [None] * len(shape)
  used = set()
  for i, name in enumerate(names):
    axis = PARAM_RULES.get(name) if name else None
    if axis is None or axis in used or (axis == "fsdp" and not shard_fsdp):
      continue
    if mesh_shape.get(axis, 1) > 1 and shape[i] % mesh_shape[axis] == 0:
      spec[i] = axis
      used.add(axis)
  fsdp = mesh_shape.get("fsdp", 1)
  if shard_fsdp and fsdp > 1 and "fsdp" not in used:
    free = [i for i in range(len(shape)) if spec[i] is None and names[i] != "layers" and shape[i] % fsdp == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*spec)


def map_with_names(fn, boxed_tree):
  """Maps fn(logical_names_or_None, value) over a tree that may hold `nn.Partitioned` boxes."""
  def apply(x):
    if isinstance(x, nn.Partitioned):
      return fn(tuple(x.names), x.value)
    return fn(None, x)
  return jax.tree.map(apply, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def tree_specs(boxed_tree, mesh_shape: dict[str, int], shard_fsdp: bool):
  """PartitionSpecs for every leaf of a (boxed, abstract) tree; unnamed leaves get only the fsdp fallback."""
  def spec(names, value):
    shape = tuple(value.shape)
    return partition_spec(names if names is not None else (None,) * len(shape), shape, mesh_shape, shard_fsdp)
  return map_with_names(spec, boxed_tree)


def state_specs(abstract_boxed_state, mesh_shape: dict[str, int], strategy: str):
  """PartitionSpecs for a (boxed, abstract) TrainState under `strategy`: params and opt_state per the table."""
  shards = STRATEGY_SHARDS[strategy]
  unboxed = nn.unbox(abstract_boxed_state)
  return unboxed.replace(
      params=tree_specs(abstract_boxed_state.params, mesh_shape, shards["params"]),
      opt_state=tree_specs(abstract_boxed_state.opt_state, mesh_shape, shards["opt_state"]),
      **{k: jax.tree.map(lambda _: P(), getattr(unboxed, k)) for k in unboxed.non_param_fields()})


def grad_specs(abstract_boxed_params, mesh_shape: dict[str, int], strategy: str):
  """PartitionSpecs of the gradients: reduce-scattered (fsdp-sharded) under zero2/zero3, all-reduced otherwise."""
  return tree_specs(abstract_boxed_params, mesh_shape, STRATEGY_SHARDS[strategy]["grads"])


def shard_shape(shape: tuple[int, ...], spec: P, mesh_shape: dict[str, int]) -> tuple[int, ...]:
  """The per-device shape of an array of `shape` laid out by `spec` (no devices needed)."""
  out = list(shape)
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None:
        out[i] //= mesh_shape[axis]
  return tuple(out)
