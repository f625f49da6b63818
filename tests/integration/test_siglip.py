"""SigLIP's sigmoid loss (Zhai et al. 2023): the dense form against the paper's formula in NumPy, the ring form
over 8 devices against the dense one (values and gradients, with and without a mask, with Mixup), the ring's
compiled program without a global B x B (or B_local x B_global) block; the contrastive task with
config.model.contrastive_loss='siglip' (configs/swinv2_g_clip.py:siglip): its params, its loss exact under
two-pass accumulation, and a run through the loop whose 4 micro-batches give the first step of 1, then evaluate."""

import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from visionfm_jax import config_lib, parallel, tasks
from visionfm_jax.errors import ConfigError
from visionfm_jax.losses import image_text as losses
from visionfm_jax.training import grads as grads_lib
from visionfm_jax.training import train

from conftest import random_params, tiny_clip_config
from test_contrastive import _random_pairs

B, D = 32, 24  # 8 devices: blocks of 4 x 4; D differs from every batch size so that shapes name one thing


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pairs(seed=0, n=B):
  rng = np.random.default_rng(seed)
  return _unit(rng.standard_normal((n, D))).astype(np.float32), _unit(rng.standard_normal((n, D))).astype(np.float32)


def _paper_loss(x, y, t, b, valid=None):
  """The paper's formula in float64: -(1/|B|) sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)) over the valid
  examples, z_ij = 1 if i == j else -1."""
  keep = np.ones(len(x), bool) if valid is None else np.asarray(valid, bool)
  x, y = np.asarray(x, np.float64)[keep], np.asarray(y, np.float64)[keep]
  z = 2.0 * np.eye(len(x)) - 1.0
  logits = t * x @ y.T + b
  return -np.sum(np.log(1.0 / (1.0 + np.exp(-z * logits)))) / max(len(x), 1)


# Jitted: run op by op, each of the loss's primitives compiles on its own.
_dense_loss = jax.jit(losses.siglip_loss, static_argnames="mix")


def _mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def test_dense_loss_is_the_papers_formula_in_value_and_gradient():
  x, y = _pairs()
  t, b = 10.0, -10.0  # the paper's init
  np.testing.assert_allclose(_dense_loss(x, y, t, b), _paper_loss(x, y, t, b), rtol=1e-5)
  valid = np.arange(B) % 3 != 0
  np.testing.assert_allclose(_dense_loss(x, y, t, b, valid=valid), _paper_loss(x, y, t, b, valid), rtol=1e-5)
  np.testing.assert_allclose(_dense_loss(x, y, t, b, valid=np.zeros(B, bool)), 0.0)
  # gradients w.r.t. both embeddings, the scale and the bias, by central differences of the float64 formula
  grads = jax.jit(jax.grad(lambda *a: losses.siglip_loss(*a, valid=valid), argnums=(0, 1, 2, 3)))(x, y, 3.0, -2.0)
  eps = 1e-5

  def numeric(arg, index):
    args = [np.asarray(x, np.float64), np.asarray(y, np.float64), 3.0, -2.0]

    def at(delta):
      moved = list(args)
      if index is None:
        moved[arg] = args[arg] + delta
      else:
        moved[arg] = args[arg].copy()
        moved[arg][index] += delta
      return _paper_loss(*moved, valid)

    return (at(eps) - at(-eps)) / (2 * eps)

  for arg, index in ((0, (1, 5)), (0, (3, 0)), (1, (2, 7)), (1, (9, 23)), (2, None), (3, None)):
    got = grads[arg] if index is None else grads[arg][index]
    np.testing.assert_allclose(got, numeric(arg, index), rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(grads[0])[~valid] == 0) and np.all(np.asarray(grads[1])[~valid] == 0)


def test_mixup_labels_are_soft_on_the_diagonal_and_the_partner():
  x, y = _pairs(1, 8)
  lam, t, b = 0.7, 5.0, -3.0
  logits = t * x.astype(np.float64) @ y.T.astype(np.float64) + b
  labels = lam * np.eye(8) + (1 - lam) * np.roll(np.eye(8), -1, axis=1)  # image i's partner is image i - 1
  assert labels[0, 7] == pytest.approx(1 - lam) and labels[3, 2] == pytest.approx(1 - lam)
  want = np.sum(labels * np.logaddexp(0, -logits) + (1 - labels) * np.logaddexp(0, logits)) / 8
  np.testing.assert_allclose(_dense_loss(x, y, t, b, mix=lam), want, rtol=1e-6)


@pytest.mark.parametrize("masked,mix", [(False, None), (True, None), (True, 0.6)])
def test_ring_equals_the_dense_loss_in_value_and_gradients(masked, mix):
  mesh = _mesh()
  x, y = _pairs(2)
  valid = (np.arange(B) % 5 != 1) if masked else None
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  x_s, y_s = jax.device_put(x, batch), jax.device_put(y, batch)
  valid_s = None if valid is None else jax.device_put(valid, batch)
  args = (x, y, jnp.float32(7.0), jnp.float32(-4.0))
  dense = jax.jit(jax.value_and_grad(lambda *a: losses.siglip_loss(*a, mix=mix, valid=valid), argnums=(0, 1, 2, 3)))
  ring = jax.jit(
    jax.value_and_grad(
      lambda i, t, s, b, v: losses.sharded_siglip_loss(i, t, s, b, mesh, mix=mix, valid=v), argnums=(0, 1, 2, 3)
    )
  )
  want_loss, want = dense(*args)
  got_loss, got = ring(x_s, y_s, *args[2:], valid_s)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  if mix is None:
    np.testing.assert_allclose(got_loss, _paper_loss(x, y, 7.0, -4.0, valid), rtol=1e-5)


def _f32_shapes(hlo: str) -> set[str]:
  return set(re.findall(r"f32\[[0-9,]*\]", hlo))


def test_ring_program_holds_per_hop_blocks_only():
  """The compiled loss and gradient of the ring hold 4 x 4 blocks (B_local x B_local), never the global 32 x 32,
  the all-gather form's 4 x 32, or the hops' blocks stacked for the backward pass (what the scan saves without
  the per-hop `jax.checkpoint`: f32[7,4,4])."""
  mesh = _mesh()
  x, y = _pairs(3)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  step = jax.jit(
    jax.value_and_grad(lambda i, t, v: losses.sharded_siglip_loss(i, t, 10.0, -10.0, mesh, valid=v), argnums=(0, 1))
  )
  hlo = (
    step.lower(jax.device_put(x, batch), jax.device_put(y, batch), jax.device_put(np.ones(B, bool), batch))
    .compile()
    .as_text()
  )
  shapes = _f32_shapes(hlo)
  assert "f32[4,4]" in shapes
  assert not shapes & {"f32[32,32]", "f32[4,32]", "f32[32,4]", "f32[7,4,4]", "f32[8,4,4]"}, shapes
  assert "collective-permute" in hlo and "all-gather" not in hlo


def test_siglip_variant_adds_the_bias_at_the_papers_init_and_composes():
  config = tiny_clip_config("siglip")
  assert config.model.contrastive_loss == "siglip" and config.eval.zeroshot_classes == "shapes"  # the demo's
  task = tasks.build(config)
  params = jax.eval_shape(lambda: nn.unbox(task.init_variables(jax.random.key(0))["params"]))
  assert params["logit_bias"].shape == () and "logit_bias" not in jax.eval_shape(
    lambda: nn.unbox(tasks.build(tiny_clip_config()).init_variables(jax.random.key(0))["params"])
  )
  # The two scalars' init alone (their values through the loop's init: the run below logs them at its first step).
  init = nn.unbox(task.model.init(jax.random.key(0), method=lambda m: (m.logit_scale, m.logit_bias))["params"])
  assert float(init["logit_scale"]) == pytest.approx(math.log(10.0)) and float(init["logit_bias"]) == -10.0
  from configs import swinv2_g_clip  # pylint: disable=g-import-not-at-top

  assert swinv2_g_clip.get_config("vit,siglip").model.image.pool == "cls"
  with pytest.raises(ConfigError, match="contrastive_loss"):
    config_lib.check(config_lib.set_paths(tiny_clip_config(), {"model.contrastive_loss": "sigmoid"}))


@pytest.mark.slow
def test_four_accumulation_steps_give_the_whole_batch_loss_and_gradients_with_mixup():
  """On a (data 2, fsdp 4) mesh: the ring loss of the task equals the single-device one, and two-pass
  accumulation over 4 micro-batches gives the whole batch's loss and gradients (bias and scale included), unlike
  the mean of the micro-batches' own losses; with Mixup, whose partners cross the micro-batches (without it: the
  run below)."""
  config = tiny_clip_config(
    "siglip", global_batch_size=32, **{"data.augment.mixup_alpha": 0.4, "mesh.data": 2, "mesh.fsdp": 4}
  )
  mesh = parallel.make_mesh(config.mesh)
  plain, task = tasks.build(config), tasks.build(config, mesh)
  params = random_params(plain)  # by shape, no init compile; unlike the init, every param changes the loss
  params = {**params, "logit_bias": jnp.float32(-3.0)}  # off the init's -10, where the loss is near its floor
  batch = _random_pairs(config, 1)[0]
  rng = jax.random.key(7)
  single_device_loss = jax.jit(lambda p, b: plain.loss(p, b, rng)[0])
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  with parallel.activation_sharding(mesh):
    (want_loss, aux), want = jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch, rng), has_aux=True))(params)
    two_pass = lambda p: grads_lib.two_pass_grads(task, p, batch, 4, rng, 1.0, replicated, None)  # noqa: E731
    got, got_loss, _ = jax.jit(two_pass)(params)
  assert float(aux["train/logit_bias"]) == -3.0
  np.testing.assert_allclose(want_loss, single_device_loss(params, batch), rtol=1e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  assert abs(float(want["logit_bias"])) > 1e-3
  micro_batches = [jax.tree.map(lambda x, j=j: x[j::4], batch) for j in range(4)]
  naive = sum(float(single_device_loss(params, micro)) for micro in micro_batches) / 4
  assert abs(naive - float(want_loss)) > 0.1  # the equalities above mean something


@pytest.mark.slow
def test_run_with_four_micro_batches_starts_as_one_batch_and_evaluates(tmp_path, compilation_cache):
  """Through the loop on 8 devices: the first step's loss and gradient norm with 4 micro-batches of 8 are those
  of one batch of 32; zero-shot and retrieval run and report. The runs share a compilation cache: the second
  loads the state's init (the same model and optimizer) instead of compiling it."""
  del compilation_cache

  def first_step(accum, **evaluation):
    config = tiny_clip_config(
      "siglip",
      global_batch_size=32,
      total_steps=1,
      log_every=1,
      eval_every=1,
      checkpoint_every=1,
      grad_accum_steps=accum,
      **evaluation,
    )
    return train.run(config, str(tmp_path / f"accum{accum}"))

  whole = first_step(1, **{"eval.zeroshot_classes": "", "eval.retrieval": False})  # evaluated below, split
  split = first_step(4)
  assert split["train/loss"] == pytest.approx(whole["train/loss"], rel=1e-5)
  assert split["train/grad_norm"] == pytest.approx(whole["train/grad_norm"], rel=1e-5)
  # the first step's forward ran on the init's temperature (exp(log 10)) and bias
  assert split["train/logit_scale"] == pytest.approx(10.0) and split["train/logit_bias"] == -10.0
  assert split["eval/zeroshot/count"] == 48 and 0 <= split["eval/zeroshot/top1"] <= 1
  assert split["eval/retrieval/count"] == 48 and 0 <= split["eval/retrieval/i2t_r1"] <= 1
