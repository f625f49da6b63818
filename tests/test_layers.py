"""The CPU-fast building blocks of models/layers.py against JAX's and flax's own implementations: attention
with its hand-written backward, GELU, Dense, LayerNorm and the broadcast whose gradient is a matmul."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from visionfm_jax.models import layers


def _normal(rng, shape):
  return jnp.asarray(rng.normal(size=shape).astype(np.float32))


def _reference_attention(q, k, v, bias, mask):
  """jax.nn.dot_product_attention (XLA) on our (..., H, T, D) layout with q pre-scaled."""
  to_bthd = lambda t: jnp.swapaxes(t, 1, 2)
  out = jax.nn.dot_product_attention(to_bthd(q), to_bthd(k), to_bthd(v), bias=bias, mask=mask, scale=1.0,
                                     implementation="xla")
  return to_bthd(out)


def test_softmax_attention_matches_jax_forward_and_gradients():
  rng = np.random.default_rng(0)
  q, k, v = (_normal(rng, (2, 3, 7, 4)) for _ in range(3))
  bias = _normal(rng, (3, 7, 7))
  mask = jnp.asarray(rng.random((2, 1, 7, 7)) > 0.3).at[..., 0].set(True)
  ours = lambda q, k, v, b: layers.softmax_attention(q, k, v, bias=b, mask=mask)
  theirs = lambda q, k, v, b: _reference_attention(q, k, v, jnp.broadcast_to(b, (2, 3, 7, 7)), mask)
  chex.assert_trees_all_close(ours(q, k, v, bias), theirs(q, k, v, bias), atol=1e-6)
  loss = lambda f: lambda *args: jnp.sum(jnp.sin(f(*args)))
  grads = jax.grad(loss(ours), argnums=(0, 1, 2, 3))(q, k, v, bias)
  expected = jax.grad(loss(theirs), argnums=(0, 1, 2, 3))(q, k, v, bias)
  chex.assert_trees_all_close(grads, expected, atol=2e-6)


def test_softmax_attention_numerical_gradients():
  rng = np.random.default_rng(1)
  q, k, v = (_normal(rng, (2, 2, 5, 3)) for _ in range(3))
  bias = _normal(rng, (2, 2, 5, 5))
  check_grads(lambda q, k, v, b: layers.softmax_attention(q, k, v, bias=b), (q, k, v, bias), order=1,
              modes=["rev"], atol=1e-2, rtol=1e-2)
  check_grads(lambda q, k, v: layers.softmax_attention(q, k, v), (q, k, v), order=1, modes=["rev"],
              atol=1e-2, rtol=1e-2)


def test_softmax_attention_rejects_a_bias_of_the_wrong_shape():
  q = jnp.zeros((2, 3, 5, 4))
  with pytest.raises(ValueError, match="attention bias"):
    layers.softmax_attention(q, q, q, bias=jnp.zeros((3, 5, 4)))


def test_dot_product_attention_causal_matches_jax():
  rng = np.random.default_rng(2)
  q, k, v = (_normal(rng, (2, 6, 3, 4)) for _ in range(3))
  ours = layers.dot_product_attention(q, k, v, causal=True)
  theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  chex.assert_trees_all_close(ours, theirs, atol=1e-6)


def test_broadcast_leading_gradient_is_the_sum():
  rng = np.random.default_rng(3)
  x, b = _normal(rng, (4, 6, 3)), _normal(rng, (6, 3))
  grad = jax.grad(lambda b: jnp.sum(jnp.cos(layers.broadcast_leading(b, x.shape) * x)))(b)
  expected = jax.grad(lambda b: jnp.sum(jnp.cos(jnp.broadcast_to(b, x.shape) * x)))(b)
  chex.assert_trees_all_close(grad, expected, atol=1e-5)
  chex.assert_trees_all_close(layers.sum_leading(x, 2), jnp.sum(x, axis=(0, 1)), atol=1e-5)
  with pytest.raises(ValueError, match="not a suffix"):
    layers.broadcast_leading(b, (6, 4))


def test_gelu_is_the_exact_gelu():
  x = jnp.linspace(-8.0, 8.0, 401)
  chex.assert_trees_all_close(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  chex.assert_trees_all_close(jax.vmap(jax.grad(layers.gelu))(x),
                              jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x), atol=1e-6)


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
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(ours.apply(p, x))))(params)
  expected = jax.grad(lambda p: jnp.sum(jnp.sin(flax_ln.apply({"params": p["params"]["ln"]}, x))))(params)
  chex.assert_trees_all_close(grads, expected, atol=1e-4)
