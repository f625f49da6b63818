"""SwinV2's stack forms per stage (`stage_scan_unrolls`): a deep stage scanned in groups of block pairs, the short
stages straight-line, computes what the straight-line and the rolled forms compute, on the same params."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from visionfm_jax import config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import swinv2

# a pico tower with a short stage and a deep one: 1 and 3 block pairs
PICO = dict(
  embed_dim=16,
  depths=(2, 6),
  num_heads=(2, 4),
  window_size=2,
  patch_size=2,
  image_size=8,
  num_classes=0,
  remat_policy="nothing_saveable",
)


def _images():
  return jax.random.normal(jax.random.key(1), (2, 8, 8, 3))


def _scans(model, params) -> list[tuple[int, int]]:
  """(trips, iterations unrolled) of each stage's scan, in order, from the forward's jaxpr."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan":
        found.append((eqn.params["length"], eqn.params["unroll"]))
      for value in eqn.params.values():  # the jaxprs a call, jit or remat holds
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          walk(inner)

  walk(jax.make_jaxpr(lambda p: model.apply({"params": p}, _images())["pooled"])(params).jaxpr)
  return found


@pytest.mark.slow
def test_a_stage_scanned_in_groups_computes_the_straight_line_form():
  """The short stage straight-line, the deep one a loop of 2 pairs an iteration plus a remainder pair: values and
  gradients equal the straight-line form's (scan_unroll 0) on one set of params."""
  straight, grouped = swinv2.SwinV2(**PICO, scan_unroll=0), swinv2.SwinV2(**PICO, stage_scan_unrolls=(0, 2))
  params = nn.unbox(jax.jit(straight.init)(jax.random.key(0), _images()))["params"]
  chex.assert_trees_all_equal_shapes_and_dtypes(
    nn.unbox(jax.eval_shape(grouped.init, jax.random.key(0), _images()))["params"], params
  )

  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, _images())["tokens"] ** 2)

  chex.assert_trees_all_close(
    jax.jit(jax.value_and_grad(lambda p: loss(grouped, p)))(params),
    jax.jit(jax.value_and_grad(lambda p: loss(straight, p)))(params),
    atol=1e-5,
    rtol=1e-5,
  )


@pytest.mark.parametrize("stages", [(0, 2), (1, 3), (0, 1)])
def test_each_stage_takes_its_own_form(stages):
  """Each stage's scan is the one a model with that scan_unroll in every stage runs: (0, 2) the short stage
  straight-line, the deep one 2 pairs an iteration; (1, 3) a rolled loop of one trip, the deep one whole."""
  model = swinv2.SwinV2(**PICO, stage_scan_unrolls=stages)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), _images()))["params"]
  per_stage = [_scans(swinv2.SwinV2(**PICO, scan_unroll=unroll), params)[s] for s, unroll in enumerate(stages)]
  assert _scans(model, params) == per_stage != _scans(swinv2.SwinV2(**PICO, scan_unroll=0), params)


def test_stage_scan_unrolls_are_checked():
  with pytest.raises(ValueError, match=r"stage_scan_unrolls=\(0,\): expected one per stage \(2\)"):
    swinv2.SwinV2(**PICO, stage_scan_unrolls=(0,)).stage_settings()
  config = config_lib.load("configs/swinv2_cls.py:demo")
  config = config_lib.set_paths(config, {"model.stage_scan_unrolls": (0, -1, 0, 0)})
  with pytest.raises(ConfigError, match="model.stage_scan_unrolls"):
    config_lib.check(config)
