"""Tests of the image-text data: ArrayRecord pairs, the pair pipelines and RandAugment (CPU, host-only)."""

import io
import pickle

from array_record.python import array_record_module
import numpy as np
from PIL import Image
import pytest

from visionfm_jax import config_lib
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources import records as pairs
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.text import tokenizer
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.data.transforms import randaugment
from visionfm_jax.errors import ConfigError, DataError

import test_data  # tests/ is on sys.path under pytest

MAX_LEN = 24


def data_config(**overrides):
  """test_data's small config, smaller, without flips (the captions name positions)."""
  cfg = test_data.data_config(**{"shapes_train_size": 256, "shapes_eval_size": 40, **overrides})
  cfg.augment.flip = False
  return cfg


@pytest.fixture(scope="module")
def tok():
  return tokenizer.Tokenizer(tokenizer.shapes_tokenizer_path(), MAX_LEN)


def png(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def shapes_pairs(n, split="train", size=40):
  source = shapes.ShapesSource(split, n, size)
  return [(source[i]["image"], source[i]["caption"]) for i in range(n)]


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
  """train-0/1 (24 + 24 pairs, as JPEG arrays and as PNG bytes) and validation-0 (10 pairs)."""
  root = tmp_path_factory.mktemp("pairs")
  train = shapes_pairs(48)
  assert pairs.write_pairs(root / "train-0.array_record", train[:24]) == 24
  pairs.write_pairs(root / "train-1.array_record", [(png(image), caption) for image, caption in train[24:]])
  pairs.write_pairs(root / "validation-0.array_record", shapes_pairs(10, "validation"))
  return root


class PairRange(test_data.RangeSource):
  """RangeSource (record i: image of value i, label i) with a caption naming shape i % 8."""

  def __getitem__(self, index):
    return {**super().__getitem__(index), "caption": f"a {shapes.SHAPE_NAMES[int(index) % 8]} on the left"}


# --- ArrayRecord pairs ----------------------------------------------------------------------------------


def test_arrayrecord_round_trip(pair_dir):
  source = pairs.ArrayRecordSource(str(pair_dir / "train-*.array_record"))
  assert len(source) == 48 and source.files == sorted(source.files) and "files=2" in repr(source)
  want = shapes_pairs(48)
  for i in (0, 23, 24, 47):
    record = source[i]
    assert set(record) == {"image", "caption"} and record["caption"] == want[i][1]
    image = transforms.decode_image(record["image"])
    if i < 24:  # JPEG
      assert np.abs(image.astype(int) - want[i][0]).mean() < 6
    else:
      np.testing.assert_array_equal(image, want[i][0])
  clone = pickle.loads(pickle.dumps(source))
  assert clone[5]["caption"] == want[5][1]


def test_arrayrecord_splits_and_errors(pair_dir, tmp_path):
  cfg = data_config(source=f"arrayrecord:{pair_dir}/{{split}}-*.array_record")
  assert len(sources.build_source(cfg.source, "train", cfg)) == 48
  assert len(sources.build_source(cfg.source, "validation", cfg)) == 10
  with pytest.raises(DataError) as info:
    sources.build_source(cfg.source, "test", cfg)
  assert f"{pair_dir}/test-*.array_record" in str(info.value) and "'test'" in str(info.value)
  with pytest.raises(DataError, match="no class labels"):
    sources.class_names(cfg.source, cfg)
  with pytest.raises(DataError, match="arrayrecord:<glob>"):
    sources.build_source("arrayrecord:", "train", cfg)
  everything = sources.build_source(f"arrayrecord:{pair_dir}/*.array_record", "validation", cfg)
  assert len(everything) == 58  # no {split}: every split reads every file
  (tmp_path / "bad.array_record").write_bytes(b"not an array record file")
  with pytest.raises(DataError, match="bad.array_record"):
    pairs.ArrayRecordSource(str(tmp_path / "bad.array_record"))


def test_corrupt_pairs_are_skipped_and_counted(tmp_path, tok):
  good = shapes_pairs(12)
  path = str(tmp_path / "mixed.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  corrupt = {
    0: b"\xc1 record 0 is checked for labels",
    3: b"\xc1 not msgpack",
    7: pairs.pack_record(b"\xff\xd8 truncated jpeg", caption="a red star"),
    9: b"\x81\xa5image\x01",
  }  # a map without bytes image or caption
  for i, (image, caption) in enumerate(good):
    writer.write(corrupt.get(i) or pairs.pack_record(image, caption=caption))
  writer.close()
  source = pairs.ArrayRecordSource(path)
  before = transforms.decode_failures()
  assert source[3] == {"image": None, "caption": ""} and transforms.decode_failures() == before + 1
  cfg = data_config(eval_examples=-1)
  batches = list(
    pipeline.make_pair_eval_iterator(cfg, tok, batch_size=8, process_index=0, process_count=1, source=source)
  )
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask[:12], [i not in corrupt for i in range(12)])
  assert transforms.decode_failures() == before + 6  # (records 0 and 3 twice: the label check reads them)
  assert set(batches[0]) == {"image", "text", "has_text", "mask"}
  text = np.concatenate([b["text"] for b in batches])
  assert (text[~mask] == 0).all() and tok.decode(text[1]) == good[1][1]
  cfg.augment.random_resized_crop = False
  it = iter(
    pipeline.make_pair_train_loader(cfg, tok, batch_size=6, seed=0, process_index=0, process_count=1, source=source)
  )
  captions = {c for b in (next(it), next(it)) for c in tok.decode(b["text"])}
  assert captions <= {c for i, (_, c) in enumerate(good) if i not in corrupt}


# --- pair pipelines -------------------------------------------------------------------------------------


def test_pair_train_loader_on_shapes(tok):
  cfg = data_config()
  it = iter(pipeline.make_pair_train_loader(cfg, tok, batch_size=8, seed=3, process_index=0, process_count=1))
  batch = next(it)
  assert set(batch) == {"image", "text", "has_text", "label"}
  assert batch["has_text"].dtype == bool and batch["has_text"].shape == (8,) and batch["has_text"].all()
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["text"].shape == (8, MAX_LEN) and batch["text"].dtype == np.int32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  for caption, label in zip(tok.decode(batch["text"]), batch["label"]):
    assert shapes.SHAPE_NAMES[label] in caption
  assert (batch["text"][:, 0] == tokenizer.BOS_ID).all() and (tokenizer.eos_positions(batch["text"]) > 5).all()


def test_pair_loader_on_arrayrecord(pair_dir, tok):
  cfg = data_config(source=f"arrayrecord:{pair_dir}/{{split}}-*.array_record")
  batch = next(iter(pipeline.make_pair_train_loader(cfg, tok, batch_size=4, seed=0, process_index=0, process_count=1)))
  assert set(batch) == {"image", "text", "has_text"} and batch["image"].shape == (4, 32, 32, 3)
  batches = list(pipeline.make_pair_eval_iterator(cfg, tok, batch_size=4, process_index=0, process_count=1))
  assert [b["mask"].sum() for b in batches] == [4, 4, 2]
  assert tok.decode(batches[0]["text"][1]) == shapes.ShapesSource("validation", 10, 40)[1]["caption"]


def test_pair_loader_needs_captions(tok):
  class NoCaptions(PairRange):
    def __getitem__(self, index):
      return {"image": np.zeros((4, 4, 3), np.uint8), "label": 0}

  with pytest.raises(DataError, match="no 'caption'"):
    pipeline.make_pair_train_loader(
      data_config(), tok, batch_size=2, seed=0, process_index=0, process_count=1, source=NoCaptions(8)
    )


def test_pair_iterator_resumes_bitwise(tmp_path, tok):
  cfg = data_config()
  cfg.augment.randaugment_ops = 2
  cfg.augment.color_jitter = 0.2

  def fresh():
    return iter(pipeline.make_pair_train_loader(cfg, tok, batch_size=8, seed=5, process_index=0, process_count=1))

  test_data.assert_resumes(fresh, tmp_path, ("orbax", "state", "replay"), skip=2)


def test_pair_train_shards_disjoint_and_complete(tok):
  cfg = data_config(image_size=4)
  cfg.augment.random_resized_crop = False
  seen = []
  for index in range(2):
    it = iter(
      pipeline.make_pair_train_loader(
        cfg, tok, batch_size=8, seed=1, process_index=index, process_count=2, source=PairRange(48)
      )
    )
    batches = [next(it) for _ in range(3)]  # one epoch of the 24-record shard
    for b in batches:
      for caption, label in zip(tok.decode(b["text"]), b["label"]):
        assert caption == f"a {shapes.SHAPE_NAMES[label % 8]} on the left"
    seen.append(np.concatenate([b["label"] for b in batches]))
  assert len(set(seen[0])) == len(set(seen[1])) == 24
  assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(48))


@pytest.mark.parametrize("processes", [1, 3])
def test_pair_eval_covers_each_example_once(tok, processes):
  cfg = data_config(image_size=4)
  labels, counts = [], []
  for index in range(processes):
    batches = list(
      pipeline.make_pair_eval_iterator(
        cfg, tok, batch_size=8, process_index=index, process_count=processes, source=PairRange(30)
      )
    )
    counts.append(len(batches))
    for b in batches:
      assert b["text"].shape == (8, MAX_LEN) and b["mask"].dtype == bool
      assert (b["text"][~b["mask"]] == 0).all() and (b["text"][b["mask"], 0] == tokenizer.BOS_ID).all()
      labels.extend(b["label"][b["mask"]].tolist())
  assert len(set(counts)) == 1 and sorted(labels) == list(range(30))


def test_example_ops_pickle(tok):
  op = pickle.loads(pickle.dumps(transforms.SelectPair(tok, with_label=True)))  # as grain workers get it
  example = op.map({"image": np.zeros((2, 2, 3), np.uint8), "caption": "a red star", "label": 4})
  assert tok.decode(example["text"]) == "a red star" and example["label"] == 4
  assert op.spec(8) == {
    "image": ((8, 8, 3), np.uint8),
    "text": ((MAX_LEN,), np.int32),
    "has_text": ((), np.bool_),
    "label": ((), np.int32),
  }


# --- RandAugment ----------------------------------------------------------------------------------------


def image_of(height=20, width=28, seed=0):
  """Random pixels in 40..199, so autocontrast has a range to stretch."""
  return np.random.default_rng(seed).integers(40, 200, (height, width, 3), dtype=np.uint8)


def test_randaugment_every_op_runs():
  image = image_of()
  for name in randaugment.OPS:
    for magnitude in (0, 9, 30):
      out = randaugment.RandAugment(1, magnitude, ops=(name,)).random_map(
        {"image": image, "label": 1}, np.random.default_rng(0)
      )
      assert out["image"].shape == image.shape and out["image"].dtype == np.uint8 and out["label"] == 1
      if magnitude == 9 and name not in ("identity",):
        assert not np.array_equal(out["image"], image), name


def test_randaugment_magnitude_zero_is_identity():
  image = image_of()
  for name in set(randaugment.OPS) - {"autocontrast", "equalize"}:  # the two without a magnitude
    for seed in range(3):
      out = randaugment.RandAugment(2, 0, ops=(name,)).random_map({"image": image}, np.random.default_rng(seed))
      assert np.abs(out["image"].astype(int) - image).max() <= 1, name


def test_randaugment_deterministic_and_varied():
  image, op = image_of(), randaugment.RandAugment(2, 9)
  outs = [op.random_map({"image": image}, np.random.default_rng(seed))["image"] for seed in (0, 0, 1, 2, 3)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert len({o.tobytes() for o in outs[1:]}) == 4
  element = {"image": image}
  assert randaugment.RandAugment(0, 9).random_map(element, np.random.default_rng(0)) is element


def test_randaugment_config():
  aug = data_config().augment
  assert (aug.randaugment_ops, aug.randaugment_magnitude, tuple(aug.randaugment_exclude)) == (0, 9, ())
  assert not any(isinstance(op, randaugment.RandAugment) for op in transforms.train_transforms(32, aug))
  aug.randaugment_ops, aug.randaugment_exclude = 2, randaugment.GEOMETRIC_OPS
  ops = [op for op in transforms.train_transforms(32, aug) if isinstance(op, randaugment.RandAugment)]
  assert len(ops) == 1 and ops[0].num_ops == 2 and ops[0].magnitude == 9
  assert set(ops[0].ops) == set(randaugment.OPS) - set(randaugment.GEOMETRIC_OPS)
  aug.randaugment_exclude = ("rotate", "wobble")
  with pytest.raises(ConfigError, match="randaugment_exclude.*wobble"):
    transforms.train_transforms(32, aug)
  config = config_lib.base_config()
  config.data.augment.randaugment_magnitude = 31
  with pytest.raises(ConfigError, match=r"config.data.augment.randaugment_magnitude=31: must be a number in \[0, 30\]"):
    config_lib.check_domains(config)
  with pytest.raises(ValueError, match="wobble"):
    randaugment.RandAugment(1, 5, ops=("wobble",))
