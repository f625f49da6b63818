"""SwinV2's stack forms per stage (`stage_scan_unrolls`): each stage traces the scan its form asks for (a deep stage
in groups of block pairs, the short ones straight-line), and the field is checked; their values and gradients
against the straight-line form: tests/integration/test_swinv2_groups.py."""

import flax.linen as nn
import jax
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
