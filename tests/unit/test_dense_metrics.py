"""Dense metrics: confusion-matrix mIoU / pixel accuracy on hand-made masks, COCO mAP on hand-made detections
(values worked out with COCO's 101-point interpolation) and agreement with pycocotools' own file-based flow."""

import contextlib
import io
import json

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from visionfm_jax.errors import DataError
from visionfm_jax.evaluate import detection, segmentation
from visionfm_jax.tasks.base import EvalContext


def _ctx(batch_size=8):
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  return EvalContext(mesh=mesh, batch_size=batch_size, process_index=0, process_count=1)


def test_each_process_reads_its_share_of_an_eval_batch():
  assert EvalContext(mesh=None, batch_size=32, process_index=1, process_count=4).local_batch_size == 8
  assert _ctx(batch_size=16).local_batch_size == 16


# ---------------------------------------------------------------------------------------------------- segmentation


def test_miou_and_pixel_accuracy_by_hand():
  labels = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
  pred = np.array([[0, 1, 1, 1], [0, 3, 2, 0]])
  confusion = np.asarray(segmentation.confusion_matrix(pred, labels, num_classes=5))
  # Labelled pixels: (0,0) (0,1) (1,1) (1,1) (2,0) (2,3); the ignored ones vanish.
  expected = np.zeros((5, 5), int)
  for gt, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 0), (2, 3)]:
    expected[gt, p] += 1
  np.testing.assert_array_equal(confusion, expected)
  metrics = segmentation.segmentation_metrics(confusion)
  # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 0 / 2 = 0; class 3 only
  # predicted: 0 / 1 = 0 (counts); class 4 absent from both: NaN (left out of the mean).
  np.testing.assert_allclose(metrics["per_class_iou"][:4], [1 / 3, 2 / 3, 0.0, 0.0])
  assert np.isnan(metrics["per_class_iou"][4])
  np.testing.assert_allclose(metrics["miou"], (1 / 3 + 2 / 3) / 4)
  np.testing.assert_allclose(metrics["pixel_acc"], 3 / 6)
  np.testing.assert_allclose(metrics["mean_acc"], (1 / 2 + 1 + 0) / 3)


def test_perfect_and_constant_predictions():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, (2, 8, 8))
  labels[0, :2] = 255
  perfect = segmentation.segmentation_metrics(segmentation.confusion_matrix(labels, labels, 4))
  assert perfect["miou"] == 1.0 and perfect["pixel_acc"] == 1.0
  constant = segmentation.segmentation_metrics(segmentation.confusion_matrix(np.zeros_like(labels), labels, 4))
  share = np.mean(labels[labels != 255] == 0)
  np.testing.assert_allclose(constant["pixel_acc"], share)
  np.testing.assert_allclose(constant["miou"], share / 4)  # class 0: TP / all pixels; others 0


def test_segmentation_evaluator_sums_batches_and_skips_padding():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, (16, 4, 4)).astype(np.int32)
  # The model "predicts" the class stored in the image's first channel; the padded rows are garbage.
  images = labels[..., None].repeat(3, axis=-1).astype(np.uint8)
  images[8:] = 2
  valid = np.arange(16) < 12
  predict = lambda params, x: jax.nn.one_hot(x[..., 0].astype(np.int32), 3)
  evaluator = segmentation.SegmentationEvaluator(predict, _ctx(), num_classes=3)
  batches = [{"image": images[i : i + 8], "mask": labels[i : i + 8], "valid": valid[i : i + 8]} for i in (0, 8)]
  metrics = evaluator(None, batches)
  confusion = segmentation.confusion_matrix(images[:12, ..., 0], labels[:12], 3)
  for name, value in segmentation.segmentation_metrics(confusion).items():
    if name != "per_class_iou":
      np.testing.assert_allclose(metrics[name], value, rtol=1e-6)
  assert metrics["miou"] < 1.0  # rows 8..11 are wrong and counted, rows 12..15 are not


# ---------------------------------------------------------------------------------------------------- detection


def _gt(boxes_per_image, categories=(0, 1)):
  images, annotations = [], []
  for image_id, boxes in enumerate(boxes_per_image):
    images.append({"id": image_id, "height": 100, "width": 100})
    for category, (x, y, w, h) in boxes:
      annotations.append(
        {
          "id": len(annotations) + 1,
          "image_id": image_id,
          "category_id": category,
          "bbox": [x, y, w, h],
          "area": w * h,
          "iscrowd": 0,
        }
      )
  return {"images": images, "annotations": annotations, "categories": [{"id": c, "name": str(c)} for c in categories]}


def _det(image_id, category, bbox, score):
  return {"image_id": image_id, "category_id": category, "bbox": list(bbox), "score": score}


GT = _gt([[(0, (10, 10, 30, 30)), (1, (50, 50, 40, 20))], [(0, (5, 60, 20, 30))]])


def test_perfect_detections_score_one():
  dets = [_det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in GT["annotations"]]
  metrics = detection.coco_map(GT, dets)
  assert metrics["map"] == pytest.approx(1.0) and metrics["ap50"] == pytest.approx(1.0)
  assert metrics["ap75"] == pytest.approx(1.0)
  assert detection.coco_map(GT, [])["map"] == 0.0


def test_map_by_hand_with_101_point_interpolation():
  # One category, two boxes; one found exactly: precision 1 up to recall 0.5, then nothing: 51 of the 101
  # recall points (0, 0.01, ..., 0.5) have precision 1.
  gt = _gt([[(0, (0, 0, 10, 10)), (0, (50, 50, 10, 10))]], categories=(0,))
  half = detection.coco_map(gt, [_det(0, 0, (0, 0, 10, 10), 0.9)])
  assert half["map"] == pytest.approx(51 / 101) and half["ap50"] == pytest.approx(51 / 101)
  # A false positive ranked first, then both boxes: precision 1/2 at recall 1/2, 2/3 at recall 1; the
  # interpolated precision (best at any higher recall) is 2/3 everywhere.
  dets = [_det(0, 0, (80, 0, 10, 10), 0.95), _det(0, 0, (0, 0, 10, 10), 0.9), _det(0, 0, (50, 50, 10, 10), 0.8)]
  assert detection.coco_map(gt, dets)["map"] == pytest.approx(2 / 3)
  # IoU 0.62 with the only box: a hit at thresholds 0.5, 0.55, 0.6 and a miss at the 7 others.
  one = _gt([[(0, (0, 0, 10, 10))]], categories=(0,))
  metrics = detection.coco_map(one, [_det(0, 0, (0, 0, 10, 6.2), 0.9)])
  assert metrics["map"] == pytest.approx(0.3) and metrics["ap50"] == pytest.approx(1.0) and metrics["ap75"] == 0.0


def test_agrees_with_pycocotools_file_flow(tmp_path):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  rng = np.random.default_rng(2)
  dets = []
  for a in GT["annotations"]:
    for _ in range(3):
      x, y, w, h = np.asarray(a["bbox"]) + rng.normal(0, 3, 4)
      dets.append(_det(a["image_id"], int(rng.integers(0, 2)), (x, y, max(w, 1), max(h, 1)), float(rng.random())))
  (tmp_path / "gt.json").write_text(json.dumps(GT))
  (tmp_path / "dets.json").write_text(json.dumps(dets))
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(str(tmp_path / "gt.json"))
    evaluation = COCOeval(coco, coco.loadRes(str(tmp_path / "dets.json")), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  log = []
  ours = detection.coco_map(GT, dets, log=log)
  assert 0.0 < ours["map"] < 1.0
  for name, index in detection.STAT_NAMES.items():
    assert ours[name] == pytest.approx(evaluation.stats[index])
  assert "Average Precision" in log[0]


def test_ground_truth_fields_are_filled_or_named():
  bare = {
    "images": [{"id": 0}],
    "categories": [{"id": 0}],
    "annotations": [{"image_id": 0, "category_id": 0, "bbox": [0, 0, 10, 10]}],
  }
  assert detection.coco_map(bare, [_det(0, 0, (0, 0, 10, 10), 0.5)])["map"] == pytest.approx(1.0)
  with pytest.raises(DataError, match="lacks \\['bbox'\\]"):
    detection.coco_map({**bare, "annotations": [{"image_id": 0, "category_id": 0}]}, [_det(0, 0, (0, 0, 1, 1), 1.0)])


def test_coco_detections_convert_to_original_pixels():
  scores = np.array([[0.9, 0.5], [0.8, 0.1]])
  classes = np.array([[1, 0], [0, 0]])
  boxes = np.array([[[0.1, 0.2, 0.5, 1.2], [0, 0, 0.1, 0.1]], [[0, 0, 1, 1], [0, 0, 1, 1]]])
  dets = detection.coco_detections(
    scores,
    classes,
    boxes,
    image_ids=np.array([7, 8]),
    to_pixels=np.array([200.0, 50.0]),
    valid=np.array([True, False]),
    orig_size=np.array([[150, 100], [50, 50]]),
  )
  assert [d["image_id"] for d in dets] == [7, 7] and [d["category_id"] for d in dets] == [1, 0]
  # (20, 40, 100, 240) clipped to the 100 x 150 (w x h) image -> xywh (20, 40, 80, 110).
  np.testing.assert_allclose(dets[0]["bbox"], [20, 40, 80, 110])
  assert dets[0]["score"] == 0.9


def test_detection_evaluator_end_to_end():
  # Two 32 px images shown at scale 0.5 (originals 64 x 64); the "model" returns stored outputs.
  gt = _gt([[(0, (8, 8, 16, 16))], [(1, (0, 32, 32, 32))]])
  for image in gt["images"]:
    image.update(height=64, width=64)
  logits = np.full((8, 3, 2), -9.0, np.float32)
  boxes = np.zeros((8, 3, 4), np.float32)
  logits[0, 1, 0], boxes[0, 1] = 5.0, [8 / 64, 8 / 64, 24 / 64, 24 / 64]
  logits[1, 2, 1], boxes[1, 2] = 5.0, [0, 0.5, 0.5, 1.0]
  batch = {
    "image": np.zeros((8, 32, 32, 3), np.uint8),
    "image_id": np.arange(8),
    "valid": np.arange(8) < 2,
    "orig_size": np.full((8, 2), 64, np.int32),
    "scale": np.full((8,), 0.5, np.float32),
  }
  predict = lambda params, images: params
  evaluator = detection.DetectionEvaluator(predict, _ctx(), gt, top_k=4)
  metrics = evaluator({"logits": logits, "boxes": boxes}, [batch])
  assert metrics["map"] == pytest.approx(1.0)
