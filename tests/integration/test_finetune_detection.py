"""Detection fine-tuning end to end: train.run of a tiny demo variant (Hungarian matching sharded over 8
devices, COCO mAP logged as eval/det/*), a backbone initialised from a classification pretraining workdir,
and the config errors."""

import collections
import json
import os

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import finetune_coco
from visionfm_jax import config_lib, tasks
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate import detection as detection_eval
from visionfm_jax.models import vit
from visionfm_jax.training import checkpoint, init_from, train

from conftest import override, tiny_vit_config


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


IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _iou(dets: np.ndarray, gts: np.ndarray) -> np.ndarray:
  """(D, G) IoU of xywh boxes."""
  lo = np.maximum(dets[:, None, :2], gts[None, :, :2])
  hi = np.minimum(dets[:, None, :2] + dets[:, None, 2:], gts[None, :, :2] + gts[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  union = np.prod(dets[:, 2:], -1)[:, None] + np.prod(gts[:, 2:], -1)[None] - inter
  return inter / union


def _coco_box_metrics(ground_truth: dict, detections: list[dict], max_dets: int = 100) -> dict[str, float]:
  """COCO's box AP and AR (area 'all', no crowd) written from its definition: per class and IoU threshold, each
  image's best `max_dets` detections claim in score order the unclaimed box of highest IoU >= the threshold; the
  precision of the ranked detections of all images, made non-increasing in recall, is read at the 101 recall
  points and averaged; map averages over the 10 thresholds and the classes that have boxes, ap50 / ap75 at one
  threshold, ar100 the final recall."""
  images = sorted(image["id"] for image in ground_truth["images"])
  ranked = collections.defaultdict(list)
  for d in sorted(detections, key=lambda d: -d["score"]):  # a stable sort, as COCO's
    ranked[d["image_id"], d["category_id"]].append(d)
  precision, recall = {}, {}
  for cat in (c["id"] for c in ground_truth["categories"]):
    boxes = {
      i: np.array(
        [a["bbox"] for a in ground_truth["annotations"] if a["image_id"] == i and a["category_id"] == cat], float
      ).reshape(-1, 4)
      for i in images
    }
    total = sum(len(b) for b in boxes.values())
    if not total:
      continue
    for t in IOU_THRESHOLDS:
      scores, hits = [], []
      for i in images:
        mine = ranked[i, cat][:max_dets]
        ious = _iou(np.array([d["bbox"] for d in mine], float).reshape(-1, 4), boxes[i])
        claimed = np.zeros(len(boxes[i]), bool)
        for row, d in enumerate(mine):
          best = np.where(claimed | (ious[row] < min(t, 1 - 1e-10)), -1.0, ious[row])
          hit = best.size > 0 and best.max() >= 0
          if hit:
            claimed[len(best) - 1 - np.argmax(best[::-1])] = True  # the last of equal IoUs, as COCO's loop
          scores.append(d["score"])
          hits.append(hit)
      order = np.argsort(-np.array(scores), kind="mergesort")
      tp = np.cumsum(np.array(hits, bool)[order])
      fp = np.cumsum(~np.array(hits, bool)[order])
      rc, pr = tp / total, tp / np.maximum(tp + fp, np.spacing(1))
      pr = np.maximum.accumulate(pr[::-1])[::-1]  # the best precision at any higher recall
      at = np.searchsorted(rc, RECALL_POINTS, side="left")
      precision[cat, t] = np.mean([pr[k] if k < len(pr) else 0.0 for k in at])
      recall[cat, t] = rc[-1] if len(rc) else 0.0
  at_threshold = lambda t: np.mean([v for (_, u), v in precision.items() if np.isclose(u, t)])
  return {
    "map": float(np.mean(list(precision.values()))),
    "ap50": float(at_threshold(0.5)),
    "ap75": float(at_threshold(0.75)),
    "ar100": float(np.mean(list(recall.values()))),
  }


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_run_from_pretrained_backbone_learns_and_logs_coco_map(tmp_path, pretrained_workdir, monkeypatch):
  config = tiny_detection_config(init_from=str(pretrained_workdir[0]), init_from_prefix="backbone")
  scored = []  # (ground truth, detections) of each evaluation, as the evaluator hands them to pycocotools
  coco_map = detection_eval.coco_map
  monkeypatch.setattr(
    detection_eval, "coco_map", lambda gt, dets, *a, **k: scored.append((gt, dets)) or coco_map(gt, dets, *a, **k)
  )
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
  # The logged figures are COCO's of the model's top-k detections on the 16 eval scenes.
  [(ground_truth, detections)] = scored
  assert sorted(d["image_id"] for d in detections) == sorted(list(range(16)) * config.head.top_k)
  want = _coco_box_metrics(ground_truth, detections)
  assert want["ap50"] > 0 and want["ar100"] > 0, want
  for metric in ("map", "ap50", "ap75", "ar100"):
    assert evals[0][f"eval/det/{metric}"] == pytest.approx(want[metric], abs=1e-12), metric
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
  swin = {
    "model": config_lib.model_config("swinv2"),
    "model.variant": "pico",
    "model.patch_size": 2,
    "model.window_size": 4,
    "model.image_size": 32,
    "model.num_classes": 0,
  }
  with pytest.raises(ConfigError, match=r"^config.head.levels=\(8, 64\): the backbone's stages have strides"):
    tasks.build(tiny_detection_config(**swin, **{"head.levels": (8, 64)}))
  with pytest.raises(ConfigError, match=r"^config.head.levels=\(8, 8\): expected distinct strides"):
    tasks.build(tiny_detection_config(**{"head.levels": (8, 8)}))
  with pytest.raises(ConfigError, match=r"^config.model.name='clip': detection takes"):
    tasks.build(tiny_detection_config(**{"model.name": "clip"}))
  config = tiny_detection_config()
  del config.head
  with pytest.raises(
    ConfigError,
    match=r"config.head: the detection task needs it .*config_lib.base_config\(model, "
    r"task='detection'\) has it",
  ):
    tasks.build(config)
  with pytest.raises(ConfigError, match="config.head.top_k=0: must be positive"):
    tasks.build(tiny_detection_config(**{"head.top_k": 0}))
  task = tasks.build(tiny_detection_config(**{"head.num_classes": 3}))
  with pytest.raises(ConfigError, match="config.head.num_classes=3"):
    task.train_loader(batch_size=16, seed=0, process_index=0, process_count=1)
  batch = task.synthetic_batch(4, np.random.default_rng(0))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["boxes"].shape == (4, 4, 4)
  assert np.all(batch["boxes"][..., 2:] > batch["boxes"][..., :2]) and np.all((batch["classes"] >= -1))
