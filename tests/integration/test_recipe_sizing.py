"""Recipes that size themselves (config_lib/sizing.py, training/sizing.py): a `:small` run shortened by
`--config.total_steps=` alone starts, its warmup and cadence in proportion and its class count from the data's
dataset.json, each choice named on a warning line; a field given keeps its value. Through `python -m
visionfm_jax.main --dry_run`, run in this process (nothing is compiled)."""

import os

import numpy as np
import pytest

from visionfm_jax import config_lib
from visionfm_jax.data.sources import records, registry
from visionfm_jax.training import checks
from visionfm_jax.training import sizing as training_sizing

from conftest import ROOT
from test_bad_input import run_main_in_process

CLASSES = ["beach", "forest", "kitchen"]


@pytest.fixture
def photos(tmp_path):
  """The spec of a 3-class folder as datatools.prepare_data writes it: 6 tiny photos to train on, 3 held out."""
  directory = tmp_path / "my_photos"
  rng = np.random.default_rng(0)
  splits = {}
  for split, count in (("train", 6), ("validation", 3)):
    name = records.shard_name(split, 0, 1)
    written = records.write_records(
      directory / name,
      ({"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i % 3} for i in range(count)),
    )
    splits[split] = {"records": written, "shards": [name], "kind": "labelled"}
  records.write_metadata(directory, kind="classification", classes=CLASSES, splits=splits)
  return f"arrayrecord:{directory}/{{split}}-*.array_record"


def _dry_run(tmp_path, monkeypatch, capsys, *flags):
  args = (
    "--config=configs/vit_huge.py:small",
    f"--workdir={tmp_path / 'run'}",
    "--dry_run",
    "--config.model.variant=pico/4",
    "--config.model.image_size=16",
    "--config.data.image_size=16",
    "--config.global_batch_size=2",
    "--dry_run_devices=1",
    *flags,
  )
  return run_main_in_process(args, monkeypatch, capsys)


def test_a_small_run_shortened_by_total_steps_alone_starts(photos, tmp_path, monkeypatch, capsys, caplog):
  named = []
  class_names = registry.class_names
  monkeypatch.setattr(registry, "class_names", lambda spec, *a, **k: named.append(spec) or class_names(spec, *a, **k))
  status, out, err = _dry_run(
    tmp_path, monkeypatch, capsys, f"--config.data.source={photos}", "--config.total_steps=40"
  )
  assert status == 0, err[-3000:]
  assert named == [photos]  # read by the sizing for the head, and handed to the loader's class-count check
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.msg.startswith("%s")]
  assert warnings == [  # the class count first: the machine's sizes read the model it sizes
    f"config.model.num_classes=-1 is 3: the classes of config.data.source={photos!r} (beach, forest, kitchen)",
    "config.optim.warmup_steps=-1 is 4: a tenth of config.total_steps=40",
    "config.eval_every=-1 is 7: a sixth of config.total_steps=40, rounded up",
    "config.checkpoint_every=-1 is 7: a sixth of config.total_steps=40, rounded up",
  ]
  assert "steps: 40 of" in out and "checkpoints: every 7" in out, out


def test_a_field_given_keeps_its_value_and_the_default_length_keeps_the_recipe_s_figures(photos, monkeypatch):
  monkeypatch.setattr(training_sizing, "accelerator", lambda: "gpu")  # the recipe's GPU length: 3,000 steps
  config = config_lib.load(os.path.join(ROOT, "configs", "vit_huge.py:small"))
  config.data.source, config.eval_every, config.model.num_classes = photos, 250, 3
  checks.validate(config)
  assert (config.optim.warmup_steps, config.eval_every, config.checkpoint_every) == (300, 250, 500)
  assert config.model.num_classes == 3


def test_a_class_count_the_data_does_not_name_is_one_error_line(tmp_path, monkeypatch, capsys):
  rng = np.random.default_rng(0)
  records.write_records(
    tmp_path / "unnamed-00000-of-00001.array_record",  # shards without a dataset.json
    ({"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": 0} for _ in range(2)),
  )
  status, _, err = _dry_run(tmp_path, monkeypatch, capsys, f"--config.data.source=arrayrecord:{tmp_path}/unnamed-*")
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert status == 2 and len(errors) == 1, err[-3000:]
  assert errors[0].startswith(
    "error: config.model.num_classes=-1 takes the class count from the training data's dataset.json, but "
  ) and errors[0].endswith("set --config.model.num_classes="), errors


def test_a_data_path_that_matches_nothing_is_the_first_error(tmp_path, monkeypatch, capsys):
  """Before the class count that the data would size: the path, as the person typed it."""
  for spec in (f"arrayrecord:{tmp_path}/none-*", f"arrayrecord:{tmp_path}/missing/{{split}}-*.array_record"):
    status, _, err = _dry_run(tmp_path, monkeypatch, capsys, f"--config.data.source={spec}")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1, err[-3000:]
    path = spec.split(":", 1)[1].replace("{split}", "train")
    assert errors[0] == (
      f"error: config.data.source={spec!r} split 'train': no files match {path!r}; see docs/data_preparation.md"
    ), errors


def test_zero_shot_images_without_a_names_file_are_named_by_their_data(photos):
  config = config_lib.load(os.path.join(ROOT, "configs", "swinv2_g_clip.py:small"))
  assert config_lib.fill_zeroshot(config) == [] and config.eval.zeroshot_classes == ""  # no zero-shot images
  config.eval.zeroshot_source = photos
  assert config_lib.fill_zeroshot(config) == [
    f"config.eval.zeroshot_classes='' is 'data': config.eval.zeroshot_source={photos!r} names no classes file: "
    "the class names of its dataset.json"
  ]
  assert config.eval.zeroshot_classes == "data"
