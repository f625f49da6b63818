"""Detection fine-tuning end to end: train.run of a tiny demo variant (Hungarian matching sharded over 8
devices, COCO mAP logged as eval/det/*), a backbone initialised from a classification pretraining workdir,
and the config errors."""

import json
import os

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import override, tiny_vit_config
from configs import finetune_coco
from visionfm_jax import config_lib, tasks
from visionfm_jax.training import checkpoint, init_from, train
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import vit


def tiny_detection_config(**overrides):
  """The demo shrunk: a pico/4 ViT (the pretraining fixture's) at 32 px, pyramid strides 8 and 16, a narrow
  head without a conv tower, 16 fixed scenes (no jitter, no flip) seen every step."""
  config = finetune_coco.get_config("demo")
  config.model.variant = "pico/4"
  config.model.image_size = config.data.image_size = 32
  config.head.levels = (8, 16)
  config.head.neck_channels = config.head.head_channels = 16
  config.head.num_convs = 0  # the classifier and box convs read the pyramid directly: a smaller graph to compile
  config.data.max_boxes = 4
  config.data.det_scale_range = (1.0, 1.0)
  config.data.augment.flip = False
  config.data.shapes_train_size = 16
  config.data.eval_examples = 16
  config.global_batch_size = 16
  config.total_steps = 8
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 1
  config.log_every = 2
  config.eval_every = config.checkpoint_every = 8
  config.progress_bar = False
  return override(config, **overrides)


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
  """A classification pretraining workdir of the 16 px pico/4 ViT with an 8-class head (config.json and a step-3
  checkpoint, as train.run writes them), its params random normal draws in the init's shapes (no compile)."""
  workdir = tmp_path_factory.mktemp("pretrain")
  config = tiny_vit_config()
  (workdir / "config.json").write_text(config.to_json_best_effort())
  params = _random_params(config, seed=0)
  saver = checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  saver.save(3, {"params": params, "step": np.int32(3)})
  saver.close()
  return workdir, params


def _random_params(config, seed):
  """Random normal params in the shapes of the task's init (traced, not compiled)."""
  abstract = nn.unbox(jax.eval_shape(tasks.build(config).init_variables, jax.random.key(0))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: rng.normal(0.0, 0.2, leaf.shape).astype(np.float32), abstract)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_run_from_pretrained_backbone_learns_and_logs_coco_map(tmp_path, pretrained_workdir):
  config = tiny_detection_config(init_from=str(pretrained_workdir[0]), init_from_prefix="backbone")
  last = train.run(config, str(tmp_path))
  rows = _rows(tmp_path)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  # 16 fixed images: the set loss drops every logged interval (measured 6.09, 5.03, 4.66, 4.51).
  assert np.all(np.diff(losses) < 0) and losses[-1] < 0.85 * losses[0], losses
  train_row = [r for r in rows if "train/loss" in r][-1]
  for part in ("class", "l1", "giou"):
    assert np.isfinite(train_row[f"train/loss_{part}"])
  evals = [r for r in rows if "eval/det/map" in r]
  assert [r["step"] for r in evals] == [8]
  for metric in ("map", "ap50", "ap75", "ar100"):
    assert 0.0 <= evals[0][f"eval/det/{metric}"] <= 1.0
  assert last["eval/det/map"] == evals[0]["eval/det/map"]
  assert "train/mfu" not in train_row  # no FLOP count for detection (tasks/detection.py)


def test_init_from_places_the_pretrained_backbone_and_leaves_neck_and_head_fresh(pretrained_workdir):
  workdir, source = pretrained_workdir
  config = tiny_detection_config(init_from=str(workdir), init_from_prefix="backbone")
  fresh = _random_params(config, seed=1)
  loaded = jax.device_get(init_from.load(config, jax.device_put(fresh, jax.devices()[0]), tasks.build(config).model))
  assert sorted(loaded) == ["backbone", "head", "neck"] and "head" in source
  chex.assert_trees_all_equal(loaded["neck"], fresh["neck"])
  chex.assert_trees_all_equal(loaded["head"], fresh["head"])  # the detector's head, not the classifier's
  backbone = {k: v for k, v in loaded["backbone"].items() if k != "pos_embed"}
  chex.assert_trees_all_equal(backbone, {k: v for k, v in source.items() if k not in ("pos_embed", "head")})
  np.testing.assert_allclose(loaded["backbone"]["pos_embed"], vit.resize_pos_embed(source["pos_embed"], 65))


def test_config_errors_name_the_field():
  # The checks every dense task shares (tasks/base.py check_dense_config), worded as segmentation's.
  with pytest.raises(ConfigError, match="config.model.num_classes=8: the backbone of a detection model has no "):
    tasks.build(tiny_detection_config(**{"model.num_classes": 8}))
  with pytest.raises(ConfigError, match="differs from the training crop config.data.image_size=48"):
    tasks.build(tiny_detection_config(**{"data.image_size": 48}))
  swin = {"model": config_lib.model_config("swinv2"), "model.variant": "pico", "model.patch_size": 2,
          "model.window_size": 4, "model.image_size": 32, "model.num_classes": 0}
  with pytest.raises(ConfigError, match=r"^config.head.levels=\(8, 64\): the backbone's stages have strides"):
    tasks.build(tiny_detection_config(**swin, **{"head.levels": (8, 64)}))
  with pytest.raises(ConfigError, match=r"^config.head.levels=\(8, 8\): expected distinct strides"):
    tasks.build(tiny_detection_config(**{"head.levels": (8, 8)}))
  with pytest.raises(ConfigError, match=r"^config.model.name='clip': detection takes"):
    tasks.build(tiny_detection_config(**{"model.name": "clip"}))
  config = tiny_detection_config()
  del config.head
  with pytest.raises(ConfigError, match="config.head: the detection task needs it .*configs/finetune_coco.py"):
    tasks.build(config)
  with pytest.raises(ConfigError, match="config.head.top_k=0: must be positive"):
    tasks.build(tiny_detection_config(**{"head.top_k": 0}))
  task = tasks.build(tiny_detection_config(**{"head.num_classes": 3}))
  with pytest.raises(ConfigError, match="config.head.num_classes=3"):
    task.train_loader(batch_size=16, seed=0, process_index=0, process_count=1)
  batch = task.synthetic_batch(4, np.random.default_rng(0))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["boxes"].shape == (4, 4, 4)
  assert np.all(batch["boxes"][..., 2:] > batch["boxes"][..., :2]) and np.all((batch["classes"] >= -1))
