"""Tests of data mixtures (config.data.mixture, data/loader/mixture.py) and image-only records in the pair pipelines
(CPU, host-only)."""

import collections

import grain
import numpy as np
import pytest

from visionfm_jax import tasks
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.loader import checks as data_checks
from visionfm_jax.data.loader import mixture, pipeline, skipping
from visionfm_jax.data.sources import records
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.text import tokenizer
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import ConfigError, DataError

from conftest import tiny_vit_config
import test_data  # tests/ is on sys.path under pytest

MAX_LEN = 16


@pytest.fixture(scope="module")
def tok():
  return tokenizer.Tokenizer(tokenizer.shapes_tokenizer_path(), MAX_LEN)


def data_config(**overrides):
  cfg = test_data.data_config(**{"shapes_train_size": 96, "shapes_eval_size": 12, **overrides})
  cfg.augment.flip = False
  return cfg


def mixture_config(entries, **overrides):
  return data_config(source="", mixture=tuple(entries), **overrides)


def range_entry(i, n, weight, prefix):
  """A RangeSource (record j: label j) as a mixture entry with classes prefix0, prefix1, ..."""
  return mixture.Entry(f"entry{i}", test_data.RangeSource(n), weight, classes=tuple(f"{prefix}{j}" for j in range(n)))


# --- configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "entries,source,error,match",
  [
    ((("shapes", 1.0),), "shapes", ConfigError, r"mixture is set \(1 entries\) and config.data.source='shapes'"),
    ((("shapes", 1.0), ("shapes:images", 0.0)), "", ConfigError, r"config.data.mixture\[1\].*positive"),
    ((("shapes", 1.0), ("shapes:images", -2)), "", ConfigError, r"config.data.mixture\[1\].*positive"),
    ((("shapes", 1.0), ("shapes:images", float("nan"))), "", ConfigError, r"config.data.mixture\[1\].*positive"),
    ((("shapes",),), "", ConfigError, r"config.data.mixture\[0\]=\('shapes',\): expected a \(source spec, weight\)"),
    ((("", 1.0),), "", ConfigError, r"config.data.mixture\[0\].*empty source spec"),
    ((("shapes", 1.0), ("nonsense:x", 1.0)), "", ConfigError, r"config.data.mixture\[1\]='nonsense:x': expected"),
    (
      (("shapes", 1.0), ("arrayrecord:/nonexistent/*", 1.0)),
      "",
      DataError,
      r"config.data.mixture\[1\]='arrayrecord:/nonexistent/\*'.*no files match",
    ),
  ],
)
def test_bad_mixtures_name_the_entry(entries, source, error, match):
  cfg = data_config(source=source, mixture=entries)
  with pytest.raises(error, match=match) as info:
    pipeline.make_train_loader(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
  if not source:  # the entry alone, not config.data.source as well
    assert "config.data.source" not in str(info.value)


def test_class_names_of_a_bad_entry_name_the_entry_alone():
  cfg = mixture_config([("shapes", 1.0), ("shapes:images", 1.0)])
  with pytest.raises(DataError, match=r"^config.data.mixture\[1\]='shapes:images': uncaptioned") as info:
    sources.train_class_names(cfg)
  assert "config.data.source" not in str(info.value)


def test_the_data_checks_check_the_mixture():
  config = tiny_vit_config()
  config.data.mixture = (("shapes", 1.0), ("shapes:images", 0.5))
  with pytest.raises(ConfigError, match=r"config.data.mixture is set .* config.data.source='shapes'"):
    data_checks.check(config.data)
  config.data.source = ""
  data_checks.check(config.data)
  config.data.mixture = (("shapes", 1.0), ("shapes:images", 0))
  with pytest.raises(ConfigError, match=r"config.data.mixture\[1\]"):
    data_checks.check(config.data)


def test_an_empty_entry_is_an_error():
  bad = mixture.Mixture(
    (range_entry(0, 8, 1.0, "a"), mixture.Entry("config.data.mixture[1]='x'", test_data.RangeSource(0))),
    "config.data.mixture",
  )
  with pytest.raises(DataError, match=r"config.data.mixture\[1\]='x' split 'train' has no records"):
    pipeline.make_train_loader(data_config(), batch_size=4, seed=0, process_index=0, process_count=1, source=bad)


def test_eval_source_rule():
  cfg = mixture_config([("shapes:images", 1.0), ("shapes", 2.0)])
  assert sources.eval_source_spec(cfg) == "shapes:images"
  cfg.eval_source = "shapes"
  assert sources.eval_source_spec(cfg) == "shapes"
  assert sources.eval_source_spec(data_config(source="scenes")) == "scenes"


# --- the stream -----------------------------------------------------------------------------------------


def _labels(it, batches):
  return np.concatenate([next(it)["label"] for _ in range(batches)]).tolist()


def test_proportions_follow_the_weights_and_each_entry_is_read_once_per_its_epoch():
  """Entry a (30 records, weight 3) and b (20 records, weight 1): labels a0..a29 -> 0..29, b0..b19 -> 30..49."""
  cfg = data_config(image_size=4)
  cfg.augment.random_resized_crop = False
  mix = mixture.Mixture((range_entry(0, 30, 3.0, "a"), range_entry(1, 20, 1.0, "b")), "test mixture")
  it = iter(pipeline.make_train_loader(cfg, batch_size=20, seed=4, process_index=0, process_count=1, source=mix))
  labels = _labels(it, 20)  # 400 examples
  a = [label for label in labels if label < 30]
  b = [label - 30 for label in labels if label >= 30]
  assert abs(len(a) - 300) <= 2 and abs(len(b) - 100) <= 2
  for draws, n in ((a, 30), (b, 20)):
    epochs = [draws[k * n : (k + 1) * n] for k in range(len(draws) // n)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)  # every record once per epoch
    assert len({tuple(epoch) for epoch in epochs}) == len(epochs)  # reshuffled each epoch
  assert a[:30] != list(range(30))

  # Two processes read disjoint shares of each entry's epoch: together, one epoch of b in its first 20 draws.
  shares = []
  for index in range(2):
    it = iter(pipeline.make_train_loader(cfg, batch_size=10, seed=4, process_index=index, process_count=2, source=mix))
    shares.append(_labels(it, 4))
  assert sorted(shares[0] + shares[1]) == sorted(labels[:80])  # the same stream, shared
  b_shares = [{label for label in share if label >= 30} for share in shares]
  assert len(b_shares[0]) + len(b_shares[1]) == 20 and not b_shares[0] & b_shares[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_iterator_resumes_bitwise(tmp_path, tok, workers):
  cfg = mixture_config([("shapes", 2.0), ("shapes:images", 1.0)], num_workers=workers)
  cfg.augment.color_jitter = 0.2

  def fresh():
    return iter(pipeline.make_pair_train_loader(cfg, tok, batch_size=8, seed=5, process_index=0, process_count=1))

  test_data.assert_resumes(fresh, tmp_path, ("orbax", "state") if workers == 0 else ("orbax",))


def test_a_single_source_reads_the_stream_of_grains_index_sampler():
  """A mixture of one gives the batches of a plain grain loader (an IndexSampler shuffling the one source with the
  loader's seed), past the first epoch."""
  cfg = data_config(image_size=4)
  cfg.augment.random_resized_crop = False
  source = test_data.RangeSource(40)
  ops = [*transforms.train_transforms(4, cfg.augment, 0, transforms.SelectKeys()), grain.transforms.Batch(8)]
  plain = iter(
    grain.DataLoader(
      data_source=source,
      operations=ops,
      worker_count=0,
      sampler=grain.samplers.IndexSampler(
        num_records=40, shard_options=grain.sharding.NoSharding(), shuffle=True, num_epochs=None, seed=7
      ),
      shard_options=grain.sharding.ShardOptions(0, 1, drop_remainder=True),
    )
  )
  mixture = iter(pipeline.make_train_loader(cfg, batch_size=8, seed=7, process_index=0, process_count=1, source=source))
  for _ in range(7):  # past the first epoch of 40
    want, got = dict(next(plain)), next(mixture)
    want.pop(skipping.VALID)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


# --- image-only records in the pair pipelines -----------------------------------------------------------


def test_pairs_and_image_only_sources_mix(tok):
  cfg = mixture_config([("shapes", 1.0), ("shapes:images", 1.0)])
  cfg.augment.random_resized_crop = False
  it = iter(pipeline.make_pair_train_loader(cfg, tok, batch_size=16, seed=0, process_index=0, process_count=1))
  batch = next(it)
  assert set(batch) == {"image", "text", "has_text"}  # no 'label': shapes:images has none
  has_text = batch["has_text"]
  assert has_text.dtype == bool and has_text.shape == (16,) and has_text.sum() == 8
  assert (batch["text"][~has_text] == tokenizer.PAD_ID).all()
  assert (batch["text"][has_text, 0] == tokenizer.BOS_ID).all()

  plain, images = sources.build_source("shapes", "train", cfg), sources.build_source("shapes:images", "train", cfg)
  assert set(images[0]) == {"image"} and set(plain[0]) >= {"image", "caption", "label"}
  assert not any(np.array_equal(plain[i]["image"], images[i]["image"]) for i in range(8))  # other images
  with pytest.raises(DataError, match="no class names"):
    sources.class_names("shapes:images", cfg)


def test_pair_eval_marks_image_only_records_and_padding(tok):
  class SomeCaptions(test_data.RangeSource):  # odd records have no caption
    def __getitem__(self, index):
      record = super().__getitem__(index)
      return {**record, "caption": "a red star"} if index % 2 == 0 else record

  cfg = data_config(image_size=4)
  batches = list(
    pipeline.make_pair_eval_iterator(cfg, tok, batch_size=8, process_index=0, process_count=1, source=SomeCaptions(10))
  )
  has_text = np.concatenate([b["has_text"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  text = np.concatenate([b["text"] for b in batches])
  assert has_text.dtype == bool and has_text.shape == mask.shape == (16,)
  np.testing.assert_array_equal(has_text, [i < 10 and i % 2 == 0 for i in range(16)])
  assert (text[~has_text] == tokenizer.PAD_ID).all() and mask.sum() == 10


def test_pair_mixtures_need_a_captioned_source(tok):
  cfg = mixture_config([("shapes:images", 1.0), ("shapes:images", 2.0)])
  with pytest.raises(DataError, match=r"config.data.mixture \(2 entries\): none of its sources has captions"):
    pipeline.make_pair_train_loader(cfg, tok, batch_size=4, seed=0, process_index=0, process_count=1)
  with pytest.raises(DataError, match=r"config.data.source='shapes:images' .* no 'caption'"):
    pipeline.make_pair_train_loader(
      data_config(source="shapes:images"), tok, batch_size=4, seed=0, process_index=0, process_count=1
    )

  cfg = mixture_config([("shapes:images", 1.0), ("shapes", 1.0)])  # evaluation reads the first entry
  with pytest.raises(
    DataError,
    match=r"config.data.mixture\[0\]='shapes:images' split 'validation': records have "
    r"no 'caption'.*config.data.eval_source",
  ):
    pipeline.make_pair_eval_iterator(cfg, tok, batch_size=4, process_index=0, process_count=1)
  cfg.eval_source = "shapes"
  assert next(pipeline.make_pair_eval_iterator(cfg, tok, batch_size=4, process_index=0, process_count=1))[
    "has_text"
  ].all()

  class Neither(test_data.RangeSource):
    def __getitem__(self, index):
      return {"label": int(index)}

  bad = mixture.Mixture(
    (
      mixture.Entry("config.data.mixture[0]='shapes'", shapes.ShapesSource("train", 8, 8)),
      mixture.Entry("config.data.mixture[1]='x'", Neither(8)),
    ),
    "config.data.mixture",
  )
  with pytest.raises(DataError, match=r"config.data.mixture\[1\]='x' .* no 'image' nor a 'caption'"):
    pipeline.make_pair_train_loader(
      data_config(), tok, batch_size=4, seed=0, process_index=0, process_count=1, source=bad
    )


# --- classification: the union of the classes -----------------------------------------------------------


def _labelled_set(directory, classes, value):
  """8 records, labels 0..len(classes)-1 in turn, every image filled with `value`."""
  image = np.full((8, 8, 3), value, np.uint8)
  records.write_records(
    directory / "train-0.array_record", ({"image": image, "label": i % len(classes)} for i in range(8))
  )
  records.write_metadata(
    directory,
    kind="classification",
    classes=classes,
    splits={"train": {"records": 8, "shards": ["train-0.array_record"]}},
  )
  return f"arrayrecord:{directory}/{{split}}-*.array_record"


def test_classification_mixture_takes_the_union_of_the_classes(tmp_path):
  first = _labelled_set(tmp_path / "a", ["cat", "dog"], 0)
  second = _labelled_set(tmp_path / "b", ["bird", "dog", "cat", "fish"], 250)
  cfg = mixture_config([(first, 1.0), (second, 1.0)], image_size=8)
  cfg.augment.random_resized_crop = False
  assert sources.train_class_names(cfg) == ["cat", "dog", "bird", "fish"]
  assert sources.train_class_names(data_config(source=second)) == ["bird", "dog", "cat", "fish"]

  it = iter(pipeline.make_train_loader(cfg, batch_size=8, seed=0, process_index=0, process_count=1))
  pairs = collections.Counter()
  for _ in range(4):
    batch = next(it)
    pairs.update(zip((batch["image"][:, 0, 0, 0] > 128).tolist(), batch["label"].tolist()))
  assert {label for from_second, label in pairs if not from_second} == {0, 1}  # cat, dog as they were
  assert {label for from_second, label in pairs if from_second} == {2, 1, 0, 3}  # bird, dog, cat, fish

  config = tiny_vit_config()
  config.data = cfg
  config.model.num_classes = 3
  with pytest.raises(
    ConfigError,
    match=r"config.model.num_classes=3 but config.data.mixture \(2 entries\) has 4 "
    r"classes",
  ):
    tasks.build(config).train_loader(batch_size=8, seed=0, process_index=0, process_count=1)

  cfg.mixture = ((first, 1.0), ("shapes:images", 1.0))
  with pytest.raises(
    DataError,
    match=r"config.data.mixture\[1\]='shapes:images' split 'train': records have no "
    r"'label'",
  ):
    pipeline.make_train_loader(cfg, batch_size=8, seed=0, process_index=0, process_count=1)
