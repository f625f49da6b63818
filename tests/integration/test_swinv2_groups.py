"""SwinV2's deep stage scanned in groups of block pairs (`stage_scan_unrolls`) against the straight-line form: values
and gradients on the same params, two compiled programs of a backward pass (the forms' scan structure without
compiling: tests/unit/test_swinv2_forms.py)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from visionfm_jax.models import swinv2

from test_swinv2_forms import PICO, _images


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
