"""Losses: CLIP (REFERENCE.md's check values, Mixup targets, the sharded form against the plain one), captioning
and SimMIM's masked L1."""

import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from visionfm_jax.losses import image_text as losses
from visionfm_jax.losses import pixels

from conftest import assert_trees_close_to_scale


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
  np.testing.assert_allclose(
    losses.clip_loss(img, txt, 10.0, mix=0.0), losses.clip_loss(img, jnp.roll(txt, 1, axis=0), 10.0), rtol=1e-6
  )
  # Soft targets: by hand for lam = 0.3.
  lam, logits = 0.3, 10.0 * np.asarray(img) @ np.asarray(txt).T
  t_i2t = lam * np.eye(4) + (1 - lam) * np.roll(np.eye(4), -1, axis=1)
  t_t2i = lam * np.eye(4) + (1 - lam) * np.roll(np.eye(4), 1, axis=1)

  def ce(l, t):
    return -np.mean(np.sum(t * (l - np.log(np.exp(l).sum(1, keepdims=True))), 1))

  expected = 0.5 * (ce(logits, t_i2t) + ce(logits.T, t_t2i))
  np.testing.assert_allclose(losses.clip_loss(img, txt, 10.0, mix=lam), expected, rtol=1e-5)


def test_uncaptioned_examples_leave_the_contrastive_loss():
  """With a captioned mask the loss and its gradients are those of the captioned examples alone; the others
  get no gradient, and a batch with no caption has loss 0."""
  rng = np.random.default_rng(2)
  img = jnp.asarray(_normalised(rng.standard_normal((12, 8))), jnp.float32)
  txt = jnp.asarray(_normalised(rng.standard_normal((12, 8))), jnp.float32)
  valid = np.zeros(12, bool)
  valid[[0, 3, 4, 7, 11]] = True
  # jitted: op by op, every primitive of the loss and its gradient compiles on its own
  masked = jax.jit(jax.value_and_grad(lambda i, t: losses.clip_loss(i, t, 10.0, valid=valid), argnums=(0, 1)))(img, txt)
  subset = jax.jit(jax.value_and_grad(lambda i, t: losses.clip_loss(i, t, 10.0), argnums=(0, 1)))(
    img[valid], txt[valid]
  )
  np.testing.assert_allclose(masked[0], subset[0], rtol=1e-6)
  for got, want in zip(masked[1], subset[1]):
    np.testing.assert_allclose(got[valid], want, atol=1e-7)
    np.testing.assert_array_equal(got[~valid], 0.0)
  assert float(losses.clip_loss(img, txt, 10.0, valid=np.zeros(12, bool))) == 0.0


def test_mixup_with_an_uncaptioned_partner_keeps_the_own_target():
  """Image i mixed with uncaptioned image i-1: its text targets are text i alone (renormalised)."""
  rng = np.random.default_rng(3)
  img = jnp.asarray(_normalised(rng.standard_normal((6, 8))), jnp.float32)
  txt = jnp.asarray(_normalised(rng.standard_normal((6, 8))), jnp.float32)
  valid = np.array([True, True, False, True, True, True])
  logits = 10.0 * np.asarray(img) @ np.asarray(txt).T
  lam = 0.3

  def direction(logits, shift):
    total, rows = 0.0, 0
    for r in np.flatnonzero(valid):
      targets = np.zeros(6)
      targets[r] += lam
      if valid[(r + shift) % 6]:
        targets[(r + shift) % 6] += 1 - lam
      cols = logits[r, valid] - np.log(np.sum(np.exp(logits[r, valid])))
      total -= np.sum(targets[valid] / targets.sum() * cols)
      rows += 1
    return total / rows

  expected = 0.5 * (direction(logits, -1) + direction(logits.T, +1))
  np.testing.assert_allclose(losses.clip_loss(img, txt, 10.0, mix=lam, valid=valid), expected, rtol=1e-5)


@pytest.mark.parametrize(
  "mesh_shape,mix,masked",
  [((2, 4), None, False), ((1, 8), 0.7, False), ((8, 1), None, False), ((2, 4), None, True), ((1, 8), 0.7, True)],
)
def test_sharded_loss_and_gradients_equal_the_single_device_ones(mesh_shape, mix, masked):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), ("data", "fsdp"))
  rng = np.random.default_rng(1)
  img = jnp.asarray(_normalised(rng.standard_normal((32, 16))), jnp.float32)
  txt = jnp.asarray(_normalised(rng.standard_normal((32, 16))), jnp.float32)
  scale = jnp.float32(1 / 0.07)

  valid = rng.random(32) < 0.6 if masked else None

  def plain(i, t, s):
    return losses.clip_loss(i, t, s, mix=mix, valid=valid)

  def sharded(i, t, s):
    return losses.sharded_clip_loss(i, t, s, mesh, mix=mix, valid=valid)

  batch = NamedSharding(mesh, P(("data", "fsdp")))
  img_s, txt_s = jax.device_put(img, batch), jax.device_put(txt, batch)
  value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(img_s, txt_s, scale)
  ref_value, ref_grads = jax.value_and_grad(plain, argnums=(0, 1, 2))(img, txt, scale)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  assert_trees_close_to_scale(grads, ref_grads, rtol=1e-5)
  assert grads[0].sharding.is_equivalent_to(batch, 2)


HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (\([^=]*?\)|\w+\[[\d,]*\])\S* ([\w-]+)\(", re.M)


def hlo_ops(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
  """(opcode, shapes of its result (several for a tuple)) of every instruction of an HLO module's text, fused
  computations included."""
  out = []
  for result, opcode in HLO_INSTRUCTION.findall(hlo):
    out.append(
      (opcode, [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", result)])
    )
  return out


def test_sharded_loss_keeps_logits_local():
  """The compiled sharded loss holds B_local x B_global logits per device, never B x B: its two logit matmuls
  (both directions) give 32 x 256 on each of 8 devices, the devices gather the 256 x 4 features (not logits),
  and no value of the per-device program is larger than one block of logits."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8), ("data", "fsdp"))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  img = jax.device_put(jnp.ones((256, 4)), batch)
  hlo = jax.jit(lambda i, t: losses.sharded_clip_loss(i, t, 1.0, mesh)).lower(img, img).compile().as_text()
  ops = hlo_ops(hlo)
  assert len(ops) > 50  # the parser reads the program
  assert [shapes for opcode, shapes in ops if opcode == "dot"] == [[(32, 256)], [(32, 256)]]
  assert [shapes for opcode, shapes in ops if opcode == "all-gather"] == [[(256, 4)], [(256, 4)]]
  assert max(math.prod(shape) for _, shapes in ops for shape in shapes) == 32 * 256


# --- captioning -----------------------------------------------------------------------------------------

CAPTION_LABELS = np.array([[3, 4, 10, 0, 0], [7, 1, 2, 5, 10]])


def test_caption_reference_check_values():
  rng = np.random.default_rng(0)
  img = _normalised(rng.standard_normal((4, 8)))
  txt = _normalised(rng.standard_normal((4, 8)))
  logits = jnp.asarray(rng.standard_normal((2, 5, 11)), jnp.float32)
  np.testing.assert_allclose(2 * losses.caption_loss(logits, CAPTION_LABELS), 4.930390, atol=1e-5)
  np.testing.assert_allclose(
    losses.clip_loss(jnp.asarray(img[:2], jnp.float32), jnp.asarray(txt[:2], jnp.float32), 1 / 0.07),
    5.150964,
    atol=1e-5,
  )
  total, count = losses.caption_loss_terms(logits, CAPTION_LABELS)
  assert total.dtype == count.dtype == jnp.float32 and float(count) == 8
  # Uniform logits: ln V per token, whatever the input dtype.
  uniform = jnp.zeros((2, 3, 32000), jnp.bfloat16)
  np.testing.assert_allclose(losses.caption_loss(uniform, jnp.ones((2, 3), jnp.int32)), np.log(32000), rtol=1e-6)
  np.testing.assert_allclose(np.log(32000), 10.3735, atol=1e-4)
  # All padding: 0, not NaN.
  assert float(losses.caption_loss(logits, jnp.zeros((2, 5), jnp.int32))) == 0.0


def test_caption_loss_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((4, 9, 50)).astype(np.float32) * 3
  labels = rng.integers(0, 50, (4, 9))
  labels[:, 6:] = 0  # padding tails
  labels[1, 2] = 0
  want = torch.nn.functional.cross_entropy(
    torch.from_numpy(logits).reshape(-1, 50), torch.from_numpy(labels).reshape(-1), ignore_index=0
  )
  np.testing.assert_allclose(losses.caption_loss(jnp.asarray(logits), jnp.asarray(labels)), want.item(), rtol=1e-5)
  # Another pad id.
  labels[labels == 0] = 7
  want = torch.nn.functional.cross_entropy(
    torch.from_numpy(logits).reshape(-1, 50), torch.from_numpy(labels).reshape(-1), ignore_index=7
  )
  np.testing.assert_allclose(
    losses.caption_loss(jnp.asarray(logits), jnp.asarray(labels), pad_id=7), want.item(), rtol=1e-5
  )


def test_caption_normalizer_splits_the_sum():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.standard_normal((6, 7, 13)), jnp.float32)
  labels = rng.integers(0, 13, (6, 7))
  labels[:4, 5:] = 0  # uneven token counts between the halves
  labels = jnp.asarray(labels)
  _, count = losses.caption_loss_terms(logits, labels)
  halves = [losses.caption_loss(logits[s], labels[s], normalizer=count) for s in (slice(0, 3), slice(3, 6))]
  np.testing.assert_allclose(halves[0] + halves[1], losses.caption_loss(logits, labels), rtol=1e-6)
  assert abs(float(losses.caption_loss(logits[:3], labels[:3])) - float(losses.caption_loss(logits, labels))) > 1e-3


# --- SimMIM ---------------------------------------------------------------------------------------------


def test_upsample_mask():
  mask = jnp.asarray([[[1, 0], [0, 1]]], jnp.uint8)
  up = pixels.upsample_mask(mask, 3)
  assert up.shape == (1, 6, 6) and up.dtype == jnp.uint8
  np.testing.assert_array_equal(up[0], np.kron(np.asarray(mask[0]), np.ones((3, 3), np.uint8)))


def test_mim_l1_loss():
  rng = np.random.default_rng(5)
  pred, target = rng.standard_normal((2, 2, 8, 8, 3)).astype(np.float32)
  mask = np.asarray(pixels.upsample_mask(jnp.asarray(rng.integers(0, 2, (2, 2, 2))), 4), np.float32)
  want = np.sum(np.abs(target - pred) * mask[..., None]) / (mask.sum() + 1e-5) / 3
  got = pixels.mim_l1_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Only masked pixels count.
  changed = np.where(mask[..., None] > 0, pred, pred + 10 * rng.standard_normal(pred.shape).astype(np.float32))
  assert not np.array_equal(changed, pred)
  np.testing.assert_allclose(
    pixels.mim_l1_loss(jnp.asarray(changed), jnp.asarray(target), jnp.asarray(mask)), got, rtol=1e-6
  )
  # bf16 predictions are computed in fp32.
  assert pixels.mim_l1_loss(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target), jnp.asarray(mask)).dtype == (
    jnp.float32
  )
  # The global normalizer splits the sum over the batch exactly.
  normalizer = mask.sum() + 1e-5
  halves = [
    pixels.mim_l1_loss(
      jnp.asarray(pred[i : i + 1]), jnp.asarray(target[i : i + 1]), jnp.asarray(mask[i : i + 1]), normalizer=normalizer
    )
    for i in range(2)
  ]
  np.testing.assert_allclose(halves[0] + halves[1], got, rtol=1e-6)
  # Nothing masked: 0.
  assert float(pixels.mim_l1_loss(jnp.asarray(pred), jnp.asarray(target), jnp.zeros(mask.shape))) == 0.0
