"""Delayed FP8 scaling (config.precision.gemm=fp8_delayed, models/fp8.py): products within e4m3's and e5m2's bounds at
the scales of the amax histories, the histories' update rule (the newest amax in front, carried as their
cotangents) and which layers keep histories (qkv, fc1, fc2; not the attention's output projection). The train
state's part: tests/integration/test_fp8_delayed_resume.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax.errors import ConfigError
from visionfm_jax.models import fp8, layers, vit
from visionfm_jax.training import checks

from conftest import tiny_vit_config
from test_fp8 import E4M3_TINY, E4M3_U, E5M2_TINY, E5M2_U, _error_bound, _operands


def _history(*amaxes):
  return jnp.zeros((fp8.HISTORY_LENGTH,), jnp.float32).at[: len(amaxes)].set(jnp.asarray(amaxes, jnp.float32))


def test_the_history_records_the_newest_amax_in_front_and_scales_by_its_max():
  history = _history(3.0, 900.0, 5.0)
  updated = fp8.recorded(history, jnp.float32(7.0))
  np.testing.assert_array_equal(updated[:4], [7.0, 3.0, 900.0, 5.0])
  assert updated.shape == history.shape  # the oldest dropped
  full = jnp.arange(1.0, fp8.HISTORY_LENGTH + 1.0)
  np.testing.assert_array_equal(fp8.recorded(full, jnp.float32(0.5)), jnp.concatenate([jnp.array([0.5]), full[:-1]]))
  # a non-finite amax (an overflowing fp16 step) is recorded as 0: it does not set the scales after it
  assert float(fp8.recorded(history, jnp.float32(jnp.inf))[0]) == 0.0
  assert float(fp8.recorded(history, jnp.float32(jnp.nan))[0]) == 0.0
  # the scale of the history's max, a power of two mapping it into the format's range; 1 for an empty history
  assert float(fp8.history_scale(history, fp8.E4M3)) == 4.0  # 900 / 448 -> 2^ceil(log2 2.01)
  assert float(fp8.history_scale(fp8.fresh_history(), fp8.E4M3)) == 1.0
  assert float(fp8.history_scale(_history(1e-3), fp8.E5M2)) == 2.0**-25


def _delayed_vjp(x, w, x_history, g_history):
  return jax.vjp(fp8.delayed_matmul, x, w, x_history, g_history)


def test_delayed_products_are_within_the_fp8_bounds_at_the_historys_scales_and_record_the_new_amaxes():
  """y = q4(x / s_x) q4(w) with s_x from x's history (here 4x x's own max: 2 binades of range unused), dx and dw
  from q5(g / s_g) with s_g from g's; the histories' cotangents are the histories with x's and g's amax in front."""
  x, w = _operands(5, m=64, k=96, n=48)
  x = x / jnp.max(jnp.abs(x)) * 100.0
  g = jnp.asarray(np.random.default_rng(6).standard_normal((64, 48)), jnp.float32) * 1e-3
  x_history, g_history = _history(400.0), _history(2e-3)
  y, vjp = _delayed_vjp(x, w, x_history, g_history)
  x_scale, w_scale = fp8.history_scale(x_history, fp8.E4M3), fp8.scale(w, fp8.E4M3)
  e4m3, e5m2 = (E4M3_U, E4M3_TINY), (E5M2_U, E5M2_TINY)
  assert np.all(np.abs(y - x @ w) <= _error_bound(x, x_scale, e4m3, w, w_scale, e4m3))
  assert not np.allclose(y, x @ w, rtol=1e-4)  # it does quantize
  dx, dw, new_x_history, new_g_history = vjp(g)
  g_scale = fp8.history_scale(g_history, fp8.E5M2)
  assert np.all(np.abs(dx - g @ w.T) <= _error_bound(g, g_scale, e5m2, w.T, w_scale, e4m3))
  assert np.all(np.abs(dw - x.T @ g) <= _error_bound(x.T, x_scale, e4m3, g, g_scale, e5m2))
  np.testing.assert_array_equal(new_x_history, fp8.recorded(x_history, jnp.max(jnp.abs(x))))
  np.testing.assert_array_equal(new_g_history, fp8.recorded(g_history, jnp.max(jnp.abs(g))))


def test_a_value_beyond_the_historys_range_saturates():
  """The history's scale maps 1 to 1 (an amax of 300 fits e4m3's 448): an input of 1000 stays at 448."""
  x = jnp.array([[1000.0, 1.0]])
  w = jnp.eye(2)
  y, _ = _delayed_vjp(x, w, _history(300.0), _history(1.0))
  np.testing.assert_array_equal(y, [[448.0, 1.0]])


def _vit_and_images():
  model = vit.ViT(**vit.parse_variant("pico/4"), num_classes=3)
  return model, jnp.linspace(-1, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3)


@pytest.mark.slow
def test_qkv_fc1_and_fc2_keep_histories_and_the_attention_output_projection_stays_in_the_compute_dtype():
  model, images = _vit_and_images()
  with fp8.gemms(fp8.DELAYED):
    variables = model.init(jax.random.key(0), images)
  histories = variables[fp8.HISTORY]
  depth = vit.parse_variant("pico/4")["depth"]
  assert set(histories["blocks"]) == {"attn", "mlp"}
  assert set(histories["blocks"]["attn"]) == {"qkv"} and set(histories["blocks"]["mlp"]) == {"fc1", "fc2"}
  for layer in (histories["blocks"]["attn"]["qkv"], histories["blocks"]["mlp"]["fc1"]):
    assert {n: a.shape for n, a in layer.items()} == {
      n: (depth, fp8.HISTORY_LENGTH) for n in (fp8.INPUT_HISTORY, fp8.GRAD_HISTORY)
    }
    assert not np.any(layer[fp8.INPUT_HISTORY])
  params = {"params": variables["params"]}
  with fp8.gemms(fp8.DELAYED), pytest.raises(ValueError, match="blocks/attn/qkv: precision.gemm=fp8_delayed needs"):
    model.apply(params, images)  # the step merges them in; nothing else may trace the recipe without them

  delayed = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Dense) and context.method_name == "__call__":
      module = context.module
      delayed.append(("/".join(module.path), module.fp8 and module.fp8_delayed))
    return next_fun(*args, **kwargs)

  with fp8.gemms(fp8.DELAYED), nn.intercept_methods(record):
    y = model.apply({"params": fp8.with_histories(variables["params"], histories)}, images)
  assert {path for path, on in delayed if on} == {"blocks/attn/qkv", "blocks/mlp/fc1", "blocks/mlp/fc2"}
  assert {path for path, on in delayed if not on} == {"blocks/attn/out", "head"}
  # within FP8's error of the compute dtype's (e4m3's 2^-4 relative rounding, averaged over the products' terms)
  features, want = y["tokens"], model.apply(params, images)["tokens"]
  assert 0 < np.linalg.norm(features - want) <= 0.05 * np.linalg.norm(want)


def test_delayed_scaling_with_micro_batches_is_refused_in_one_line():
  with pytest.raises(ConfigError, match=r"^config.precision.gemm=fp8_delayed .* \(config.grad_accum_steps=2\)"):
    checks.validate(tiny_vit_config(**{"precision.gemm": fp8.DELAYED, "grad_accum_steps": 2}))
  checks.validate(tiny_vit_config(**{"precision.gemm": "fp8", "grad_accum_steps": 2}))
