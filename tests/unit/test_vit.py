"""The ViT family: sizes, logical axis names, scan/remat equivalence, stochastic depth, dtype policy."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import config_lib, models
from visionfm_jax.convert import stack_layers, unstack_layers
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import vit

from conftest import tiny_vit_config


def _count(model, size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))


def test_vit_h14_parameter_counts():
  spec = vit.parse_variant("H/14")
  assert _count(vit.ViT(**spec), 224) == 630_764_800
  assert _count(vit.ViT(**spec, num_classes=21841), 224) == 658_743_121


@pytest.mark.parametrize("size", ["Ti", "S", "B", "L", "H", "g", "G"])
def test_block_parameter_formula(size):
  spec = vit.parse_variant(f"{size}/16")
  d, m = spec["width"], spec["mlp_dim"]
  with_blocks = _count(vit.ViT(**spec), 32)
  spec["depth"] = 0
  per_block = (with_blocks - _count(vit.ViT(**spec, scan=False), 32)) // vit.SIZES[size][1]
  assert per_block == 4 * d * d + 2 * d * m + 9 * d + m  # = 12D^2 + 13D when m = 4D


def test_every_param_has_logical_axis_names():
  model = vit.ViT(**vit.parse_variant("pico/4"), num_classes=3)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  assert boxed["params"]["blocks"]["mlp"]["fc1"]["kernel"].names == ("layers", "embed", "mlp")


def test_bad_variant_names_the_problem():
  with pytest.raises(ValueError, match="'X/16'"):
    vit.parse_variant("X/16")


@pytest.mark.parametrize("pool", ["CLS", "mean", ""])
def test_unknown_pool_is_a_config_error_naming_it(pool):
  """Anything but 'cls' used to pool by the mean silently."""
  config = tiny_vit_config(**{"model.pool": pool})
  with pytest.raises(ConfigError, match=f"config.model: pool={pool!r}: expected one of"):
    models.build(config.model, jnp.float32, "cpu")
  with pytest.raises(ValueError, match=f"pool={pool!r}"):
    jax.eval_shape(vit.ViT(**vit.parse_variant("pico/4"), pool=pool).init, jax.random.key(0), _images())


def _images(n=2, size=16):
  return jax.random.normal(jax.random.key(1), (n, size, size, 3))


def _forward_and_grads(model, params):
  """(the sum of squares of the tokens of `_images()`, the tokens, its gradient): one program, forward and
  backward."""

  def loss(p):
    tokens = model.apply({"params": p}, _images())["tokens"]
    return jnp.sum(tokens**2), tokens

  (value, tokens), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, tokens, grads


@functools.lru_cache(maxsize=None)
def _scanned_params(depth: int = 2):
  """The params of a pico/4 ViT of `depth` scanned blocks (the remat policy and the form do not change them)."""
  model = vit.ViT(**dict(vit.parse_variant("pico/4"), depth=depth), num_classes=5)
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), _images()))["params"]


@pytest.mark.parametrize("policy", ["none", "nothing_saveable", "dots_saveable"])
def test_scanned_and_unrolled_blocks_agree(policy):
  kwargs = dict(vit.parse_variant("pico/4"), num_classes=5, remat_policy=policy)
  params = _scanned_params()
  flat = unstack_layers(params, 2)
  _, out_scan, g_scan = _forward_and_grads(vit.ViT(**kwargs, scan=True), params)
  _, out_unrolled, g_unrolled = _forward_and_grads(vit.ViT(**kwargs, scan=False), flat)
  chex.assert_trees_all_close(out_scan, out_unrolled, atol=1e-5)
  chex.assert_trees_all_equal(stack_layers(flat, 2), params)
  chex.assert_trees_all_close(unstack_layers(g_scan, 2), g_unrolled, atol=1e-4, rtol=1e-4)


def test_stochastic_depth_is_random_in_training_and_off_in_eval():
  model = vit.ViT(**vit.parse_variant("pico/4"), drop_path=0.5)
  variables = jax.jit(model.init)(jax.random.key(0), _images())
  train = jax.jit(lambda v, key: model.apply(v, _images(8), train=True, rngs={"dropout": key})["tokens"])
  a, b = train(variables, jax.random.key(1)), train(variables, jax.random.key(2))
  assert not np.allclose(a, b)
  e1 = jax.jit(model.apply)(variables, _images(8))["tokens"]
  e2 = jax.jit(vit.ViT(**vit.parse_variant("pico/4")).apply)(variables, _images(8))["tokens"]
  chex.assert_trees_all_close(e1, e2)
  np.testing.assert_allclose(vit.layers.stochastic_depth_rates(0.2, 5), [0.0, 0.05, 0.1, 0.15, 0.2], atol=1e-7)


def test_bf16_compute_keeps_fp32_params_and_norms():
  model = vit.ViT(**vit.parse_variant("pico/4"), num_classes=3, dtype=jnp.bfloat16)
  variables = nn.unbox(model.init(jax.random.key(0), _images()))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = model.apply(variables, _images())
  assert out["tokens"].dtype == jnp.float32 and out["logits"].dtype == jnp.float32
  ref = vit.ViT(**vit.parse_variant("pico/4"), num_classes=3).apply(variables, _images())
  np.testing.assert_allclose(out["tokens"], ref["tokens"], atol=0.1)


@functools.lru_cache(maxsize=None)
def _rolled_forward_and_grads():
  """The rolled scan's `_forward_and_grads` on `_scanned_params(4)`, the reference of every stack form."""
  kwargs = dict(vit.parse_variant("pico/4"), depth=4, num_classes=5, remat_policy="nothing_saveable")
  return _forward_and_grads(vit.ViT(**kwargs), _scanned_params(4))


@pytest.mark.parametrize("unroll", [2, 3, 0])
def test_every_stack_form_computes_the_rolled_scan_on_the_same_params(unroll):
  """scan_unroll changes the program, not the params or the numbers: 4 blocks rolled (1), 2 an iteration, 3 (a loop
  of one trip plus a remainder block) and straight-line (0)."""
  kwargs = dict(vit.parse_variant("pico/4"), depth=4, num_classes=5, remat_policy="nothing_saveable")
  formed, params = vit.ViT(**kwargs, scan_unroll=unroll), _scanned_params(4)
  chex.assert_trees_all_equal_shapes_and_dtypes(
    nn.unbox(jax.eval_shape(formed.init, jax.random.key(0), _images()))["params"], params
  )
  (value, _, grads), (want_value, _, want_grads) = _forward_and_grads(formed, params), _rolled_forward_and_grads()
  chex.assert_trees_all_close((value, grads), (want_value, want_grads), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "scan, unroll, barriers", [(True, 1, False), (True, 2, False), (True, 3, True), (True, 0, True), (False, 1, True)]
)
def test_blocks_outside_a_loop_keep_their_remat_from_cse(scan, unroll, barriers):
  """A block whose recomputation lands in straight-line code (unrolled, scanned whole, a loop's remainder) is
  checkpointed with prevent_cse: its lowering carries the optimization barriers that keep XLA's GPU CSE from
  merging the recomputation into the forward (models/layers.py straight_line_blocks); blocks in a loop do not.
  LayerNorm's own barrier, over its (tokens, 1) row statistics (kernels.layer_norm), is in every form."""
  model = vit.ViT(
    **dict(vit.parse_variant("pico/4"), depth=4), scan=scan, scan_unroll=unroll, remat_policy="nothing_saveable"
  )
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), _images()))["params"]
  lowered = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, _images())["tokens"]))).lower(params)
  barrier_types = [line.split(" : ")[-1] for line in lowered.as_text().splitlines() if "optimization_barrier" in line]
  statistics = re.compile(r"(tensor<[0-9x]+x1xf32>(, )?)+")
  assert any(statistics.fullmatch(types) for types in barrier_types)
  assert any(not statistics.fullmatch(types) for types in barrier_types) == barriers


def test_scan_unroll_is_checked():
  with pytest.raises(ValueError, match="scan_unroll=-1"):
    vit.ViT(**vit.parse_variant("pico/4"), scan_unroll=-1).init(jax.random.key(0), _images())
  config = tiny_vit_config(**{"model.scan_unroll": -2})
  with pytest.raises(ConfigError, match="model.scan_unroll"):
    config_lib.check(config)
