"""ZeRO on 8 simulated devices: per-device bytes of every strategy (from shapes, checked against the real sharded
arrays) and the collectives of the compiled train step (the one `train.run` jits), read from its HLO.

What the CPU backend compiles for the tiny scanned ViT (jax 0.10): no strategy has a `reduce-scatter` op.
Gradients are always all-reduced at full size; zero2/zero3 then keep only the device's 1/8 of the reduced
gradient (all-reduce + dynamic-slice is how the CPU pipeline spells a reduce-scatter; GPU/TPU pipelines fuse
the pair). So the gradient tests follow each reduced gradient to the ops that consume it and check the shape
those keep. zero1 and zero2 compile to the same collectives: the updated params are reassembled by all-gathers
after the optimizer step; zero3 instead gathers param shards inside the forward and backward, one scanned
block's weights at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import types
from unittest import mock

import flax.linen as nn
import jax
import numpy as np
import pytest

from visionfm_jax import config_lib, parallel, tasks
from visionfm_jax.errors import ConfigError
from visionfm_jax.parallel import checks as parallel_checks
from visionfm_jax.tools import summary
from visionfm_jax.training import optim
from visionfm_jax.training import step as step_lib
from visionfm_jax.training.dry_run import human_bytes

from conftest import tiny_vit_config
from test_train_step import _random_batches

STRATEGIES = config_lib.ZERO_STAGES
DEVICES = 8
FC1, HEAD, PATCH = "blocks/mlp/fc1/kernel", "head/kernel", "patch_embed/kernel"

# Why zero3's scanned blocks do not compile to FSDP yet: see test_activation_constraints_reach_the_step.

# ------------------------------------------------------------------------------------------------- HLO text

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
_SAME_VALUE = {"bitcast", "copy", "get-tuple-element"}  # ops that pass a value on unchanged


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  shapes: tuple[tuple[int, ...], ...]  # every array in the output (several for a tuple)
  operands: tuple[str, ...]
  op_name: str  # the JAX name stack it was made for; '' where the partitioner made it up
  tuple_index: int | None  # of a get-tuple-element


def _parse(line: str) -> Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  name, shape, opcode, rest = m.groups()
  op_name = re.search(r'op_name="([^"]*)"', rest)
  index = re.search(r"\bindex=(\d+)", rest)
  return Instruction(
    name,
    opcode,
    tuple(tuple(int(d) for d in dims.split(",") if d) for dims in _ARRAY.findall(shape)),
    tuple(re.findall(r"%([\w.-]+)", rest.split(")", 1)[0])),
    op_name.group(1) if op_name else "",
    int(index.group(1)) if index and opcode == "get-tuple-element" else None,
  )


class Hlo:
  """The instructions of a compiled module's text, and who uses each."""

  def __init__(self, text: str):
    self.instructions = {i.name: i for i in map(_parse, text.splitlines()) if i}
    self.users = collections.defaultdict(list)
    for instruction in self.instructions.values():
      for operand in instruction.operands:
        self.users[operand].append(instruction)

  def ops(self, kind: str) -> list[Instruction]:
    """Collectives of `kind`; an async pair (`all-gather-start`/`-done`) counts once."""
    return [i for i in self.instructions.values() if i.opcode in (kind, kind + "-start")]

  def counts(self) -> dict[str, int]:
    return {
      k: len(self.ops(k)) for k in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
    }

  def kept_after_reduction(self, forms) -> list[tuple[int, ...]]:
    """Shapes that the ops consuming a reduced array of one of the `forms` produce from it: a reduce-scatter's
    own output, or what the first real consumers of an all-reduce's output make of it."""
    kept = []
    for op in self.ops("reduce-scatter"):
      if any(_matches(self.instructions[o].shapes[0], forms) for o in op.operands if o in self.instructions):
        kept += op.shapes
    for op in self.ops("all-reduce"):
      for index, shape in enumerate(op.shapes):
        if _matches(shape, forms):
          start = [op] if len(op.shapes) == 1 else [u for u in self.users[op.name] if u.tuple_index == index]
          kept += [s for consumer in self._consumers(start) for s in consumer.shapes]
    return kept

  def _consumers(self, values: list[Instruction]) -> list[Instruction]:
    out = []
    while values:
      for user in self.users[values.pop().name]:
        (values if user.opcode in _SAME_VALUE else out).append(user)
    return out


def _matches(shape, forms) -> bool:
  """Whether `shape` is one of `forms` up to the order of its dimensions (the compiler transposes freely)."""
  return any(sorted(shape) == sorted(form) for form in forms)


def _in_model(op: Instruction) -> bool:
  """Made for the model's forward (`jvp(...)`) or backward (`transpose(jvp(...))`), not the optimizer. From jax
  0.11 a gather that XLA hoists to the step's input is named after the argument ("state.params['head']..."): the
  param as the step reads it, before any update, so a gather for the model too."""
  return "jvp(" in op.op_name or op.op_name.startswith("state.params[")


# ----------------------------------------------------------------------------------------------- fixtures


def _mesh_shape():
  return parallel.mesh_shape(tiny_vit_config().mesh, DEVICES)


@functools.cache
def _abstract_state():
  """The tiny ViT's boxed train state, shapes only (the same for every strategy)."""
  config = tiny_vit_config()
  tx = optim.make_optimizer(config.optim, optim.schedule(config.optim, config.total_steps))
  return jax.eval_shape(step_lib.make_init_fn(tasks.build(config), tx, config), jax.random.key(0))


@functools.cache
def _lowered_and_compiled(strategy):
  """The train step that `step.compile_train_step` compiles: its lowered text (StableHLO before partitioning,
  where sharding constraints are still ops) and the compiled step."""
  config = tiny_vit_config(strategy=strategy)
  lowered = []
  jit_train_step = step_lib.jit_train_step

  def lowering_recorded(*args, **kwargs):
    step = jit_train_step(*args, **kwargs)
    return types.SimpleNamespace(lower=lambda *a: lowered.append(step.lower(*a)) or lowered[-1])

  with mock.patch.object(step_lib, "jit_train_step", lowering_recorded):
    compiled = step_lib.compile_train_step(config, parallel.make_mesh(config.mesh), _random_batches(config, 1)[0])
  return lowered[0].as_text(), compiled


def _compiled(strategy):
  return _lowered_and_compiled(strategy)[1]


@functools.cache
def _hlo(strategy) -> Hlo:
  return Hlo(_compiled(strategy).as_text())


def _leaf(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree.value if isinstance(tree, nn.Partitioned) else tree


def _flattenings(shape) -> list[tuple[int, ...]]:
  """`shape` and its 2-D forms (leading axes x trailing axes): kernels.contract_trailing (CPU path) multiplies a kernel
  (in axes..., out axes...) as one matrix, so the compiler may move it in that form."""
  return [shape] + [(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]


def _forms(path: str, shape) -> tuple[tuple[int, ...], ...]:
  """A scanned block's param is used one layer at a time: its per-layer shape counts too."""
  shape = tuple(shape)
  uses = (shape, shape[1:]) if path.startswith("blocks/") else (shape,)
  return tuple(form for use in uses for form in _flattenings(use))


def _full_and_shard(path: str, strategy: str):
  """(forms of the whole gradient of `path`, forms of one device's shard as `grad_specs` lays it out)."""
  boxed = _abstract_state().params
  specs = parallel.grad_specs(boxed, _mesh_shape(), strategy)
  shape = _leaf(boxed, path).shape
  return _forms(path, shape), _forms(path, parallel.shard_shape(shape, _leaf(specs, path), _mesh_shape()))


# ------------------------------------------------------------------------------------------ bytes per device


def _nbytes(leaf) -> int:
  return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def _splits(names, shape) -> bool:
  """The rules' promise on a pure fsdp mesh: a leaf splits 8 ways iff an axis other than `layers` divides by 8."""
  return any(size % DEVICES == 0 and name != "layers" for name, size in zip(names or (None,) * len(shape), shape))


def _expected_bytes(boxed_tree, sharded: bool) -> int:
  sizes = parallel.map_with_names(
    lambda names, x: _nbytes(x) // DEVICES if sharded and _splits(names, x.shape) else _nbytes(x), boxed_tree
  )
  return sum(jax.tree.leaves(sizes))


def test_the_strategies_shard_what_their_zero_stage_does():
  """ZeRO stage 1 shards the optimizer state, stage 2 the gradients too, stage 3 the parameters too; `fsdp` is
  zero3; the table has every strategy config_lib accepts, and summary's `--strategy=all` each stage once."""
  sharded = lambda *parts: {part: part in parts for part in ("params", "grads", "opt_state")}
  assert parallel.STRATEGY_SHARDS == {
    "ddp": sharded(),
    "zero1": sharded("opt_state"),
    "zero2": sharded("opt_state", "grads"),
    "zero3": sharded("opt_state", "grads", "params"),
    "fsdp": sharded("opt_state", "grads", "params"),
  }
  assert tuple(parallel.STRATEGY_SHARDS) == config_lib.STRATEGIES
  assert summary.ALL_STRATEGIES == ("ddp", "zero1", "zero2", "zero3")


def test_bytes_per_device_follow_the_strategy_table():
  state = _abstract_state()
  for strategy in STRATEGIES:
    shards = parallel.STRATEGY_SHARDS[strategy]
    want = dict(
      params=_expected_bytes(state.params, shards["params"]),
      grads=_expected_bytes(state.params, shards["grads"]),
      opt_state=_expected_bytes(state.opt_state, shards["opt_state"]),
    )
    want["total"] = sum(want.values())
    assert parallel.bytes_per_device(state, _mesh_shape(), strategy) == want, strategy
  ddp = parallel.bytes_per_device(state, _mesh_shape(), "ddp")
  assert ddp["params"] == ddp["grads"] == sum(_nbytes(x) for x in jax.tree.leaves(nn.unbox(state.params)))
  assert ddp["opt_state"] == sum(_nbytes(x) for x in jax.tree.leaves(nn.unbox(state.opt_state)))
  # Only the optimizer's step counts stay whole, so sharded parts are 1/8 up to a few scalar bytes.
  whole = parallel.map_with_names(
    lambda names, x: None if _splits(names, x.shape) else str(x.shape), (state.params, state.opt_state)
  )
  assert set(jax.tree.leaves(whole)) == {"()"}
  zero3 = parallel.bytes_per_device(state, _mesh_shape(), "zero3")
  counts = sum(_nbytes(x) for x in jax.tree.leaves(nn.unbox(state.opt_state)) if x.shape == ())
  assert zero3["params"] * DEVICES == ddp["params"]
  assert zero3["opt_state"] == (ddp["opt_state"] - counts) // DEVICES + counts


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_the_optimizer_state_over_data_keeps_a_data_th_of_it_and_nothing_else_moves(strategy):
  """On a data 2 x fsdp 4 mesh, optimizer_over_data halves the optimizer state a device holds (up to the step
  counts, which stay whole) and leaves the params and gradients as the strategy lays them out; ddp refuses it."""
  state, mesh_shape = _abstract_state(), {"data": 2, "fsdp": 4, "tensor": 1}
  plain = parallel.bytes_per_device(state, mesh_shape, strategy)
  over = parallel.bytes_per_device(state, mesh_shape, strategy, optimizer_over_data=True)
  counts = sum(_nbytes(x) for x in jax.tree.leaves(nn.unbox(state.opt_state)) if x.shape == ())
  assert (over["params"], over["grads"]) == (plain["params"], plain["grads"])
  assert over["opt_state"] - counts == (plain["opt_state"] - counts) // 2
  with pytest.raises(ConfigError, match=r"optimizer_over_data=True .* config.strategy='ddp' keeps it whole"):
    parallel_checks.check_batch(tiny_vit_config(strategy="ddp", optimizer_over_data=True))


def test_summary_tool_prints_a_row_per_strategy():
  s = summary.summarize(tiny_vit_config(), DEVICES, "all")
  assert s["per_device"] == {k: parallel.bytes_per_device(_abstract_state(), _mesh_shape(), k) for k in STRATEGIES}
  assert "state_bytes_per_device" not in s
  table = summary.bytes_table(s["per_device"])
  assert table[0].split() == ["strategy", "params", "grads", "opt_state", "total"]
  assert [row.split()[0] for row in table[1:]] == list(STRATEGIES)
  zero3 = s["per_device"]["zero3"]
  assert re.split(r"\s{2,}", table[-1].strip())[1:] == [
    human_bytes(zero3[k]) for k in ("params", "grads", "opt_state", "total")
  ]
  assert table[-1].split()[2] in ("B", "KiB", "MiB", "GiB")
  one = summary.summarize(tiny_vit_config(), DEVICES, "zero2")
  assert list(one["per_device"]) == ["zero2"]
  # The whole train state: params + optimizer state + the int32 step (no loss scale in fp32).
  zero2 = one["per_device"]["zero2"]
  assert one["state_bytes_per_device"] == zero2["params"] + zero2["opt_state"] + 4
  with pytest.raises(ConfigError, match=r"config.model.num_classes=-2: must be an integer >= 0"):  # an override
    summary.summarize(tiny_vit_config(**{"model.num_classes": -2}), DEVICES, "all")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bytes_per_device_match_the_real_arrays(strategy):
  """The state that the compiled step puts out holds on device 0 what the shapes say."""
  config = tiny_vit_config(strategy=strategy)
  mesh = parallel.make_mesh(config.mesh)
  tx = optim.make_optimizer(config.optim, optim.schedule(config.optim, config.total_steps))
  init_fn = step_lib.make_init_fn(tasks.build(config), tx, config)
  abstract, shardings, _ = step_lib.state_shardings(init_fn, mesh, config)
  # Zeros in the run's layout (initialising would cost a compile); what is checked is the step's output layout.
  state = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
  batch = jax.device_put(_random_batches(config, 1)[0], parallel.batch_sharding(mesh))
  state, metrics = _compiled(strategy)(state, batch)
  assert np.isfinite(float(metrics["train/loss"]))
  want = parallel.bytes_per_device(_abstract_state(), _mesh_shape(), strategy)
  on_device0 = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
  assert on_device0(state.params) == want["params"]
  assert on_device0(state.opt_state) == want["opt_state"]


# ----------------------------------------------------------------------------------------------- collectives


def test_ddp_all_reduces_whole_gradients_and_gathers_nothing():
  hlo = _hlo("ddp")
  assert not hlo.ops("all-gather") and not hlo.ops("reduce-scatter")
  for path in (FC1, HEAD):
    full, _ = _full_and_shard(path, "ddp")
    assert any(_matches(s, full) for s in hlo.kept_after_reduction(full)), path


@pytest.mark.parametrize("strategy", ["zero1", "zero2"])
def test_zero1_zero2_gather_the_updated_params_not_the_model_inputs(strategy):
  gathers = _hlo(strategy).ops("all-gather")
  assert gathers and not any(_in_model(g) for g in gathers)
  gathered = [s for g in gathers for s in g.shapes]
  for path in (FC1, HEAD, PATCH):
    full, _ = _full_and_shard(path, strategy)
    assert any(_matches(s, full[:1]) for s in gathered), path  # whole (stacked) params leave the step


@pytest.mark.parametrize(
  "strategy,path", [("zero2", FC1), ("zero2", HEAD), ("zero2", PATCH), ("zero3", FC1), ("zero3", HEAD)]
)
def test_sharded_gradients_keep_only_the_device_shard_after_reduction(strategy, path):
  full, shard = _full_and_shard(path, strategy)
  kept = _hlo(strategy).kept_after_reduction(full)
  assert kept, f"no reduction of the {path} gradient"
  assert not any(_matches(s, full) for s in kept) and any(_matches(s, shard) for s in kept), kept


@pytest.mark.parametrize("path", [PATCH, FC1])
def test_zero3_gathers_param_shards_for_the_forward_and_backward(path):
  gathers = _hlo("zero3").ops("all-gather")
  assert all(_in_model(g) for g in gathers)  # and never reassembles the updated params
  shape = tuple(_leaf(_abstract_state().params, path).shape)
  per_use = _flattenings(shape[1:] if path.startswith("blocks/") else shape)  # scanned: one layer at a time
  assert any(_matches(s, per_use) for g in gathers for s in g.shapes), path


_CONSTRAINT = re.compile(r"sdy\.sharding_constraint %[\w#]+ <@\w+, \[(.*)\]> : tensor<([0-9x]+)x[a-z]+[0-9]*>")


def _constraints(lowered_text: str) -> list[tuple[tuple[int, ...], tuple[tuple[str, ...], ...]]]:
  """(shape, mesh axes of each dimension) of every sharding constraint in a lowered (Shardy) module."""
  out = []
  for dims, shape in _CONSTRAINT.findall(lowered_text):
    axes = tuple(tuple(re.findall(r'"(\w+)"', d)) for d in re.findall(r"\{([^}]*)\}", dims))
    out.append((tuple(int(n) for n in shape.split("x")), axes))
  return out


def test_activation_constraints_reach_the_step():
  """In the context `train.run` traces under, the models' activation constraints are in the train step: the
  pico ViT's three per block (block input, attention heads, MLP hidden; models/vit.py, models/layers.py), each
  in the scanned forward and, transposed, in the backward (no remat), batch over (data, fsdp), heads and MLP over
  `tensor` (parallel.activation_rules). With a plain `with mesh:` flax drops them, and XLA shards a scanned zero3
  model over its embedding instead."""
  config = tiny_vit_config()
  batch, width, heads, mlp = config.global_batch_size, 32, 2, 64  # pico: width 32, 2 heads, MLP 64
  tokens = (config.model.image_size // 4) ** 2 + 1  # 4 px patches and the class token
  data = ("data", "fsdp")
  want = {
    ((batch, tokens, width), (data, (), ())): 2,
    ((batch, tokens, heads, width // heads), (data, (), ("tensor",), ())): 2,
    ((batch, tokens, mlp), (data, (), ("tensor",))): 2,
  }
  on_activations = [c for c in _constraints(_lowered_and_compiled("zero3")[0]) if c[1] and c[1][0] == data]
  assert collections.Counter(on_activations) == want
