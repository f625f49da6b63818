"""A masked SwinV2 tower that keeps its windows whole (`model.image.token_subgrid` = k): in training each image keeps
every k-th patch along both axes from a random phase of its own and the tower runs on that smaller whole map, with
the full map's windows (W / k kept tokens a side) and the position bias at the kept tokens' offsets on the full map;
evaluation sees every patch; through `main` a CLIP with the masked tower trains and evaluates on whole images."""

import functools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import swinv2_g_clip
from visionfm_jax.convert import unstack_layers
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import clip, swinv2
from visionfm_jax.training import train

from conftest import params_drawn_by_shape, tiny_clip_config

IMAGES = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)  # patch 2: an 8x8 map


def _swin(token_subgrid=2, **kw):
  # window 4: stage 0 has 2x2 windows of 4 (kept: windows of 2, shift 1), stage 1's 4x4 map is one window
  return swinv2.SwinV2(
    **{
      **dict(
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
        patch_size=2,
        image_size=16,
        num_classes=3,
        token_subgrid=token_subgrid,
      ),
      **kw,
    }
  )


def _init(model):
  return lambda: model.init(jax.random.key(0), IMAGES)["params"]


def _params(model):
  """Params drawn at random by shape (conftest.params_drawn_by_shape: no init compile), as host arrays (unstacked
  with numpy, not op by op on the device). Not the init: its res-post-norms start at zero, which would hide the
  attention branches."""
  return jax.device_get(params_drawn_by_shape(_init(model)))


def _train(model, params, rng=1):
  return _train_apply(model, params, jax.random.key(rng))


# Jitted, as every apply here (eager, each primitive compiles on its own), with the model static: one compile per
# model, whatever the params and key.
@functools.partial(jax.jit, static_argnums=0)
def _train_apply(model, params, key):
  return model.apply({"params": params}, IMAGES, train=True, rngs={"dropout": key})


@functools.partial(jax.jit, static_argnums=0)
def _eval(model, params):
  return model.apply({"params": params}, IMAGES)


def test_each_image_keeps_every_kth_patch_from_a_random_phase_of_its_own():
  patch, k = 2, 2
  ids = np.arange(8 * 8, dtype=np.float32).reshape(8, 8)  # the patch id, on every pixel of the patch
  images = jnp.asarray(np.broadcast_to(np.kron(ids, np.ones((patch, patch)))[None, :, :, None], (16, 16, 16, 1)))
  kept = np.asarray(swinv2.keep_patch_subgrid(images, patch, k, jax.random.key(0)))
  assert kept.shape == (16, 8, 8, 1)
  phases = set()
  for image in kept[..., 0]:
    per_patch = image[::patch, ::patch]
    dy, dx = divmod(int(per_patch[0, 0]), 8)
    np.testing.assert_array_equal(per_patch, ids[dy::k, dx::k])  # rows k i + dy, columns k j + dx
    np.testing.assert_array_equal(image, np.kron(per_patch, np.ones((patch, patch))))  # whole patches
    phases.add((dy, dx))
  assert len(phases) > 1 and phases <= {(0, 0), (0, 1), (1, 0), (1, 1)}
  np.testing.assert_array_equal(kept, swinv2.keep_patch_subgrid(images, patch, k, jax.random.key(0)))


def test_kept_windows_see_the_position_bias_of_their_offsets_on_the_full_map():
  """A window of 2 kept tokens a side at stride 2 holds full-map offsets -2, 0, 2 of a window of 4."""
  kept = swinv2.relative_coords_table(2, 4, stride=2).reshape(3, 3, 2)
  full = swinv2.relative_coords_table(4, 0).reshape(7, 7, 2)
  np.testing.assert_array_equal(kept, full[1::2, 1::2])
  assert swinv2.subgrid_window((4, 4), (8, 8), 4, 2) == (2, 1)  # the full map's windows, a quarter of their tokens
  assert swinv2.subgrid_window((2, 2), (4, 4), 4, 2) == (2, 0)  # a map that is one window stays one
  with pytest.raises(ValueError, match="token_subgrid=2 needs windows divisible"):
    swinv2.subgrid_window((9, 9), (18, 18), 3, 2)


def test_training_sees_a_quarter_of_the_tokens_evaluation_all_with_the_unmasked_params():
  model = _swin()
  params = _params(model)
  chex.assert_trees_all_equal_shapes(params, nn.unbox(jax.eval_shape(_init(_swin(1)))))
  assert _train(model, params)["tokens"].shape == (2, 2 * 2, 32)  # 4x4 kept map, merged to 2x2
  evaluated = _eval(model, params)
  assert evaluated["tokens"].shape == (2, 4 * 4, 32)
  chex.assert_trees_all_equal(evaluated, _eval(_swin(1), params))
  assert not np.allclose(_train(model, params, 1)["pooled"], _train(model, params, 2)["pooled"])  # another phase
  assert swinv2.training_stages(model) == [(4, 2), (2, 2)]
  assert swinv2.train_flops_per_example(model) < swinv2.train_flops_per_example(_swin(1)) / 3.5
  with pytest.raises(ValueError, match="no full feature map"):
    model.apply({"params": params}, IMAGES, train=True, rngs={"dropout": jax.random.key(1)}, method="feature_maps")


def test_scanned_and_unrolled_masked_towers_agree_and_gradients_reach_every_param():
  scanned, unrolled = _swin(scan=True), _swin(scan=False)
  params = _params(scanned)
  flat = {
    k: (unstack_layers(v, name="blocks", members=swinv2.PAIR) if k.startswith("stage_") else v)
    for k, v in params.items()
  }

  def loss(model, p):  # the head starts at zero: the pooled features reach every param
    out = model.apply({"params": p}, IMAGES, train=True, rngs={"dropout": jax.random.key(1)})
    return jnp.sum(out["pooled"] ** 2), out

  # One program a tower gives its training outputs and its gradients.
  (_, out_scan), g_scan = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True))(params)
  (_, out_unrolled), g_unrolled = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True))(flat)
  chex.assert_trees_all_close(out_scan, out_unrolled, atol=1e-5)
  g_scan = {
    k: (unstack_layers(v, name="blocks", members=swinv2.PAIR) if k.startswith("stage_") else v)
    for k, v in jax.device_get(g_scan).items()
  }
  chex.assert_trees_all_close(g_scan, g_unrolled, atol=1e-4, rtol=1e-4)
  for path, grad in jax.tree_util.tree_leaves_with_path(g_unrolled):
    assert np.all(np.isfinite(grad)), path
  cpb = g_unrolled["stage_0"]["blocks_1"]["attn"]["cpb_mlp"]["fc1"]["kernel"]
  assert np.any(cpb != 0)  # the shifted kept windows' position bias learns


def test_swin_mask_trains_through_the_loop_evaluates_on_whole_images_and_its_tuning_config_unmasks(tmp_path):
  assert clip.build(swinv2_g_clip.get_config("demo,swin_mask").model, jnp.float32).image.token_subgrid == 2
  assert swinv2_g_clip.get_config("demo,swin_mask_tune").model.image.token_subgrid == 1
  with pytest.raises(ConfigError, match="mask the SwinV2 image tower"):
    swinv2_g_clip.get_config("vit,swin_mask")
  config = tiny_clip_config("swin_mask", total_steps=2, eval_every=2, checkpoint_every=2)
  masked = train.run(config, str(tmp_path / "masked"))
  assert masked["step"] == 2 and np.isfinite(masked["train/loss"])
  rows = [json.loads(line) for line in (tmp_path / "masked" / "metrics.jsonl").read_text().splitlines()]
  evaluated = {k for r in rows for k in r if k.startswith("eval/")}
  assert "eval/zeroshot/top1" in evaluated and any("r1" in k for k in evaluated), evaluated
  with pytest.raises(ConfigError, match="token_subgrid"):
    train.run(tiny_clip_config(**{"model.image.token_subgrid": 0}), str(tmp_path / "refused"))
