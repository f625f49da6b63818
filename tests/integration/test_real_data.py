"""Real-data layouts end to end: an image-folder tree and img2dataset tars, converted by datatools.prepare_data,
then trained on; corrupt images skipped, counted and bounded; disjoint per-process shares of the shards."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image
import pytest

from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.text import tokenizer
from visionfm_jax.datatools.prepare_data.folders import convert_folders
from visionfm_jax.datatools.prepare_data.webdataset import convert_webdataset
from visionfm_jax.errors import ConfigError, DataError
from visionfm_jax.training import train

from conftest import tiny_clip_config, tiny_vit_config


def png(image) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def shapes_examples(n, split="train", size=16):
  source = shapes.ShapesSource(split, n, size)
  return [source[i] for i in range(n)]


def write_tree(root, n_good: int, n_corrupt: int) -> None:
  """`n_good` shapes images as <shape name>/<i>.png, plus `n_corrupt` truncated JPEGs spread over the classes."""
  for i, example in enumerate(shapes_examples(n_good)):
    folder = root / shapes.SHAPE_NAMES[example["label"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i}.png").write_bytes(png(example["image"]))
  for i in range(n_corrupt):
    folder = root / shapes.SHAPE_NAMES[i % len(shapes.SHAPE_NAMES)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"corrupt{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")


def metrics_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_image_folder_converts_trains_and_counts_corrupt_images(tmp_path):
  write_tree(tmp_path / "tree", n_good=48, n_corrupt=4)
  out = tmp_path / "records"
  metadata = convert_folders(str(tmp_path / "tree"), str(out), records_per_shard=16, holdout_per_class=1, num_workers=0)
  assert metadata["classes"] == sorted(shapes.SHAPE_NAMES)
  counts = {split: entry["records"] for split, entry in metadata["splits"].items()}
  assert counts["train"] + counts["validation"] == 52 and counts["validation"] >= 6  # 1 per class of 2+ images
  config = tiny_vit_config(total_steps=5, log_every=5, eval_every=5, checkpoint_every=5)
  config.data.source = f"arrayrecord:{out}/{{split}}-*.array_record"
  config.data.num_workers = 0
  config.model.num_classes = 8
  last = train.run(config, str(tmp_path / "run"))
  # 5 steps of 16 need 80 good records: more than an epoch of the train split, so every corrupt one was read.
  assert last["step"] == 5 and np.isfinite(last["train/loss"]) and 0 <= last["eval/val/top1"] <= 1
  row = [r for r in metrics_rows(tmp_path / "run") if "train/loss" in r][-1]
  train_split = sources.build_source(config.data.source, "train", config.data)
  corrupt_in_train = sum("corrupt" in train_split[i]["key"] for i in range(len(train_split)))
  assert corrupt_in_train >= 2  # (the holdout may take some of the 4)
  assert row["data/skipped"] >= corrupt_in_train and 0 < row["data/skipped_fraction"] < 0.2

  config.model.num_classes = 4
  with pytest.raises(ConfigError, match="config.model.num_classes=4 but .* has 8 classes"):
    train.run(config, str(tmp_path / "run_small_head"))


def test_mostly_corrupt_data_stops_the_run(tmp_path):
  write_tree(tmp_path / "tree", n_good=8, n_corrupt=24)
  out = tmp_path / "records"
  convert_folders(str(tmp_path / "tree"), str(out), num_workers=0)
  config = tiny_vit_config(total_steps=3)
  config.data.source = f"arrayrecord:{out}/{{split}}-*.array_record"
  config.data.eval_source = "shapes"
  config.data.num_workers = 0
  config.data.skip_check_after = 16
  config.model.num_classes = 8
  with pytest.raises(DataError, match=r"are corrupt or undecodable .* > config.data.max_skipped_fraction=0.02") as info:
    train.run(config, str(tmp_path / "run"))
  assert str(out) in str(info.value)
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


def write_tars(root, examples, per_tar: int) -> None:
  """img2dataset layout: <key>.jpg + <key>.txt + <key>.json per example, `per_tar` examples per tar."""
  root.mkdir(parents=True, exist_ok=True)
  for t in range(0, len(examples), per_tar):
    with tarfile.open(root / f"{t // per_tar:05d}.tar", "w") as tar:
      for i, example in enumerate(examples[t : t + per_tar], start=t):
        key = f"{i:09d}"
        members = {
          f"{key}.jpg": png(example["image"]),
          f"{key}.txt": example["caption"].encode(),
          f"{key}.json": json.dumps({"key": key, "similarity": 0.3}).encode(),
        }
        for name, data in members.items():
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))


def convert_shapes_tars(root, train: int, validation: int):
  """Shapes pairs as img2dataset tars (32 per tar), converted into `root`/pairs; returns the source spec. The
  CLIP end-to-end test (test_contrastive) trains on it."""
  write_tars(root / "tars" / "train", shapes_examples(train), per_tar=32)
  write_tars(root / "tars" / "validation", shapes_examples(validation, "validation"), per_tar=32)
  for split in ("train", "validation"):
    convert_webdataset(str(root / "tars" / split / "*.tar"), str(root / "pairs"), split=split, num_workers=0)
  return f"arrayrecord:{root / 'pairs'}/{{split}}-*.array_record"


def test_processes_read_disjoint_shares_covering_the_shards(tmp_path):
  write_tars(tmp_path / "tars", shapes_examples(48), per_tar=12)
  out = tmp_path / "pairs"
  convert_webdataset(str(tmp_path / "tars" / "*.tar"), str(out), num_workers=0)
  config = tiny_clip_config()
  config.data.source = f"arrayrecord:{out}/{{split}}-*.array_record"
  config.data.num_workers = 0
  config.data.augment.random_resized_crop = False
  shares = []
  tok = tokenizer.Tokenizer(tokenizer.shapes_tokenizer_path(), config.model.text.max_len)
  for index in range(2):
    it = iter(
      pipeline.make_pair_train_loader(config.data, tok, batch_size=8, seed=0, process_index=index, process_count=2)
    )
    images = np.concatenate([next(it)["image"] for _ in range(3)])  # one epoch of the 24-record share
    shares.append({img.tobytes() for img in images})
  assert len(shares[0]) == len(shares[1]) == 24
  assert not shares[0] & shares[1]
  every = {e["image"].tobytes() for e in shapes_examples(48)}
  assert shares[0] | shares[1] == every
