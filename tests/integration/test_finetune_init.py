"""init_from for fine-tuning: position-embedding resizing, a backbone placed under a prefix, skipped params,
SwinV2 window transfer and the errors for shapes that cannot be carried over."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import config_lib
from visionfm_jax.errors import CheckpointError, ConfigError
from visionfm_jax.models import dense_heads, swinv2, vit
from visionfm_jax.training import init_from, stored


def _vit(image_size=16, num_classes=5, **kwargs):
  return vit.ViT(
    width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, image_size=image_size, num_classes=num_classes, **kwargs
  )


def _random_params(module, images, seed=0):
  """Random params in the shapes of module.init (traced, not compiled) on a device, as training hands them to
  load_params."""
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), images)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jax.device_put(rng.normal(size=s.shape).astype(s.dtype), jax.devices()[0]), abstract)


def _params(model, seed=0):
  return _random_params(model, jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32), seed)


def _config(path, **fields):
  config = config_lib.base_config("vit")
  config.init_from = str(path)
  for k, v in fields.items():
    config[k] = v
  return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 16 px ViT (4 x 4 patches) with a 5-class head, saved as tools.import_hf does."""
  path = tmp_path_factory.mktemp("pretrained")
  params = jax.device_get(_params(_vit(), seed=1))
  stored.save_params(str(path), params, {"name": "vit"})
  return str(path), params


def test_resize_pos_embed_keeps_the_class_token_and_constant_and_linear_fields():
  grid = np.arange(8, dtype=np.float32)
  linear = 2.0 * grid[:, None, None] - 3.0 * grid[None, :, None] + np.array([0.0, 1.0], np.float32)  # (8, 8, 2)
  pos = np.concatenate([np.full((1, 2), 7.0, np.float32), linear.reshape(64, 2)])[None]
  out = vit.resize_pos_embed(pos, 1 + 16 * 16)
  assert out.shape == (1, 257, 2)
  np.testing.assert_array_equal(out[0, 0], [7.0, 7.0])
  # Output cell centres in input pixel units; where all four bicubic taps lie inside the grid the cubic
  # convolution reproduces a linear field exactly (only the borders see the truncated kernel).
  centres = (np.arange(16) + 0.5) / 2 - 0.5
  expected = 2.0 * centres[:, None, None] - 3.0 * centres[None, :, None] + np.array([0.0, 1.0])
  interior = (np.floor(centres) >= 1) & (np.floor(centres) <= 5)
  got = out[0, 1:].reshape(16, 16, 2)
  np.testing.assert_allclose(got[interior][:, interior], expected[interior][:, interior], atol=1e-5)
  constant = np.full((1, 1 + 36, 3), 0.25, np.float32)
  for length in (1 + 9, 1 + 100):
    np.testing.assert_allclose(vit.resize_pos_embed(constant, length), 0.25, atol=1e-6)
  np.testing.assert_array_equal(vit.resize_pos_embed(pos, 65), pos)
  with pytest.raises(ValueError, match="square"):
    vit.resize_pos_embed(pos, 1 + 50)


def test_higher_resolution_model_gets_resized_pos_embed_and_everything_else(pretrained):
  path, source = pretrained
  model = _vit(image_size=32)  # 8 x 8 patches
  target = _params(model)
  loaded = init_from.load(_config(path), target, model)
  assert loaded["pos_embed"].shape == (1, 65, 16)
  np.testing.assert_allclose(loaded["pos_embed"], vit.resize_pos_embed(source["pos_embed"], 65))
  chex.assert_trees_all_equal(
    {k: v for k, v in jax.device_get(loaded).items() if k != "pos_embed"},
    {k: v for k, v in source.items() if k != "pos_embed"},
  )
  assert loaded["blocks"]["mlp"]["fc1"]["kernel"].sharding == target["blocks"]["mlp"]["fc1"]["kernel"].sharding


class _Segmenter(dense_heads.DenseModel):
  """A backbone under 'backbone' plus a fresh 'neck' and 'head', like the dense-prediction models."""

  @nn.compact
  def __call__(self, images):
    tokens = self.backbone(images)["tokens"]
    tokens = nn.Dense(8, name="neck")(tokens)
    return nn.Dense(3, name="head")(tokens)


SEGMENTER = _Segmenter(backbone=_vit(image_size=24, num_classes=0))


def _segmenter_params(seed=2):
  return _random_params(SEGMENTER, jnp.zeros((1, 24, 24, 3)), seed)


def test_prefix_places_the_backbone_drops_its_head_and_keeps_the_new_params(pretrained):
  path, source = pretrained
  target = _segmenter_params()
  assert sorted(target) == ["backbone", "head", "neck"]
  loaded = jax.device_get(
    init_from.load(_config(path, init_from_prefix="backbone", init_from_skip="norm1"), target, SEGMENTER)
  )
  fresh = jax.device_get(target)
  chex.assert_trees_all_equal(loaded["neck"], fresh["neck"])
  chex.assert_trees_all_equal(loaded["head"], fresh["head"])  # the segmenter's head, not the checkpoint's
  chex.assert_trees_all_equal(loaded["backbone"]["blocks"]["norm1"], fresh["backbone"]["blocks"]["norm1"])  # skip
  chex.assert_trees_all_equal(loaded["backbone"]["blocks"]["mlp"], source["blocks"]["mlp"])
  chex.assert_trees_all_equal(loaded["backbone"]["norm"], source["norm"])
  np.testing.assert_allclose(loaded["backbone"]["pos_embed"], vit.resize_pos_embed(source["pos_embed"], 37))


def test_subtree_takes_one_tower_of_a_checkpoint(tmp_path, pretrained):
  _, source = pretrained
  tower = {k: v for k, v in source.items() if k != "head"}
  stored.save_params(str(tmp_path), {"image": tower, "text": {"proj": np.zeros((4, 4), np.float32)}})
  model = _vit(num_classes=0)
  target = _params(model)
  loaded = init_from.load(_config(tmp_path, init_from_subtree="image"), target, model)
  chex.assert_trees_all_equal(jax.device_get(loaded), tower)
  with pytest.raises(ConfigError, match="init_from_subtree='vision'"):
    init_from.load(_config(tmp_path, init_from_subtree="vision"), target, model)


def test_shapes_that_cannot_be_resized_name_the_param_and_both_shapes(pretrained):
  path, source = pretrained
  model = _vit(num_classes=7)
  target = _params(model)
  with pytest.raises(ConfigError, match=r"head/kernel: checkpoint \(16, 5\) vs model \(16, 7\)"):
    init_from.load(_config(path), target, model)
  loaded = init_from.load(_config(path, init_from_skip="^head/"), target, model)
  chex.assert_trees_all_equal(jax.device_get(loaded["head"]), jax.device_get(target["head"]))
  chex.assert_trees_all_equal(jax.device_get(loaded["blocks"]), source["blocks"])
  wide = vit.ViT(width=32, depth=2, mlp_dim=32, num_heads=2, patch_size=4, image_size=16, num_classes=5)
  with pytest.raises(ConfigError, match=r"pos_embed: checkpoint \(1, 17, 16\) vs model \(1, 17, 32\)"):
    init_from.load(_config(path), _params(wide), wide)
  deep = vit.ViT(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4, image_size=16, num_classes=5)
  with pytest.raises(ConfigError, match=r"blocks/mlp/fc1/kernel: checkpoint \(2, 16, 32\) vs model \(3, 16, 32\)"):
    init_from.load(_config(path), _params(deep), deep)
  dense = _Segmenter(backbone=model)
  with pytest.raises(ConfigError, match="init_from_prefix='encoder': the model has no params under it"):
    init_from.load(_config(path, init_from_prefix="encoder"), {"backbone": target}, dense)
  with pytest.raises(CheckpointError, match="missing backbone/extra"):
    body = {k: v for k, v in target.items() if k != "head"}
    init_from.load(_config(path, init_from_prefix="backbone"), {"backbone": {**body, "extra": target["norm"]}}, dense)
  with pytest.raises(ConfigError, match="init_from_skip"):
    init_from.load(_config(path, init_from_skip="head["), target, model)


def test_swinv2_params_do_not_depend_on_window_or_resolution_and_windows_are_checked(tmp_path):
  def shapes(image_size, window):
    model = swinv2.SwinV2(
      embed_dim=16,
      depths=(2, 2),
      num_heads=(2, 4),
      window_size=window,
      image_size=image_size,
      patch_size=2,
      num_classes=3,
    )
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    return jax.tree.map(lambda x: x.shape, nn.unbox(abstract["params"]))

  assert shapes(16, 4) == shapes(32, 8) == shapes(64, 8)

  config = config_lib.base_config("swinv2")
  config.model.update(dict(variant="pico", patch_size=2, image_size=32, window_size=8))
  meta = {
    "name": "swinv2",
    "depths": [2, 2],
    "patch": 2,
    "image_size": 16,
    "window_size": 4,
    "pretrained_window_sizes": [],
  }
  (tmp_path / "model.json").write_text(json.dumps(meta))
  config.init_from = str(tmp_path)
  # The config states the windows the checkpoint trained with; any other value, () included, is an error naming
  # the flag and the value to set.
  with pytest.raises(
    ConfigError,
    match=r"^config.model.pretrained_window_sizes=\(\) but the init_from checkpoint "
    r"trained with \(4, 4\): set "
    r'--config.model.pretrained_window_sizes="\(4, 4\)"$',
  ):
    init_from.check_model_fields(config)
  config.model.pretrained_window_sizes = (8, 8)
  with pytest.raises(ConfigError, match=r"pretrained_window_sizes=\(8, 8\) but"):
    init_from.check_model_fields(config)
  config.model.pretrained_window_sizes = (4, 4)
  init_from.check_model_fields(config)
  config.model.update(dict(image_size=16, window_size=4, pretrained_window_sizes=()))  # the checkpoint's own windows
  init_from.check_model_fields(config)

  # A CLIP workdir's image tower into a dense model's backbone: the tower takes image_size from its parent.
  clip_dir = tmp_path / "clip"
  clip_dir.mkdir()
  tower = {"name": "swinv2", "variant": "pico", "patch_size": 2, "window_size": 4, "pretrained_window_sizes": []}
  (clip_dir / "config.json").write_text(json.dumps({"model": {"name": "clip", "image_size": 16, "image": tower}}))
  config = config_lib.base_config("swinv2", task="segmentation")
  config.model.update(dict(variant="pico", patch_size=2, image_size=64, window_size=8))
  config_lib.set_fields(config, init_from=str(clip_dir), init_from_subtree="image", init_from_prefix="backbone")
  with pytest.raises(ConfigError, match=r'set --config.model.pretrained_window_sizes="\(4, 4\)"'):
    init_from.check_model_fields(config)
  config.model.pretrained_window_sizes = (4, 4)
  init_from.check_model_fields(config)
