"""datatools.build_tfds: TFDS' imagenet2012 from ImageNet's own tars, read back by the `tfds:` source, no TensorFlow."""

import subprocess
import sys
import tempfile

import ml_collections

from visionfm_jax.data.sources import registry as sources
from visionfm_jax.datatools import build_tfds

import standins

DATA_CFG = dict(train_split="train", eval_split="validation")


def test_imagenet2012_builds_from_the_manual_tars_and_reads_as_tfds_imagenet2012(tmp_path, monkeypatch):
  data = tmp_path / "data"
  manual = standins.write_imagenet2012_manual(data)
  temporary = tmp_path / "tmp"
  temporary.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temporary))
  assert build_tfds.main(["build_tfds", "--name=imagenet2012", f"--data_dir={data}"]) == 0
  assert not list(temporary.iterdir())  # nothing left in the temporary folder
  cfg = ml_collections.ConfigDict(dict(DATA_CFG, data_dir=str(data)))
  names = sources.class_names("tfds:imagenet2012", cfg)
  assert len(names) == 1000 and names[0] == "n01440764"  # TFDS' label order: sorted WordNet ids
  train = sources.build_source("tfds:imagenet2012", "train", cfg)
  assert len(train) == manual["train_images"]
  assert {names[train[i]["label"]] for i in range(len(train))} == set(manual["train_classes"])
  validation = sources.build_source("tfds:imagenet2012", "validation", cfg)
  labels = {validation[i]["file_name"].decode(): names[validation[i]["label"]] for i in range(len(validation))}
  assert sorted(labels) == manual["val_files"]
  # ILSVRC2012's first validation images are a sea snake, a cliff, a Shetland sheepdog (TFDS' shipped labels)
  assert [labels[f] for f in manual["val_files"][:3]] == ["n01751748", "n09193705", "n02105855"]
  assert isinstance(validation[0]["image"], bytes)
  assert "tensorflow" not in sys.modules


def test_the_validation_split_alone_needs_only_its_tar(tmp_path):
  manual = standins.write_imagenet2012_manual(tmp_path)
  (tmp_path / "downloads" / "manual" / build_tfds.TRAIN_TAR).unlink()
  assert build_tfds.main(["build_tfds", "--name=imagenet2012", f"--data_dir={tmp_path}", "--splits=validation"]) == 0
  cfg = ml_collections.ConfigDict(dict(DATA_CFG, data_dir=str(tmp_path)))
  assert len(sources.build_source("tfds:imagenet2012", "validation", cfg)) == len(manual["val_files"])


def test_missing_tars_are_one_error_line_naming_the_folder(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "visionfm_jax.datatools.build_tfds", "--name=imagenet2012", f"--data_dir={tmp_path}"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
  assert result.stderr.startswith("error: ") and str(tmp_path / "downloads" / "manual") in result.stderr
