"""FLIP's masked image tower (Li et al. 2023) as `model.token_drop` on ViTs: in training each image keeps its class
token and a random subset of round((1 - token_drop) x N) patch tokens; evaluation sees every token; through `main`
a CLIP with a masked ViT tower trains and reports zero-shot and retrieval on whole images."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax.errors import ConfigError
from visionfm_jax.models import clip, vit
from visionfm_jax.training import train

from conftest import params_drawn_by_shape, tiny_clip_config

IMAGES = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)  # 16 patches of 8 px


def _vit(token_drop, pool="cls"):
  return vit.ViT(**vit.parse_variant("pico/8"), image_size=32, num_classes=4, pool=pool, token_drop=token_drop)


def _variables(model):
  """{'params': drawn at random by shape} (conftest.params_drawn_by_shape), unboxed: no init (run eagerly, it
  compiles every primitive on its own), and unlike the init's zero head (zero logits, zero gradients below it),
  every param changes the outputs."""
  return {"params": params_drawn_by_shape(lambda: model.init(jax.random.key(0), IMAGES)["params"])}


# Jitted, with the model static (eager, every primitive compiles on its own): one compile per model and mode.
@functools.partial(jax.jit, static_argnums=0)
def _train(model, variables, key):
  return model.apply(variables, IMAGES, train=True, rngs={"dropout": key})


@functools.partial(jax.jit, static_argnums=0)
def _eval(model, variables):
  return model.apply(variables, IMAGES)


def test_training_keeps_the_class_token_and_a_random_subset_of_patches_evaluation_sees_all():
  model = _vit(0.75)
  params = _variables(model)
  train_out = _train(model, params, jax.random.key(1))
  assert train_out["tokens"].shape == (3, 1 + 4, 32)  # 16 patches, 4 kept
  unmasked = _vit(0.0)
  np.testing.assert_array_equal(_eval(model, params)["logits"], _eval(unmasked, params)["logits"])


def test_the_kept_tokens_are_those_of_the_unmasked_embedding_each_image_its_own():
  """The blocks see exactly the chosen embedded tokens: a ViT of depth 0 would show them; here the selection is
  checked on the embedding itself, with the class token first and the patches in their order."""
  x = jnp.arange(2 * 17 * 1, dtype=jnp.float32).reshape(2, 17, 1)
  kept = vit.keep_random_patches(x, 0.5, jax.random.key(3))
  assert kept.shape == (2, 9, 1)
  np.testing.assert_array_equal(kept[:, 0, 0], [0, 17])
  for row in range(2):
    values = np.asarray(kept[row, 1:, 0])
    assert np.all(np.diff(values) > 0) and set(values) <= set(np.asarray(x[row, 1:, 0]))
  assert not np.array_equal(kept[0, 1:, 0], kept[1, 1:, 0] - 17)  # each image draws its own subset
  np.testing.assert_array_equal(kept, vit.keep_random_patches(x, 0.5, jax.random.key(3)))
  assert not np.array_equal(kept, vit.keep_random_patches(x, 0.5, jax.random.key(4)))


def test_gradients_flow_through_the_kept_tokens_and_flops_count_them():
  model = _vit(0.5, pool="gap")
  params = _variables(model)
  loss = lambda p: jnp.sum(_train(model, p, jax.random.key(2))["logits"] ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.any(grads["params"]["pos_embed"] != 0)
  assert vit.train_flops_per_example(model) < vit.train_flops_per_example(_vit(0.0))
  with pytest.raises(ValueError, match="no feature map"):
    model.apply(params, IMAGES, train=True, rngs={"dropout": jax.random.key(2)}, method="feature_maps")


def _tiny_vit_clip(*variants, **overrides):
  """The CLIP demo with a one-block ViT tower of pico's width (16 px images, 4 px patches: 16 patch tokens; the
  tokens are dropped before the blocks, whatever their number)."""
  config = tiny_clip_config("vit", *variants, **overrides)
  for swin_only in ("patch_size", "window_size"):
    if swin_only in config.model.image:
      del config.model.image[swin_only]
  config.model.image.variant = "32x1x64x2/4"
  return config


@pytest.mark.slow
def test_flip_then_its_unmasked_tuning_train_through_main_and_evaluate_on_whole_images(tmp_path, compilation_cache):
  """`vit,flip` masks half of the patches in training; `vit,flip_tune` goes on from its params unmasked. The two
  runs share a compilation cache: the tuning run compiles its own train step (no tokens dropped) and loads the
  rest (state init, evaluations, panel: the same programs, since token_drop acts in training only)."""
  del compilation_cache
  config = _tiny_vit_clip("flip")
  assert clip.build(config.model, jnp.float32).image.token_drop == 0.5
  masked = train.run(config, str(tmp_path / "flip"))
  assert masked["step"] == config.total_steps and np.isfinite(masked["train/loss"])
  tune = _tiny_vit_clip(
    "flip_tune", **{"init_from": str(tmp_path / "flip"), "total_steps": 2, "eval_every": 2, "checkpoint_every": 2}
  )
  assert tune.model.image.token_drop == 0.0
  tuned = train.run(tune, str(tmp_path / "tune"))
  assert tuned["step"] == 2
  for workdir in ("flip", "tune"):
    rows = [json.loads(line) for line in (tmp_path / workdir / "metrics.jsonl").read_text().splitlines()]
    evaluated = {k for r in rows for k in r if k.startswith("eval/")}
    assert "eval/zeroshot/top1" in evaluated and any("r1" in k for k in evaluated), evaluated
  with pytest.raises(ConfigError, match="token_drop"):
    train.run(_tiny_vit_clip(**{"model.image.token_drop": 1.0}), str(tmp_path / "refused"))
  with pytest.raises(ConfigError, match="mask a ViT image tower"):
    tiny_clip_config("flip")
