"""The stand-ins of the released data sets and models (tests/standins.py), each read by the project's own reader or
tool as the runbooks use it: cheap, deterministic, and in the layouts those readers accept."""

import hashlib
import json
import tarfile
import time

import ml_collections
import numpy as np
import pytest

from visionfm_jax import convert
from visionfm_jax.data.sources import ade20k, coco, records, wds
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.text import caption_sets, tokenizer
from visionfm_jax.datatools import index_tars
from visionfm_jax.datatools.prepare_data import __main__ as prepare_data
from visionfm_jax.trained import loader

import standins

DATA_CFG = ml_collections.ConfigDict({"train_split": "train", "eval_split": "validation", "data_dir": ""})


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
  """(root, summaries) of write_all without the model repositories."""
  root = tmp_path_factory.mktemp("standins")
  return root, standins.write_all(root, models=False)


def digests(root) -> dict[str, str]:
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
  }


def prepare(*args) -> dict:
  """Runs datatools.prepare_data in this process (one worker) and returns the dataset.json it wrote."""
  output = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
  assert prepare_data.main(["prepare_data", *args, "--num_workers=0"]) == 0
  return records.read_metadata(output)


def test_the_data_stand_ins_are_cheap_deterministic_and_placed_as_the_runbooks_expect(placed, tmp_path):
  root, _ = placed
  start = time.process_time()
  standins.write_all(tmp_path, models=False)
  assert time.process_time() - start < 2.0  # about 0.1 s measured
  assert digests(tmp_path) == digests(root)
  for relative in (
    "raw/imagenet21k/fall11_whole.tar",
    "raw/imagenet21k/winter21_whole.tar.gz",
    "raw/laion/00000.tar",
    "raw/laion/00001_stats.json",
    "raw/vg/image_data.json",
    "raw/vg/region_descriptions.json",
    "raw/vg/VG_100K/3.jpg",
    "raw/vg/VG_100K_2/1.jpg",
    "raw/images/batch_001/part_a/00005.jpg",
    "data/tfds/downloads/manual/ILSVRC2012_img_train.tar",
    "data/tfds/downloads/manual/ILSVRC2012_img_val.tar",
    "data/coco/train2017/000000000009.jpg",
    "data/coco/val2017/000000000139.jpg",
    "data/coco/annotations/instances_train2017.json",
    "data/coco/annotations/captions_val2017.json",
    "data/coco/val2014/COCO_val2014_000000000133.jpg",
    "data/coco/dataset_coco.json",
    "data/flickr30k/flickr30k-images/1000092795.jpg",
    "data/flickr30k/dataset_flickr30k.json",
    "data/flickr30k/results_20130124.token",
    "data/ADEChallengeData2016/images/training/ADE_train_00000001.jpg",
    "data/ADEChallengeData2016/annotations/validation/ADE_val_00000002.png",
  ):
    assert (root / relative).is_file(), relative
  assert (root / "models").is_dir() and not (root / "hub").exists()


def test_imagenet21k_releases_unpack_into_class_folders_that_prepare_data_converts(placed, tmp_path):
  root, written = placed
  with tarfile.open(root / "raw/imagenet21k/fall11_whole.tar") as fall11:
    names = fall11.getnames()
    assert names == [f"{wnid}.tar" for wnid in standins.FALL11_SYNSETS]
    with tarfile.open(fileobj=fall11.extractfile(names[0])) as synset:
      assert synset.getnames()[0] == "n00004475_10026.JPEG"
  with tarfile.open(root / "raw/imagenet21k/winter21_whole.tar.gz") as winter21:
    assert winter21.getnames()[0] == "winter21_whole/n00004475.tar"

  fall11_dir = tmp_path / "fall11"
  assert standins.unpack_synset_tars(root / "raw/imagenet21k/fall11_whole.tar", fall11_dir) == sorted(
    standins.FALL11_SYNSETS
  )
  winter21 = standins.unpack_synset_tars(root / "raw/imagenet21k/winter21_whole.tar.gz", tmp_path / "winter21")
  assert len(winter21) < len(written["imagenet21k_fall11"]["classes"])
  # The runbook's command: 5 images per class held out, at most half of a class (here 4), shorter sides cut to 512
  # (these are smaller: kept).
  metadata = prepare(
    "--format=folders",
    f"--input={fall11_dir}",
    f"--output={tmp_path / 'in21k'}",
    "--holdout_per_class=5",
    "--resize_shorter=512",
  )
  assert metadata["classes"] == sorted(standins.FALL11_SYNSETS)
  per_class = standins.IMAGES_PER_SYNSET
  assert metadata["splits"]["validation"]["class_counts"] == [per_class // 2] * 6
  assert metadata["splits"]["train"]["class_counts"] == [per_class - per_class // 2] * 6


def test_laion_tars_are_indexed_filtered_and_converted_as_img2dataset_output(placed, tmp_path):
  root, written = placed
  laion = root / "raw" / "laion"
  pattern = str(laion / "*.tar")
  index_tars.index_tars(pattern)
  metas = written["laion"]["metas"].values()
  assert len(wds.WdsSource(pattern)) == written["laion"]["samples"] == len(metas)
  filtered = wds.WdsSource(pattern, wds.ScoreFilter(min_similarity=0.30, max_pwatermark=0.8, max_punsafe=0.5))
  first_failed = [
    next(
      (
        name
        for name, ok in (
          ("similarity", m["similarity"] >= 0.30),
          ("pwatermark", m["pwatermark"] <= 0.8),
          ("punsafe", m["punsafe"] <= 0.5),
        )
        if not ok
      ),
      None,
    )
    for m in metas
  ]
  assert len(filtered) == first_failed.count(None) > 0
  assert filtered.filtered == {k: first_failed.count(k) for k in ("similarity", "pwatermark", "punsafe")}
  similarities = sorted(m["similarity"] for m in written["laion"]["metas"].values())
  assert similarities[0] == 0.2 and similarities[-1] == 0.45

  metadata = prepare(
    "--format=webdataset",
    f"--input={pattern}",
    f"--output={tmp_path / 'laion'}",
    "--resize_shorter=640",
    "--holdout_examples=3",
    "--holdout_split=validation",
  )
  train, held = metadata["splits"]["train"], metadata["splits"]["validation"]
  assert train["records"] + held["records"] == len(metas) - 1
  assert train["skipped"] + held["skipped"] == 1  # the bad JPEG
  assert train["uncaptioned"] + held["uncaptioned"] == 2  # no .txt, and an empty one
  source = records.ArrayRecordSource(str(tmp_path / "laion" / "*.array_record"))
  stored = {r["key"]: r for r in (source[i] for i in range(len(source)))}
  with tarfile.open(laion / "00000.tar") as archive:
    original = archive.extractfile("000000004.jpg").read()
    assert archive.getnames()[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
  assert stored["000000004"]["image"] == original  # shorter sides under 640 are stored as they are, not upsampled
  assert json.loads(stored["000000004"]["meta"])["similarity"] == written["laion"]["metas"]["000000004"]["similarity"]

  stats = json.loads((laion / "00001_stats.json").read_text())
  per_shard = standins.LAION_SAMPLES_PER_SHARD
  assert stats["count"] == per_shard + 1 and stats["successes"] == per_shard and stats["failed_to_download"] == 1
  pq = pytest.importorskip("pyarrow.parquet")
  rows = pq.read_table(laion / "00000.parquet").to_pylist()
  assert [r["status"] for r in rows] == ["success"] * per_shard + ["failed_to_download"]
  assert rows[0]["key"] == "000000000" and rows[0]["similarity"] == written["laion"]["metas"]["000000000"]["similarity"]


def test_coco_serves_detection_caption_pairs_and_karpathy_retrieval(placed, tmp_path):
  root, written = placed
  coco_root = str(root / "data" / "coco")
  assert sources.class_names(f"coco:{coco_root}", DATA_CFG) == ["person", "car", "cat", "dog"]
  training = coco.CocoSource(coco_root, "train", skip_empty=True)
  assert len(training) == len(written["coco"]["train2017"]) - len(standins.COCO_UNANNOTATED)
  crowd = training.ground_truth(len(training))["annotations"]
  assert sum(a["iscrowd"] for a in crowd) == len(standins.COCO_CROWD)
  assert len(coco.CocoSource(coco_root, "validation")) == len(written["coco"]["val2017"]) == 3

  metadata = prepare(
    "--format=coco",
    f"--input={coco_root}",
    "--coco_folder=train2017",
    f"--output={tmp_path / 'coco_pairs'}",
    "--resize_shorter=448",
    f"--exclude_karpathy={coco_root}/dataset_coco.json",
  )
  split = metadata["splits"]["train"]
  kept = [i for i in written["coco"]["train2017"] if i not in written["coco"]["karpathy_eval"]]
  assert split["excluded_images"] == 4 and split["images"] == len(kept)
  assert split["records"] == sum(len(standins.coco_captions(i)) for i in kept)

  test = caption_sets.open_caption_set(f"coco_karpathy:{coco_root}")
  assert len(test) == 4 and len(test.captions) == 5 + 6 + 5 + 7
  assert test.image_paths[0].name == "COCO_val2014_000000000133.jpg"
  assert len(caption_sets.open_caption_set(f"coco_karpathy:{coco_root}:val")) == 2
  assert len(caption_sets.open_caption_set(f"coco_captions:{coco_root}")) == 3


def test_flickr30k_reads_with_karpathy_splits_and_the_token_file(placed):
  root, written = placed
  flickr = root / "data" / "flickr30k"
  test = caption_sets.open_caption_set(f"flickr30k:{flickr}")
  assert [p.name for p in test.image_paths] == written["flickr30k"]["test"] and len(test.captions) == 10
  assert len(caption_sets.open_caption_set(f"flickr30k_tokens:{flickr}")) == len(standins.FLICKR_IMAGES)


def test_visual_genome_regions_convert_leaving_out_coco_evaluation_images(placed, tmp_path):
  root, written = placed
  metadata = prepare(
    "--format=visual_genome",
    f"--input={root / 'raw' / 'vg'}",
    f"--output={tmp_path / 'vg'}",
    "--resize_shorter=448",
    "--min_region_size=64",
    f"--exclude_karpathy={root / 'data' / 'coco' / 'dataset_coco.json'}",
  )
  split = metadata["splits"]["train"]
  excluded = [v for v in written["visual_genome"]["coco_ids"].values() if v in written["coco"]["karpathy_eval"]]
  assert split["excluded_images"] == len(excluded) == 2 and split["images"] == 3
  assert split["small_regions"] == 3 and split["empty_phrases"] == 1 and split["records"] == 6


def test_ade20k_reads_with_its_150_classes(placed):
  root, written = placed
  ade_root = str(root / "data" / "ADEChallengeData2016")
  for split, folder in (("train", "training"), ("validation", "validation")):
    source = ade20k.ADE20KSource(ade_root, split)
    assert [f[:-4] for f in source.files] == written["ade20k"][folder]
  mask = ade20k.ADE20KSource(ade_root, "train")[0]["mask"]
  assert set(np.unique(mask).tolist()) == {0, 12, 149, 255}  # labels 1, 13, 150 and 'other'


def test_uncaptioned_image_tree_converts_to_image_records(placed, tmp_path):
  root, written = placed
  metadata = prepare(
    "--format=folders",
    "--unlabelled",
    f"--input={root / 'raw' / 'images'}",
    f"--output={tmp_path / 'images'}",
    "--resize_shorter=448",
    "--holdout_examples=2",
  )
  assert metadata["splits"]["train"]["records"] == len(written["images"]["images"]) - 2
  assert metadata["splits"]["validation"]["records"] == 2 and metadata["kind"] == "images"


def test_model_repositories_have_the_published_files_and_load(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  written = standins.write_all(tmp_path)  # builds the repositories once per process (about 4 CPU s)
  clip_dir, vit_dir = tmp_path / "hub" / standins.CLIP_REPO, tmp_path / "hub" / standins.VIT_REPO
  assert written["clip"]["files"] == sorted(standins.CLIP_FILES)
  assert written["vit"]["files"] == sorted(standins.VIT_FILES)
  config = loader.checkpoint_config(str(clip_dir))
  tok = tokenizer.load(config.data.tokenizer, config.model.text.max_len)
  vocab = json.loads((clip_dir / "vocab.json").read_text())
  assert (
    (tok.bos_id, tok.eos_id) == (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (len(vocab) - 2, len(vocab) - 1)
  )
  assert config.model.text.eos_id == tok.eos_id and config.model.image.variant.endswith("/32")
  model, _ = convert.from_hf(str(vit_dir))
  assert model.patch_size == 14


def test_imagenet_variants_open_with_every_class_folder(placed):
  from visionfm_jax.data.sources import imagenet_variants  # pylint: disable=g-import-not-at-top

  root, written = placed
  folders = {
    "imagenetv2": "imagenetv2-matched-frequency-format-val",
    "imagenet_sketch": "sketch",
    "imagenet_r": "imagenet-r",
    "imagenet_a": "imagenet-a",
  }
  for kind, folder in folders.items():
    source = imagenet_variants.open_variant(kind, str(root / "data" / "imagenet_variants" / folder))
    assert len(source) == written["imagenet_variants"][folder] == len(imagenet_variants.class_wnids(kind))
