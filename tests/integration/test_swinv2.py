"""SwinV2: sizes and parameter counts, windows per stage, scan/unrolled equivalence, extra norms, fp16 cosine
attention, resolution transfer 224/w14 -> 640/w40, weight decay, and classification through the training loop.

Parity with Hugging Face's Swinv2Model lives in test_convert_swinv2.py.
"""

import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import swinv2_cls
from visionfm_jax import config_lib, models, parallel
from visionfm_jax.convert import stack_layers, unstack_layers
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import layers, swinv2
from visionfm_jax.param_rules import path_str
from visionfm_jax.tools import summary
from visionfm_jax.training import init_from, optim, stored, train

from conftest import override, params_drawn_by_shape, tiny_vit_config


def _jittered(tree, scale, seed):
  """`tree` plus N(0, scale^2) noise, drawn with numpy (jax.random would compile a program per leaf shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.asarray(x).dtype), tree)


def _init(model, size):
  return lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]


def _param_shapes(model, size):
  """The params' shapes and dtypes (jax.eval_shape of the init: nothing is compiled)."""
  return nn.unbox(jax.eval_shape(_init(model, size)))


def _random_params(model, size, seed=0):
  """Params drawn at random by shape (conftest.params_drawn_by_shape: no init compile, which would be the slowest
  part of a test), as host arrays (stacked and unstacked with numpy, not op by op on the device). Unlike the init,
  whose res-post-norms are zero (every block starts as the identity), every branch of every block shows."""
  return jax.device_get(params_drawn_by_shape(_init(model, size), seed))


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _summary_total(arg, **model_overrides) -> int:
  config = swinv2_cls.get_config(arg)
  for key, value in model_overrides.items():
    config.model[key] = value
  return summary.summarize(config, devices=8, strategy="zero3")["total_params"]


def test_reference_parameter_counts():
  assert _summary_total("G", num_classes=0) == 2_997_815_008  # the paper's 3.0B; depths 2,2,42,4
  assert _summary_total("H") == 657_883_256  # the paper's 658M, 1000-class head
  assert _summary_total("T") == 28_347_154


@pytest.mark.parametrize("size", list(swinv2.SIZES))
def test_parameter_formula(size):
  c, depths, heads = swinv2.SIZES[size]
  model = swinv2.SwinV2(**swinv2.parse_variant(size), window_size=7)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))["params"]
  params = nn.unbox(params)
  expected = 51 * c + 2 * (c * 2 ** (len(depths) - 1))  # patch embed + its LN; the final LN
  for s, (depth, h) in enumerate(zip(depths, heads)):
    width = c * 2**s
    block = 12 * width**2 + 12 * width + 513 * h + 1536
    assert _count(params[f"stage_{s}"]["blocks"]) == depth * block
    if s < len(depths) - 1:
      assert _count(params[f"stage_{s}"]["downsample"]) == 8 * width**2 + 4 * width
      expected += 8 * width**2 + 4 * width
    expected += depth * block
  assert _count(params) == expected


def test_windows_per_stage_match_the_reference_table(tmp_path):
  assert swinv2.stage_windows(224, 14) == [(56, 14, 7), (28, 14, 7), (14, 14, 0), (7, 7, 0)]
  assert swinv2.stage_windows(448, 14) == [(112, 14, 7), (56, 14, 7), (28, 14, 7), (14, 14, 0)]
  assert swinv2.stage_windows(640, 40) == [(160, 40, 20), (80, 40, 20), (40, 40, 0), (20, 20, 0)]
  assert swinv2.pretrained_windows(224, 14) == (14, 14, 14, 7)
  # The 640 px config states the windows of the 224 px run it is initialised from, which init_from checks.
  (tmp_path / "config.json").write_text(swinv2_cls.get_config("G").to_json())
  config = override(swinv2_cls.get_config("G,640"), init_from=str(tmp_path))
  assert tuple(config.model.pretrained_window_sizes) == (14, 14, 14, 7)
  init_from.check_model_fields(config)
  with pytest.raises(ConfigError, match=r'set --config.model.pretrained_window_sizes="\(14, 14, 14, 7\)"'):
    init_from.check_model_fields(override(config, **{"model.pretrained_window_sizes": ()}))


def test_extra_norm_positions_per_stage_and_global():
  g = swinv2.SwinV2(**swinv2.parse_variant("G"))
  assert g.extra_norm_period == 6
  per_stage = [np.flatnonzero(f).tolist() for f in g.extra_norm_flags()]
  assert per_stage == [[], [], [5, 11, 17, 23, 29, 35, 41], []]
  glob = [np.flatnonzero(f).tolist() for f in g.clone(extra_norm_scope="global").extra_norm_flags()]
  # Blocks 6, 12, ..., 48 of 50 (1-based): stage 3 starts at block 5, stage 4 at block 47.
  assert glob == [[], [], [1, 7, 13, 19, 25, 31, 37], [1]]
  assert swinv2.SwinV2(**swinv2.parse_variant("T")).extra_norm_period == 0


def test_extra_norm_normalises_the_main_branch_and_has_no_params():
  block = swinv2.SwinBlock(num_heads=2, window=4, shift=2, pretrained_window=0, shifted=True, extra_norm=True)
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  flags = (jnp.float32(0.0), jnp.bool_(True))
  init = lambda module: lambda: module.init(jax.random.key(1), x, flags)["params"]
  plain = swinv2.SwinBlock(num_heads=2, window=4, shift=2, pretrained_window=0, shifted=True)
  assert _count(jax.eval_shape(init(block))) == _count(jax.eval_shape(init(plain)))
  variables = {"params": params_drawn_by_shape(init(block))}  # random: the block's branches show in its output
  # Jitted (eager, every primitive compiles on its own): a flag passed as an argument is traced (scanned blocks
  # carry theirs as data), one closed over is static (unrolled blocks know theirs).
  traced = jax.jit(lambda v, extra: block.apply(v, x, (flags[0], extra))[0])
  static = {e: jax.jit(lambda v, e=e: block.apply(v, x, (flags[0], e))[0]) for e in (True, False)}
  for normed in (traced(variables, jnp.bool_(True)), static[True](variables)):
    normed = np.asarray(normed)
    np.testing.assert_allclose(normed.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(normed.std(-1), 1.0, atol=1e-3)
  reference = jax.jit(lambda v: plain.apply(v, x, flags)[0])(variables)
  for untouched in (traced(variables, jnp.bool_(False)), static[False](variables)):  # other programs: rounding
    chex.assert_trees_all_close(untouched, reference, rtol=1e-5, atol=1e-5)


def _small(**kw):
  base = dict(
    embed_dim=16, depths=(4, 2), num_heads=(2, 4), window_size=4, patch_size=2, num_classes=5, extra_norm_period=3
  )
  return swinv2.SwinV2(**{**base, **kw})


def _outputs_loss_and_grads(model, images):
  """A jitted params -> ((the squared logits' sum, the model's outputs), its gradients): one program gives the
  forward outputs, the loss and the gradients."""

  def loss(params):
    out = model.apply({"params": params}, images)
    return jnp.sum(out["logits"] ** 2), out

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.slow
def test_scanned_unrolled_and_straight_line_stages_agree():
  """A scanned stage (pairs of blocks under nn.scan) and the unrolled one compute the same outputs from the same
  params (stacked <-> unstacked losslessly), and the same loss and gradients under each remat policy ('none', and
  'nothing_saveable': each block of a pair rematerialised on its own). The outputs are compared once: a remat
  policy changes what the backward pass recomputes, not the forward pass (whose loss is compared per policy).
  scan_unroll=0 runs each stage's pairs as straight-line code over the same stacked params: the same loss and
  gradients as the rolled loop (stage 0's two pairs, stage 1's one), each block still rematerialised."""
  # 20 px, patch 2: a 10x10 map padded to 12 for window 4, shifted blocks 1 and 3, an extra norm after block 2
  # (a plain block's), then 5x5 -> one window.
  images = jax.random.normal(jax.random.key(1), (2, 20, 20, 3))
  params = _random_params(_small(scan=True), 20)
  assert set(params["stage_0"]["blocks"]) == set(swinv2.PAIR)
  unstack = lambda v: unstack_layers(v, name="blocks", members=swinv2.PAIR)
  flat = {k: (unstack(v) if k.startswith("stage_") else v) for k, v in params.items()}
  assert set(flat["stage_0"]) == {"blocks_0", "blocks_1", "blocks_2", "blocks_3", "downsample"}
  chex.assert_trees_all_equal(
    flat["stage_0"]["blocks_3"], jax.tree.map(lambda a: a[1], params["stage_0"]["blocks"]["shifted"])
  )
  restacked = {
    k: (
      stack_layers(v, len(v) - ("downsample" in v), name="blocks", members=swinv2.PAIR) if k.startswith("stage_") else v
    )
    for k, v in flat.items()
  }
  chex.assert_trees_all_equal(restacked, params)

  for policy in ("none", "nothing_saveable"):  # a failure's traceback shows `policy`
    scanned, unrolled = _small(scan=True, remat_policy=policy), _small(scan=False, remat_policy=policy)
    (l_scan, out_scan), g_rolled = _outputs_loss_and_grads(scanned, images)(params)
    (l_unrolled, out_unrolled), g_unrolled = _outputs_loss_and_grads(unrolled, images)(flat)
    if policy == "none":
      chex.assert_trees_all_close(out_scan, out_unrolled, atol=1e-5)
    np.testing.assert_allclose(l_scan, l_unrolled, rtol=1e-5)
    g_scan = {k: (unstack(v) if k.startswith("stage_") else v) for k, v in jax.device_get(g_rolled).items()}
    chex.assert_trees_all_close(g_scan, g_unrolled, atol=1e-4, rtol=1e-4)
  straight = _small(remat_policy="nothing_saveable", scan_unroll=0)
  (l_straight, _), g_straight = _outputs_loss_and_grads(straight, images)(params)
  chex.assert_trees_all_close((l_straight, g_straight), (l_scan, g_rolled), atol=1e-5, rtol=1e-5)
  by_stage = straight.clone(stage_remat_policies=("none", "dots_with_no_batch_dims_saveable"))
  (l_by_stage, _), g_by_stage = _outputs_loss_and_grads(by_stage, images)(params)
  chex.assert_trees_all_close((l_by_stage, g_by_stage), (l_straight, g_straight), atol=1e-5, rtol=1e-5)


def test_each_stage_rematerialises_its_blocks_by_its_own_policy():
  """stage_remat_policies: stage 0's blocks without remat, stage 1's under their policy; () is remat_policy in
  every stage, and the field names a policy per stage or none."""
  images = jnp.zeros((2, 20, 20, 3))
  params = _random_params(_small(scan=True), 20)

  def policies(**kw) -> list[str]:  # the policy of each rematerialised block the forward traces (one pair a stage)
    jaxpr = str(jax.make_jaxpr(lambda p: _small(scan_unroll=0, **kw).apply({"params": p}, images))(params))
    return re.findall(r"policy=(?:<function )?(\w+)", jaxpr)

  def traced_as(name: str) -> str:  # a function's name, or (as in jax 0.10) the class of a callable policy
    policy = layers.REMAT_POLICIES[name]
    return getattr(policy, "__name__", type(policy).__name__)

  assert policies(remat_policy="nothing_saveable") == [traced_as("nothing_saveable")] * 4
  assert (
    policies(remat_policy="nothing_saveable", stage_remat_policies=("none", "dots_with_no_batch_dims_saveable"))
    == [traced_as("dots_with_no_batch_dims_saveable")] * 2
  )
  with pytest.raises(ValueError, match=r"stage_remat_policies=\('none',\): expected one per stage \(2\)"):
    policies(stage_remat_policies=("none",))


def test_every_param_has_logical_axis_names_and_zero_post_norms():
  model, images = _small(), jnp.zeros((1, 16, 16, 3))
  boxed = jax.eval_shape(model.init, jax.random.key(0), images)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  assert boxed["params"]["stage_0"]["blocks"]["shifted"]["attn"]["qkv"]["kernel"].names == (
    "layers",
    "embed",
    None,
    "heads",
    "kv",
  )

  def checked(variables):  # the values below, of the model's own init: XLA drops the rest of its program
    blocks = nn.unbox(variables)["params"]["stage_0"]["blocks"]
    return blocks["shifted"]["attn"]["logit_scale"], {norm: blocks["plain"][norm]["ln"] for norm in ("norm1", "norm2")}

  logit_scale, norms = jax.jit(lambda key: checked(model.init(key, images)))(jax.random.key(0))
  np.testing.assert_allclose(logit_scale, math.log(10.0))
  # Res-post-norm blocks start as the identity: both block norms are zero (weight and bias).
  for ln in norms.values():
    assert not np.any(ln["scale"]) and not np.any(ln["bias"])


def test_stochastic_depth_rises_linearly_over_all_blocks_and_is_off_in_eval(monkeypatch):
  rates, drop_path = [], layers.drop_path

  def recorded(module, x, rate, deterministic):  # each residual branch's rate, as the traced program sees it
    jax.debug.callback(lambda r: rates.append(float(r)), rate)
    return drop_path(module, x, rate, deterministic)

  monkeypatch.setattr(layers, "drop_path", recorded)
  model = _small(drop_path=0.4)
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  params = _random_params(model, 16, seed=2)
  apply = jax.jit(model.apply, static_argnames="train")
  a = apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(1)})["tokens"]
  b = apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(2)})["tokens"]
  assert not np.allclose(a, b)
  # 6 blocks, two branches each, two calls: 0 at the first block up to drop_path at the last, evenly spaced
  values, counts = np.unique(np.round(rates, 6), return_counts=True)
  np.testing.assert_allclose(values, np.linspace(0.0, 0.4, sum(model.depths)), atol=1e-6)
  assert set(counts) == {4}, counts
  chex.assert_trees_all_close(apply({"params": params}, images), jax.jit(_small().apply)({"params": params}, images))


def test_fp16_cosine_attention_normalises_in_fp32():
  # Activations of a few hundred overflow fp16 in |q|^2; the fp32 normalisation keeps the result finite.
  attn32 = swinv2.WindowAttention(num_heads=2, window=4, pretrained_window=0)
  attn16 = attn32.clone(dtype=jnp.float16)
  windows = 300.0 * jax.random.normal(jax.random.key(0), (1, 2, 16, 32))
  # Jitted (eager, every primitive compiles on its own): the init, then both applies in one program.
  variables = jax.jit(attn32.init)(jax.random.key(1), windows)
  ref, out = jax.jit(lambda v, x: (attn32.apply(v, x), attn16.apply(v, x.astype(jnp.float16))))(variables, windows)
  out, ref = jax.device_get((out, ref))
  assert out.dtype == np.float16 and np.all(np.isfinite(out))
  np.testing.assert_allclose(out.astype(np.float32), ref, rtol=0.05, atol=0.05 * float(np.abs(ref).max()))


def test_position_bias_transfers_to_a_larger_window():
  """With pretrained_window 14, a window-40 bias equals the window-14 bias on every offset both cover."""
  small = swinv2.ContinuousPositionBias(num_heads=3, window=14, pretrained_window=0)
  large = swinv2.ContinuousPositionBias(num_heads=3, window=40, pretrained_window=14)
  unanchored = swinv2.ContinuousPositionBias(num_heads=3, window=40, pretrained_window=0)
  variables = _jittered(jax.jit(small.init)(jax.random.key(0)), 1.0, seed=3)
  # Jitted (eager, every primitive compiles on its own): the three biases in one program, read on the host.
  b14, b40, spread = jax.device_get(
    jax.jit(
      lambda v: (
        swinv2.bias_of_offsets(small.apply(v), 14),
        swinv2.bias_of_offsets(large.apply(v), 40),
        swinv2.bias_of_offsets(unanchored.apply(v), 40),
      )
    )(variables)
  )
  assert b14.shape == (3, 196, 196) and b40.shape == (3, 1600, 1600)
  # Query (0, 0) against keys (i, j), i, j < 14: the offsets -i, -j exist in both windows.
  keys14 = np.arange(14)[:, None] * 14 + np.arange(14)[None, :]
  keys40 = np.arange(14)[:, None] * 40 + np.arange(14)[None, :]
  np.testing.assert_allclose(b40[:, 0, keys40.ravel()], b14[:, 0, keys14.ravel()], rtol=1e-6)
  # Without pretrained_window the large window spreads the same offsets differently.
  assert not np.allclose(spread[:, 0, keys40.ravel()], b14[:, 0, keys14.ravel()], atol=1e-3)


@pytest.mark.parametrize("implementation", ["softmax", "jax", "pallas"])
def test_window_attention_on_devices_sums_the_position_bias_gradient_as_its_table(implementation):
  """On 8 devices (batch-sharded, under the activation mesh), window attention (the softmax path; the fused one,
  whose bias takes the shift mask folded over the windows, through XLA here; the Pallas kernels, each device's
  rows by Pallas's interpreter here) equals the one-device result,
  values and gradients, and its position bias's gradient crosses devices as the (heads, (2W-1)^2) table that the
  bias is gathered from, never as a (..., N, N) bias: at 640 px in SwinV2-G the difference between 0.8 MB and
  up to 1.31 GB per block and micro-batch across 128 GPUs (BENCHMARKS.md, "The recipes on their clusters";
  docs/tried_and_dropped.md, the window-attention bias left to GSPMD)."""
  attention = swinv2.WindowAttention(num_heads=2, window=4, pretrained_window=0, attention=implementation)
  windows = jax.random.normal(jax.random.key(0), (8, 4, 16, 8))
  regions = swinv2.shift_regions(8, 8, 4, 2)
  variables = _jittered(jax.jit(attention.init)(jax.random.key(1), windows[:1], regions), 0.1, seed=2)

  def loss(v, x):
    return jnp.sum(jnp.sin(attention.apply(v, x, regions)))

  step = jax.value_and_grad(loss, argnums=(0, 1))
  want = jax.jit(step)(variables, windows)
  mesh = parallel.make_mesh(tiny_vit_config(strategy="zero3").mesh)
  with parallel.activation_sharding(mesh):
    sharded = jax.device_put(windows, NamedSharding(mesh, P(parallel.BATCH_AXES)))
    got = jax.jit(step)(variables, sharded)
    program = jax.jit(step).lower(variables, sharded).compile().as_text()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))
  summed = {
    tuple(int(d) for d in shape.split(",") if d)
    for line in program.splitlines()
    if " all-reduce(" in line
    for shape in re.findall(r"f32\[([\d,]*)\]", line.split(" all-reduce(")[0])
  }
  assert (2, 49) in summed and not [s for s in summed if s[-2:] == (16, 16)], summed


@pytest.mark.slow
def test_224_window_14_weights_run_at_640_window_40():
  kw = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), num_classes=3)
  low = swinv2.SwinV2(**kw, window_size=14, image_size=224)
  params = _random_params(low, 224, seed=5)  # a 224 px model's weights (by its shapes)
  high = swinv2.SwinV2(**kw, window_size=40, image_size=640, pretrained_window_sizes=swinv2.pretrained_windows(224, 14))
  chex.assert_trees_all_equal_shapes(_param_shapes(high, 640), params)  # every weight has a place, none is new
  out = jax.jit(high.apply)({"params": params}, jax.random.normal(jax.random.key(0), (1, 640, 640, 3)))
  assert out["tokens"].shape == (1, 20 * 20, 64) and out["logits"].shape == (1, 3)
  assert bool(jnp.all(jnp.isfinite(out["logits"])))


def test_no_weight_decay_for_biases_norms_position_bias_and_logit_scale():
  config = config_lib.base_config("swinv2")
  params = _param_shapes(_small(scan=False), 16)
  decays = {
    path_str(p): d
    for p, d in jax.tree_util.tree_flatten_with_path(optim.decay_mask_fn(tuple(config.optim.no_decay))(params))[0]
  }
  decayed = sorted(k.split("/", 2)[-1] for k, d in decays.items() if d and k.startswith("stage_0/blocks_0"))
  assert decayed == ["attn/out/kernel", "attn/qkv/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel"]
  assert decays["stage_0/downsample/reduction/kernel"] and decays["head/kernel"]
  assert not any(d for k, d in decays.items() if "cpb_mlp" in k or "logit_scale" in k or "_bias" in k)


def test_a_scanned_stage_of_odd_depth_is_an_error_naming_the_depths():
  with pytest.raises(ValueError, match=r"depths \(3, 2\).*even.*scan=False"):
    _small(depths=(3, 2)).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  params = _param_shapes(_small(depths=(3, 2), scan=False), 16)  # unrolled, any depth: block i is blocks_i
  assert sorted(params["stage_0"]) == ["blocks_0", "blocks_1", "blocks_2", "downsample"]
  assert all(depth % 2 == 0 for _, depths, _ in swinv2.SIZES.values() for depth in depths)  # every named size


def test_bad_model_config_names_the_field():
  config = swinv2_cls.get_config("demo")
  config.model.variant = "XL"
  with pytest.raises(ConfigError, match="variant 'XL'"):
    models.build(config.model, jnp.float32, "cpu")
  config = swinv2_cls.get_config("demo")
  config.model.pretrained_window_sizes = (4, 4)
  with pytest.raises(ConfigError, match=r"pretrained_window_sizes=\(4, 4\)"):
    models.build(config.model, jnp.float32, "cpu")
  config = swinv2_cls.get_config("demo")
  config.model.extra_norm_scope = "block"
  with pytest.raises(ConfigError, match="extra_norm_scope='block'"):
    models.build(config.model, jnp.float32, "cpu")
  with pytest.raises(ValueError, match="unknown parts"):
    swinv2_cls.get_config("T,320")


def _demo_config(**overrides):
  config = swinv2_cls.get_config("demo")
  # femto: pico's first stage alone, a plain and a shifted block (8x8 map, windows of 4, at 16 px). Training and
  # the transfer need no second stage, which would double the compile time of both runs (the stages' windows
  # and the patch merging are tested on the module above).
  config.model.variant = "femto"
  config.model.patch_size = 2
  config.model.image_size = config.data.image_size = 16
  config.global_batch_size = 16
  config.total_steps = 6
  config.optim.warmup_steps = 2
  config.log_every = 3
  config.eval_every = 6
  config.checkpoint_every = 6
  config.data.eval_examples = 32
  config.progress_bar = False
  return override(config, **overrides)


@pytest.mark.slow
def test_swinv2_classification_trains_and_transfers_resolution_through_the_loop(tmp_path):
  low = _demo_config(strategy="zero3")
  first = train.run(low, str(tmp_path / "w4"))
  assert first["step"] == 6 and 0.0 <= first["eval/val/top1"] <= 1.0 and np.isfinite(first["train/loss"])

  # 32 px with window 8 (a 16x16 map) from the 16 px / window 4 run. One step at lr 0 (the first warmup step)
  # leaves the params as loaded, so the new run's checkpoint must equal the old run's params bit for bit.
  high = _demo_config(
    **{
      "model.image_size": 32,
      "data.image_size": 32,
      "model.window_size": 8,
      "model.pretrained_window_sizes": (4,),
      "init_from": str(tmp_path / "w4"),
      "total_steps": 1,
      "optim.warmup_steps": 1,
      "eval_every": 1,
      "checkpoint_every": 1,
    }
  )
  second = train.run(high, str(tmp_path / "w8"))
  assert second["step"] == 1 and np.isfinite(second["eval/val/top1"])
  model = models.build(high.model, jnp.float32, "cpu")
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device), _param_shapes(model, 32))
  trained_low = stored.load_params(str(tmp_path / "w4"), target)
  loaded_high = stored.load_params(str(tmp_path / "w8"), target)
  chex.assert_trees_all_equal(trained_low, loaded_high)


def test_l2_normalize_has_finite_gradients_at_zero():
  """Cosine attention normalises q and k; an all-zero row (a black patch at init) must not make the step NaN."""
  from visionfm_jax.models import layers  # pylint: disable=g-import-not-at-top

  x = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], np.float32)
  loss = lambda v: jnp.sum(layers.l2_normalize(v) * jnp.array([1.0, 2.0, 3.0]))
  normalized, grads = jax.jit(lambda v: (layers.l2_normalize(v), jax.grad(loss)(v)))(x)  # one program
  assert np.all(np.isfinite(grads))
  np.testing.assert_allclose(normalized[1], [0.6, 0.0, 0.8], rtol=1e-6)


@pytest.mark.parametrize("shifted_stage", [True, False])
def test_fused_window_attention_matches_the_einsum_path(shifted_stage):
  """attention='jax' (jax.nn.dot_product_attention; the cuDNN path on GPU takes the same folded layout, bias
  and scale) computes what the einsum path does, with and without the shift mask; gradients too."""
  from visionfm_jax.models import swinv2  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  windows = jnp.asarray(rng.normal(size=(2, 4, 16, 12)), jnp.float32)  # B, nW, N (4x4 windows), C
  regions = jnp.asarray(rng.integers(0, 3, (4, 16))) if shifted_stage else None
  modules = {
    a: swinv2.WindowAttention(num_heads=3, window=4, pretrained_window=4, attention=a) for a in ("softmax", "jax")
  }
  params = jax.jit(modules["softmax"].init)(jax.random.key(0), windows, regions)
  # With numpy: jnp would compile a program per leaf shape.
  params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape).astype(p.dtype), params)

  def loss(module, p):
    out = module.apply(p, windows, regions)
    return jnp.sum(jnp.sin(out)), out

  # One program per path gives its outputs and gradients.
  runs = {a: jax.jit(jax.grad(lambda p, m=m: loss(m, p), has_aux=True))(params) for a, m in modules.items()}
  np.testing.assert_allclose(runs["jax"][1], runs["softmax"][1], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(runs["jax"][0], runs["softmax"][0], rtol=1e-4, atol=1e-5)
