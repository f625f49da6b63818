"""The segmentation task end to end: training from a pretrained ViT under 'backbone', sliding-window mIoU logged as
eval/seg/*, the backbone loaded by init_from with a fresh neck and head, and config errors."""

import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import tasks
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate import segmentation as seg_eval
from visionfm_jax.losses import pixels
from visionfm_jax.models import vit
from visionfm_jax.training import init_from, stored, train

from conftest import override, tiny_vit_config


def tiny_seg_config(**overrides):
  """The demo shrunk: a pico ViT (4 x 4 patches at 16 px), a 3-level 16-channel neck and head, batch 16."""
  from configs import finetune_ade20k  # pylint: disable=g-import-not-at-top

  config = finetune_ade20k.get_config("demo")
  config.model.variant = "pico/4"
  config.model.image_size = config.data.image_size = 16
  config.head.neck_channels = config.head.head_channels = 16
  config.head.neck_strides = (4, 8, 16)  # maps 4 x 4, 2 x 2, 1 x 1: a small graph to compile
  config.head.ppm_scales = (1, 2)
  config.head.eval_stride = 8
  config.data.seg_eval_width = 24  # a 16 x 24 canvas: two sliding 16 px windows
  config.data.eval_examples = 32
  config.global_batch_size = 16
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 1
  config.progress_bar = False
  return override(config, **overrides)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A classification ViT (pico/4 at 8 px: a 2 x 2 patch grid, 8 classes), saved as tools.import_hf does."""
  path = str(tmp_path_factory.mktemp("pretrained"))
  config = tiny_vit_config(**{"model.image_size": 8, "data.image_size": 8})
  params = jax.tree.map(np.asarray, jax.device_get(_random_params(tasks.build(config), seed=7)))
  stored.save_params(path, params, {"name": "vit"})
  return path, params


def _random_params(task, seed=0):
  """Random params in the shapes of the task's model, on a device (traced, never compiled: cheap)."""
  abstract = nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0))["params"])
  rng = np.random.default_rng(seed)
  device = jax.devices()[0]
  return jax.tree.map(lambda a: jax.device_put((0.1 * rng.normal(size=a.shape)).astype(a.dtype), device), abstract)


def _miou_by_class(pred: np.ndarray, labels: np.ndarray, labelled: np.ndarray, num_classes: int) -> dict[str, float]:
  """mmseg's figures from their definitions, class by class: IoU = |pred c and label c| / |pred c or label c| over
  the labelled pixels, mIoU its mean over the classes present in either; pixel accuracy; the mean over the classes
  in the labels of their pixels' accuracy."""
  ious, accs = [], []
  for c in range(num_classes):
    is_pred, is_label = (pred == c) & labelled, (labels == c) & labelled
    union = np.sum(is_pred | is_label)
    if union:
      ious.append(np.sum(is_pred & is_label) / union)
    if is_label.any():
      accs.append(np.sum(is_pred & is_label) / np.sum(is_label))
  return {
    "miou": float(np.mean(ious)),
    "pixel_acc": float(np.sum((pred == labels) & labelled) / np.sum(labelled)),
    "mean_acc": float(np.mean(accs)),
  }


def _record_to_host(records: list, fn, *picks):
  """`fn` that also sends `pick(*args)` of each call to `records` on the host, from inside the jitted step."""

  def recorded(*args, **kwargs):
    jax.debug.callback(lambda *values: records.append([np.asarray(v) for v in values]), *(p(*args) for p in picks))
    return fn(*args, **kwargs)

  return recorded


def test_finetune_from_pretrained_backbone_logs_loss_and_sliding_window_miou(tmp_path, pretrained, monkeypatch):
  """The logged pixel accuracy (train) and mIoU, pixel and mean accuracy (eval, sliding windows over the 16 x 24
  canvas) are those of the model's own predictions, recomputed here with numpy."""
  config = tiny_seg_config(
    total_steps=6, log_every=1, eval_every=6, checkpoint_every=6, init_from=pretrained[0], init_from_prefix="backbone"
  )
  num_classes = config.head.num_classes
  trained, evaluated, eval_batches = [], [], []  # (predicted classes, labels) per step / per eval batch; raw batches
  monkeypatch.setattr(
    pixels,
    "segmentation_cross_entropy",
    _record_to_host(
      trained,
      pixels.segmentation_cross_entropy,
      lambda logits, labels, *_: jnp.argmax(logits, -1),
      lambda logits, labels, *_: labels,
    ),
  )
  monkeypatch.setattr(
    seg_eval, "confusion_matrix", _record_to_host(evaluated, seg_eval.confusion_matrix, lambda pred, *_: pred)
  )
  evaluate = seg_eval.SegmentationEvaluator.__call__
  monkeypatch.setattr(
    seg_eval.SegmentationEvaluator,
    "__call__",
    lambda self, params, batches: evaluate(self, params, eval_batches.extend(batches) or eval_batches),
  )
  last = train.run(config, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  losses_logged = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses_logged) == 6 and np.all(np.isfinite(losses_logged))
  assert np.mean(losses_logged[-3:]) < losses_logged[0] - 0.1, losses_logged
  train_rows = [r for r in rows if "train/pixel_acc" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6] and len(trained) == 6
  for row, (pred, labels) in zip(train_rows, trained):
    labelled = (labels != 255) & (labels < num_classes)
    assert 0 < labelled.sum() < labelled.size  # ignored pixels present: leaving them out matters
    assert row["train/pixel_acc"] == pytest.approx(np.sum((pred == labels) & labelled) / np.sum(labelled), abs=1e-6)
  evals = [r for r in rows if "eval/seg/miou" in r]
  assert [r["step"] for r in evals] == [6]
  pred = np.concatenate([p for (p,) in evaluated])
  labels = np.concatenate([b["mask"] for b in eval_batches])
  valid = np.concatenate([b.get("valid", np.ones(len(b["mask"]), bool)) for b in eval_batches])
  assert pred.shape == labels.shape == (32, 16, 24)  # every canvas, predicted whole
  want = _miou_by_class(pred, labels, (labels != 255) & valid[:, None, None], num_classes)
  for metric in ("miou", "pixel_acc", "mean_acc"):
    assert evals[0][f"eval/seg/{metric}"] == pytest.approx(want[metric], abs=1e-12), metric
  assert last["eval/seg/miou"] == evals[0]["eval/seg/miou"]


def test_init_from_loads_the_backbone_and_leaves_neck_and_head_fresh(pretrained):
  path, source = pretrained
  config = tiny_seg_config(init_from=path, init_from_prefix="backbone")
  task = tasks.build(config)
  target = _random_params(task, seed=1)
  fresh = jax.device_get(target)
  loaded = jax.device_get(init_from.load(config, target, task.model))
  assert sorted(loaded) == ["backbone", "head", "neck"]
  chex.assert_trees_all_equal(loaded["neck"], fresh["neck"])
  chex.assert_trees_all_equal(loaded["head"], fresh["head"])  # UPerNet's, not the classifier's
  backbone = {k: v for k, v in source.items() if k not in ("head", "pos_embed")}
  chex.assert_trees_all_equal({k: v for k, v in loaded["backbone"].items() if k != "pos_embed"}, backbone)
  np.testing.assert_allclose(loaded["backbone"]["pos_embed"], vit.resize_pos_embed(source["pos_embed"], 17))


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="config.model.num_classes=8"):
    tasks.build(tiny_seg_config(**{"model.num_classes": 8}))
  with pytest.raises(ConfigError, match="config.head.eval_window=24"):
    tasks.build(tiny_seg_config(**{"head.eval_window": 24}))
  config = tiny_seg_config()
  del config.head
  with pytest.raises(ConfigError, match="config.head"):
    tasks.build(config)
  task = tasks.build(tiny_seg_config(**{"head.num_classes": 5}))
  with pytest.raises(ConfigError, match="num_classes=9"):
    task.train_loader(batch_size=4, seed=0, process_index=0, process_count=1)
