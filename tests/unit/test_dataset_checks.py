"""A prepared data set is checked against its dataset.json when opened (a deleted, truncated or short shard is a
DataError naming it); labels outside [0, num_classes) are skipped and counted like corrupt records; a classifier's
head has exactly the data's classes (checked at start-up, --dry_run too); a 16-bit PNG decodes to 8 bits by its
depth's range (it came out nearly white)."""

import io
import os
import re

import numpy as np
from PIL import Image
import pytest

from visionfm_jax import config_lib, tasks
from visionfm_jax.config_lib import schema
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources import records
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import ConfigError, DataError

from conftest import tiny_vit_config
from test_bad_input import run_main_in_process
from test_data import RangeSource, data_config

SHARD_SIZES = (6, 5, 7)


@pytest.fixture
def prepared(tmp_path):
  """A labelled set of three train shards with their sidecars and dataset.json, as datatools.prepare_data leaves it."""
  names = [records.shard_name("train", i, len(SHARD_SIZES)) for i in range(len(SHARD_SIZES))]
  for name, size in zip(names, SHARD_SIZES):
    path = str(tmp_path / name)
    records.write_records(path, ({"image": np.full((4, 4, 3), i, np.uint8), "label": i % 3} for i in range(size)))
    records.atomic.write_json(records.sidecar_path(path), {"records": size})
  records.write_metadata(
    tmp_path,
    kind="classification",
    classes=["a", "b", "c"],
    splits={"train": {"records": sum(SHARD_SIZES), "shards": names, "kind": "labelled"}},
  )
  return tmp_path, names


def _open(directory):
  return sources.build_source(
    f"arrayrecord:{directory}/{{split}}-*.array_record", "train", config_lib.defaults(schema.DATA)
  )


def test_an_intact_set_opens(prepared):
  directory, _ = prepared
  assert len(_open(directory)) == sum(SHARD_SIZES)


def test_a_deleted_shard_is_an_error_naming_it(prepared):
  directory, names = prepared
  os.remove(directory / names[1])
  with pytest.raises(
    DataError,
    match=rf"config.data.source=.* split 'train': .*dataset.json lists shards that are "
    rf"not in {directory}: {names[1]}; prepare it again",
  ):
    _open(directory)


def test_a_truncated_shard_is_an_error_naming_it(prepared):
  directory, names = prepared
  os.truncate(directory / names[2], os.path.getsize(directory / names[2]) // 2)
  with pytest.raises(DataError, match=rf"cannot read {directory / names[2]} as ArrayRecord"):
    _open(directory)


def test_a_shard_with_fewer_records_than_counted_is_an_error_naming_it(prepared):
  directory, names = prepared
  records.write_records(
    str(directory / names[0]), ({"image": np.zeros((4, 4, 3), np.uint8), "label": 0} for _ in range(2))
  )
  with pytest.raises(
    DataError,
    match=rf"split 'train' holds 14 records, .*dataset.json counts 18; short: "
    rf"{directory / names[0]} \(2 of 6\)",
  ):
    _open(directory)


def test_a_classifier_head_of_another_class_count_stops_at_start_up(prepared):
  directory, _ = prepared
  spec = f"arrayrecord:{directory}/{{split}}-*.array_record"
  for head in (2, 4):  # fewer classes than the data's 3: labels past the head; more: outputs no label names
    task = tasks.build(tiny_vit_config(**{"data.source": spec, "data.num_workers": 0, "model.num_classes": head}))
    message = (
      f"config.model.num_classes={head} but config.data.source={spec!r} has 3 classes; set --config.model.num_classes=3"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
      task.train_loader(batch_size=4, seed=0, process_index=0, process_count=1)
  task = tasks.build(tiny_vit_config(**{"data.source": spec, "data.num_workers": 0, "model.num_classes": 3}))
  assert next(iter(task.train_loader(batch_size=4, seed=0, process_index=0, process_count=1)))["label"].shape == (4,)


def test_dry_run_stops_a_fall11_head_on_winter21_in_one_line(tmp_path, monkeypatch, capsys):
  """ImageNet-21K winter21 (19,167 classes) under the config's fall11 head (21,841): one error line, both counts."""
  name = records.shard_name("train", 0, 1)
  records.write_records(str(tmp_path / name), ({"image": np.zeros((4, 4, 3), np.uint8), "label": i} for i in range(4)))
  records.write_metadata(
    tmp_path,
    kind="classification",
    classes=[f"n{i:08d}" for i in range(19167)],
    splits={"train": {"records": 4, "shards": [name], "kind": "labelled"}},
  )
  status, _, stderr = run_main_in_process(
    [
      "--config=configs/vit_huge.py:demo",
      f"--workdir={tmp_path / 'run'}",
      "--dry_run",
      f"--config.data.source=arrayrecord:{tmp_path}/{{split}}-*.array_record",
      "--config.model.num_classes=21841",
    ],
    monkeypatch,
    capsys,
  )
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert errors[0].startswith("error: config.model.num_classes=21841 but config.data.source=")
  assert errors[0].endswith("has 19167 classes; set --config.model.num_classes=19167"), errors[0]


def test_labels_outside_the_classes_are_skipped_and_counted():
  cfg = data_config(image_size=4)
  cfg.augment.random_resized_crop = False
  it = iter(
    pipeline.make_train_loader(
      cfg, batch_size=5, seed=0, process_index=0, process_count=1, source=RangeSource(40), num_classes=30
    )
  )
  labels = np.concatenate([next(it)["label"] for _ in range(6)])  # record i has label i: 30 of 40 in range
  assert sorted(labels) == list(range(30))
  assert it.skipped == it.read - 30 and it.skipped > 0


def test_a_16_bit_png_decodes_by_its_range():
  pixels = np.random.default_rng(0).integers(0, 65536, (32, 32)).astype(np.uint16)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  decoded = transforms.decode_image(buffer.getvalue())
  assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
  np.testing.assert_allclose(decoded.mean(), pixels.mean() / 257, atol=0.5)  # was 254: saturated


@pytest.mark.parametrize(
  "classes, culprit",
  [
    ("abc", "'classes' is \"abc\", not a list of class names (strings)"),
    (["a", 1], "'classes' is [\"a\", 1], not a list of class names (strings)"),
    (["a", "b", "a"], "'classes' names 'a' more than once"),
    (["only"], "split 'train' holds records of label 1 ('class_counts'), but 'classes' names 1 (labels 0 to 0)"),
  ],
)
def test_a_class_list_that_cannot_name_the_labels_stops_before_training(
  classes, culprit, tmp_path, monkeypatch, capsys
):
  """dataset.json's `classes` edited by hand: a string (once a model of one class per letter), a repeated name, or
  fewer names than the labels its records hold (once an IndexError in the panel after the first checkpoint)."""
  splits = {}
  for split in ("train", "validation"):
    name = records.shard_name(split, 0, 1)
    records.write_records(
      str(tmp_path / name), ({"image": np.zeros((4, 4, 3), np.uint8), "label": i % 2} for i in range(64))
    )  # the demo's batch
    splits[split] = {"records": 64, "shards": [name], "kind": "labelled", "class_counts": [32, 32]}
  records.write_metadata(tmp_path, kind="classification", classes=["x", "y"], splits=splits)
  metadata = records.read_metadata(tmp_path)
  records.atomic.write_json(tmp_path / records.METADATA_FILE, {**metadata, "classes": classes})
  status, _, stderr = run_main_in_process(
    [
      "--config=configs/vit_huge.py:demo",
      f"--workdir={tmp_path / 'run'}",
      "--dry_run",
      f"--config.data.source=arrayrecord:{tmp_path}/{{split}}-*.array_record",
      "--config.model.num_classes=-1",
    ],
    monkeypatch,
    capsys,
  )  # sized from the classes, as configs/vit_huge.py:small
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert f"{tmp_path / records.METADATA_FILE}: {culprit}; prepare the data set again" in errors[0], errors[0]
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_fewer_records_than_a_batch_name_the_flag_the_largest_batch_and_no_holdout_where_there_is_none():
  from visionfm_jax.data.loader import checks, mixture  # pylint: disable=g-import-not-at-top

  data = mixture.Mixture((mixture.Entry("config.data.source='x'", RangeSource(10), 1.0, "x"),), "x")
  checks.check_one_batch(data, 5, 2, "x")  # 10 records: one batch of 5 for each of 2 processes
  with pytest.raises(DataError) as error:
    checks.check_one_batch(data, 4, 3, "x split 'train'")
  assert str(error.value) == (
    "x split 'train' has 10 records: fewer than one batch of --config.global_batch_size=12 "
    "(4 for each of 3 processes); train with a --config.global_batch_size of at most 9, or "
    "on more data"
  )
  with pytest.raises(DataError, match="each process needs a record of its own"):
    checks.check_one_batch(data, 1, 11, "x")


def test_a_path_that_matches_nothing_is_found_before_anything_reads_the_data(tmp_path):
  from visionfm_jax.data.loader import checks  # pylint: disable=g-import-not-at-top

  (tmp_path / "here").mkdir()
  (tmp_path / "here" / "train-00000-of-00001.array_record").write_bytes(b"")
  found = data_config(source=f"arrayrecord:{tmp_path}/here/{{split}}-*.array_record")
  assert checks.check_found(found) == []
  typo = data_config(source=f"arrayrecord:{tmp_path}/here/{{split}}-*.arrayrecord")
  for absent_ok in (False, True):  # a folder that exists without a match is a typo, also in a dry run's plan
    with pytest.raises(DataError, match=re.escape(f"no files match '{tmp_path}/here/train-*.arrayrecord'")):
      checks.check_found(typo, absent_ok)
  later = data_config(
    mixture=(("shapes", 1.0), (f"arrayrecord:{tmp_path}/later/*", 1.0), (f"coco:{tmp_path}/coco", 1.0)), source=""
  )
  with pytest.raises(DataError, match=re.escape(r"config.data.mixture[1]=") + ".*no files match"):
    checks.check_found(later)
  assert checks.check_found(later, absent_ok=True) == [f"{tmp_path}/coco", f"{tmp_path}/later"]
