"""The train step: ZeRO strategies agree with ddp, accumulation equals one big batch, fp16 overflow skips."""

import contextlib
import functools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from visionfm_jax import parallel, tasks
from visionfm_jax.bench import hlo_cost
from visionfm_jax.training import grads as grads_lib
from visionfm_jax.training import optim, precision
from visionfm_jax.training import state as state_lib
from visionfm_jax.training import step as step_lib
from visionfm_jax.training.state import TrainState

from conftest import tiny_clip_config, tiny_vit_config


def _random_batches(config, n, seed=0):
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  return [
    {
      "image": rng.integers(0, 256, (config.global_batch_size, size, size, 3), dtype=np.uint8),
      "label": rng.integers(0, config.model.num_classes, (config.global_batch_size,), dtype=np.int32),
    }
    for _ in range(n)
  ]


class OverflowingTask(tasks.ClassificationTask):
  """Gradients become inf on a poisoned batch, as an fp16 overflow makes them."""

  def loss(self, params, batch, rng):
    loss, aux = super().loss(params, batch, rng)
    return loss * jnp.where(jnp.any(batch["poison"]), jnp.inf, 1.0), aux


def _batches_poisoned_at(config, n, index):
  """`_random_batches` whose batch `index` an OverflowingTask turns into an overflow."""
  batches = _random_batches(config, n)
  for i, b in enumerate(batches):
    b["poison"] = np.full((config.global_batch_size,), i == index, np.bool_)
  return batches


_INITIAL_STATES = {}


def _initial_state(config, init_fn, shardings):
  """A fresh copy of the initial state (the train step donates it), laid out by `shardings`. The init draws the same
  values under any layout (partitionable threefry), so configs that differ only in what does not shape or seed the
  state (batch, accumulation, steps, strategy, mesh, devices) share one init compile, the slowest part of a test:
  it runs once, unsharded, and its host copy is laid out for each run."""
  key = json.dumps(
    [config.model.to_dict(), config.optim.to_dict(), config.precision.to_dict(), config.seed],
    sort_keys=True,
    default=str,
  )
  if key not in _INITIAL_STATES:
    _INITIAL_STATES[key] = jax.device_get(jax.jit(lambda r: nn.unbox(init_fn(r)))(jax.random.key(config.seed)))
  return jax.device_put(_INITIAL_STATES[key], shardings)


class _GivenParams:
  """A task whose init draws nothing: its params are the ones given."""

  def __init__(self, params):
    self.params = params

  def init_variables(self, rng):
    del rng
    return {"params": self.params}

  def training_gemms(self):
    """The init traces nothing here, so no GEMM's precision matters."""
    return contextlib.nullcontext()


def _setup(config, task=None, devices=None, params=None):
  """The real train step (shardings, donation, jit) and a fresh sharded state for `config` on `devices` (all of
  them by default); `params`: the state's params instead of the init's (the state around them, its optimizer
  state, loss scale and EMA, is the init's), e.g. conftest.random_params: no compile of the init's draws."""
  mesh = parallel.make_mesh(config.mesh, devices)
  task = task or tasks.build(config)
  tx, lr_schedule = optim.fresh_optimizer(config)
  init_fn = step_lib.make_init_fn(task, tx, config)
  with parallel.activation_sharding(mesh):
    abstract, shardings, specs = step_lib.state_shardings(init_fn, mesh, config)
    if params is None:
      state = _initial_state(config, init_fn, shardings)
    else:
      around = lambda p: nn.unbox(step_lib.make_init_fn(_GivenParams(p), tx, config)(jax.random.key(config.seed)))
      state = jax.jit(around, out_shardings=shardings)(params)
  batch_sharding = parallel.batch_sharding(mesh)
  jitted = step_lib.jit_train_step(task, tx, config, mesh, init_fn, shardings, lr_schedule)

  def step(state, batch):
    with parallel.activation_sharding(mesh):
      state, metrics = jitted(state, jax.device_put(batch, batch_sharding))
    return state, jax.device_get(metrics)

  def compiled_text(state, batch):
    """The partitioned HLO of the step just run on `state` and `batch` (jit's cache: no second compile)."""
    with parallel.activation_sharding(mesh):
      return jitted.lower(state, jax.device_put(batch, batch_sharding)).compile().as_text()

  step.compiled_text = compiled_text
  return state, step, specs


def _train(config, batches, with_hlo=False, devices=None, params=None, params_after=None):
  """(final state, state specs, metrics per step[, the step's partitioned HLO]) from `_setup`'s state; `params_after`:
  a list that receives the params (host copies) after each step."""
  state, step, specs = _setup(config, devices=devices, params=params)
  history = []
  for b in batches:
    state, m = step(state, b)
    history.append(m)
    if params_after is not None:
      params_after.append(jax.device_get(state.params))
  if with_hlo:
    return state, specs, history, step.compiled_text(state, batches[-1])
  return state, specs, history


@functools.lru_cache(maxsize=1)
def _ddp_run():
  """(params after each step, metrics per step, state specs) of three ddp steps on `_random_batches`: the reference
  of the ZeRO strategies (three steps) and of accumulation (the first two), one run and one compile for all."""
  params = []
  _, specs, history = _train(
    tiny_vit_config(strategy="ddp"), _random_batches(tiny_vit_config(), 3), params_after=params
  )
  return params, history, specs


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_zero_strategies_match_ddp(strategy):
  got, specs, _ = _train(tiny_vit_config(strategy=strategy), _random_batches(tiny_vit_config(), 3))
  chex.assert_trees_all_close(jax.device_get(got.params), _ddp_run()[0][2], atol=1e-5, rtol=1e-4)
  kernel = specs.params["blocks"]["mlp"]["fc1"]["kernel"]
  mu_kernel = specs.opt_state[1][0].mu["blocks"]["mlp"]["fc1"]["kernel"]
  assert ("fsdp" in tuple(kernel)) == (strategy == "zero3")
  assert "fsdp" in tuple(mu_kernel)
  # The sharded layout is real: each device holds 1/8 of the moment.
  leaf = got.opt_state[1][0].mu["blocks"]["mlp"]["fc1"]["kernel"]
  assert leaf.addressable_shards[0].data.size * 8 == leaf.size


@pytest.mark.parametrize("strategy", ["zero1", "zero3"])
def test_the_optimizer_state_over_data_matches_ddp(strategy):
  """optimizer_over_data on a data 2 x fsdp 4 mesh: the same params as ddp's after three steps, the moments split
  over all 8 devices, the params as the strategy lays them out (zero3: over the 4 of fsdp only)."""
  config = tiny_vit_config(strategy=strategy, optimizer_over_data=True, **{"mesh.data": 2, "mesh.fsdp": 4})
  got, specs, _ = _train(config, _random_batches(tiny_vit_config(), 3))
  chex.assert_trees_all_close(jax.device_get(got.params), _ddp_run()[0][2], atol=1e-5, rtol=1e-4)
  mu = got.opt_state[1][0].mu["blocks"]["mlp"]["fc1"]["kernel"]
  kernel = got.params["blocks"]["mlp"]["fc1"]["kernel"]
  assert ("data", "fsdp") in tuple(specs.opt_state[1][0].mu["blocks"]["mlp"]["fc1"]["kernel"])
  assert mu.addressable_shards[0].data.size * 8 == mu.size
  assert kernel.addressable_shards[0].data.size * (4 if strategy == "zero3" else 1) == kernel.size


def test_fp8_gemms_step_within_an_e4m3_roundoff_of_the_compute_dtype_and_keep_the_state():
  """precision.gemm=fp8 through the real step: the same state (params, optimizer state: shapes and dtypes), losses and
  gradient norms that differ from the compute dtype's (the blocks' GEMMs are quantized) by less than one e4m3
  roundoff (2^-4) of their size over three steps."""
  config = tiny_vit_config(strategy="ddp", **{"precision.gemm": "fp8"})
  state, _, history = _train(config, _random_batches(config, 3))
  reference = _ddp_run()[1]
  chex.assert_trees_all_equal_shapes_and_dtypes(
    jax.device_get(state), jax.device_get(_setup(tiny_vit_config(strategy="ddp"))[0])
  )
  for name in ("train/loss", "train/grad_norm"):
    got, want = np.array([h[name] for h in history]), np.array([h[name] for h in reference])
    assert np.all(np.abs(got - want) <= 2.0**-4 * np.abs(want)), name
  assert any(h["train/grad_norm"] != r["train/grad_norm"] for h, r in zip(history, reference))


def test_ddp_state_is_replicated():
  _, _, specs = _ddp_run()
  assert all(all(a is None for a in s) for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_the_init_is_traced_once_for_its_shapes_and_its_values():
  """`init_state` reuses the trace that `state_shardings` made of the init (the model's whole init, traced again per
  run otherwise) and lays the state out as planned, with the values of a plain jit of the init."""
  config = tiny_vit_config(strategy="zero3")
  mesh, task = parallel.make_mesh(config.mesh), tasks.build(config)
  tx, _ = optim.fresh_optimizer(config)
  make_state, traces = step_lib.make_init_fn(task, tx, config), []
  init_fn = lambda rng: traces.append(rng) or make_state(rng)
  with parallel.activation_sharding(mesh):
    _, shardings, _ = step_lib.state_shardings(init_fn, mesh, config)
    state = step_lib.init_state(init_fn, shardings, jax.random.key(config.seed))
  assert len(traces) == 1
  assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), state, shardings)))
  chex.assert_trees_all_equal(state, _initial_state(config, make_state, shardings))


UNREDUCED = {"accumulate_unreduced": True, "strategy": "zero2"}
NODE_LOCAL = {**UNREDUCED, "mesh.data": 2, "mesh.fsdp": 4}


def test_a_straight_line_stack_initialises_from_the_rolled_loops_program():
  """scan_unroll changes the step's program, never the params: the state's init traces every stack as the rolled
  loop (models.layers.rolled_stacks), one block's random draws in a loop body where straight-line code would compile
  a copy per block, and so gives every form the same params."""

  def lowered_init(unroll):
    config = tiny_vit_config(**{"model.variant": "32x3x64x2/4", "model.scan_unroll": unroll})
    tx, _ = optim.fresh_optimizer(config)
    init_fn = step_lib.make_init_fn(tasks.build(config), tx, config)
    return jax.jit(init_fn).lower(jax.random.key(0)).as_text()

  assert lowered_init(0) == lowered_init(1)


@pytest.mark.parametrize(
  "make_config, loss_name, unreduced",
  [(tiny_vit_config, "loss", {}), (tiny_vit_config, "loss", UNREDUCED), (tiny_clip_config, "local_loss", UNREDUCED)],
  ids=["reduced", "unreduced", "split_loss_unreduced"],
)
def test_an_accumulated_step_traces_the_micro_batch_once(monkeypatch, make_config, loss_name, unreduced):
  """The loop's carry is shaped from the same trace of a micro-batch's forward and backward that the loop body
  runs (grads.traced_once): the model is traced once per step, not twice; a split loss's per-device pass 2 too."""
  config = make_config(grad_accum_steps=2, **unreduced)
  mesh, task = parallel.make_mesh(config.mesh), tasks.build(config)
  traces, loss = [], getattr(task, loss_name)
  monkeypatch.setattr(task, loss_name, lambda *args: traces.append(1) or loss(*args))
  tx, lr_schedule = optim.fresh_optimizer(config)
  init_fn = step_lib.make_init_fn(task, tx, config)
  rows = task.synthetic_batch(config.global_batch_size, np.random.default_rng(0))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in rows.items()}
  with parallel.activation_sharding(mesh):
    abstract, shardings, _ = step_lib.state_shardings(init_fn, mesh, config)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    traces.clear()  # counted from the step's trace on
    step_lib.jit_train_step(task, tx, config, mesh, init_fn, shardings, lr_schedule).trace(state, batch)
  assert len(traces) == 1


@pytest.mark.parametrize("unreduced", [{}, UNREDUCED, NODE_LOCAL], ids=["reduced", "unreduced", "node_local"])
def test_gradient_accumulation_equals_one_big_batch(unreduced):
  """Also with each device's gradients summed unreduced over the micro-batches and reduced once a step, and with
  each fsdp group (a node) reducing its micro-batches' gradients within and the groups once a step."""
  assert tiny_vit_config().strategy == "ddp"  # the reference: the first two steps of `_ddp_run`
  ref_params, ref_hist, _ = _ddp_run()
  got, _, hist, hlo = _train(
    tiny_vit_config(grad_accum_steps=2, **unreduced), _random_batches(tiny_vit_config(), 2), with_hlo=True
  )
  chex.assert_trees_all_close(jax.device_get(got.params), ref_params[1], atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(hist[-1]["train/loss"], ref_hist[1]["train/loss"], rtol=1e-5)
  if unreduced is NODE_LOCAL:  # 8 devices read as 2 nodes of 4: only the fsdp groups of 4 reduce inside the loop
    collectives = [k for k in hlo_cost.Program(hlo, devices_per_node=4).kernels if k.kind == "collective"]
    inside = {(k.collective, k.group_size, k.group_spans_nodes) for k in collectives if k.count > 1}
    assert inside == {("reduce-scatter", 4, False)}, inside
    across = [k for k in collectives if k.group_spans_nodes and k.collective in ("all-reduce", "reduce-scatter")]
    shard = 4 * sum(np.size(x) for x in jax.tree.leaves(got.params)) / 4  # fp32, a quarter per device
    assert shard <= sum(k.bytes for k in across) < 1.5 * shard  # across the nodes once, the shard only


def test_per_device_accumulation_runs_a_stack_unrolled_k_blocks_at_a_time():
  """scan_unroll=2 over 3 blocks (a loop of one 2-block trip, then the last block) in the node-local layout, each
  device accumulating its own gradients in a shard_map: the rolled loop's step. (Closed over by the shard_map, the
  params kept their automatic-sharding type inside it, and JAX 0.10 failed to lower the unrolled loop's gradient.)"""
  three_blocks = {"model.variant": "32x3x64x2/4", "grad_accum_steps": 2, **NODE_LOCAL}
  batches = _random_batches(tiny_vit_config(), 1)
  rolled, _, _ = _train(tiny_vit_config(**three_blocks), batches)
  unrolled, _, _ = _train(tiny_vit_config(**three_blocks, **{"model.scan_unroll": 2}), batches)
  chex.assert_trees_all_close(jax.device_get(unrolled.params), jax.device_get(rolled.params), atol=1e-6, rtol=1e-5)


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
  config = tiny_vit_config(
    **{"precision.compute_dtype": "float16", "precision.loss_scale_init": 2.0**10, "strategy": "ddp"}
  )
  batches = _batches_poisoned_at(config, 3, 1)  # the second batch overflows
  state, step, _ = _setup(config, OverflowingTask(config))
  state, m = step(state, batches[0])
  assert m["train/skipped_steps"] == 0 and np.isfinite(m["train/loss"])
  before = jax.device_get((state.params, state.opt_state))
  state, m = step(state, batches[1])
  assert m["train/skipped_steps"] == 1
  assert float(state.loss_scale.scale) == 2.0**9
  assert int(state.step) == 2
  chex.assert_trees_all_equal(jax.device_get((state.params, state.opt_state)), before)
  # Training continues with the lowered scale.
  state, m = step(state, batches[2])
  assert float(state.loss_scale.scale) == 2.0**9
  assert m["train/skipped_steps"] == 1 and np.isfinite(m["train/loss"])
  assert not np.allclose(jax.device_get(state.params["head"]["kernel"]), before[0]["head"]["kernel"])


def test_weight_decay_mask_decays_only_kernels_and_no_decay_exempts_kernels():
  params = {
    "blocks": {
      "attn": {"qkv": {"kernel": 1, "bias": 1}, "cpb_mlp": {"fc1": {"kernel": 1}}},
      "norm1": {"ln": {"scale": 1, "bias": 1}},
    },
    "pos_embed": np.zeros((1, 5, 4)),
    "cls_token": 1,
    "head": {"kernel": 1},
  }
  blocks = {
    "attn": {"qkv": {"kernel": True, "bias": False}, "cpb_mlp": {"fc1": {"kernel": True}}},
    "norm1": {"ln": {"scale": False, "bias": False}},
  }
  # No rule needed for a non-kernel leaf of any rank.
  assert optim.decay_mask_fn(())(params) == {
    "blocks": blocks,
    "pos_embed": False,
    "cls_token": False,
    "head": {"kernel": True},
  }
  blocks["attn"]["cpb_mlp"]["fc1"]["kernel"] = False
  assert optim.decay_mask_fn(("cpb_mlp",))(params) == {
    "blocks": blocks,
    "pos_embed": False,
    "cls_token": False,
    "head": {"kernel": True},
  }


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
  config = tiny_vit_config(**{"optim.lr": 1.0, "optim.warmup_steps": 10, "optim.end_lr": 0.1})
  config.total_steps = 110
  s = optim.schedule(config.optim, config.total_steps)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(s(60), 0.1 + 0.9 * 0.5, atol=1e-5)
  np.testing.assert_allclose(s(110), 0.1, atol=1e-6)


def test_the_loss_scale_takes_every_setting_from_the_config():
  config = tiny_vit_config(
    **{
      "precision.compute_dtype": "float16",
      "precision.loss_scale_init": 8.0,
      "precision.loss_scale_period": 7,
      "precision.loss_scale_min": 0.5,
    }
  )
  scale = precision.maybe_loss_scale(config.precision)
  assert (float(scale.scale), scale.period, scale.min_scale) == (8.0, 7, 0.5)
  assert precision.maybe_loss_scale(tiny_vit_config().precision) is None


def test_a_restored_state_without_a_loss_scale_gets_a_fresh_one_in_fp16_only(caplog):
  """A checkpoint saved without its config (its compute dtype never compared) restores no loss scale: an fp16 run
  starts one, which the step's loss-scale guard reads; a bf16 / fp32 run leaves the state as it is."""
  fp16 = tiny_vit_config(**{"precision.compute_dtype": "float16", "precision.loss_scale_init": 8.0})
  state = TrainState(step=jnp.zeros((), jnp.int32), params={}, opt_state=(), loss_scale=None)
  shardings = TrainState(step=None, params=None, opt_state=None, loss_scale=None)
  resumed = lambda config: state_lib.Resumed(config, None, shardings, "ckpt/4")
  adopted = state_lib.adopted(state, resumed(fp16))
  assert float(adopted.loss_scale.scale) == 8.0 and "ckpt/4 has no fp16 loss scale" in caplog.text
  assert state_lib.adopted(state, resumed(tiny_vit_config())).loss_scale is None
  assert precision.adopt(adopted, resumed(fp16)) is adopted.loss_scale


def test_a_node_sums_only_gradients_its_strategy_shards():
  """ddp / zero1 keep gradients whole: their devices accumulate whole sums (no collective in the loop), on any mesh."""
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top

  hybrid = Mesh(np.array(jax.devices()[:8]).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
  flat = Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  sharded = {"w": NamedSharding(hybrid, P(None, "fsdp")), "b": NamedSharding(hybrid, P())}
  whole = {"w": NamedSharding(hybrid, P()), "b": NamedSharding(hybrid, P())}
  assert grads_lib.node_local_specs(hybrid, sharded) == {"w": P(None, "fsdp"), "b": P()}
  assert grads_lib.node_local_specs(hybrid, whole) is None
  assert grads_lib.node_local_specs(flat, sharded) is None


class ToySplitLoss:
  """A split loss with every part `two_pass_grads` must carry: per-example local terms and metrics, features that
  depend on the micro-batch's rng and on partners rolled across the whole batch, and a global term over the
  captioned rows only, with a param of its own (a temperature)."""

  splits_loss = True

  def whole_batch(self, batch, rng):
    context = {
      "has_text": batch["has_text"],
      "rows": jnp.float32(batch["x"].shape[0]),
      "mix": jax.random.uniform(jax.random.fold_in(rng, 1)),
    }
    return {**batch, "partner": jnp.roll(batch["x"], 1, axis=0)}, context

  def batch_features(self, params, batch, rng, context):
    mixed = context["mix"] * batch["x"] + (1 - context["mix"]) * batch["partner"]
    noise = 0.1 * jax.random.normal(rng, (batch["x"].shape[0], params["w"].shape[1]))
    return jnp.tanh(mixed @ params["w"]) + noise, mixed @ params["u"]

  def local_loss(self, params, batch, rng, context):
    local = jnp.sum((batch["x"] @ params["v"]) ** 2) / context["rows"]
    return local, self.batch_features(params, batch, rng, context), {"train/local": local}

  def global_loss(self, params, features, context):
    a, b = features
    logits = a @ b.T * jnp.exp(params["t"])
    captioned = context["has_text"]
    lse = jax.nn.logsumexp(jnp.where(captioned[None], logits, -1e9), axis=1)
    loss = jnp.sum(jnp.where(captioned, lse - jnp.diag(logits), 0)) / jnp.sum(captioned)
    return loss, {"train/global": loss}


def test_two_pass_accumulation_of_a_split_loss_equals_the_whole_batch():
  """4 micro-batches of a split loss, loss-scaled: the local terms, their metrics and the global term's loss and
  gradients are those of the whole batch (its features gathered with each micro-batch's own rng)."""
  task, accum, scale = ToySplitLoss(), 4, 8.0
  keys = jax.random.split(jax.random.key(0), 6)
  params = {
    "w": jax.random.normal(keys[0], (5, 3)),
    "u": jax.random.normal(keys[1], (5, 3)),
    "v": jax.random.normal(keys[2], (5,)),
    "t": jnp.float32(0.3),
  }
  batch = {"x": jax.random.normal(keys[3], (24, 5)), "has_text": jax.random.uniform(keys[4], (24,)) > 0.3}
  rng = keys[5]

  def whole_batch_loss(p):
    rows, context = task.whole_batch(batch, rng)
    micro_batches = grads_lib.split_microbatches(rows, accum)
    outs = [
      task.local_loss(p, jax.tree.map(lambda x, j=j: x[j], micro_batches), jax.random.fold_in(rng, j), context)
      for j in range(accum)
    ]
    features = jax.tree.map(lambda *f: jnp.stack(f), *[features for _, features, _ in outs])
    whole = jax.tree.map(lambda f: jnp.swapaxes(f, 0, 1).reshape((-1,) + f.shape[2:]), features)
    return sum(local for local, _, _ in outs) + task.global_loss(p, whole, context)[0]

  mesh = parallel.make_mesh(tiny_vit_config(**{"mesh.data": 1, "mesh.fsdp": 1}).mesh, jax.devices()[:1])
  with parallel.activation_sharding(mesh):
    want_loss, want = jax.jit(jax.value_and_grad(whole_batch_loss))(params)
    got, got_loss, aux = jax.jit(lambda p: grads_lib.two_pass_grads(task, p, batch, accum, rng, scale, None))(params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(aux["train/local"] + aux["train/global"], want_loss, rtol=1e-6)
  chex.assert_trees_all_close(jax.tree.map(lambda g: g / scale, got), want, atol=1e-6, rtol=1e-5)
