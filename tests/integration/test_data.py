"""Tests of visionfm_jax.data: the shapes set, transforms, sources and the grain pipelines (CPU, host-only)."""

import hashlib
import io
import json
import re
import sys
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from visionfm_jax import config_lib
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import ConfigError, DataError


def data_config(**overrides):
  cfg = config_lib.base_config().data
  cfg.image_size = 32
  cfg.num_workers = 0
  cfg.shapes_train_size = 512
  cfg.shapes_eval_size = 64
  cfg.augment.crop_scale = (0.6, 1.0)
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


class RangeSource:
  """Record i is a 4x4 image whose label is i: shows which records a pipeline read."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return {"image": np.full((4, 4, 3), index % 256, np.uint8), "label": int(index)}

  def __repr__(self):
    return f"RangeSource({self.n})"


class CorruptEveryFifth(RangeSource):
  """PNG bytes, except that every fifth record is garbage."""

  def __getitem__(self, index):
    record = super().__getitem__(index)
    record["image"] = b"garbage" if index % 5 == 0 else encode(record["image"], "PNG")
    return record


def encode(image, fmt):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt)
  return buf.getvalue()


def digest(image):
  return hashlib.sha1(image.tobytes()).hexdigest()


# --- shapes ---------------------------------------------------------------------------------------------


def test_shapes_deterministic_per_index():
  a, b = shapes.ShapesSource("train", 100, 48), shapes.ShapesSource("train", 100, 48)
  for i in (0, 7, 99):
    ra, rb = a[i], b[np.int64(i)]
    np.testing.assert_array_equal(ra["image"], rb["image"])
    np.testing.assert_array_equal(ra["box"], rb["box"])
    assert (ra["label"], ra["colour"], ra["caption"]) == (rb["label"], rb["colour"], rb["caption"])
  assert digest(a[0]["image"]) != digest(a[1]["image"])
  assert digest(a[0]["image"]) != digest(shapes.ShapesSource("train", 100, 48, seed=1)[0]["image"])


def test_shapes_splits_disjoint():
  train, val = shapes.ShapesSource("train", 300, 32), shapes.ShapesSource("validation", 300, 32)
  train_digests = {digest(train[i]["image"]) for i in range(300)}
  assert not train_digests & {digest(val[i]["image"]) for i in range(300)}


def test_shapes_record_contents():
  src = shapes.ShapesSource("train", 400, 64)
  labels, colours = set(), set()
  for i in range(400):
    r = src[i]
    assert r["image"].shape == (64, 64, 3) and r["image"].dtype == np.uint8
    assert 0 <= r["label"] < len(shapes.SHAPE_NAMES) == 8
    assert 0 <= r["colour"] < len(shapes.COLOUR_NAMES)
    assert shapes.SHAPE_NAMES[r["label"]] in r["caption"] and shapes.COLOUR_NAMES[r["colour"]] in r["caption"]
    ymin, xmin, ymax, xmax = r["box"]
    assert r["box"].dtype == np.float32 and 0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1
    labels.add(r["label"])
    colours.add(r["colour"])
  assert labels == set(range(8)) and colours == set(range(len(shapes.COLOUR_NAMES)))
  with pytest.raises(IndexError):
    src[400]


def test_shapes_box_holds_the_shape():
  src = shapes.ShapesSource("validation", 50, 64)
  for i in range(50):
    r = src[i]
    colour = np.array(shapes.COLOURS[r["colour"]], np.float32)
    close = np.abs(r["image"].astype(np.float32) - colour).max(-1) <= 2 * shapes.COLOUR_JITTER
    ymin, xmin, ymax, xmax = np.round(r["box"] * 64).astype(int)
    inside = close[ymin:ymax, xmin:xmax].sum()
    assert inside > 0.3 * (ymax - ymin) * (xmax - xmin)
    assert close.sum() - inside <= 0.02 * 64 * 64  # a few background pixels may match by chance


def test_shapes_render_speed_sanity():
  src = shapes.ShapesSource("train", 1000, 64)
  start = time.perf_counter()
  for i in range(200):
    src[i]
  assert (time.perf_counter() - start) / 200 < 0.01  # the target is < 0.3 ms; this only catches disasters


# --- transforms -----------------------------------------------------------------------------------------


def test_random_resized_crop_shape_and_window():
  rng = np.random.default_rng(0)
  image = np.random.default_rng(1).integers(0, 256, (50, 80, 3), dtype=np.uint8)
  out = transforms.RandomResizedCrop(32, (0.08, 1.0)).random_map({"image": image, "label": 1}, rng)
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8 and out["label"] == 1
  for _ in range(200):
    top, left, h, w = transforms.crop_window(50, 80, rng, (0.3, 0.9), (3 / 4, 4 / 3))
    assert 0 <= top <= 50 - h and 0 <= left <= 80 - w
    assert 0.25 <= h * w / 4000 <= 0.95 and 0.7 <= w / h <= 1.4
  # No crop of >= 90% area fits a 3/4..4/3 aspect in a 10x100 strip: the central fallback.
  assert transforms.crop_window(10, 100, rng, (0.9, 1.0)) == (0, 43, 10, 13)


def test_flip_draws_for_the_device():
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  outs = [transforms.RandomFlip().random_map({"image": image}, np.random.default_rng(seed)) for seed in range(20)]
  assert all(out["image"] is image and out[transforms.FLIP].dtype == np.uint8 for out in outs)
  assert 0 < sum(int(out[transforms.FLIP]) for out in outs) < 20


def test_color_jitter_draws_for_the_device():
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  with pytest.raises(ValueError, match="strength=0"):
    transforms.ColorJitter(0.0)
  for seed in range(10):
    out = transforms.ColorJitter(0.4).random_map({"image": image, "label": 0}, np.random.default_rng(seed))
    assert out["image"] is image
    factors, order = out[transforms.JITTER], out[transforms.JITTER_ORDER]
    assert factors.dtype == np.float32 and ((0.6 <= factors) & (factors <= 1.4)).all()
    assert order.dtype == np.int32 and sorted(order) == [0, 1, 2]


def test_eval_transform_central_crop():
  same = np.zeros((32, 32, 3), np.uint8)
  assert transforms.EvalTransform(32).map({"image": same})["image"] is same
  # 64x128 at size 32: shorter side to 37, so the crop is the central 55.4 px square, columns 36.3..91.7.
  wide = np.zeros((64, 128, 3), np.uint8)
  wide[:, 30:98] = 255
  out = transforms.EvalTransform(32).map({"image": wide})["image"]
  assert out.shape == (32, 32, 3) and (out == 255).all()
  wide[:, 30:98], wide[:, 44:84] = 0, 255
  out = transforms.EvalTransform(32).map({"image": wide})["image"]
  assert out[:, 0].max() == 0 and out[:, 16].min() == 255


def test_decode():
  image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.Decode().map({"image": encode(image, "PNG")})["image"], image)
  grey = transforms.Decode().map({"image": encode(image[:, :, 0], "PNG")})["image"]
  assert grey.shape == (20, 30, 3)
  big = np.zeros((300, 400, 3), np.uint8)
  assert transforms.Decode().map({"image": encode(big, "JPEG")})["image"].shape == (300, 400, 3)
  assert transforms.Decode(100).map({"image": encode(big, "JPEG")})["image"].shape == (150, 200, 3)
  assert transforms.Decode().map({"image": image})["image"] is image
  failures = transforms.decode_failures()
  bad = transforms.Decode().map({"image": b"not an image", "label": 3})
  assert bad["image"] is None and transforms.decode_failures() == failures + 1
  marked = transforms.MarkUndecodable(8).map(bad)
  assert marked["valid"] is False and marked["image"].shape == (8, 8, 3) and marked["label"] == 3


# --- pipelines ------------------------------------------------------------------------------------------


def test_train_loader_batches():
  cfg = data_config()
  cfg.augment.color_jitter = 0.3
  it = iter(pipeline.make_train_loader(cfg, batch_size=16, seed=3, process_index=0, process_count=1))
  batch = next(it)
  assert set(batch) == {"image", "label", *transforms.DEVICE_KEYS}
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["label"].min() >= 0 and batch["label"].max() < 8


@pytest.mark.parametrize("workers", [0, 2])
def test_train_iterator_resumes_bitwise(tmp_path, workers):
  cfg = data_config(num_workers=workers)
  cfg.augment.color_jitter = 0.2

  def fresh():
    return iter(pipeline.make_train_loader(cfg, batch_size=8, seed=5, process_index=0, process_count=1))

  assert_resumes(fresh, tmp_path, ("orbax", "state") if workers == 0 else ("orbax",))  # worker start-up is slow


def assert_resumes(fresh, tmp_path, restores=("orbax", "state"), skip=3):
  """An iterator from `fresh()` is saved after `skip` batches; every restore must then give its next two
  batches bitwise: 'orbax' (grain's Orbax handler), 'state' (set_state), 'replay' (a new iterator that
  skips as many batches: determinism)."""
  it = fresh()
  for _ in range(skip):
    next(it)
  state = it.get_state()
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "it", args=grain.checkpoint.CheckpointSave(it))
  expected = [next(it) for _ in range(2)]
  for restore in restores:
    resumed = fresh()
    if restore == "orbax":
      resumed = checkpointer.restore(tmp_path / "it", args=grain.checkpoint.CheckpointRestore(resumed))
    elif restore == "state":
      resumed.set_state(state)
    else:
      for _ in range(skip):
        next(resumed)
    for want in expected:
      got = next(resumed)
      assert set(got) == set(want)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_train_shards_disjoint_and_complete():
  cfg = data_config(image_size=4)
  cfg.augment.random_resized_crop = False
  seen = []
  for index in range(2):
    loader = pipeline.make_train_loader(
      cfg, batch_size=8, seed=1, process_index=index, process_count=2, source=RangeSource(64)
    )
    it = iter(loader)
    seen.append(np.concatenate([next(it)["label"] for _ in range(4)]))  # one epoch of the 32-record shard
  assert len(set(seen[0])) == len(set(seen[1])) == 32
  assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(64))


def _range_loader(cfg, records, batch_size, index, count):
  return iter(
    pipeline.make_train_loader(
      cfg, batch_size=batch_size, seed=1, process_index=index, process_count=count, source=RangeSource(records)
    )
  )


@pytest.mark.slow
@pytest.mark.parametrize("old_workers,new_workers", [(0, 0), (2, 0), (0, 2)])
def test_two_processes_to_one_continue_the_epoch_without_repeating_a_record(old_workers, new_workers):
  """2 processes read 3 batches of 4 each (24 of the 64 records) and save their iterator states; 1 process
  restores both and reads on to the end of the epoch: no record twice, and at most a round of the new
  residues (here 1 x max(1, workers) positions) plus one batch per old worker left out of the epoch."""
  records, batch = 64, 4
  cfg = data_config(image_size=4, num_workers=old_workers)
  cfg.augment.random_resized_crop = False
  seen, states = [], []
  for index in range(2):
    it = _range_loader(cfg, records, batch, index, 2)
    seen.extend(np.concatenate([next(it)["label"] for _ in range(3)]))
    states.append(it.get_state())
  assert len(set(seen)) == len(seen) == 24

  cfg.num_workers = new_workers
  resumed = _range_loader(cfg, records, 2 * batch, 0, 1)
  resumed.continue_from(states)
  assert resumed.read == 24 and resumed.skipped == 0  # the old processes' counts, now this process's
  rest = []
  lost_at_most = max(1, new_workers) + batch * max(1, old_workers)
  while len(seen) + len(rest) + lost_at_most < records:
    rest.extend(next(resumed)["label"])
  rest = rest[: records - len(seen) - lost_at_most]
  union = seen + [int(r) for r in rest]
  assert len(set(union)) == len(union), sorted(union)


def test_another_worker_count_continues_the_stream_of_the_same_processes():
  """A state saved with 2 workers restores in a loader with none: the process continues after the records
  it had read (its own share of the stream), and the next epoch is read in full again."""
  cfg = data_config(image_size=4, num_workers=2)
  cfg.augment.random_resized_crop = False
  it = _range_loader(cfg, 32, 4, 0, 1)
  seen = list(np.concatenate([next(it)["label"] for _ in range(3)]))
  state = it.get_state()
  cfg.num_workers = 0
  resumed = _range_loader(cfg, 32, 4, 0, 1)
  resumed.set_state(state)
  rest = list(np.concatenate([next(resumed)["label"] for _ in range(4)]))  # 16 of the 20 records left
  assert not set(seen) & set(rest) and len(set(rest)) == 16
  epoch_two = np.concatenate([next(resumed)["label"] for _ in range(16)])
  assert len(set(epoch_two.tolist())) == 32


def test_corrupt_records_are_skipped_and_counted():
  cfg = data_config(image_size=4)
  cfg.augment.random_resized_crop = False
  loader = pipeline.make_train_loader(
    cfg, batch_size=4, seed=0, process_index=0, process_count=1, source=CorruptEveryFifth(40)
  )
  it = iter(loader)
  labels = np.concatenate([next(it)["label"] for _ in range(8)])  # one epoch: 32 good records
  assert labels.shape == (32,) and sorted(labels) == [i for i in range(40) if i % 5]
  assert it.skipped == 8 and it.read == 40
  # The same records in the same order as the raw loader, with the corrupt ones taken out.
  raw = iter(loader.loader)
  raw_batches = [next(raw) for _ in range(10)]
  raw_labels = np.concatenate([b["label"] for b in raw_batches])
  raw_valid = np.concatenate([b["valid"] for b in raw_batches])
  np.testing.assert_array_equal(raw_valid, raw_labels % 5 != 0)
  np.testing.assert_array_equal(labels, raw_labels[raw_valid])
  batches = list(
    pipeline.make_eval_iterator(cfg, batch_size=8, process_index=0, process_count=1, source=CorruptEveryFifth(40))
  )
  masks = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(masks, np.arange(40) % 5 != 0)


def test_skipping_iterator_restores_mid_batch():
  """A state taken while part of a raw batch is still in hand replays the same batches and counts."""
  cfg = data_config(image_size=4, num_workers=0)
  cfg.augment.random_resized_crop = False
  loader = pipeline.make_train_loader(
    cfg, batch_size=3, seed=1, process_index=0, process_count=1, source=CorruptEveryFifth(30)
  )
  it = iter(loader)
  for _ in range(5):
    next(it)
  state, counts = it.get_state(), (it.read, it.skipped)
  assert json.loads(state)["offset"] > 0  # 5 x 3 valid rows end inside a raw batch
  want = [next(it)["label"] for _ in range(6)]
  resumed = iter(loader)
  resumed.set_state(state)
  assert (resumed.read, resumed.skipped) == counts
  np.testing.assert_array_equal([next(resumed)["label"] for _ in range(6)], want)


def test_mostly_corrupt_data_stops_with_a_clear_error():
  cfg = data_config(image_size=4, max_skipped_fraction=0.1, skip_check_after=20)
  it = iter(
    pipeline.make_train_loader(
      cfg, batch_size=4, seed=0, process_index=0, process_count=1, source=CorruptEveryFifth(40)
    )
  )
  with pytest.raises(DataError, match=r"config.data.max_skipped_fraction=0.1") as info:
    for _ in range(10):
      next(it)
  assert re.search(r"\d+ of the 2\d records read so far by this process are corrupt or undecodable", str(info.value))


@pytest.mark.parametrize("examples,processes", [(-1, 3), (20, 2), (-1, 1)])
def test_eval_iterator_covers_each_example_once(examples, processes):
  cfg = data_config(image_size=4, eval_examples=examples)
  total = 50 if examples < 0 else examples
  labels, counts = [], []
  for index in range(processes):
    batches = list(
      pipeline.make_eval_iterator(
        cfg, batch_size=8, process_index=index, process_count=processes, source=RangeSource(50)
      )
    )
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (8, 4, 4, 3) and b["mask"].dtype == bool and b["label"].dtype == np.int32
      assert (b["image"][~b["mask"]] == 0).all()
      labels.extend(b["label"][b["mask"]].tolist())
  assert len(set(counts)) == 1
  assert sorted(labels) == list(range(total))


def test_eval_iterator_on_shapes():
  cfg = data_config()
  batches = list(pipeline.make_eval_iterator(cfg, batch_size=24, process_index=0, process_count=1))
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 64
  src = shapes.ShapesSource("validation", 64, 32)
  np.testing.assert_array_equal(batches[1]["image"][5], src[29]["image"])


# --- sources --------------------------------------------------------------------------------------------


def test_sources_shapes_and_bad_spec():
  cfg = data_config()
  assert len(sources.build_source("shapes", "train", cfg)) == 512
  assert len(sources.build_source("shapes", "validation", cfg)) == 64
  assert len(sources.class_names("shapes", cfg)) == 8
  assert sources.class_names("shapes", cfg)[3] == "star"
  for spec in ("imagenet", "tfds:", "hf:foo"):
    with pytest.raises(DataError, match="config.data.source"):
      sources.build_source(spec, "train", cfg)


@pytest.mark.parametrize(
  "fields, culprit",
  [
    (dict(eval_source="foo"), "config.data.eval_source='foo'"),
    (dict(eval_source="arrayrecord:/nonexistent/*"), "config.data.eval_source='arrayrecord:/nonexistent/*'"),
    (
      dict(source="", mixture=(("arrayrecord:/nonexistent/*", 1.0), ("shapes", 1.0))),
      "config.data.mixture[0]='arrayrecord:/nonexistent/*'",
    ),
  ],
)
def test_eval_source_errors_name_the_field_it_came_from(fields, culprit):
  with pytest.raises(DataError) as info:
    pipeline.make_eval_iterator(data_config(**fields), batch_size=4, process_index=0, process_count=1)
  assert str(info.value).startswith(culprit) and str(info.value).count("config.data.") == 1, info.value


def test_tfds_missing_dataset_fails_fast(tmp_path):
  cfg = data_config(source="tfds:imagenet21k", data_dir=str(tmp_path))
  start = time.perf_counter()
  with pytest.raises(DataError) as info:
    pipeline.make_train_loader(cfg, batch_size=8, seed=0, process_index=0, process_count=1)
  assert time.perf_counter() - start < 10
  message = str(info.value)
  assert "imagenet21k" in message and "'train'" in message and str(tmp_path) in message
  assert "see docs/data_preparation.md" in message
  with pytest.raises(DataError, match="not prepared"):
    sources.class_names("tfds:imagenet21k", cfg)
  assert "tensorflow" not in sys.modules
  assert not list(tmp_path.iterdir())  # nothing downloaded or created


def test_tfds_prepared_dataset(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class VisionfmTestImages(tfds.core.GeneratorBasedBuilder):
    """Six JPEGs of varied sizes, labels 0..2."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6), "validation": self._generate_examples(4)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": encode(np.full((40 + 4 * i, 50, 3), 30 * i, np.uint8), "JPEG"), "label": i % 3}

  VisionfmTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = data_config(source="tfds:visionfm_test_images", data_dir=str(tmp_path), image_size=16)
  src = sources.build_source(cfg.source, "validation", cfg)
  assert len(src) == 4 and isinstance(src[0]["image"], bytes)
  assert sources.class_names(cfg.source, cfg) == ["a", "b", "c"]
  batches = list(pipeline.make_eval_iterator(cfg, batch_size=3, process_index=0, process_count=1))
  assert [b["mask"].sum() for b in batches] == [3, 1]
  assert batches[0]["image"].shape == (3, 16, 16, 3)
  it = iter(pipeline.make_train_loader(cfg, batch_size=2, seed=0, process_index=0, process_count=1))
  assert next(it)["image"].shape == (2, 16, 16, 3)
  with pytest.raises(DataError, match="visionfm_test_images"):
    sources.build_source(cfg.source, "nosuchsplit", cfg)
  # A split in the spec wins over the configured one; eval_source serves evaluation.
  assert len(sources.build_source("tfds:visionfm_test_images:1.0.0:train[:5]", "validation", cfg)) == 5
  assert len(sources.build_source("tfds:visionfm_test_images:train[4:]", "validation", cfg)) == 2
  cfg.eval_source = "tfds:visionfm_test_images:train[:5]"
  batches = list(pipeline.make_eval_iterator(cfg, batch_size=3, process_index=0, process_count=1))
  assert [b["mask"].sum() for b in batches] == [3, 2]
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize(
  "spec,parsed",
  [
    ("shapes", ("shapes", "", "")),
    ("tfds:imagenet2012", ("tfds", "imagenet2012", "")),
    ("tfds:imagenet2012:validation", ("tfds", "imagenet2012", "validation")),
    ("tfds:imagenet2012:5.1.0", ("tfds", "imagenet2012:5.1.0", "")),
    ("tfds:imagenet2012:5.*.*:train[:99%]", ("tfds", "imagenet2012:5.*.*", "train[:99%]")),
    ("tfds:imagenet2012:5.1.0:train[:99%]", ("tfds", "imagenet2012:5.1.0", "train[:99%]")),
    ("tfds:in21k/full:train[99%:]", ("tfds", "in21k/full", "train[99%:]")),
    ("arrayrecord:/d/{split}-*.array_record", ("arrayrecord", "/d/{split}-*.array_record", "")),
  ],
)
def test_source_spec_parsing(spec, parsed):
  assert sources._parse(spec) == parsed  # pylint: disable=protected-access


@pytest.mark.parametrize("height, width", [(300, 500), (500, 301), (224, 227), (231, 224), (480, 640)])
def test_clip_eval_preprocess_matches_hf_clip_image_processor(height, width):
  """config.data.eval_preprocess='clip' is CLIP's view (shorter side to 224, bicubic, central crop): exactly
  transformers' CLIPImageProcessor, odd margins included; 'inception' is another view."""
  from transformers import CLIPImageProcessor  # pylint: disable=g-import-not-at-top

  image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
  processor = CLIPImageProcessor(
    size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_rescale=False, do_normalize=False
  )
  want = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  got = transforms.EvalTransform(224, "clip").map({"image": image})["image"]
  np.testing.assert_array_equal(got, want.astype(np.uint8))
  assert np.abs(transforms.EvalTransform(224).map({"image": image})["image"].astype(int) - want).mean() > 10
  with pytest.raises(ConfigError, match="config.data.eval_preprocess='openai'"):
    transforms.EvalTransform(224, "openai")


def test_eval_iterator_takes_the_configured_preprocess():
  """config.data.eval_preprocess reaches the eval batches (zero-shot, retrieval read them through EvalReader)."""
  rng = np.random.default_rng(0)
  records = [{"image": rng.integers(0, 256, (20, 27, 3), dtype=np.uint8), "label": i} for i in range(3)]
  for preprocess in ("inception", "clip"):
    cfg = data_config(image_size=16, eval_preprocess=preprocess)
    batch = next(pipeline.make_eval_iterator(cfg, batch_size=4, process_index=0, process_count=1, source=records))
    for image, record in zip(batch["image"], records):
      np.testing.assert_array_equal(image, transforms.EvalTransform(16, preprocess).map(record)["image"])
  assert not np.array_equal(
    transforms.EvalTransform(16, "clip").map(records[0])["image"], transforms.EvalTransform(16).map(records[0])["image"]
  )
