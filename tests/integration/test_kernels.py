"""models/kernels.py: every CPU trick against the plain path (values and gradients), the hand-written attention
backward against autodiff of JAX's attention, the choice of forms and its override (one jit cache never holds
both), whole models in both forms, the config errors of the attention names, and the kernel candidates (Pallas's
interpreter on the CPU against the plain path; the Triton kernels a GPU's program gets)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from visionfm_jax import config_lib, models
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import kernels, layers, swinv2, vit

from conftest import params_drawn_by_shape

MODES = ("plain", "cpu")


def _normal(rng, shape):
  return jnp.asarray(rng.normal(size=shape).astype(np.float32))


def _value_and_grads(f, args, argnums):
  """f(*args) and the gradients of sum(sin(f(*args))) with respect to `argnums`, jitted, as every computation
  here: run eagerly, each primitive of each shape would compile a program of its own."""
  grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=argnums)
  return jax.jit(lambda *a: (f(*a), grads(*a)))(*args)


def _grad_of_broadcast(b):
  return jax.grad(lambda b: jnp.sum(jnp.cos(kernels.broadcast_leading(b, (4,) + b.shape))))(b)


def test_the_forms_are_the_lowering_platforms_unless_forced_and_bad_forms_are_named():
  """Unforced, a program lowered for the CPU takes the CPU form (the bias gradient as a ones-vector matmul) and
  one lowered for a GPU the plain one (XLA's reduction), whatever backend this process has."""
  traced = jax.jit(_grad_of_broadcast).trace(jnp.ones((3, 2)))
  cpu, gpu = (traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda"))
  assert "dot_general" in cpu and "dot_general" not in gpu and "reduce" in gpu
  with pytest.raises(ValueError, match="'fast'.*plain.*cpu"):
    kernels.forced("fast")


def test_forcing_the_forms_retraces_a_jitted_function_instead_of_reusing_the_other_trace():
  """The override is part of jit's cache key: one jitted function gives the plain program under 'plain' and the
  CPU one under 'cpu', in any order, and traces once per choice."""
  traces = []

  @jax.jit
  def grad_of_broadcast(b):
    traces.append(kernels.forced_forms())
    return _grad_of_broadcast(b)

  b = jnp.ones((3, 2))
  programs = {}
  for mode in ("cpu", "plain", "cpu", "plain"):
    with kernels.forced(mode):
      grad_of_broadcast(b)
      programs[mode] = grad_of_broadcast.lower(b).as_text()
  assert traces == ["cpu", "plain"]
  assert "dot_general" in programs["cpu"] and "dot_general" not in programs["plain"]


@pytest.mark.parametrize("x_shape,kernel_shape,num_axes", [((2, 5, 6), (6, 3, 2, 4), 1), ((2, 5, 3, 4), (3, 4, 6), 2)])
def test_contract_trailing_as_one_matmul_is_the_dot_general(x_shape, kernel_shape, num_axes):
  rng = np.random.default_rng(0)
  args = (_normal(rng, x_shape), _normal(rng, kernel_shape), _normal(rng, kernel_shape[num_axes:]))
  trailing = tuple(range(len(x_shape) - num_axes, len(x_shape)))
  dot_general = lambda x, w, b: jax.lax.dot_general(x, w, ((trailing, tuple(range(num_axes))), ((), ()))) + b
  ours = lambda x, w, b: kernels.flat_dense(x, w, b, num_axes)
  chex.assert_trees_all_close(
    _value_and_grads(ours, args, (0, 1, 2)), _value_and_grads(dot_general, args, (0, 1, 2)), atol=1e-5
  )
  with pytest.raises(ValueError, match="do not match"):
    kernels.contract_trailing(args[0], args[1][1:], num_axes)


def test_broadcast_leading_gradient_is_the_sum():
  rng = np.random.default_rng(3)
  x, b = _normal(rng, (4, 6, 3)), _normal(rng, (6, 3))

  def grad_and_sum(broadcast, sum_leading):
    grad = jax.grad(lambda b, x: jnp.sum(jnp.cos(broadcast(b, x.shape) * x)))
    return jax.jit(lambda b, x: (grad(b, x), sum_leading(x, 2)))(b, x)

  expected = grad_and_sum(jnp.broadcast_to, lambda x, n: jnp.sum(x, axis=tuple(range(n))))
  for mode in MODES:
    with kernels.forced(mode):
      chex.assert_trees_all_close(grad_and_sum(kernels.broadcast_leading, kernels.sum_leading), expected, atol=1e-5)
      with pytest.raises(ValueError, match="not a suffix"):
        kernels.broadcast_leading(b, (6, 4))
  chex.assert_trees_all_close(jax.jit(kernels.sum_leading_as_matmul, static_argnums=1)(x, 2), expected[1], atol=1e-5)


@pytest.mark.parametrize("image_hw,patch", [((8, 12), 4), ((6, 6), 3)])
def test_patch_conv_as_matmul_is_the_strided_convolution(image_hw, patch):
  rng = np.random.default_rng(1)
  images = _normal(rng, (2, *image_hw, 3))
  conv = nn.Conv(5, (patch, patch), strides=(patch, patch), padding="VALID", conv_general_dilated=kernels.patch_conv)
  params = conv.init(jax.random.key(0), images)
  forms = {}
  for mode in MODES:
    with kernels.forced(mode):
      forms[mode] = _value_and_grads(conv.apply, (params, images), (0, 1))
  chex.assert_trees_all_close(forms["cpu"], forms["plain"], atol=1e-5)


def test_patch_conv_as_matmul_leaves_other_convolutions_to_xla():
  rng = np.random.default_rng(2)
  images = _normal(rng, (1, 7, 7, 2))
  conv = nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME", conv_general_dilated=kernels.patch_conv)
  params = conv.init(jax.random.key(0), images)
  with kernels.forced("cpu"):
    cpu = conv.apply(params, images)
  chex.assert_trees_all_close(
    cpu,
    jax.lax.conv_general_dilated(
      images, params["params"]["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + params["params"]["bias"],
    atol=1e-6,
  )


def _reference_attention(q, k, v, bias, mask):
  """jax.nn.dot_product_attention (XLA, autodiff) on our (..., H, T, D) layout with q pre-scaled."""
  to_bthd = lambda t: jnp.swapaxes(t, 1, 2)
  out = jax.nn.dot_product_attention(
    to_bthd(q), to_bthd(k), to_bthd(v), bias=bias, mask=mask, scale=1.0, implementation="xla"
  )
  return to_bthd(out)


@pytest.mark.parametrize("mode", MODES)
def test_softmax_attention_matches_jax_forward_and_gradients(mode):
  rng = np.random.default_rng(0)
  q, k, v = (_normal(rng, (2, 3, 7, 4)) for _ in range(3))
  bias = _normal(rng, (3, 7, 7))
  mask = jnp.asarray(rng.random((2, 1, 7, 7)) > 0.3).at[..., 0].set(True)
  ours = lambda q, k, v, b: kernels.softmax_attention(q, k, v, bias=b, mask=mask)
  theirs = lambda q, k, v, b: _reference_attention(q, k, v, jnp.broadcast_to(b, (2, 3, 7, 7)), mask)
  with kernels.forced(mode):
    out, grads = _value_and_grads(ours, (q, k, v, bias), (0, 1, 2, 3))
  expected_out, expected = _value_and_grads(theirs, (q, k, v, bias), (0, 1, 2, 3))
  chex.assert_trees_all_close(out, expected_out, atol=1e-6)
  chex.assert_trees_all_close(grads, expected, atol=2e-6)


@pytest.mark.parametrize("mode", MODES)
def test_softmax_attention_numerical_gradients(mode):
  rng = np.random.default_rng(1)
  q, k, v = (_normal(rng, (2, 2, 5, 3)) for _ in range(3))
  bias = _normal(rng, (2, 2, 5, 5))
  with kernels.forced(mode):
    check_grads(
      jax.jit(lambda q, k, v, b: kernels.softmax_attention(q, k, v, bias=b)),
      (q, k, v, bias),
      order=1,
      modes=["rev"],
      atol=1e-2,
      rtol=1e-2,
    )
    check_grads(
      jax.jit(lambda q, k, v: kernels.softmax_attention(q, k, v)),
      (q, k, v),
      order=1,
      modes=["rev"],
      atol=1e-2,
      rtol=1e-2,
    )


def test_softmax_attention_rejects_a_bias_of_the_wrong_shape():
  q = jnp.zeros((2, 3, 5, 4))
  with pytest.raises(ValueError, match="attention bias"):
    kernels.softmax_attention(q, q, q, bias=jnp.zeros((3, 5, 4)))


@pytest.mark.slow
@pytest.mark.parametrize(
  "model,image_size",
  [
    (vit.ViT(**vit.parse_variant("pico/4"), num_classes=5), 16),
    # one stage (a plain and a shifted block): the patch merging's dense and norm are the blocks' layers again
    (swinv2.SwinV2(16, (2,), (2,), window_size=2, patch_size=2, image_size=8, num_classes=5, scan=False), 8),
  ],
  ids=["vit", "swinv2"],
)
def test_models_compute_the_same_in_both_forms(model, image_size):
  """The forms change how, never what: same params, logits and gradients with every trick on or off."""
  images = _normal(np.random.default_rng(4), (2, image_size, image_size, 3))
  # Drawn by shape (no init compile): the init's zero head would zero every gradient but its own.
  params = {"params": params_drawn_by_shape(lambda: model.init(jax.random.key(0), images)["params"])}
  logits = lambda p: model.apply(p, images)["logits"]
  logits_and_grads = jax.jit(lambda p: (logits(p), jax.grad(lambda p: jnp.sum(jnp.sin(logits(p))))(p)))
  forms = {}
  for mode in MODES:
    with kernels.forced(mode):
      forms[mode] = logits_and_grads(params)
  chex.assert_trees_all_close(forms["cpu"], forms["plain"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,field", [("vit", "attention"), ("swinv2", "attention"), ("clip", "text.attention")])
def test_an_unknown_attention_gets_a_config_error_naming_the_field_and_the_choices(family, field):
  model_cfg = config_lib.model_config(family)
  node = model_cfg.text if field.startswith("text.") else model_cfg
  node.attention = "xla"
  with pytest.raises(ConfigError, match=f"{field}='xla'.*auto.*softmax.*cudnn.*jax"):
    models.build(model_cfg, jnp.float32, "cpu")


# ------------------------------------------------------------------------------------------ kernel candidates


def _layer_norm_loss_and_grads(ln, params, x):
  def loss(p, x):
    return jnp.sum(jnp.sin(ln.apply(p, x).astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize(
  "dtype,shape,tol",
  [(jnp.float32, (2, 3, 4, 40), 2e-5), (jnp.bfloat16, (3, 5, 40), 2e-2)],
  ids=["fp32_maps", "bf16_tokens"],
)
def test_the_pallas_layer_norm_candidate_computes_the_layer_norm(dtype, shape, tol):
  """layers.LayerNorm under kernels.trying('pallas_layer_norm'), run by Pallas's interpreter here, against the
  plain path: its value and the gradients of its params and input (bf16: to bf16's rounding, as the kernel keeps
  its statistics for the backward in bf16)."""
  rng = np.random.default_rng(0)
  ln = layers.LayerNorm(1e-6, dtype)
  x = jnp.asarray(rng.normal(1.0, 2.0, shape), dtype)
  params = jax.tree.map(
    lambda p: p + jnp.asarray(rng.normal(0.0, 0.3, p.shape), p.dtype), ln.init(jax.random.key(0), x)
  )
  plain = _layer_norm_loss_and_grads(ln, params, x)
  with kernels.trying([kernels.PALLAS_LAYER_NORM]):
    assert "pallas_call" in str(jax.make_jaxpr(ln.apply)(params, x))
    tried = _layer_norm_loss_and_grads(ln, params, x)
  for got, want in zip(jax.tree.leaves(tried), jax.tree.leaves(plain)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=0)


def test_a_gpu_program_gets_the_candidates_triton_kernels_and_bad_candidates_are_named():
  """Lowered for a GPU, the tried LayerNorm is three Triton kernels (forward; dx; dscale and dbias) and none in
  a CPU program or untried; an output dtype other than the input's keeps the plain form."""

  def grads(x, s, b, dtype=jnp.bfloat16):
    return jax.grad(lambda *a: jnp.sum(kernels.layer_norm(*a, 1e-6, dtype).astype(jnp.float32)), (0, 1, 2))(x, s, b)

  args = (jnp.ones((2, 3, 64), jnp.bfloat16), jnp.ones(64), jnp.zeros(64))

  def triton_calls(fn, platform):
    return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text().count("custom_call @__gpu$xla.gpu.triton")

  with kernels.trying([kernels.PALLAS_LAYER_NORM]):
    assert triton_calls(jax.jit(grads), "cuda") == 3 and triton_calls(jax.jit(grads), "cpu") == 0
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: grads(*a, dtype=jnp.float32))(*args))
  assert triton_calls(jax.jit(grads), "cuda") == 0
  with pytest.raises(ValueError, match="fused_adamw is not a kernel candidate; the candidates: pallas_layer_norm"):
    kernels.trying(["fused_adamw"])
