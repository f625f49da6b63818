"""The building blocks of models/layers.py against JAX's and flax's own implementations: attention, Dense,
LayerNorm. The kernels themselves are tested in test_kernels.py."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax.models import kernels, layers

from conftest import assert_trees_close_to_scale


def _normal(rng, shape):
  return jnp.asarray(rng.normal(size=shape).astype(np.float32))


def test_dot_product_attention_causal_matches_jax():
  rng = np.random.default_rng(2)
  q, k, v = (_normal(rng, (2, 6, 3, 4)) for _ in range(3))
  ours = kernels.attention(q, k, v, causal=True)
  theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  chex.assert_trees_all_close(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("features,axis", [(5, -1), ((3, 2, 4), -1), (6, (-2, -1))])
def test_dense_has_flax_dense_generals_params_and_outputs(features, axis):
  x = _normal(np.random.default_rng(4), (2, 7, 3, 4))
  inits = dict(kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.normal(0.5))
  ours = layers.Dense(features, axis=axis, **inits)
  flax_dense = nn.DenseGeneral(features, axis=axis, **inits)
  params = ours.init(jax.random.key(0), x)
  chex.assert_trees_all_close(params, flax_dense.init(jax.random.key(0), x))  # same names, shapes, init
  chex.assert_trees_all_close(ours.apply(params, x), flax_dense.apply(params, x), atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(params)
  expected = jax.grad(lambda p: jnp.sum(flax_dense.apply(p, x) ** 2))(params)
  chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-4)


def test_separate_projections_are_the_slices_of_the_fused_one():
  """q, k, v as three products of one (C, 3, heads, head_dim) kernel: the same params and numbers as the fused
  product sliced, values and gradients."""
  x = _normal(np.random.default_rng(5), (2, 7, 6))
  inits = dict(kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.normal(0.5))
  fused, apart = layers.Dense((3, 2, 4), **inits), layers.Dense((3, 2, 4), separate=True, **inits)
  params = fused.init(jax.random.key(0), x)
  chex.assert_trees_all_close(apart.init(jax.random.key(0), x), params)
  sliced = lambda p: tuple(fused.apply(p, x)[:, :, i] for i in range(3))
  chex.assert_trees_all_close(apart.apply(params, x), sliced(params), atol=1e-6)
  loss = lambda f: lambda p: sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(f(p)))
  chex.assert_trees_all_close(
    jax.grad(loss(lambda p: apart.apply(p, x)))(params), jax.grad(loss(sliced))(params), atol=1e-5
  )


def test_attention_masks_keys_past_kv_length_as_if_they_were_not_there():
  rng = np.random.default_rng(6)
  q, k, v = (_normal(rng, (2, 8, 3, 4)) for _ in range(3))
  for implementation in ("softmax", "jax"):
    padded = kernels.attention(q, k, v, implementation=implementation, kv_length=5)
    real = kernels.attention(q[:, :5], k[:, :5], v[:, :5], implementation=implementation)
    chex.assert_trees_all_close(padded[:, :5], real, atol=1e-6)


def test_vit_padded_once_for_its_attention_equals_the_unpadded_vit(monkeypatch):
  """The token padding a ViT carries through its blocks for cuDNN (even counts), forced here on the softmax path
  (17 tokens padded to 20): logits and gradients as without padding."""
  from visionfm_jax.models import vit  # pylint: disable=g-import-not-at-top

  model = vit.ViT(**vit.parse_variant("pico/8"), num_classes=5, image_size=32, attention="softmax")
  images = _normal(np.random.default_rng(7), (2, 32, 32, 3))
  params = jax.jit(lambda: jax.tree.map(lambda a: a + 0.01, model.init(jax.random.key(0), images)))()

  def logits_and_grads():
    logits = lambda p: model.apply(p, images)["logits"]
    return jax.jit(lambda p: (logits(p), jax.grad(lambda p: jnp.sum(jnp.sin(logits(p))))(p)))(params)

  expected = logits_and_grads()
  monkeypatch.setattr(kernels, "token_multiple", lambda implementation: 4)
  (logits, grads), (expected_logits, expected_grads) = logits_and_grads(), expected
  assert_trees_close_to_scale(logits, expected_logits, rtol=1e-5)
  assert_trees_close_to_scale(grads, expected_grads, rtol=1e-5)


def test_dense_contracts_trailing_axes_only():
  with pytest.raises(ValueError, match="trailing axes"):
    layers.Dense(4, axis=0).init(jax.random.key(0), jnp.zeros((3, 5)))


def test_layer_norm_matches_flax():
  rng = np.random.default_rng(5)
  x = _normal(rng, (3, 5, 8)) * 3 + 1
  ours = layers.LayerNorm(1e-6)
  params = nn.unbox(ours.init(jax.random.key(0), x))
  params = jax.tree.map(lambda p: p + _normal(rng, p.shape), params)
  flax_ln = nn.LayerNorm(1e-6, use_fast_variance=False)
  chex.assert_trees_all_close(ours.apply(params, x), flax_ln.apply({"params": params["params"]["ln"]}, x), atol=1e-5)
  grads = jax.grad(lambda p, t: jnp.sum(jnp.sin(ours.apply(p, t))), (0, 1))(params, x)
  expected = jax.grad(lambda p, t: jnp.sum(jnp.sin(flax_ln.apply({"params": p["params"]["ln"]}, t))), (0, 1))(params, x)
  chex.assert_trees_all_close(grads, expected, atol=1e-4)


def test_layer_norms_written_backward_keeps_the_forwards_row_statistics():
  """The backward (kernels._layer_norm_bwd) is autodiff's gradient of the textbook form in fp32, for x, scale
  and bias, from a bf16 input too; it keeps x and two numbers a row, behind an optimization barrier in the
  lowered program (without it XLA recomputes them inside the backward's fusions: kernels.py)."""
  rng = np.random.default_rng(7)
  x, scale, bias, w = (_normal(rng, shape) for shape in ((2, 3, 5, 16), (16,), (16,), (2, 3, 5, 16)))
  x = x * 3 + 1

  def textbook(t, s, b):
    t = t.astype(jnp.float32)
    centered = t - jnp.mean(t, axis=-1, keepdims=True)
    return centered / jnp.sqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + 1e-6) * s + b

  ours = lambda t, s, b: kernels.layer_norm(t, s, b, 1e-6, jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * w)
  for t in (x, x.astype(jnp.bfloat16)):
    chex.assert_trees_all_close(ours(t, scale, bias), textbook(t, scale, bias), atol=1e-5)
    got, want = (jax.grad(loss(f), (0, 1, 2))(t, scale, bias) for f in (ours, textbook))
    assert got[0].dtype == t.dtype
    chex.assert_trees_all_close(
      jax.tree.map(lambda g: g.astype(jnp.float32), got),
      jax.tree.map(lambda g: g.astype(jnp.float32), want),
      atol=1e-4 if t is x else 1e-2,
    )
  residuals = [r.shape for r in jax.tree.leaves(jax.vjp(ours, x, scale, bias)[1])]
  assert sorted(residuals) == sorted([x.shape, (2, 3, 5, 1), (2, 3, 5, 1), (16,), (16,)])
  lowered = jax.jit(jax.grad(loss(ours), (0, 1, 2))).trace(x, scale, bias).lower(lowering_platforms=("cuda",))
  assert "optimization_barrier" in lowered.as_text()


def test_mlp_is_two_dense_layers_around_the_exact_gelu():
  x = _normal(np.random.default_rng(6), (2, 3, 4))
  mlp = layers.Mlp(6)
  params = nn.unbox(mlp.init(jax.random.key(0), x))["params"]
  dense = lambda p, t: t @ p["kernel"] + p["bias"]
  expected = dense(params["fc2"], jax.nn.gelu(dense(params["fc1"], x), approximate=False))
  chex.assert_trees_all_close(mlp.apply({"params": params}, x), expected, atol=1e-6)


def test_gelus_backward_keeps_only_its_input_and_is_autodiffs_slope():
  """`layers.gelu` is jax.nn.gelu's exact GELU, value for value; its backward keeps x alone (autodiff keeps the
  erfc and exp terms too) and gives autodiff's gradient in fp32, and in bf16 one within bf16's rounding of the
  exact slope, where autodiff's bf16 constants and products are off by up to twice that."""
  x = np.linspace(-8.0, 8.0, 4001, dtype=np.float32)
  reference = lambda t: jax.nn.gelu(t, approximate=False)
  np.testing.assert_array_equal(layers.gelu(jnp.asarray(x)), reference(jnp.asarray(x)))
  residuals = lambda f, t: [r.shape for r in jax.tree.leaves(jax.vjp(f, t)[1])]
  assert residuals(layers.gelu, jnp.asarray(x)) == [x.shape]
  assert len(residuals(reference, jnp.asarray(x))) > 1
  grad = lambda f, t: jax.grad(lambda u: jnp.sum(jnp.sin(f(u).astype(jnp.float32))))(t)
  np.testing.assert_allclose(grad(layers.gelu, jnp.asarray(x)), grad(reference, jnp.asarray(x)), rtol=1e-6, atol=1e-6)
  slope = lambda f, t: jax.grad(lambda u: jnp.sum(f(u).astype(jnp.float32)))(t).astype(jnp.float32)
  x16 = jnp.asarray(x, jnp.bfloat16)
  exact = slope(reference, x16.astype(jnp.float32))
  ours, autodiffs = (np.abs(slope(f, x16) - exact).max() for f in (layers.gelu, reference))
  assert ours <= 2.0**-8 * np.abs(exact).max() < autodiffs


@pytest.mark.parametrize("act", sorted(layers.ACTIVATIONS))
def test_each_activation_is_the_one_transformers_names_so(act):
  """Our activation names are transformers' (ACT2FN), and each computes what transformers' does, in fp32:
  'gelu_pytorch_tanh' (an opt-in GPU candidate) is torch's tanh approximation, not the exact GELU."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.activations import ACT2FN  # pylint: disable=g-import-not-at-top

  x = np.linspace(-8.0, 8.0, 2001, dtype=np.float32)
  want = ACT2FN[act](torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(layers.ACTIVATIONS[act](jnp.asarray(x))), want, rtol=1e-6, atol=1e-6)
  if act == "gelu_pytorch_tanh":
    exact = np.asarray(layers.ACTIVATIONS["gelu"](jnp.asarray(x)))
    assert 1e-4 < np.abs(want - exact).max() < 1e-2  # the math it changes


def test_the_attention_saving_remat_policy_keeps_cudnns_forward_and_otherwise_is_its_base():
  """cuDNN's forward primitives, as the installed jax names them (a renaming fails here, not silently in a GPU
  plan), are kept; any other program (here a dense layer and the softmax path, as on a CPU) remats exactly as
  under dots_with_no_batch_dims_saveable."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top

  saving = layers.REMAT_POLICIES["dots_with_no_batch_dims_and_attention_saveable"]
  assert all(saving(p) for p in (cudnn._dot_product_attention_fwd_p_wrapper, cudnn._dot_product_attention_fwd_p))
  assert not saving(cudnn._dot_product_attention_bwd_p_wrapper)
  rng = np.random.default_rng(5)
  x, w = _normal(rng, (2, 6, 8)), _normal(rng, (8, 24))

  def block(x, w):
    q, k, v = jnp.split(x @ w, 3, axis=-1)
    heads = lambda t: t.reshape(2, 6, 2, 4)
    return jnp.sum(jnp.tanh(kernels.attention(heads(q), heads(k), heads(v))) ** 2)

  def backward(policy):  # the gradient's program, but the name of its remat policy
    jaxpr = jax.make_jaxpr(jax.grad(jax.checkpoint(block, policy=layers.REMAT_POLICIES[policy]), argnums=1))(x, w)
    return re.sub(r"policy=.*", "", str(jaxpr))

  assert backward("dots_with_no_batch_dims_and_attention_saveable") == backward("dots_with_no_batch_dims_saveable")
  assert backward("dots_with_no_batch_dims_saveable") != backward("nothing_saveable")
