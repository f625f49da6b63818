"""The host + device split of the training augmentation (data/transforms/device_augment.py): the device's colour jitter,
flip and normalisation reproduce the host-only chain they replaced, to float rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import config_lib, tasks
from visionfm_jax.config_lib import schema
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.transforms import device_augment, randaugment
from visionfm_jax.data.transforms import host as transforms

from test_data import data_config

MEAN = np.asarray((0.485, 0.456, 0.406), np.float32) * 255.0
STD = np.asarray((0.229, 0.224, 0.225), np.float32) * 255.0


# --- the host-only chain before the split (transforms.RandomFlip and ColorJitter at commit afe51eb), the reference
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _host_brightness(planes, factor):
  return np.clip(planes * np.float32(factor), 0, 255)


def _host_contrast(planes, factor):
  mean = np.float32(_LUMA @ planes.reshape(3, -1).mean(1))
  return np.clip(planes * np.float32(factor) + mean * np.float32(1 - factor), 0, 255)


def _host_saturation(planes, factor):
  grey = np.tensordot(_LUMA, planes, axes=1)[None]
  return np.clip(planes * np.float32(factor) + grey * np.float32(1 - factor), 0, 255)


def host_flip(element, rng):
  if rng.random() < 0.5:
    return {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}
  return element


def host_jitter(strength):
  def op(element, rng):
    factors = rng.uniform(max(0.0, 1 - strength), 1 + strength, size=3)
    planes = element["image"].transpose(2, 0, 1).astype(np.float32, order="C")
    for i in rng.permutation(3):
      planes = (_host_brightness, _host_contrast, _host_saturation)[i](planes, factors[i])
    planes += np.float32(0.5)
    return {**element, "image": planes.transpose(1, 2, 0).astype(np.uint8)}

  return op


def run_ops(ops, element, rng):
  for op in ops:
    element = op.random_map(element, rng) if isinstance(op, transforms.grain.transforms.RandomMap) else op.map(element)
  return element


def old_host_chain(augment, image_size, element, rng):
  """The pre-split train_transforms: crop, flip, jitter all on the host; the batch normalised on the device."""
  element = transforms.RandomResizedCrop(image_size, augment.crop_scale, augment.crop_ratio).random_map(element, rng)
  element = host_flip(element, rng)
  return host_jitter(augment.color_jitter)(element, rng)["image"]


def photo(rng, height=60, width=80):
  """Smooth colour fields plus noise: the contrast mean and the grey levels matter, unlike uniform noise."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  base = np.stack([120 + 100 * np.sin(4 * x + c) * np.cos(3 * y - c) for c in range(3)], -1)
  return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("strength", [0.4, 1.0])
def test_host_plus_device_equals_the_old_host_chain(strength):
  augment = config_lib.defaults(schema.AUGMENT)
  augment.color_jitter = strength
  size, count = 48, 24
  ops = [op for op in transforms.train_transforms(size, augment)[2:]]  # after Decode and MarkUndecodable
  images = np.random.default_rng(7)
  old, new = [], []
  for i in range(count):
    element = {"image": photo(images), "label": 0, "valid": True}
    old.append(old_host_chain(augment, size, element, np.random.default_rng(100 + i)))
    new.append(run_ops(ops, element, np.random.default_rng(100 + i)))
  batch = {key: np.stack([example[key] for example in new]) for key in new[0]}
  assert set(transforms.device_params_spec(augment)) <= set(batch)
  ours = jax.jit(device_augment.augment)(batch["image"], batch, MEAN, STD)
  reference = device_augment.normalize(np.stack(old), MEAN, STD)
  assert ours.dtype == jnp.float32 and ours.shape == reference.shape
  diff = np.abs(np.asarray(ours) - np.asarray(reference))
  level = 1 / STD.min()  # one grey level, normalised
  # Float rounding (reduction order, fused multiply-adds) can move a value that sits on a .5 boundary by one
  # level; anything else would be a different augmentation.
  assert diff.max() <= level * 1.001, diff.max()
  assert (diff > 1e-4).mean() < 2e-3, (diff > 1e-4).mean()
  assert batch[transforms.FLIP].any() and not batch[transforms.FLIP].all()


def test_adjustments():
  image = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3)), jnp.float32)
  jitter = lambda factors, order: device_augment.color_jitter(image, jnp.asarray([factors]), jnp.asarray([order]))
  np.testing.assert_array_equal(jitter((1.0, 1.0, 1.0), (2, 0, 1)), image)
  np.testing.assert_array_equal(jitter((0.0, 1.0, 1.0), (1, 2, 0)), 0 * image)  # brightness 0: black
  grey = jitter((1.0, 1.0, 0.0), (0, 1, 2))  # saturation 0
  np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1)
  flat = jitter((1.0, 0.0, 1.0), (0, 2, 1))  # contrast 0, last
  assert flat.min() == flat.max()


def test_without_parameters_it_only_normalises():
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
    device_augment.augment(images, {}, MEAN, STD, jnp.bfloat16),
    device_augment.normalize(images, MEAN, STD).astype(jnp.bfloat16),
  )
  flipped = device_augment.augment(images, {transforms.FLIP: np.array([1, 0], np.uint8)}, MEAN, STD)
  np.testing.assert_allclose(flipped[0], device_augment.normalize(images[0, :, ::-1], MEAN, STD), atol=1e-6)
  np.testing.assert_allclose(flipped[1], device_augment.normalize(images[1], MEAN, STD), atol=1e-6)


def test_flip_stays_on_the_host_before_geometric_randaugment():
  augment = config_lib.defaults(schema.AUGMENT)
  assert transforms.flip_on_device(augment)
  augment.randaugment_ops = 2
  assert not transforms.flip_on_device(augment)
  assert transforms.FLIP not in transforms.device_params_spec(augment)
  augment.randaugment_exclude = randaugment.GEOMETRIC_OPS  # the rest commute with a mirror
  assert transforms.flip_on_device(augment)
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  flips = [
    transforms.RandomFlip(on_device=False).random_map({"image": image}, np.random.default_rng(seed))
    for seed in range(20)
  ]
  mirrored = [np.array_equal(out["image"], image[:, ::-1]) for out in flips]
  assert any(mirrored) and not all(mirrored) and all(transforms.FLIP not in out for out in flips)


def test_loader_batches_match_the_synthetic_layout():
  cfg = data_config()
  cfg.augment.color_jitter = 0.3
  batch = next(iter(pipeline.make_train_loader(cfg, batch_size=8, seed=3, process_index=0, process_count=1)))
  config = config_lib.load("configs/vit_huge.py:demo")
  config.data = cfg
  config.model.image_size = cfg.image_size
  synthetic = tasks.build(config).synthetic_batch(8, np.random.default_rng(0))
  layout = lambda b: {k: (v.shape, v.dtype) for k, v in b.items()}
  assert layout(batch) == layout(synthetic)
  assert set(batch) == {"image", "label", transforms.FLIP, transforms.JITTER, transforms.JITTER_ORDER}
