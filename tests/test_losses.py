"""CLIP loss: REFERENCE.md's check values, Mixup targets, and the sharded form against the plain one."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from visionfm_jax import losses


def _normalised(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_features():
  rng = np.random.default_rng(0)
  img = _normalised(rng.standard_normal((4, 8)))
  txt = _normalised(rng.standard_normal((4, 8)))
  return jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32)


def test_reference_check_values():
  img, txt = _reference_features()
  np.testing.assert_allclose(losses.clip_loss(img, txt, 1 / 0.07), 6.063571, atol=1e-5)
  assert float(losses.clip_loss(img, img, 100.0)) == pytest.approx(0.0, abs=1e-6)
  np.testing.assert_allclose(losses.clip_loss(img, txt, 0.0), np.log(4), rtol=1e-6)


def test_mixup_targets():
  img, txt = _reference_features()
  # lam = 1 is no Mixup.
  np.testing.assert_allclose(losses.clip_loss(img, txt, 10.0, mix=1.0), losses.clip_loss(img, txt, 10.0), rtol=1e-6)
  # lam = 0: image i is image i-1, so its text is i-1; the loss equals the unmixed loss of rolled images.
  np.testing.assert_allclose(losses.clip_loss(img, txt, 10.0, mix=0.0),
                             losses.clip_loss(img, jnp.roll(txt, 1, axis=0), 10.0), rtol=1e-6)
  # Soft targets: by hand for lam = 0.3.
  lam, logits = 0.3, 10.0 * np.asarray(img) @ np.asarray(txt).T
  t_i2t = lam * np.eye(4) + (1 - lam) * np.roll(np.eye(4), -1, axis=1)
  t_t2i = lam * np.eye(4) + (1 - lam) * np.roll(np.eye(4), 1, axis=1)

  def ce(l, t):
    return -np.mean(np.sum(t * (l - np.log(np.exp(l).sum(1, keepdims=True))), 1))
  expected = 0.5 * (ce(logits, t_i2t) + ce(logits.T, t_t2i))
  np.testing.assert_allclose(losses.clip_loss(img, txt, 10.0, mix=lam), expected, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape,mix", [((2, 4), None), ((1, 8), 0.7), ((8, 1), None)])
def test_sharded_loss_and_gradients_equal_the_single_device_ones(mesh_shape, mix):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), ("data", "fsdp"))
  rng = np.random.default_rng(1)
  img = jnp.asarray(_normalised(rng.standard_normal((32, 16))), jnp.float32)
  txt = jnp.asarray(_normalised(rng.standard_normal((32, 16))), jnp.float32)
  scale = jnp.float32(1 / 0.07)

  def plain(i, t, s):
    return losses.clip_loss(i, t, s, mix=mix)

  def sharded(i, t, s):
    return losses.sharded_clip_loss(i, t, s, mesh, mix=mix)

  batch = NamedSharding(mesh, P(("data", "fsdp")))
  img_s, txt_s = jax.device_put(img, batch), jax.device_put(txt, batch)
  value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(img_s, txt_s, scale)
  ref_value, ref_grads = jax.value_and_grad(plain, argnums=(0, 1, 2))(img, txt, scale)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-6, rtol=1e-5)
  assert grads[0].sharding.is_equivalent_to(batch, 2)


def test_sharded_loss_keeps_logits_local():
  """The compiled sharded loss holds B_local x B_global logits per device, never B x B."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8), ("data", "fsdp"))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  img = jax.device_put(jnp.ones((256, 4)), batch)
  hlo = jax.jit(lambda i, t: losses.sharded_clip_loss(i, t, 1.0, mesh)).lower(img, img).compile().as_text()
  assert "f32[32,256]" in hlo and "f32[256,256]" not in hlo
