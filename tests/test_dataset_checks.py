"""A prepared data set is checked against its dataset.json when opened (a deleted, truncated or short shard is a
DataError naming it); labels outside [0, num_classes) are skipped and counted like corrupt records; a 16-bit
PNG decodes to 8 bits by its depth's range (it came out nearly white)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from test_data import RangeSource, data_config
from visionfm_jax import config_lib
from visionfm_jax.data import pipeline, records, sources, transforms
from visionfm_jax.errors import DataError

SHARD_SIZES = (6, 5, 7)


@pytest.fixture
def prepared(tmp_path):
  """A labelled set of three train shards with their sidecars and dataset.json, as tools.prepare_data leaves it."""
  names = [records.shard_name("train", i, len(SHARD_SIZES)) for i in range(len(SHARD_SIZES))]
  for name, size in zip(names, SHARD_SIZES):
    path = str(tmp_path / name)
    records.write_records(path, ({"image": np.full((4, 4, 3), i, np.uint8), "label": i % 3} for i in range(size)))
    records.atomic.write_json(records.sidecar_path(path), {"records": size})
  records.write_metadata(tmp_path, kind="classification", classes=["a", "b", "c"],
                         splits={"train": {"records": sum(SHARD_SIZES), "shards": names, "kind": "labelled"}})
  return tmp_path, names


def _open(directory):
  return sources.build_source(f"arrayrecord:{directory}/{{split}}-*.array_record", "train",
                              config_lib.data_config())


def test_an_intact_set_opens(prepared):
  directory, _ = prepared
  assert len(_open(directory)) == sum(SHARD_SIZES)


def test_a_deleted_shard_is_an_error_naming_it(prepared):
  directory, names = prepared
  os.remove(directory / names[1])
  with pytest.raises(DataError, match=rf"config.data.source=.* split 'train': .*dataset.json lists shards that are "
                                      rf"not in {directory}: {names[1]}; prepare it again"):
    _open(directory)


def test_a_truncated_shard_is_an_error_naming_it(prepared):
  directory, names = prepared
  os.truncate(directory / names[2], os.path.getsize(directory / names[2]) // 2)
  with pytest.raises(DataError, match=rf"cannot read {directory / names[2]} as ArrayRecord"):
    _open(directory)


def test_a_shard_with_fewer_records_than_counted_is_an_error_naming_it(prepared):
  directory, names = prepared
  records.write_records(str(directory / names[0]), ({"image": np.zeros((4, 4, 3), np.uint8), "label": 0}
                                                    for _ in range(2)))
  with pytest.raises(DataError, match=rf"split 'train' holds 14 records, .*dataset.json counts 18; short: "
                                      rf"{directory / names[0]} \(2 of 6\)"):
    _open(directory)


def test_labels_outside_the_classes_are_skipped_and_counted():
  cfg = data_config(image_size=4)
  cfg.augment.random_resized_crop = False
  it = iter(pipeline.make_train_loader(cfg, batch_size=5, seed=0, process_index=0, process_count=1,
                                       source=RangeSource(40), num_classes=30))
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
