"""Logical-axis rules that turn parameter axis names into PartitionSpecs, per ZeRO strategy.

| strategy      | params             | gradients          | optimizer state |
|---------------|--------------------|--------------------|-----------------|
| ddp           | replicated         | all-reduced        | replicated      |
| zero1         | replicated         | all-reduced        | sharded (fsdp)  |
| zero2         | replicated         | reduce-scattered   | sharded (fsdp)  |
| zero3 / fsdp  | sharded (fsdp)     | reduce-scattered   | sharded (fsdp)  |

"Sharded" means split over the `fsdp` mesh axis; `tensor` splits matmul widths under every strategy, and
the batch splits over (data, fsdp). `config.optimizer_over_data` splits the optimizer state over (data, fsdp):
ZeRO-1 across the fsdp groups (the nodes, where fsdp is a node) under the strategy within each, as ZeRO++'s
hierarchical partitioning keeps the params' shards within a node and the optimizer's across all devices.
One table, `LOGICAL_AXIS_RULES`, says it for parameters and activations alike, MaxText style: a logical axis
maps to the mesh axes to try, in order. A parameter dim takes the first of them that is enabled (`fsdp` only for
the parts of the state the strategy shards; (data, fsdp) first where that part is over data), not yet taken by
another dim of the same parameter, larger than 1 and a divisor of the dim; none of them: the dim stays
replicated. Then the fallback, `FALLBACK`: `fsdp`, when no dim took it, goes to the parameter's largest free dim
it divides, so odd-sized parameters (a 21,841-class head) still shard. Activations (`nn.with_logical_constraint`)
use the same table through flax's rules, which try a name's entries in order as well.

A recipe moves one parameter with `config.sharding.overrides` (`Overrides`): (regex over the param's path, layout)
rules in the one mechanism of param_rules.py, the first match winning, as big_vision's `sharding_strategy`. A layout
is logical axes, one per dim (the table reads them instead of the model's, for the param, its gradient, its
optimizer state and its EMA alike, each as the strategy lays that part out), or the param's own layout: 'replicated'
(whole on every device) or mesh axes, one per dim (a mesh axis, a tuple of them, or None); its gradient, optimizer
state and EMA stay as the strategy lays them out from the model's names.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from visionfm_jax import config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.parallel.batch import BATCH_AXES, batch_axes_of
from visionfm_jax.parallel.mesh import AXES as MESH_AXES
from visionfm_jax.param_rules import ParamRules, named_leaves, path_str

# Flax's box of a param with its logical axes, and the unboxing of a tree of them: named here, so that outside
# models/ no module but this one imports flax.linen (tests/unit/test_layering.py).
Partitioned = nn.Partitioned
unbox = nn.unbox

# ZeRO stage k shards the first k of these over fsdp (Rajbhandari et al. 2020): stage 1 the optimizer state,
# stage 2 the gradients too, stage 3 the parameters too.
SHARDED_BY_STAGE = ("opt_state", "grads", "params")

# strategy (config_lib.STRATEGIES) -> which parts of the train state are sharded over fsdp
STRATEGY_SHARDS: dict[str, dict[str, bool]] = {
  name: {
    part: i < config_lib.ZERO_STAGES.index(config_lib.STRATEGY_ALIASES.get(name, name))
    for i, part in enumerate(SHARDED_BY_STAGE)
  }
  for name in config_lib.STRATEGIES
}

MeshAxes = str | tuple[str, ...]  # one mesh axis, or several that split a dim together

# logical axis -> the mesh axes to try, in order of preference; (): never split.
LOGICAL_AXIS_RULES: dict[str, tuple[MeshAxes, ...]] = {
  # parameters
  "embed": ("fsdp",),
  "mlp": ("tensor",),
  "heads": ("tensor",),
  "classes": ("tensor",),
  "vocab": ("tensor",),
  "kv": (),
  "layers": (),
  # activations
  "batch": (BATCH_AXES,),
  "length": (),
  "act_embed": (),
  "act_mlp": ("tensor",),
  "act_heads": ("tensor",),
}
# The names activations carry (models/layers.py BATCH, LENGTH, ACT_*): flax constrains activations by their
# rows only, and parameters never use them.
ACTIVATION_AXES = ("batch", "length", "act_embed", "act_mlp", "act_heads")
PARAM_AXES = tuple(name for name in LOGICAL_AXIS_RULES if name not in ACTIVATION_AXES)

# mesh axis -> logical axes it never falls back to: a mesh axis here that no dim of a parameter took by the
# table goes to the largest of its free dims that it divides, whatever their logical axis (unnamed ones too),
# except these (a scanned stack's `layers` axis stays whole: each scan step slices it).
FALLBACK: dict[str, tuple[str, ...]] = {"fsdp": ("layers",)}


def check_axis_names(names: tuple[str | None, ...], known: tuple[str, ...], kind: str) -> None:
  """ValueError naming an axis of `names` that is neither None (never split) nor one of the `known` `kind` axes of
  LOGICAL_AXIS_RULES: a mistyped name would otherwise leave its dim unsharded without a word."""
  unknown = [name for name in names if name is not None and name not in known]
  if unknown:
    raise ValueError(
      f"{kind} axis names {tuple(names)}: {', '.join(map(repr, unknown))} not in LOGICAL_AXIS_RULES "
      f"(its {kind} axes: {', '.join(known)}; None: never split)"
    )


OVERRIDES_FIELD = "config.sharding.overrides"
REPLICATED = "replicated"  # an override's layout: the param whole on every device


@dataclasses.dataclass(frozen=True)
class Layout:
  """One override's layout: `names`, logical axes the table reads instead of the model's, or `spec`, the param's
  own PartitionSpec (module docstring)."""

  names: tuple[str | None, ...] | None = None
  spec: P | None = None


def parse_layout(value: Any) -> Layout:
  """The Layout an override's value states: 'replicated'; logical axes (PARAM_AXES names or None), one per dim;
  or mesh axes (MESH_AXES names, tuples of them, or None), one per dim. ValueError saying what is wrong."""
  if value == REPLICATED:
    return Layout(spec=P())
  if isinstance(value, str) or not isinstance(value, (tuple, list)):
    raise ValueError(f"expected {REPLICATED!r} or a tuple of axes, one per dim of the param")
  entries: tuple[Any, ...] = tuple(tuple(e) if isinstance(e, list) else e for e in value)
  given = [e for e in entries if e is not None]
  if all(isinstance(e, str) and e in PARAM_AXES for e in given):
    return Layout(names=entries)
  mesh_axes = [a for e in given for a in (e if isinstance(e, tuple) and e else (e,))]  # a dim's: one, or a tuple
  unknown = [a for a in mesh_axes if a not in MESH_AXES and a not in PARAM_AXES]
  if unknown:
    raise ValueError(
      f"{', '.join(map(repr, unknown))} is neither a logical axis ({', '.join(PARAM_AXES)}) "
      f"nor a mesh axis ({', '.join(MESH_AXES)})"
    )
  logical = [a for a in mesh_axes if a in PARAM_AXES]
  if logical:
    raise ValueError(f"{', '.join(map(repr, logical))} beside mesh axes: logical and mesh axes in one layout")
  twice = sorted({a for a in mesh_axes if mesh_axes.count(a) > 1})
  if twice:
    raise ValueError(f"mesh axis {', '.join(map(repr, twice))} splits more than one dim")
  return Layout(spec=P(*entries))


class Overrides:
  """`config.sharding.overrides` as rules: the Layout of a param path (the first matching rule's), checked against
  a model's params and a mesh (`check`)."""

  def __init__(self, rules: Sequence = ()):
    self._rules = ParamRules(rules, field=OVERRIDES_FIELD, value_name="layout", convert=parse_layout)

  def __bool__(self) -> bool:
    return bool(self._rules)

  def layout(self, path: str) -> Layout | None:
    """The Layout of the param at `path` ('' for a leaf outside the params, as an optimizer's count: none)."""
    return self._rules.value(path) if path else None

  def check(self, boxed_params, mesh_shape: dict[str, int]) -> None:
    """ConfigError naming a rule that matches no param of `boxed_params`, or the param whose dims a rule's layout
    does not fit (another number of dims; a dim its mesh axes do not divide) on a mesh of `mesh_shape`."""
    leaves = named_leaves(boxed_params)
    self._rules.require_matches([path for path, _ in leaves])
    for path, value in leaves:
      layout = self.layout(path)
      if layout is not None:
        _check_fits(layout, path, tuple(value.shape), mesh_shape)


def _check_fits(layout: Layout, path: str, shape: tuple[int, ...], mesh_shape: dict[str, int]) -> None:
  axes: tuple[Any, ...] = layout.names if layout.names is not None else tuple(layout.spec or ())
  if (layout.names is not None or axes) and len(axes) != len(shape):  # P() ('replicated') fits any dims
    raise ConfigError(
      f"{OVERRIDES_FIELD}: param {path} of shape {shape} has {len(shape)} dims, its layout {tuple(axes)} {len(axes)}"
    )
  if layout.spec is None:
    return
  for size, dim_axes in zip(shape, axes):
    split = math.prod(mesh_shape.get(a, 1) for a in ((dim_axes,) if isinstance(dim_axes, str) else dim_axes or ()))
    if size % split:
      raise ConfigError(
        f"{OVERRIDES_FIELD}: param {path} of shape {shape}: its dim of {size} does not divide over "
        f"mesh axes {dim_axes!r} ({split} devices, mesh {mesh_shape})"
      )


def activation_rules() -> tuple[tuple[str, MeshAxes | None], ...]:
  """The activation rows of `LOGICAL_AXIS_RULES` as flax logical axis rules (for `nn.with_logical_constraint`):
  one (name, mesh axes) rule per entry, in order (flax, too, takes a name's first free entry), and (name, None)
  for a name that is never split."""
  return tuple((name, axes) for name in ACTIVATION_AXES for axes in LOGICAL_AXIS_RULES[name] or (None,))


_ACTIVATION_MESH = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh):
  """Within it, `models.layers.constrain` shards activations over `mesh` by `activation_rules()`, and
  `constrain_to` lays out the step's batches: the one mesh context the step is traced under.

  The mesh is passed to flax and JAX explicitly, not through a context of theirs: `with mesh:` is deprecated,
  and under `jax.set_mesh` flax would also constrain every boxed parameter it unboxes. (flax 0.12's
  `nn.with_logical_constraint` looks only at the abstract mesh that `jax.set_mesh` sets, so inside a plain
  `with mesh:` it constrains nothing, and XLA is free to shard a scanned zero3 model over its embedding
  instead of gathering weights per layer.)
  """
  token = _ACTIVATION_MESH.set(mesh)
  try:
    with nn.logical_axis_rules(activation_rules()):
      yield
  finally:
    _ACTIVATION_MESH.reset(token)


@contextlib.contextmanager
def device_local():
  """Within it (a shard_map manual over the whole mesh), code sees one device's rows: activation constraints
  are off (`activation_mesh` is None)."""
  token = _ACTIVATION_MESH.set(None)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def activation_mesh():
  """The mesh of the innermost `activation_sharding`, else None."""
  return _ACTIVATION_MESH.get()


def constrain_to(tree, spec: P):
  """`tree`'s leaves laid out by `spec` on the `activation_sharding` mesh (an XLA sharding constraint); a no-op
  outside one, as `models.layers.constrain` is."""
  mesh = activation_mesh()
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: NamedSharding(mesh, spec), tree))


def batch_local(fn, rows, shared):
  """fn(*rows, *shared), run by each device on its own rows of `rows` (arrays whose leading axis is the batch)
  with the whole of `shared` (arrays of no batch axis), in a shard_map over the batch axes of the
  `activation_sharding` mesh; its result is rows again.

  What it is for: a reduction over `rows` stays on the device (models/fp8.py scales each device's rows by their own
  max, where a max over the batch is an all-reduce before every cast). And the gradient of a `shared` input reaches
  the other devices once, at the size of that input, after `fn`'s backward has reduced each device's rows into it.
  Under GSPMD the reduction goes where the program's batch axis ends, which for SwinV2's position bias is the
  (windows x heads, N, N) bias that the attention kernel takes (1.31 GB in SwinV2-G's first stage at 640 px) rather
  than the (heads, (2W-1)^2) table it is gathered from. Outside an `activation_sharding`, inside `device_local`, on
  a mesh with a tensor axis (which splits heads, not rows) or for rows that do not divide over the batch devices: fn
  itself."""
  mesh = activation_mesh()
  if mesh is None or mesh.shape.get("tensor", 1) != 1:
    return fn(*rows, *shared)
  batch_axes = batch_axes_of(mesh)
  devices = math.prod(mesh.shape[a] for a in batch_axes)
  if devices == 1 or any(r.shape[0] % devices for r in rows):
    return fn(*rows, *shared)

  def local(rows, shared):
    with device_local():
      return fn(*rows, *shared)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(batch_axes), P()), out_specs=P(batch_axes), check_vma=False)(
    tuple(rows), tuple(shared)
  )


def partition_spec(
  names: tuple[str | None, ...],
  shape: tuple[int, ...],
  mesh_shape: dict[str, int],
  shard_fsdp: bool,
  over_data: bool = False,
) -> P:
  """PartitionSpec for one parameter with logical axis `names` and `shape`: `LOGICAL_AXIS_RULES`, then
  `FALLBACK` (module docstring); `shard_fsdp` enables the fsdp axis; `over_data` has a dim that takes fsdp take
  (data, fsdp) where it divides over both (nothing where `shard_fsdp` is off)."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match shape {shape}")
  check_axis_names(names, PARAM_AXES, "parameter")
  spec: list[MeshAxes | None] = [None] * len(shape)
  used: set[str] = set()

  def fits(axes: MeshAxes, size: int) -> bool:
    axes = (axes,) if isinstance(axes, str) else axes
    split = math.prod(mesh_shape.get(a, 1) for a in axes)
    enabled = shard_fsdp or "fsdp" not in axes
    return enabled and not used.intersection(axes) and split > 1 and size % split == 0

  def take(i: int, axes: MeshAxes) -> None:
    spec[i] = axes
    used.update((axes,) if isinstance(axes, str) else axes)

  def widened(rules: tuple[MeshAxes, ...]) -> tuple[MeshAxes, ...]:
    return tuple(a for axes in rules for a in ((("data", "fsdp"), axes) if over_data and axes == "fsdp" else (axes,)))

  for i, name in enumerate(names):
    rules = LOGICAL_AXIS_RULES[name] if name is not None else ()
    axes = next((a for a in widened(rules) if fits(a, shape[i])), None)
    if axes is not None:
      take(i, axes)
  for axis, excluded in FALLBACK.items():
    for option in widened((axis,)):
      free = [i for i in range(len(shape)) if spec[i] is None and names[i] not in excluded and fits(option, shape[i])]
      if free:
        take(max(free, key=lambda i: shape[i]), option)
        break
  return P(*spec)


def map_with_names(fn, boxed_tree):
  """Maps fn(logical_names_or_None, value) over a tree that may hold `nn.Partitioned` boxes."""

  def apply(x):
    if isinstance(x, nn.Partitioned):
      return fn(tuple(x.names), x.value)
    return fn(None, x)

  return jax.tree.map(apply, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def tree_specs(
  boxed_tree,
  mesh_shape: dict[str, int],
  shard_fsdp: bool,
  over_data: bool = False,
  overrides: Overrides | None = None,
  own_layouts: bool = False,
):
  """PartitionSpecs for every leaf of a (boxed, abstract) tree; unnamed leaves get only the fsdp fallback.
  `overrides`: a leaf whose path a rule matches reads its logical axes; `own_layouts` (the params themselves):
  also takes its own layout ('replicated', mesh axes)."""

  def spec(path, x):
    boxed = isinstance(x, nn.Partitioned)
    shape = tuple((x.value if boxed else x).shape)
    layout = overrides.layout(path_str(path)) if overrides else None
    if layout is not None and layout.spec is not None and own_layouts:
      return layout.spec
    names = tuple(x.names) if boxed else (None,) * len(shape)
    if layout is not None and layout.names is not None:
      names = layout.names
    return partition_spec(names, shape, mesh_shape, shard_fsdp, over_data)

  return jax.tree_util.tree_map_with_path(spec, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_specs(boxed_params, mesh_shape: dict[str, int], strategy: str, overrides: Sequence = ()):
  """PartitionSpecs of the params under `strategy` and the recipe's `overrides` (config.sharding.overrides),
  which are checked against them first (`Overrides.check`)."""
  rules = Overrides(overrides)
  rules.check(boxed_params, mesh_shape)
  return tree_specs(boxed_params, mesh_shape, STRATEGY_SHARDS[strategy]["params"], overrides=rules, own_layouts=True)


def state_specs(
  abstract_boxed_state,
  mesh_shape: dict[str, int],
  strategy: str,
  optimizer_over_data: bool = False,
  overrides: Sequence = (),
):
  """PartitionSpecs for a (boxed, abstract) TrainState under `strategy`: params and opt_state per the table; the
  state's parts laid out as the optimizer state (the params' EMA: sharded from zero1 on, as only the step's
  elementwise update and the evaluations read it, so it need not be replicated where the params are), the rest
  replicated. `optimizer_over_data` (config.optimizer_over_data): the optimizer state's fsdp dims over
  (data, fsdp). `overrides` (config.sharding.overrides): the recipe's layouts of params (module docstring)."""
  shards, rules = STRATEGY_SHARDS[strategy], Overrides(overrides)
  unboxed = nn.unbox(abstract_boxed_state)
  return unboxed.replace(
    params=param_specs(abstract_boxed_state.params, mesh_shape, strategy, overrides),
    opt_state=tree_specs(abstract_boxed_state.opt_state, mesh_shape, shards["opt_state"], optimizer_over_data, rules),
    **{
      k: tree_specs(getattr(abstract_boxed_state, k), mesh_shape, shards["opt_state"], optimizer_over_data, rules)
      for k in unboxed.opt_state_like_fields()
    },
    **{k: jax.tree.map(lambda _: P(), getattr(unboxed, k)) for k in unboxed.non_param_fields()},
  )


def grad_specs(abstract_boxed_params, mesh_shape: dict[str, int], strategy: str, overrides: Sequence = ()):
  """PartitionSpecs of the gradients: reduce-scattered (fsdp-sharded) under zero2/zero3, all-reduced otherwise;
  a param the `overrides` give logical axes has its gradient laid out by them (checked as `param_specs` does)."""
  rules = Overrides(overrides)
  rules.check(abstract_boxed_params, mesh_shape)
  return tree_specs(abstract_boxed_params, mesh_shape, STRATEGY_SHARDS[strategy]["grads"], overrides=rules)


def shard_shape(shape: tuple[int, ...], spec: P, mesh_shape: dict[str, int]) -> tuple[int, ...]:
  """The per-device shape of an array of `shape` laid out by `spec` (no devices needed)."""
  out = list(shape)
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None:
        out[i] //= mesh_shape[axis]
  return tuple(out)
