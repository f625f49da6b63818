"""datatools.prepare_data: class trees and img2dataset tars -> ArrayRecord shards + dataset.json (small fixtures,
CPU)."""

import collections
import functools
import glob
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest

from visionfm_jax import config_lib
from visionfm_jax.bench import file_opens
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources import records
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.text import tokenizer
from visionfm_jax.datatools import cluster_task
from visionfm_jax.datatools.prepare_data import __main__ as prepare_data
from visionfm_jax.datatools.prepare_data import image_tree, shards
from visionfm_jax.datatools.prepare_data.folders import convert_folders
from visionfm_jax.datatools.prepare_data.webdataset import convert_webdataset
from visionfm_jax.errors import DataError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ["ant", "moth", "zebra"]  # created in another order: labels must follow the sorted names
DATA_CFG = ml_collections.ConfigDict({"train_split": "train", "eval_split": "validation"})


def encoded(width=32, height=24, fmt="JPEG", seed=0) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  return buffer.getvalue()


def write_file(path, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def make_tree(root) -> dict[str, bytes]:
  """3 classes, 10 images (jpg/JPEG/png/webp/bmp, one in a subfolder) + non-image files; {relative path: bytes}."""
  files = {
    "zebra/z1.jpg": encoded(seed=1),
    "zebra/z2.JPEG": encoded(seed=2),
    "zebra/z3.png": encoded(fmt="PNG", seed=3),
    "zebra/z4.jpeg": encoded(seed=4),
    "ant/a1.jpg": encoded(seed=5),
    "ant/nested/a2.webp": encoded(fmt="WEBP"),
    "ant/a3.bmp": encoded(fmt="BMP", seed=7),
    "moth/m1.jpg": encoded(seed=8),
    "moth/m2.PNG": encoded(fmt="PNG"),
    "moth/m3.jpg": encoded(seed=10),
  }
  for relpath, data in files.items():
    write_file(os.path.join(root, relpath), data)
  write_file(os.path.join(root, "moth", "notes.txt"), b"not an image")
  write_file(os.path.join(root, "README"), b"not a class")
  return files


def read_split(directory, split="train") -> list[dict]:
  source = sources.build_source(f"arrayrecord:{directory}/{{split}}-*.array_record", split, DATA_CFG)
  return [source[i] for i in range(len(source))]


def shard_bytes(directory) -> dict[str, bytes]:
  """Every shard and sidecar of `directory` by name."""
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "*.array_record*"))):
    with open(path, "rb") as f:
      out[os.path.basename(path)] = f.read()
  return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("tree")
  return str(root), make_tree(root)


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory):
  """The tree converted inline with 4 records per shard: (output dir, metadata)."""
  out = str(tmp_path_factory.mktemp("converted"))
  return out, convert_folders(tree[0], out, records_per_shard=4, num_workers=0)


def test_folders_round_trip(tree, converted):
  root, files = tree
  out, metadata = converted
  assert metadata == records.read_metadata(out)
  assert metadata["kind"] == "classification" and metadata["classes"] == CLASSES
  entry = metadata["splits"]["train"]
  assert entry["shards"] == [records.shard_name("train", i, 3) for i in range(3)]
  assert (entry["records"], entry["skipped"], entry["class_counts"], entry["kind"]) == (10, 0, [3, 3, 4], "labelled")
  assert entry["source"] == os.path.abspath(root)
  assert sorted(os.listdir(out)) == sorted(["dataset.json", *entry["shards"], *(s + ".json" for s in entry["shards"])])
  assert sorted(glob.glob(f"{out}/train-*.array_record")) == [os.path.join(out, s) for s in entry["shards"]]
  examples = read_split(out)
  assert sorted(e["key"] for e in examples) == sorted(files)
  assert [e["key"] for e in examples] != sorted(files)  # shuffled: shards mix classes
  for example in examples:
    assert example["image"] == files[example["key"]]  # bytes pass through unchanged
    assert example["label"] == CLASSES.index(example["key"].split("/")[0])
  assert sources.class_names(f"arrayrecord:{out}/{{split}}-*.array_record", DATA_CFG) == CLASSES


def test_folders_deterministic_by_seed(tree, converted, tmp_path):
  again = convert_folders(tree[0], str(tmp_path / "a"), records_per_shard=4, num_workers=1)
  assert again["splits"] == converted[1]["splits"]
  assert shard_bytes(tmp_path / "a") == shard_bytes(converted[0])
  convert_folders(tree[0], str(tmp_path / "b"), records_per_shard=4, num_workers=1, seed=1)
  assert [e["key"] for e in read_split(tmp_path / "b")] != [e["key"] for e in read_split(converted[0])]


def test_folders_holdout(tree, tmp_path):
  root, files = tree
  metadata = convert_folders(
    root, str(tmp_path), records_per_shard=4, num_workers=0, holdout_per_class=2, holdout_split_name="val"
  )
  train, val = read_split(tmp_path, "train"), read_split(tmp_path, "val")
  assert sorted(e["key"] for e in train + val) == sorted(files)  # disjoint and complete
  assert len(train) + len(val) == len({e["key"] for e in train + val})
  # No class trains on fewer images than it holds out: the 3-image classes hold out 1 of --holdout_per_class=2.
  assert sorted(e["label"] for e in val) == [0, 1, 2, 2]
  assert metadata["splits"]["val"]["class_counts"] == [1, 1, 2]
  assert metadata["splits"]["train"]["class_counts"] == [2, 2, 2]
  assert metadata["splits"]["val"]["shards"] == ["val-00000-of-00001.array_record"]
  big = convert_folders(root, str(tmp_path / "big"), num_workers=0, holdout_per_class=5)
  assert big["splits"]["validation"]["class_counts"] == [1, 1, 2]
  assert big["splits"]["train"]["class_counts"] == [2, 2, 2]


def make_tars(directory) -> list[str]:
  """Two img2dataset-style tars; of the 7 examples, one has no image and one no caption."""
  tars = {
    "00000.tar": {
      "k0.jpg": encoded(seed=1),
      "k0.txt": b"a red square\n",
      "k0.json": b'{"url": "u0"}',
      "k1.png": encoded(fmt="PNG", seed=2),
      "k1.txt": b"  two words ",
      "k2.txt": b"no image",
      "k2.json": b"{}",
    },
    "00001.tar": {
      "sub/k3.jpg": encoded(seed=3),
      "sub/k3.txt": b"in a folder",
      "sub/k3.json": b'{"w": 32}',
      "k4.jpg": encoded(seed=4),
      "k4.json": b"{}",
      "k5.webp": encoded(fmt="WEBP"),
      "k5.txt": "caf\u00e9".encode(),
      "k6.jpeg": encoded(seed=6),
      "k6.txt": b"last",
    },
  }
  for name, members in tars.items():
    with tarfile.open(os.path.join(directory, name), "w") as archive:
      for member, data in members.items():
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
  return tars


def test_webdataset_pairs(tmp_path):
  os.makedirs(tmp_path / "in")
  tars = make_tars(tmp_path / "in")
  out = str(tmp_path / "out")
  metadata = convert_webdataset(str(tmp_path / "in" / "*.tar"), out, num_workers=0)
  entry = metadata["splits"]["train"]
  assert metadata["kind"] == "pairs" and "classes" not in metadata
  assert entry["shards"] == ["train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
  assert (entry["records"], entry["skipped"], entry["uncaptioned"], entry["kind"]) == (6, 1, 1, "pairs")
  assert entry["source"] == str(tmp_path / "in" / "*.tar")
  examples = {e["key"]: e for e in read_split(out)}
  assert list(examples) == ["k0", "k1", "sub/k3", "k4", "k5", "k6"]
  assert {k: e.get("caption") for k, e in examples.items()} == {
    "k0": "a red square",
    "k1": "two words",
    "sub/k3": "in a folder",
    "k4": None,
    "k5": "caf\u00e9",
    "k6": "last",
  }
  assert set(examples["k4"]) == {"image", "key", "meta"}  # image-only: no caption, kept
  assert examples["k0"]["meta"] == '{"url": "u0"}' and "meta" not in examples["k1"]
  assert examples["sub/k3"]["image"] == tars["00001.tar"]["sub/k3.jpg"]
  assert examples["k1"]["image"] == tars["00000.tar"]["k1.png"]
  assert [json.load(open(os.path.join(out, s + ".json")))["records"] for s in entry["shards"]] == [2, 4]


def make_uncaptioned_tars(directory, tars: int, per_tar: int) -> None:
  for t in range(tars):
    with tarfile.open(os.path.join(directory, f"{t:05d}.tar"), "w") as archive:
      for k in range(per_tar):
        for member, data in (
          (f"t{t}k{k}.jpg", encoded(width=8, height=8, seed=t * 100 + k)),
          (f"t{t}k{k}.json", b"{}"),
        ):
          info = tarfile.TarInfo(member)
          info.size = len(data)
          archive.addfile(info, io.BytesIO(data))


def test_webdataset_of_images_only_trains_in_a_mixture(tmp_path):
  os.makedirs(tmp_path / "in")
  make_uncaptioned_tars(tmp_path / "in", tars=2, per_tar=6)
  out = tmp_path / "out"
  metadata = convert_webdataset(str(tmp_path / "in" / "*.tar"), str(out), num_workers=0)
  entry = metadata["splits"]["train"]
  assert (entry["records"], entry["uncaptioned"], entry["kind"]) == (12, 12, "images")
  assert all(set(e) == {"image", "key", "meta"} for e in read_split(out))
  cfg = config_lib.base_config().data
  cfg.image_size, cfg.num_workers, cfg.shapes_train_size, cfg.source = 8, 0, 64, ""
  cfg.mixture = (("shapes", 1.0), (f"arrayrecord:{out}/{{split}}-*.array_record", 1.0))
  tok = tokenizer.Tokenizer(tokenizer.shapes_tokenizer_path(), 12)
  batch = next(iter(pipeline.make_pair_train_loader(cfg, tok, batch_size=8, seed=0, process_index=0, process_count=1)))
  assert batch["has_text"].sum() == 4 and (batch["text"][~batch["has_text"]] == tokenizer.PAD_ID).all()


def test_webdataset_holdout(tmp_path):
  os.makedirs(tmp_path / "in")
  make_uncaptioned_tars(tmp_path / "in", tars=3, per_tar=5)
  pattern = str(tmp_path / "in" / "*.tar")

  def convert(name, **kwargs):
    out = str(tmp_path / name)
    metadata = convert_webdataset(pattern, out, num_workers=0, holdout_split_name="val", **kwargs)
    return metadata, {split: [e["key"] for e in read_split(out, split)] for split in metadata["splits"]}

  metadata, keys = convert("a", holdout_examples=4, seed=3)
  assert metadata["splits"]["val"]["records"] == 4 and metadata["splits"]["val"]["holdout_examples"] == 4
  assert len(keys["train"]) == 11 and not set(keys["train"]) & set(keys["val"])
  assert len({k.split("k")[0] for k in keys["val"]}) == 1  # all from the first tar of the seeded order (5 >= 4)
  assert convert("b", holdout_examples=4, seed=3)[1] == keys  # deterministic
  assert convert("c", holdout_examples=4, seed=4)[1]["val"] != keys["val"]
  assert len(convert("d", holdout_examples=7, seed=3)[1]["val"]) == 7  # from two tars
  with pytest.raises(UserError, match="--holdout_examples=15: the tars hold only 15"):
    convert("e", holdout_examples=15)


def test_unlabelled_folders(tmp_path):
  for name, data in {
    "x1.jpg": encoded(seed=1),
    "sub/x2.png": encoded(fmt="PNG", seed=2),
    "sub/deeper/x3.jpg": encoded(seed=3),
    "notes.txt": b"not an image",
    "x4.jpeg": encoded(seed=4),
  }.items():
    write_file(str(tmp_path / "in" / name), data)
  out = str(tmp_path / "out")
  metadata = convert_folders(
    str(tmp_path / "in"), out, unlabelled=True, holdout_examples=1, num_workers=0, records_per_shard=2
  )
  assert metadata["kind"] == "images" and "classes" not in metadata
  assert {s: (e["records"], e["kind"]) for s, e in metadata["splits"].items()} == {
    "train": (3, "images"),
    "validation": (1, "images"),
  }
  examples = read_split(out) + read_split(out, "validation")
  assert sorted(e["key"] for e in examples) == ["sub/deeper/x3.jpg", "sub/x2.png", "x1.jpg", "x4.jpeg"]
  assert all(set(e) == {"image", "key"} for e in examples)
  source = records.ArrayRecordSource(f"{out}/train-*.array_record")
  with pytest.raises(DataError, match="no class names"):
    records.class_names(f"{out}/train-*.array_record")
  assert source.metadata["kind"] == "images"
  write_file(str(tmp_path / "in" / "other" / "x5.jpg"), encoded(seed=5))  # a second class folder
  with pytest.raises(UserError, match="different data set"):  # labelled folders into the same directory
    convert_folders(str(tmp_path / "in"), out, num_workers=0)
  with pytest.raises(UserError, match="--holdout_per_class=1, --holdout_examples=0"):
    convert_folders(str(tmp_path / "in"), out, unlabelled=True, holdout_per_class=1)


def test_resize_and_verify(tmp_path, caplog):
  root = tmp_path / "tree"
  big, small, corrupt = encoded(64, 48, seed=1), encoded(12, 10, fmt="PNG", seed=2), encoded(seed=3)[:200]
  tree = {"a/big.jpg": big, "a/small.png": small, "b/bad.jpg": corrupt, "b/tall.jpg": encoded(20, 90)}
  for relpath, data in tree.items():
    write_file(os.path.join(root, relpath), data)

  with caplog.at_level(logging.WARNING):
    metadata = convert_folders(str(root), str(tmp_path / "r"), resize_shorter=16, num_workers=0)
  assert "b/bad.jpg" in caplog.text
  assert (metadata["splits"]["train"]["records"], metadata["splits"]["train"]["skipped"]) == (3, 1)
  assert metadata["splits"]["train"]["class_counts"] == [2, 1]
  resized = {e["key"]: e["image"] for e in read_split(tmp_path / "r")}
  assert Image.open(io.BytesIO(resized["a/big.jpg"])).size == (21, 16)
  assert Image.open(io.BytesIO(resized["b/tall.jpg"])).format == "JPEG"
  assert Image.open(io.BytesIO(resized["b/tall.jpg"])).size == (16, 72)
  assert resized["a/small.png"] == small  # never enlarged, not re-encoded

  metadata = convert_folders(str(root), str(tmp_path / "v"), verify=True, num_workers=0)
  assert metadata["splits"]["train"]["skipped"] == 1
  assert {e["key"]: e["image"] for e in read_split(tmp_path / "v")}["a/big.jpg"] == big

  metadata = convert_folders(str(root), str(tmp_path / "raw"), num_workers=0)
  assert metadata["splits"]["train"]["skipped"] == 0
  assert {e["key"]: e["image"] for e in read_split(tmp_path / "raw")}["b/bad.jpg"] == corrupt


def test_images_below_min_side_are_counted_and_warned_about(tree, tmp_path, capsys):
  """Each sidecar and dataset.json count the images whose shorter side as given (decoded, or read from the header)
  is below --min_side (default: --resize_shorter); the console says how many."""
  sizes = [(40, 30), (20, 50), (64, 64), (33, 32), (31, 90)]  # shorter sides 30, 20, 64, 32, 31
  os.makedirs(tmp_path / "in")
  with tarfile.open(tmp_path / "in" / "00000.tar", "w") as archive:
    for i, (width, height) in enumerate(sizes):
      for member, data in ((f"k{i}.jpg", encoded(width, height, seed=i)), (f"k{i}.txt", b"a caption")):
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

  def convert(name, *flags):
    assert (
      prepare_data.main(
        [
          "prog",
          "--format=webdataset",
          f"--input={tmp_path / 'in' / '*.tar'}",
          f"--output={tmp_path / name}",
          "--num_workers=0",
          *flags,
        ]
      )
      == 0
    )
    entry = json.loads((tmp_path / name / "dataset.json").read_text())["splits"]["train"]
    sidecar = json.loads((tmp_path / name / (entry["shards"][0] + ".json")).read_text())
    return entry, sidecar, capsys.readouterr().err

  entry, sidecar, err = convert("resized", "--resize_shorter=32")
  assert entry["small_images"] == sidecar["small_images"] == {"min_side": 32, "count": 3}
  assert err.splitlines() == [
    "warning: 3 of the 5 train images have a shorter side below 32 px (--min_side): a "
    "recipe that reads them at 32 px upsamples them (download larger: img2dataset "
    "--resize_mode=keep_ratio --image_size=...)"
  ]
  entry, sidecar, err = convert("as_stored", "--min_side=64")  # not decoded: the sides from the headers
  assert entry["small_images"] == sidecar["small_images"] == {"min_side": 64, "count": 4}
  assert "warning: 4 of the 5 train images" in err
  # the option is no part of the fingerprint: the finished shard is kept, its images unmeasured at another size
  entry, _, err = convert("as_stored", "--min_side=31")
  assert entry["small_images"] == {"min_side": 31, "count": 0, "unmeasured": 5}
  assert err.strip().endswith("; 5 more, in shards written without this --min_side, are not measured")
  entry, sidecar, err = convert("uncounted", "--resize_shorter=32", "--min_side=0")
  assert "small_images" not in entry and "small_images" not in sidecar and not err
  entry, _, err = convert("enough", "--min_side=20")
  assert entry["small_images"] == {"min_side": 20, "count": 0} and not err
  assert (
    prepare_data.main(
      [
        "prog",
        "--format=webdataset",
        f"--input={tmp_path / 'in' / '*.tar'}",
        f"--output={tmp_path / 'bad'}",
        "--min_side=-1",
      ]
    )
    == 2
  )
  assert "--min_side=-1: expected a size in px, or 0 (no count)" in capsys.readouterr().err
  # every format: the class tree's images are 32x24
  metadata = convert_folders(tree[0], str(tmp_path / "folders"), num_workers=0, min_side=25)
  assert metadata["splits"]["train"]["small_images"] == {"min_side": 25, "count": 10}


def test_resume_rewrites_only_missing_shards(tree, converted, tmp_path, monkeypatch):
  out = str(tmp_path / "out")
  convert_folders(tree[0], out, records_per_shard=4, num_workers=0)
  before = shard_bytes(out)
  middle = os.path.join(out, records.shard_name("train", 1, 3))
  os.remove(middle)
  write_file(middle + ".tmp", b"partial")  # an interrupted write
  os.remove(os.path.join(out, records.shard_name("train", 2, 3) + ".json"))  # crashed before its sidecar
  written = []
  write_shard = shards.write_shard
  monkeypatch.setattr(shards, "write_shard", lambda job: written.append(job.path) or write_shard(job))

  metadata = convert_folders(tree[0], out, records_per_shard=4, num_workers=0)
  assert sorted(written) == [middle, os.path.join(out, records.shard_name("train", 2, 3))]
  assert shard_bytes(out) == before and not os.path.exists(middle + ".tmp")
  assert metadata == converted[1]

  written.clear()  # finished: nothing to do
  assert convert_folders(tree[0], out, records_per_shard=4, num_workers=0) == metadata
  assert not written
  # Other options: every shard is stale, so all are rewritten.
  convert_folders(tree[0], out, records_per_shard=4, num_workers=0, verify=True)
  assert len(written) == 3 and shard_bytes(out) != before


def test_parallel_matches_inline(tree, converted, tmp_path):
  metadata = convert_folders(tree[0], str(tmp_path), records_per_shard=4, num_workers=2)
  assert metadata == converted[1]
  assert shard_bytes(tmp_path) == shard_bytes(converted[0])


def test_cli(tree, tmp_path, capsys):
  out = str(tmp_path / "out")
  args = [
    "prepare_data",
    "--format=folders",
    f"--input={tree[0]}",
    f"--output={out}",
    "--records_per_shard=4",
    "--num_workers=0",
    "--holdout_per_class=1",
    "--progress",
  ]
  assert prepare_data.main(args) == 0
  captured = capsys.readouterr()
  assert captured.out.startswith("prepare_data: train 7, validation 3 records, 0 skipped, 3 shards, ")
  assert "shards 3/3, 10 records written" in captured.err
  assert records.read_metadata(out)["splits"]["validation"]["records"] == 3
  with file_opens.FileOpens([out], ".array_record") as opens:  # each split's shard index says what they hold
    assert len(records.ArrayRecordSource(f"{out}/*.array_record")) == 10 and opens.opened() == 0

  os.makedirs(tmp_path / "tars")
  make_uncaptioned_tars(tmp_path / "tars", tars=2, per_tar=4)
  args = [
    "prepare_data",
    "--format=webdataset",
    f"--input={tmp_path}/tars/*.tar",
    f"--output={tmp_path / 'wds'}",
    "--num_workers=0",
    "--holdout_examples=3",
    "--holdout_split=val",
    "--seed=2",
  ]
  assert prepare_data.main(args) == 0
  assert capsys.readouterr().out.startswith("prepare_data: train 5, val 3 records, 0 skipped, 3 shards, ")


def _error(args, capsys) -> str:
  assert prepare_data.main(["prepare_data", *args]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
  return captured.err


def test_cli_errors(tree, tmp_path, capsys):
  out = f"--output={tmp_path / 'out'}"
  missing = tmp_path / "missing"
  assert f"--input={missing}: no such directory" in _error(["--format=folders", f"--input={missing}", out], capsys)
  assert "no files match" in _error(["--format=webdataset", f"--input={tmp_path}/*.tar", out], capsys)
  os.makedirs(tmp_path / "empty" / "no_images")
  assert "no class folders" in _error(["--format=folders", f"--input={tmp_path / 'empty' / 'no_images'}", out], capsys)
  write_file(str(tmp_path / "empty" / "no_images" / "notes.txt"), b"x")
  assert "no image files" in _error(["--format=folders", f"--input={tmp_path / 'empty'}", out], capsys)
  os.makedirs(tmp_path / "pairs")
  records.write_metadata(tmp_path / "pairs", kind="pairs", splits={})
  err = _error(["--format=folders", f"--input={tree[0]}", f"--output={tmp_path / 'pairs'}"], capsys)
  assert f"--output={tmp_path / 'pairs'}: its dataset.json describes a different data set" in err
  assert "--format" in _error(["--format=zip", f"--input={tree[0]}", out], capsys)
  assert "--records_per_shard" in _error(
    ["--format=webdataset", f"--input={tree[0]}/*.tar", out, "--records_per_shard=10"], capsys
  )
  assert "--unlabelled: only for --format=folders" in _error(
    ["--format=webdataset", f"--input={tree[0]}/*.tar", out, "--unlabelled"], capsys
  )
  assert "--holdout_examples=2: the first for class folders" in _error(
    ["--format=folders", f"--input={tree[0]}", out, "--holdout_examples=2"], capsys
  )
  assert "--split='my-train'" in _error(["--format=folders", f"--input={tree[0]}", out, "--split=my-train"], capsys)
  write_file(str(tmp_path / "tars" / "bad.tar"), b"not a tar")
  err = _error(["--format=webdataset", f"--input={tmp_path}/tars/*.tar", out], capsys)
  assert f"{tmp_path}/tars/bad.tar: unreadable tar file" in err
  assert "--output: required" in _error(["--format=folders", f"--input={tree[0]}"], capsys)


def test_cli_refuses_shards_of_another_conversion(tree, converted, capsys):
  err = _error(["--format=folders", f"--input={tree[0]}", f"--output={converted[0]}", "--records_per_shard=5"], capsys)
  assert "train-00000-of-00003.array_record" in err and "another shard count" in err


def make_image_tree(root) -> list[str]:
  """An unlabelled tree: 2 images of its own and 6 top-level folders (one nested, one empty, one hidden); the
  sorted relative paths of its images."""
  paths = [
    "r1.jpg",
    "r0.png",
    "a/x.jpg",
    "a/y.jpg",
    "a/z.jpg",
    "a-b/q.jpg",
    "b/deep/er/p.jpg",
    "b/p.jpg",
    "c/1.jpg",
    "c/2.jpg",
    "c/3.jpg",
    "c/4.jpg",
    "c/5.jpg",
    "d/only.jpg",
  ]
  for i, path in enumerate(paths):
    write_file(os.path.join(root, path), encoded(8, 8, seed=i))
  write_file(os.path.join(root, "c", "notes.txt"), b"not an image")
  write_file(os.path.join(root, ".hidden", "h.jpg"), encoded(8, 8))
  os.makedirs(os.path.join(root, "empty"))
  return sorted(paths)


def test_image_tree_walks_each_top_level_folder_in_sorted_order(tmp_path):
  paths = make_image_tree(tmp_path)
  folders = image_tree.top_level_folders(str(tmp_path))
  assert folders == ["", "a", "a-b", "b", "c", "d", "empty"]  # "": the root's own images
  walked = [p for folder in folders for p in image_tree.folder_images(str(tmp_path), folder)]
  assert sorted(walked) == paths and len(walked) == len(paths)
  assert list(image_tree.walk_images(str(tmp_path), "")) == paths  # a folder 'a' sorts as 'a/': after 'a-b'
  held = image_tree.sample_holdout(str(tmp_path), folders, 3, seed=0)
  assert held == sorted(held) and len(set(held)) == 3 and set(held) <= set(paths)
  assert image_tree.sample_holdout(str(tmp_path), folders, 3, seed=0) == held
  with pytest.raises(UserError, match=f"--holdout_examples=14: {tmp_path} has only 14 images"):
    image_tree.sample_holdout(str(tmp_path), folders, 14, seed=0)


def test_an_unlabelled_task_walks_only_its_folders(tmp_path, monkeypatch):
  make_image_tree(tmp_path / "in")
  walked = []
  folder_images = image_tree.folder_images
  monkeypatch.setattr(
    image_tree, "folder_images", lambda root, folder: walked.append(folder) or folder_images(root, folder)
  )
  report = convert_folders(
    str(tmp_path / "in"),
    str(tmp_path / "out"),
    unlabelled=True,
    num_workers=0,
    records_per_shard=2,
    task=cluster_task.Task(1, 3),
  )
  assert walked == ["a", "c"]  # folders 1 and 4 of ['', 'a', 'a-b', 'b', 'c', 'd', 'empty']
  assert report == {"unfinished": "2 of 3 tasks' shares", "task": "task 1 of 3"}
  assert sorted(os.listdir(tmp_path / "out" / "train-folders")) == ["00001.json", "00004.json"]
  assert sorted(n for n in os.listdir(tmp_path / "out") if n.endswith(".array_record")) == [
    "train-00001-00000.array_record",
    "train-00001-00001.array_record",
    "train-00004-00000.array_record",
    "train-00004-00001.array_record",
    "train-00004-00002.array_record",
  ]


def test_unlabelled_tasks_write_what_one_run_writes(tmp_path, monkeypatch):
  paths = make_image_tree(tmp_path / "in")
  common = dict(
    unlabelled=True, num_workers=0, records_per_shard=2, holdout_examples=3, holdout_split_name="val", seed=1
  )
  one = convert_folders(str(tmp_path / "in"), str(tmp_path / "one"), **common)
  held = [e["key"] for e in read_split(tmp_path / "one", "val")]
  assert held == sorted(held) and len(held) == 3 and one["splits"]["val"]["holdout_examples"] == 3
  kept = collections.Counter(p.split("/")[0] if "/" in p else "" for p in paths if p not in held)
  folders = ["", "a", "a-b", "b", "c", "d"]  # and 'empty' (number 6): no shard
  assert one["splits"]["train"]["shards"] == [
    f"train-{folders.index(f):05d}-{n:05d}.array_record" for f in folders for n in range(-(-kept[f] // 2))
  ]
  assert one["splits"]["val"]["shards"] == ["val-00000-of-00002.array_record", "val-00001-of-00002.array_record"]
  assert [e["key"] for e in read_split(tmp_path / "one")] == sorted(
    set(paths) - set(held), key=lambda p: (folders.index(p.split("/")[0] if "/" in p else ""), p)
  )  # folder by folder, each in sorted order
  many = str(tmp_path / "many")
  for index in (2, 0):
    report = convert_folders(str(tmp_path / "in"), many, task=cluster_task.Task(index, 3), **common)
    assert "unfinished" in report and not os.path.exists(os.path.join(many, "dataset.json"))
  with pytest.raises(UserError, match="--finalize: 2 of 7 folders are not written yet"):
    convert_folders(str(tmp_path / "in"), many, task=None, **common)
  assert convert_folders(str(tmp_path / "in"), many, task=cluster_task.Task(1, 3), **common) == one
  assert shard_bytes(many) == shard_bytes(tmp_path / "one")
  assert read_split(many) == read_split(tmp_path / "one") and read_split(many, "val") == read_split(
    tmp_path / "one", "val"
  )
  train, val = ({e["key"] for e in read_split(many, split)} for split in ("train", "val"))
  assert not train & val and len(train | val) == 14
  os.remove(os.path.join(many, "dataset.json"))  # the final step writes it again from the lists and sidecars
  assert convert_folders(str(tmp_path / "in"), many, task=None, **common) == one

  written = []  # a deleted shard is the only one a rerun writes
  write_shard = shards.write_shard
  monkeypatch.setattr(shards, "write_shard", lambda job: written.append(job.path) or write_shard(job))
  os.remove(os.path.join(many, one["splits"]["train"]["shards"][3]))
  assert convert_folders(str(tmp_path / "in"), many, **common) == one
  assert written == [os.path.join(many, one["splits"]["train"]["shards"][3])]


def test_unlabelled_refuses_shards_of_another_conversion(tmp_path):
  make_image_tree(tmp_path / "in")
  convert = functools.partial(
    convert_folders, str(tmp_path / "in"), str(tmp_path / "out"), unlabelled=True, num_workers=0
  )
  convert(records_per_shard=2)
  with pytest.raises(
    UserError,
    match=r"holds 2 'train' shards this conversion does not write "
    r"\(train-00001-00001.array_record, ...: another shard count\?\)",
  ):
    convert(records_per_shard=3)  # the second shard of 2 images of folder a (3 images), the third of c (5)
  os.makedirs(tmp_path / "labelled")
  write_file(str(tmp_path / "labelled" / records.shard_name("train", 0, 1)), b"")
  with pytest.raises(UserError, match="train-00000-of-00001.array_record"):
    convert_folders(str(tmp_path / "in"), str(tmp_path / "labelled"), unlabelled=True, num_workers=0)


def test_unlabelled_parallel_matches_inline(tmp_path, capsys):
  make_image_tree(tmp_path / "in")
  args = [
    "prepare_data",
    "--format=folders",
    "--unlabelled",
    f"--input={tmp_path / 'in'}",
    "--records_per_shard=2",
    "--holdout_examples=2",
    "--progress",
  ]
  assert prepare_data.main([*args, f"--output={tmp_path / 'inline'}", "--num_workers=0"]) == 0
  assert prepare_data.main([*args, f"--output={tmp_path / 'pool'}", "--num_workers=2"]) == 0
  out, err = capsys.readouterr()
  assert out.count("prepare_data: train 12, validation 2 records, 0 skipped, 8 shards") == 2, out
  assert "shards 8, 14 records written" in err
  assert shard_bytes(tmp_path / "pool") == shard_bytes(tmp_path / "inline")


def test_folders_refuse_links_and_follow_only_those_inside_with_follow_links(tmp_path, capsys):
  """A tree's link to a private file outside it (a key) never reaches the shards: every link is counted as `link`,
  and --follow_links follows only the one that resolves inside --input."""
  root = tmp_path / "tree"
  write_file(str(root / "cat" / "plain.jpg"), encoded(seed=1))
  write_file(str(root / "dog" / "plain.jpg"), encoded(seed=2))
  secret = tmp_path / "id_rsa"
  secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
  secret.chmod(0o600)
  (root / "cat" / "key.jpg").symlink_to(secret)
  (root / "dog" / "again.jpg").symlink_to(root / "cat" / "plain.jpg")
  (root / "mole").symlink_to(tmp_path)  # a class folder out of the tree: not entered
  args = ["prepare_data", "--format=folders", f"--input={root}", "--num_workers=0"]
  assert prepare_data.main([*args, f"--output={tmp_path / 'out'}"]) == 0
  assert "train 2 records, 2 skipped (link 2), " in capsys.readouterr().out
  entry = records.read_metadata(str(tmp_path / "out"))["splits"]["train"]
  assert entry["skipped_by"] == {"link": 2} and entry["class_counts"] == [1, 1, 0]
  assert all(b"PRIVATE KEY" not in data for data in shard_bytes(str(tmp_path / "out")).values())
  assert prepare_data.main([*args, f"--output={tmp_path / 'followed'}", "--follow_links"]) == 0
  assert "train 3 records, 1 skipped (link 1), " in capsys.readouterr().out
  examples = read_split(str(tmp_path / "followed"))
  assert sorted(e["key"] for e in examples) == ["cat/plain.jpg", "dog/again.jpg", "dog/plain.jpg"]
  assert not any(b"PRIVATE KEY" in e["image"] for e in examples)
  assert all(b"PRIVATE KEY" not in data for data in shard_bytes(str(tmp_path / "followed")).values())
  refused = tmp_path / "refused"
  assert "--follow_links: only for --format=folders" in _error(
    ["--format=webdataset", "--input=x.tar", f"--output={refused}", "--follow_links"], capsys
  )
  assert not refused.exists()  # a refused run leaves no folder of its own behind


def _prepare_data_process(*args) -> subprocess.CompletedProcess:
  """`python -m visionfm_jax.datatools.prepare_data ARGS`, as a person runs it (its console set up as main's)."""
  return subprocess.run(
    [sys.executable, "-m", "visionfm_jax.datatools.prepare_data", "--num_workers=0", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def test_a_holdout_larger_than_half_a_class_is_capped_on_one_warning_line(tmp_path):
  for c, name in enumerate(["cat", "dog"]):
    for i in range(6 + c):
      write_file(str(tmp_path / "in" / name / f"{i}.jpg"), encoded(8, 8, seed=10 * c + i))
  result = _prepare_data_process(
    "--format=folders", f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}", "--holdout_per_class=50"
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("prepare_data: train 7, validation 6 records, ")  # cat 3 + 3, dog 4 + 3
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert re.fullmatch(
    r"\d\d:\d\d:\d\d warning: prepare_data: --holdout_per_class=50: 2 of the 2 classes have fewer "
    r"than 100 images; each holds out half of its images, rounded down \(3\), so that no class "
    r"trains on fewer images than it holds out",
    lines[0],
  ), lines[0]
  metadata = records.read_metadata(tmp_path / "out")
  assert metadata["splits"]["validation"]["class_counts"] == [3, 3]
  assert metadata["splits"]["train"]["class_counts"] == [3, 4]


@pytest.mark.parametrize(
  "options",
  [[], ["--verify"], ["--unlabelled"], ["--unlabelled", "--resize_shorter=16"]],
  ids=lambda o: " ".join(o) or "as stored",
)
def test_a_folder_without_one_decodable_image_is_exit_2_and_writes_nothing(tmp_path, capsys, options):
  for name in ("cat", "dog"):
    for i in range(3):
      write_file(str(tmp_path / "in" / name / f"{i}.jpg"), b"not an image " * i)
  err = _error(
    ["--format=folders", f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}", "--num_workers=0", *options],
    capsys,
  )
  assert err == f"error: --input={tmp_path / 'in'}: none of its 6 image files could be read (6 undecodable)\n"
  assert not os.path.exists(tmp_path / "out")
  # One decodable image is enough: the rest are skipped (or, as stored, kept for the loader to skip and count).
  write_file(str(tmp_path / "in" / "dog" / "3.jpg"), encoded(8, 8))
  assert (
    prepare_data.main(
      [
        "prepare_data",
        "--format=folders",
        f"--input={tmp_path / 'in'}",
        f"--output={tmp_path / 'out'}",
        "--num_workers=0",
        *options,
      ]
    )
    == 0
  )
