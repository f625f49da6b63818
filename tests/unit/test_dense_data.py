"""Tests of the dense-task data: the scenes set, the ADE20K and COCO readers, the segmentation and detection
batch contracts (data/loader/dense.py) and the COCO ground truth."""

import io
import json

import numpy as np
from PIL import Image
import pytest

from visionfm_jax import config_lib
from visionfm_jax.data.embedded import scenes, shapes
from visionfm_jax.data.loader import dense
from visionfm_jax.data.sources import ade20k
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.transforms import dense_transforms
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import ConfigError, DataError

S = 32


def data_config(**overrides):
  cfg = config_lib.base_config().data
  cfg.image_size = S
  cfg.num_workers = 0
  cfg.source = "scenes"
  cfg.shapes_train_size = 64
  cfg.shapes_eval_size = 20
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def encode(image, fmt):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt)
  return buffer.getvalue()


def element(record, **extra):
  """A source record as it leaves DecodeDense."""
  return {**record, "orig_size": record["image"].shape[:2], "valid": True, **extra}


# --- scenes ---------------------------------------------------------------------------------------------


def test_scenes_deterministic_and_split_apart():
  a, b = scenes.ScenesSource("train", 50, S), scenes.ScenesSource("train", 50, S)
  for i in (0, 17, 49):
    ra, rb = a[i], b[np.int64(i)]
    for key in ("image", "mask", "boxes", "classes"):
      np.testing.assert_array_equal(ra[key], rb[key])
  val = scenes.ScenesSource("validation", 50, S)
  assert {a[i]["image"].tobytes() for i in range(50)}.isdisjoint(val[i]["image"].tobytes() for i in range(50))
  # Not the shapes record of the same index either.
  assert not np.array_equal(a[0]["image"], shapes.ShapesSource("train", 50, S)[0]["image"])
  with pytest.raises(IndexError):
    a[50]


def test_scenes_masks_and_boxes_agree():
  src = scenes.ScenesSource("validation", 120, 48)
  counts = []
  for i in range(120):
    r = src[i]
    image, mask, boxes, classes = r["image"], r["mask"], r["boxes"], r["classes"]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and mask.shape == (48, 48)
    assert mask.dtype == np.uint8 and boxes.dtype == np.float32 and classes.dtype == np.int32
    assert boxes.shape == (len(classes), 4) and 1 <= len(classes) <= 4 and r["image_id"] == i
    assert (boxes[:, :2] < boxes[:, 2:]).all() and boxes.min() >= 0 and boxes.max() <= 48
    labels = set(np.unique(mask).tolist())
    assert labels <= set(range(9)) | {255} and 0 in labels
    assert labels - {0, 255} == {1 + c for c in classes.tolist()}  # every kept object shows, none else
    assert (mask == 255).mean() < 0.15  # only antialiased edges and dropped slivers
    for c in set(classes.tolist()):
      ys, xs = np.nonzero(mask == 1 + c)
      mine = boxes[classes == c]
      # Each box is the extent of its object's labelled pixels: the union over a class is the class extent.
      np.testing.assert_array_equal(
        [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
        [mine[:, 0].min(), mine[:, 1].min(), mine[:, 2].max(), mine[:, 3].max()],
      )
      inside = np.zeros(mask.shape, bool)
      for x0, y0, x1, y1 in mine.astype(int):
        inside[y0:y1, x0:x1] = True
      assert inside[ys, xs].all()
      # The object is painted in a saturated colour there: far from the grey background.
      pixels = image[ys, xs].astype(int)
      assert np.median(pixels.max(-1) - pixels.min(-1)) > 60
    counts.append(len(classes))
  assert set(counts) == {1, 2, 3, 4}


def test_scenes_render_cost():
  import time  # pylint: disable=g-import-not-at-top

  src = scenes.ScenesSource("train", 200, 64)
  start = time.perf_counter()
  for i in range(100):
    src[i]
  assert (time.perf_counter() - start) / 100 < 0.02  # ~0.6 ms on one core; this only catches disasters


# --- transforms -----------------------------------------------------------------------------------------


def test_place_resizes_crops_and_pads():
  image = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)
  same = dense_transforms.place(image, (8, 12), 1.0, (2, -3), (10, 10), 0, Image.BILINEAR)
  np.testing.assert_array_equal(same[2:10, 0:9], image[:, 3:12])
  assert (same[:2] == 0).all() and (same[:, 9:] == 0).all()
  mask = np.repeat(np.arange(12, dtype=np.uint8)[None], 8, 0)
  half = dense_transforms.place(mask, (8, 12), 0.5, (0, 0), (6, 8), 255, Image.NEAREST)
  np.testing.assert_array_equal(half[:4, :6], np.tile([1, 3, 5, 7, 9, 11], (4, 1)))  # nearest: source centres
  assert (half[4:] == 255).all() and (half[:, 6:] == 255).all()
  # A drafted (half-size) decode of the same original maps to the same place: a linear ramp stays one.
  ys, xs = np.mgrid[0:8, 0:12]
  ramp = (10 * xs + 5 * ys).astype(np.float32)
  small = ramp.reshape(4, 2, 6, 2).mean((1, 3)).round().astype(np.uint8)
  out = dense_transforms.place(small, (8, 12), 1.0, (0, 0), (8, 12), 0, Image.BILINEAR)
  assert out.shape == (8, 12) and np.abs(out[1:-1, 1:-1] - ramp[1:-1, 1:-1]).max() <= 1


def test_boxes_move_clip_drop_and_pad():
  boxes = np.array([[2, 2, 6, 6], [10, 0, 11, 4], [30, 30, 40, 40]], np.float32)
  classes = np.array([0, 1, 2], np.int32)
  moved, kept = dense_transforms.place_boxes(boxes, classes, 2.0, (1, -5), 32)
  np.testing.assert_allclose(moved, [[0, 5, 7, 13], [15, 1, 17, 9]])  # x * 2 - 5, y * 2 + 1; the third left
  np.testing.assert_array_equal(kept, [0, 1])
  before = dense_transforms.truncated_boxes()
  padded, labels = dense_transforms.pad_boxes(moved, kept, 32, max_boxes=1)
  assert padded.shape == (1, 4) and labels.tolist() == [0] and dense_transforms.truncated_boxes() == before + 1
  padded, labels = dense_transforms.pad_boxes(moved, kept, 32, max_boxes=4)
  np.testing.assert_allclose(padded[:2], moved / 32)
  assert labels.tolist() == [0, 1, -1, -1] and (padded[2:] == 0).all()


def _flip_pair(transform_of, record):
  """Outputs of the same random draws without and with the flip, for a seed where the flip happened."""
  for seed in range(20):
    plain = transform_of(False).random_map(element(record), np.random.default_rng(seed))
    maybe = transform_of(True).random_map(element(record), np.random.default_rng(seed))
    if not np.array_equal(plain["image"], maybe["image"]):
      return plain, maybe
  raise AssertionError("never flipped")


def test_segmentation_train_transform():
  record = scenes.ScenesSource("train", 4, S)[1]
  full = dense_transforms.SegmentationTrain(S, (1.0, 1.0), False).random_map(element(record), np.random.default_rng(0))
  np.testing.assert_array_equal(full["image"], record["image"])  # scale 1 on an S x S image: unchanged
  np.testing.assert_array_equal(full["mask"], record["mask"].astype(np.int32))
  assert full["mask"].dtype == np.int32 and full["valid"]
  small = dense_transforms.SegmentationTrain(S, (0.5, 0.5), False).random_map(element(record), np.random.default_rng(0))
  assert (small["mask"][S // 2 :] == 255).all() and (small["mask"][:, S // 2 :] == 255).all()
  assert (small["image"][S // 2 :] == 0).all() and (small["mask"][: S // 2, : S // 2] != 255).mean() > 0.8
  big = dense_transforms.SegmentationTrain(S, (2.0, 2.0), False).random_map(element(record), np.random.default_rng(3))
  assert big["image"].shape == (S, S, 3) and (big["mask"] != 255).mean() > 0.8
  for i in range(6):  # masks stay on their shapes: object pixels saturated, background grey
    out = dense_transforms.SegmentationTrain(S, (0.75, 2.0), True).random_map(
      element(scenes.ScenesSource("train", 6, S)[i]), np.random.default_rng(i)
    )
    saturated = np.ptp(out["image"].astype(int), axis=-1) > 60
    objects = (out["mask"] > 0) & (out["mask"] < 255)
    assert saturated[objects].mean() > 0.9 and saturated[out["mask"] == 0].mean() < 0.1
  plain, flipped = _flip_pair(lambda f: dense_transforms.SegmentationTrain(S, (0.7, 1.5), f), record)
  np.testing.assert_array_equal(flipped["image"], plain["image"][:, ::-1])
  np.testing.assert_array_equal(flipped["mask"], plain["mask"][:, ::-1])


def test_detection_train_transform():
  record = scenes.ScenesSource("train", 4, S)[2]
  k = len(record["classes"])
  out = dense_transforms.DetectionTrain(S, (1.0, 1.0), False, 6).random_map(element(record), np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], record["image"])
  np.testing.assert_allclose(out["boxes"][:k], record["boxes"] / S)
  assert out["classes"].tolist() == record["classes"].tolist() + [-1] * (6 - k)
  out = dense_transforms.DetectionTrain(S, (0.5, 0.5), False, 6).random_map(element(record), np.random.default_rng(5))
  rows, cols = np.nonzero(out["image"].any(-1))  # where the half-size image was placed
  oy, ox = rows.min(), cols.min()
  np.testing.assert_allclose(out["boxes"][:k], (record["boxes"] * 0.5 + [ox, oy, ox, oy]) / S, atol=1e-6)
  for i in range(6):  # boxes stay on their shapes: saturated pixels inside boxes only
    out = dense_transforms.DetectionTrain(S, (0.75, 1.5), True, 6).random_map(
      element(scenes.ScenesSource("train", 6, S)[i]), np.random.default_rng(i)
    )
    saturated = np.ptp(out["image"].astype(int), axis=-1) > 60
    inside = np.zeros(saturated.shape, bool)
    for x0, y0, x1, y1 in np.round(out["boxes"][out["classes"] >= 0] * S).astype(int):
      inside[y0:y1, x0:x1] = True
      assert saturated[y0:y1, x0:x1].mean() > 0.3
    assert saturated[~inside].mean() < 0.05
  plain, flipped = _flip_pair(lambda f: dense_transforms.DetectionTrain(S, (0.6, 1.0), f, 6), record)
  np.testing.assert_array_equal(flipped["image"], plain["image"][:, ::-1])
  box, mirrored = plain["boxes"][:k], flipped["boxes"][:k]
  np.testing.assert_allclose(mirrored, np.stack([1 - box[:, 2], box[:, 1], 1 - box[:, 0], box[:, 3]], 1), atol=1e-6)
  np.testing.assert_array_equal(flipped["classes"], plain["classes"])


# --- pipelines on scenes --------------------------------------------------------------------------------


def test_train_batches_contract_and_resume():
  cfg = data_config()
  loader = dense.make_dense_train_loader(cfg, "segmentation", batch_size=4, seed=1, process_index=0, process_count=1)
  batch = next(iter(loader))
  assert set(batch) == {"image", "mask"} and batch["image"].shape == (4, S, S, 3)
  assert batch["image"].dtype == np.uint8 and batch["mask"].shape == (4, S, S) and batch["mask"].dtype == np.int32
  assert set(np.unique(batch["mask"]).tolist()) <= set(range(9)) | {255}
  cfg.max_boxes = 5
  it = iter(dense.make_dense_train_loader(cfg, "detection", batch_size=4, seed=1, process_index=0, process_count=1))
  batch = next(it)
  assert set(batch) == {"image", "boxes", "classes"}
  assert batch["boxes"].shape == (4, 5, 4) and batch["boxes"].dtype == np.float32
  assert batch["classes"].shape == (4, 5) and batch["classes"].dtype == np.int32
  real = batch["classes"] >= 0
  assert real.any(1).all() and (batch["classes"][~real] == -1).all() and (batch["boxes"][~real] == 0).all()
  boxes = batch["boxes"][real]
  assert boxes.min() >= 0 and boxes.max() <= 1 and (boxes[:, 2:] > boxes[:, :2]).all()
  state = it.get_state()
  want = next(it)
  resumed = iter(
    dense.make_dense_train_loader(cfg, "detection", batch_size=4, seed=1, process_index=0, process_count=1)
  )
  resumed.set_state(state)
  got = next(resumed)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_eval_batches_on_scenes():
  cfg = data_config(eval_examples=10)
  src = scenes.ScenesSource("validation", 20, S)
  batches = list(dense.make_dense_eval_iterator(cfg, "segmentation", batch_size=4, process_index=0, process_count=1))
  assert len(batches) == 3 and [b["valid"].sum() for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(batches[1]["image"][1], src[5]["image"])
  np.testing.assert_array_equal(batches[1]["mask"][1], src[5]["mask"])
  assert (batches[2]["mask"][2:] == 255).all() and (batches[2]["image"][2:] == 0).all()
  batches = list(
    dense.make_dense_eval_iterator(cfg, "detection", batch_size=4, process_index=1, process_count=2)
  )  # the second share: records 5..9
  b = batches[0]
  assert b["image_id"].dtype == np.int64 and b["image_id"][:4].tolist() == [5, 6, 7, 8]
  assert (b["orig_size"] == S).all() and (b["scale"] == 1).all() and batches[1]["valid"].tolist() == [1, 0, 0, 0]
  k = len(src[6]["classes"])
  np.testing.assert_allclose(b["boxes"][1, :k] * S / b["scale"][1], src[6]["boxes"])
  assert (batches[1]["classes"][1:] == -1).all()
  assert dense.class_names(cfg, "segmentation")[0] == "background" and len(dense.class_names(cfg, "segmentation")) == 9
  assert dense.class_names(cfg, "detection") == list(shapes.SHAPE_NAMES)


def coco_ap(ground_truth, batches):
  """pycocotools AP@[.5:.95] of the eval batches' boxes, mapped back to original pixels, as detections."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top

  gt = COCO()
  gt.dataset = ground_truth
  gt.createIndex()
  detections = []
  for b in batches:
    for row in np.flatnonzero(b["valid"]):
      size = b["image"].shape[1]
      for box, c in zip(b["boxes"][row] * size / b["scale"][row], b["classes"][row]):
        if c >= 0:
          x0, y0, x1, y1 = box.tolist()
          detections.append(
            {
              "image_id": int(b["image_id"][row]),
              "category_id": int(c),
              "bbox": [x0, y0, x1 - x0, y1 - y0],
              "score": 1.0,
            }
          )
  evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  return evaluator.stats[0]


def test_scenes_ground_truth_round_trip():
  cfg = data_config(eval_examples=12)
  gt = dense.coco_ground_truth(cfg, "validation")
  assert [im["id"] for im in gt["images"]] == list(range(12))
  assert [c["id"] for c in gt["categories"]] == list(range(8))
  src = scenes.ScenesSource("validation", 20, S)
  want = sum(len(src[i]["classes"]) for i in range(12))
  assert len(gt["annotations"]) == want and len({a["id"] for a in gt["annotations"]}) == want
  batches = list(dense.make_dense_eval_iterator(cfg, "detection", batch_size=5, process_index=0, process_count=1))
  assert coco_ap(gt, batches) == pytest.approx(1.0)


def test_bad_configs():
  with pytest.raises(ConfigError, match="kind"):
    dense.make_dense_train_loader(data_config(), "panoptic", batch_size=2, seed=0, process_index=0, process_count=1)
  config = config_lib.base_config()
  config.data.seg_scale_range = (2.0, 1.0)  # config_lib.check's ordered-pair check (main runs it before any loader)
  with pytest.raises(ConfigError, match=r"config.data.seg_scale_range=\(2.0, 1.0\): expected \(low, high\)"):
    config_lib.check_domains(config)
  with pytest.raises(ConfigError, match=r"config.data.mixture \(1 entries\): segmentation trains on one source"):
    dense.make_dense_train_loader(
      data_config(source="", mixture=(("scenes", 1.0),)),
      "segmentation",
      batch_size=2,
      seed=0,
      process_index=0,
      process_count=1,
    )
  with pytest.raises(DataError, match="records have no 'boxes'.*detection reads"):
    dense.make_dense_train_loader(
      data_config(source="shapes"), "detection", batch_size=2, seed=0, process_index=0, process_count=1
    )
  with pytest.raises(DataError, match=r"^config.data.eval_source='shapes' split 'validation': records have no 'boxes'"):
    dense.make_dense_eval_iterator(
      data_config(source="scenes", eval_source="shapes"), "detection", batch_size=2, process_index=0, process_count=1
    )
  with pytest.raises(DataError, match=r"^config.data.source='shapes': COCO ground truth needs"):
    dense.coco_ground_truth(data_config(source="shapes"))


# --- ADE20K ---------------------------------------------------------------------------------------------


def write_ade(root, split_dir="training"):
  """Four images with two-class label maps (left half label 2*i+1, right half 150 or 0), one corrupt JPEG,
  one pair whose label map has the wrong size. Returns the label maps by stem."""
  (root / "images" / split_dir).mkdir(parents=True)
  (root / "annotations" / split_dir).mkdir(parents=True)
  labels = {}
  for i, (h, w) in enumerate([(40, 60), (50, 30), (36, 36), (64, 48)]):
    stem = f"ADE_{split_dir}_{i:08d}"
    image = np.full((h, w, 3), 40 * i, np.uint8)
    label = np.zeros((h, w), np.uint8)
    label[:, : w // 2] = 2 * i + 1
    label[:, w // 2 :] = 150 if i % 2 else 0
    (root / "images" / split_dir / f"{stem}.jpg").write_bytes(encode(image, "JPEG"))
    (root / "annotations" / split_dir / f"{stem}.png").write_bytes(encode(label, "PNG"))
    labels[stem] = label
  (root / "images" / split_dir / "ADE_x_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  (root / "annotations" / split_dir / "ADE_x_corrupt.png").write_bytes(encode(np.ones((8, 8), np.uint8), "PNG"))
  (root / "images" / split_dir / "ADE_y_mismatch.jpg").write_bytes(encode(np.zeros((20, 20, 3), np.uint8), "JPEG"))
  (root / "annotations" / split_dir / "ADE_y_mismatch.png").write_bytes(encode(np.ones((10, 20), np.uint8), "PNG"))
  return labels


def test_ade20k_reader_and_pipelines(tmp_path):
  labels = write_ade(tmp_path / "ade", "training")
  write_ade(tmp_path / "ade", "validation")
  cfg = data_config(source=f"ade20k:{tmp_path / 'ade'}")
  src = sources.build_source(cfg.source, "train", cfg)
  assert len(src) == 6 and src.files[0] == "ADE_training_00000000.jpg"
  record = src[1]
  assert isinstance(record["image"], bytes) and record["mask"].dtype == np.uint8
  np.testing.assert_array_equal(record["mask"][:, :15], 2)  # 3 -> 2
  np.testing.assert_array_equal(record["mask"][:, 15:], 149)  # 150 -> 149
  assert (src[0]["mask"][:, 30:] == 255).all()  # 0 ('other') -> ignore
  assert labels["ADE_training_00000001"][0, 0] == 3
  names = sources.class_names(cfg.source, cfg)
  assert len(names) == 150 and names[:3] == ["wall", "building", "sky"] and names[-1] == "flag"
  assert dense.class_names(cfg, "segmentation") == names

  failures = transforms.decode_failures()
  it = iter(dense.make_dense_train_loader(cfg, "segmentation", batch_size=2, seed=0, process_index=0, process_count=1))
  masks = np.concatenate([next(it)["mask"] for _ in range(2)])  # 4 good records
  assert it.read - it.skipped == 4 and 1 <= it.skipped <= 2  # the last record of the epoch may be unread
  assert transforms.decode_failures() >= failures + it.skipped  # (the prefetch may have decoded more)
  assert masks.shape == (4, S, S) and set(np.unique(masks).tolist()) <= {0, 2, 4, 6, 149, 255}

  cfg.seg_eval_width = 48
  batches = list(dense.make_dense_eval_iterator(cfg, "segmentation", batch_size=4, process_index=0, process_count=1))
  assert [b["valid"].tolist() for b in batches] == [[True] * 4, [False, False, False, False]]
  first = batches[0]
  assert first["image"].shape == (4, S, 48, 3) and first["mask"].shape == (4, S, 48)
  # Image 0 (40 x 60): short side to 32 -> 32 x 48, fills the canvas; left half label 0, right ignore.
  assert (first["mask"][0, :, :23] == 0).all() and (first["mask"][0, :, 25:] == 255).all()
  # Image 1 (50 x 30): 53 x 32, centre-cropped to 32 rows, padded to 48 columns: 8 each side.
  assert (first["mask"][1, :, :8] == 255).all() and (first["mask"][1, :, 40:] == 255).all()
  assert (first["mask"][1, :, 8:23] == 2).all() and (first["mask"][1, :, 25:40] == 149).all()
  assert (first["image"][1, :, :8] == 0).all() and abs(int(first["image"][1, 10, 20, 0]) - 40) <= 3

  with pytest.raises(DataError, match="records have no 'boxes'"):
    dense.make_dense_train_loader(cfg, "detection", batch_size=2, seed=0, process_index=0, process_count=1)


def test_ade20k_layout_errors(tmp_path):
  cfg = data_config(source=f"ade20k:{tmp_path}")
  with pytest.raises(DataError, match=r"no folder .*images/training.*data_preparation.md"):
    sources.build_source(cfg.source, "train", cfg)
  write_ade(tmp_path, "validation")
  (tmp_path / "annotations" / "validation" / "ADE_validation_00000002.png").unlink()
  with pytest.raises(DataError, match=r"1 images .* have no <stem>.png .*ADE_validation_00000002.jpg"):
    sources.build_source(cfg.source, "validation", cfg)
  with pytest.raises(DataError, match="unknown split 'test'"):
    sources.build_source(cfg.source, "test", cfg)
  assert ade20k.decode_annotation(encode(np.array([[0, 1, 150, 151, 255]], np.uint8), "PNG")).tolist() == [
    [255, 0, 149, 255, 255]
  ]


# --- COCO -----------------------------------------------------------------------------------------------

COCO_CATEGORIES = [{"id": 7, "name": "train"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def write_coco(root, split_dir="val2017"):
  """Images 30 (80 x 60, two boxes + a crowd), 10 (40 x 100, one box past the edge), 20 (no annotations),
  40 (corrupt) in <root>/<split_dir>, and their instances JSON."""
  (root / split_dir).mkdir(parents=True)
  (root / "annotations").mkdir(exist_ok=True)
  sizes = {30: (80, 60), 10: (40, 100), 20: (50, 50), 40: (50, 50)}
  for image_id, (h, w) in sizes.items():
    data = b"not a jpeg" if image_id == 40 else encode(np.full((h, w, 3), image_id, np.uint8), "JPEG")
    (root / split_dir / f"{image_id:012d}.jpg").write_bytes(data)
  annotations = [
    {"id": 5, "image_id": 30, "category_id": 7, "bbox": [10, 20, 30, 40], "area": 900.0, "iscrowd": 0},
    {"id": 6, "image_id": 30, "category_id": 1, "bbox": [0, 0, 5, 6], "area": 25.5, "iscrowd": 0},
    {"id": 7, "image_id": 30, "category_id": 3, "bbox": [40, 40, 20, 30], "area": 500.0, "iscrowd": 1},
    {"id": 8, "image_id": 10, "category_id": 3, "bbox": [90, 10, 30, 20], "area": 400.0, "iscrowd": 0},
    {"id": 9, "image_id": 40, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100.0, "iscrowd": 0},
  ]
  images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w} for i, (h, w) in sizes.items()]
  (root / "annotations" / f"instances_{split_dir}.json").write_text(
    json.dumps({"images": images, "annotations": annotations, "categories": COCO_CATEGORIES})
  )


def test_coco_reads_no_image_outside_its_folder(tmp_path):
  """An annotation file naming '../secret.jpg', an absolute path, or a path through a linked folder reads no byte
  outside the image folder: the record is skipped and counted as outside_root."""
  write_coco(tmp_path / "coco", "val2017")
  secret = tmp_path / "private"
  secret.mkdir()
  (secret / "key.jpg").write_bytes(encode(np.full((50, 50, 3), 9, np.uint8), "JPEG"))
  (tmp_path / "coco" / "val2017" / "linked").symlink_to(secret)
  path = tmp_path / "coco" / "annotations" / "instances_val2017.json"
  table = json.loads(path.read_text())
  names = ["../../private/key.jpg", str(secret / "key.jpg"), "linked/key.jpg"]
  for image, name in zip(table["images"][1:], names):
    image["file_name"] = name
  path.write_text(json.dumps(table))
  source = sources.build_source(f"coco:{tmp_path / 'coco'}", "validation", data_config(source=""))
  failures = transforms.decode_failures()
  records = [source[i] for i in range(len(source))]
  assert [r["image"] is None for r in records] == [True, True, False, True]  # ids 10, 20, 30, 40
  assert transforms.decode_failures() == failures + 3


def test_coco_reader_and_pipelines(tmp_path):
  write_coco(tmp_path / "coco", "val2017")
  write_coco(tmp_path / "coco", "train2017")
  cfg = data_config(source=f"coco:{tmp_path / 'coco'}", max_boxes=4)
  assert sources.class_names(cfg.source, cfg) == ["person", "car", "train"]  # category ids 1, 3, 7
  evaluation = sources.build_source(cfg.source, "validation", cfg)
  assert len(evaluation) == 4 and [evaluation[i]["image_id"] for i in range(4)] == [10, 20, 30, 40]
  assert evaluation.index.category_ids == (1, 3, 7)
  record = evaluation[2]  # image 30: the crowd box is no training target
  np.testing.assert_allclose(record["boxes"], [[10, 20, 40, 60], [0, 0, 5, 6]])
  assert record["classes"].tolist() == [2, 0]
  np.testing.assert_allclose(evaluation[0]["boxes"], [[90, 10, 100, 30]])  # clipped to the 100 px width
  assert len(evaluation[1]["boxes"]) == 0
  training = sources.build_source(cfg.source, "train", cfg, training=True)
  assert [training[i]["image_id"] for i in range(len(training))] == [10, 30, 40]  # no empty image

  failures = transforms.decode_failures()
  it = iter(dense.make_dense_train_loader(cfg, "detection", batch_size=2, seed=0, process_index=0, process_count=1))
  batch = next(it)
  assert batch["boxes"].shape == (2, 4, 4) and sorted((batch["classes"] >= 0).sum(1).tolist()) == [1, 2]
  next(it)  # 4 good records: past the first epoch of 3, the corrupt one included
  assert it.skipped >= 1 and transforms.decode_failures() >= failures + it.skipped

  batches = list(dense.make_dense_eval_iterator(cfg, "detection", batch_size=3, process_index=0, process_count=1))
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.tolist() == [True, True, True, False, False, False]  # image 40 does not decode
  first = batches[0]
  assert first["image_id"].tolist() == [10, 20, 30] and first["orig_size"].tolist() == [[40, 100], [50, 50], [80, 60]]
  np.testing.assert_allclose(first["scale"], [S / 100, S / 50, S / 80])
  np.testing.assert_allclose(first["boxes"][2, :2] * S / first["scale"][2], record["boxes"], atol=1e-4)
  assert first["classes"][2].tolist() == [2, 0, -1, -1] and (first["classes"][1] == -1).all()
  image_30 = first["image"][2]  # 80 x 60 -> 32 x 24 at the top-left
  assert abs(int(image_30[:32, :24].mean()) - 30) <= 2 and (image_30[:, 24:] == 0).all()

  gt = dense.coco_ground_truth(cfg, "validation", -1)
  assert [im["id"] for im in gt["images"]] == [10, 20, 30, 40]
  assert gt["images"][0] == {"id": 10, "height": 40, "width": 100, "file_name": "000000000010.jpg"}
  assert [(c["id"], c["name"], c["coco_id"]) for c in gt["categories"]] == [
    (0, "person", 1),
    (1, "car", 3),
    (2, "train", 7),
  ]
  crowd = [a for a in gt["annotations"] if a["iscrowd"]]
  assert len(gt["annotations"]) == 5 and crowd == [
    {"id": 7, "image_id": 30, "category_id": 1, "bbox": [40.0, 40.0, 20.0, 30.0], "area": 500.0, "iscrowd": 1}
  ]
  assert len(dense.coco_ground_truth(cfg, "validation", 2)["images"]) == 2
  # The boxes mapped back as detections: 'train' is found (AP 1), 'person' in 1 of 2 images (the corrupt one
  # yields nothing; AP 0.505 with COCO's 101-point interpolation), 'car' not (the box clipped to the image
  # has IoU 1/3 with its ground truth, which extends past the image); the crowd box is ignored.
  assert coco_ap(gt, batches) == pytest.approx((1 + 0.50495 + 0) / 3, abs=1e-4)

  with pytest.raises(DataError, match="records have no 'mask'"):
    dense.make_dense_train_loader(cfg, "segmentation", batch_size=2, seed=0, process_index=0, process_count=1)


def test_coco_layout_errors(tmp_path):
  cfg = data_config(source=f"coco:{tmp_path}")
  with pytest.raises(DataError, match=r"no annotation file .*instances_val2017.json.*data_preparation.md"):
    sources.build_source(cfg.source, "validation", cfg)
  (tmp_path / "annotations").mkdir()
  (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": []')
  with pytest.raises(DataError, match="cannot read .*instances_val2017.json"):
    sources.build_source(cfg.source, "validation", cfg)
  (tmp_path / "annotations" / "instances_val2017.json").write_text(
    json.dumps(
      {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 2, "width": 2}],
        "categories": COCO_CATEGORIES,
        "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}],
      }
    )
  )
  (tmp_path / "val2017").mkdir()
  with pytest.raises(DataError, match="unknown image/category id"):
    sources.build_source(cfg.source, "validation", cfg)


@pytest.mark.parametrize(
  "spec,parsed",
  [
    ("scenes", ("scenes", "", "")),
    ("ade20k:/data/ADEChallengeData2016", ("ade20k", "/data/ADEChallengeData2016", "")),
    ("coco:/data/coco", ("coco", "/data/coco", "")),
  ],
)
def test_dense_source_specs(spec, parsed):
  assert sources._parse(spec) == parsed  # pylint: disable=protected-access
  for bad in ("scenes:x", "ade20k", "coco:"):
    with pytest.raises(DataError, match="config.data.source"):
      sources._parse(bad)  # pylint: disable=protected-access
