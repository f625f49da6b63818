"""Miniature stand-ins of the released data sets and models that the runbooks (docs/runbooks/) start from.

Each `write_<release>(root)` writes under `root` the file layout of one public release, as the runbook expects it
at that path (the download for tars and model repositories, the unpacked folder for zips), with a few classes and
a few small valid JPEGs, byte for byte the same on every call; it returns a small summary (counts, names) for
assertions. `write_all(root)` places every one as the runbooks do:

  root/raw/imagenet21k/fall11_whole.tar, winter21_whole.tar.gz   ImageNet-21K (fall 2011, winter 2021)
  root/raw/laion/00000.tar, .parquet, _stats.json, ...           img2dataset's output of LAION
  root/raw/laion2B-en-joined/part-00000.parquet                   LAION-2B-en's metadata, img2dataset's input
  root/raw/vg/                                                   Visual Genome 1.2
  root/raw/images/                                               uncaptioned images, a folder tree
  root/raw/my_photos/, my_captioned/, my_table/                  a researcher's own photos: class folders, images
                                                                 with caption files, a CSV of path + caption;
                                                                 my_class_names.txt (docs/your_data.md)
  root/data/tfds/downloads/manual/ILSVRC2012_img_{train,val}.tar ImageNet-1K for TFDS
  root/data/coco/                                                COCO 2017 + val2014 + Karpathy's dataset_coco.json
  root/data/flickr30k/                                           Flickr30k images + Karpathy's dataset_flickr30k.json
  root/data/ADEChallengeData2016/                                ADE20K (SceneParsing)
  root/hub/openai/clip-vit-base-patch32, root/hub/google/vit-huge-patch14-224-in21k,
  root/hub/google/vit-base-patch16-224-in21k
                                                                 Hugging Face repositories, for a stand-in of
                                                                 `hf download <repo> --local-dir=...` to copy
  root/models/                                                   empty: where the runbooks download models to

The data stand-ins cost about 0.1 CPU s together. The three model repositories are built once per process with
torch and transformers (about 4 CPU s, mostly importing them) into a temporary folder, then copied.

`unpack_synset_tars` unpacks an ImageNet tar of per-synset tars into class folders (as the release is unpacked
before `prepare_data --format=folders`).
"""

from __future__ import annotations

import atexit
import functools
import gzip
import hashlib
import io
import json
import os
from pathlib import Path
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image

MTIME = 1318291200  # every tar member's time stamp (2011-10-11), so that the tars are the same bytes every time

# ----------------------------------------------------------------------------------------------- building blocks


def jpeg(seed: int, width: int, height: int) -> bytes:
  """A photo-like JPEG of `width` x `height`: a smooth colour field from a 4 x 4 grid drawn by `seed`."""
  grid = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def _write_json(path: Path, data, indent: int | None = None) -> None:
  _write(path, json.dumps(data, indent=indent).encode("utf-8"))


def _tar(members: dict[str, bytes], mode: int = 0o644) -> bytes:
  """An uncompressed tar of `members` (name -> bytes), in that order."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size, info.mtime, info.mode = len(data), MTIME, mode
      archive.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def _gzip(data: bytes) -> bytes:
  return gzip.compress(data, mtime=MTIME)


WORDS = {
  "adjective": ("red", "small", "old", "bright", "wooden", "striped", "green"),
  "noun": ("dog", "cat", "bicycle", "boat", "clock", "kite", "train", "sofa"),
  "place": ("beach", "kitchen", "street", "park", "field", "harbour"),
}


def caption(seed: int) -> str:
  """A short English caption drawn by `seed` from a small vocabulary."""
  adjective, noun, place = (words[(seed * step + 1) % len(words)] for words, step in zip(WORDS.values(), (3, 5, 7)))
  return f"A {adjective} {noun} in the {place}."


def _tokens(text: str) -> list[str]:
  return [word.strip(".,").lower() for word in text.split()]


# ---------------------------------------------------------------------------------------------- ImageNet-21K

FALL11_SYNSETS = ("n00004475", "n00005787", "n00006024", "n00006484", "n00007846", "n00015388")
# winter21 removed 2,674 of fall11's 21,841 synsets (19,167 left); the stand-in drops two of its six.
WINTER21_SYNSETS = ("n00004475", "n00005787", "n00006024", "n00015388")
IMAGES_PER_SYNSET = 8  # prepare_data's --holdout_per_class=5 holds out half of them, 4, and trains on 4


def _synset_tar(wnid: str, count: int) -> bytes:
  """One synset's tar as ImageNet ships it: `<wnid>_<number>.JPEG` files at its root."""
  base = int(wnid[1:]) % 1000
  members = {}
  for i in range(count):
    number = 10026 + 137 * i
    members[f"{wnid}_{number}.JPEG"] = jpeg(base * 100 + i, 40 + 4 * (i % 4), 32 + 8 * (i % 3))
  return _tar(members)


def write_imagenet21k_fall11(root: Path) -> dict:
  """`root/fall11_whole.tar`: a tar of one tar per synset (`n00004475.tar`, ...) at its root, each holding that
  synset's `n00004475_<number>.JPEG` files. Returns {tar, classes, images_per_class}."""
  path = Path(root) / "fall11_whole.tar"
  _write(path, _tar({f"{wnid}.tar": _synset_tar(wnid, IMAGES_PER_SYNSET) for wnid in FALL11_SYNSETS}))
  return {"tar": str(path), "classes": list(FALL11_SYNSETS), "images_per_class": IMAGES_PER_SYNSET}


def write_imagenet21k_winter21(root: Path) -> dict:
  """`root/winter21_whole.tar.gz`: as fall11 but gzipped, the synset tars under a `winter21_whole/` folder, and
  fewer classes. Returns {tar, classes, images_per_class}."""
  path = Path(root) / "winter21_whole.tar.gz"
  members = {f"winter21_whole/{wnid}.tar": _synset_tar(wnid, IMAGES_PER_SYNSET) for wnid in WINTER21_SYNSETS}
  _write(path, _gzip(_tar(members)))
  return {"tar": str(path), "classes": list(WINTER21_SYNSETS), "images_per_class": IMAGES_PER_SYNSET}


def unpack_synset_tars(tar: Path, dest: Path) -> list[str]:
  """Unpacks a tar (or .tar.gz) of per-synset tars into `dest/<wnid>/<files>`, the class folders that
  `prepare_data --format=folders` reads (the shell's `tar -xf` of the outer tar, then of each inner one into a
  folder of its name). Returns the class names, sorted."""
  classes = []
  with tarfile.open(tar) as outer:
    for member in outer:
      if not (member.isfile() and member.name.endswith(".tar")):
        continue
      wnid = os.path.basename(member.name)[: -len(".tar")]
      with tarfile.open(fileobj=outer.extractfile(member)) as inner:
        inner.extractall(Path(dest) / wnid, filter="data")
      classes.append(wnid)
  return sorted(classes)


# -------------------------------------------------------------------------------------------- LAION (img2dataset)

LAION_SHARDS, LAION_SAMPLES_PER_SHARD = 3, 40  # + 1 failed download per shard, only in its .parquet
LAION_UNCAPTIONED = ("000000001",)  # no .txt member
LAION_EMPTY_CAPTION = ("000010002",)  # an empty .txt: what img2dataset writes for a null caption
LAION_CORRUPT = ("000010000",)  # a truncated JPEG


def laion_similarity(shard: int, index: int) -> float:
  """LAION's CLIP score of a sample: the samples take evenly spaced values in [0.20, 0.45]."""
  position = (7 * (shard * LAION_SAMPLES_PER_SHARD + index) + 3) % (LAION_SHARDS * LAION_SAMPLES_PER_SHARD)
  return round(0.20 + 0.25 * position / (LAION_SHARDS * LAION_SAMPLES_PER_SHARD - 1), 4)


def _laion_meta(shard: int, index: int, image: bytes | None, size: tuple[int, int]) -> dict:
  """One sample's img2dataset metadata (LAION-2B-en's columns, then img2dataset's own); None where the download
  failed."""
  key = f"{shard:05d}{index:04d}"
  ok = image is not None
  width, height = size
  return {
    "url": f"https://images.example.com/{shard}/{index}.jpg",
    "caption": caption(shard * 100 + index),
    "similarity": laion_similarity(shard, index) if index < LAION_SAMPLES_PER_SHARD else 0.3,
    "pwatermark": round(0.05 + 0.9 * ((index * 5 + shard) % 8) / 7, 4),
    "punsafe": round(0.01 + 0.08 * ((index + 3 * shard) % 8), 4),
    "key": key,
    "status": "success" if ok else "failed_to_download",
    "error_message": None if ok else "HTTP Error 404: Not Found",
    "width": width if ok else None,
    "height": height if ok else None,
    "original_width": 4 * width if ok else None,
    "original_height": 4 * height if ok else None,
    "exif": "{}" if ok else None,
    "md5": hashlib.md5(image).hexdigest() if ok else None,
  }


def _laion_size(index: int) -> tuple[int, int]:
  """(width, height) of a downloaded sample's image (a quarter of the original's)."""
  return 64 + 16 * (index % 3), 64 + 8 * (index % 4)


def _laion_sample(shard: int, index: int) -> tuple[dict[str, bytes], dict]:
  """(tar members, metadata) of one downloaded sample; sorted members as webdataset's TarWriter writes them."""
  size = _laion_size(index)
  image = jpeg(7000 + 100 * shard + index, *size)
  meta = _laion_meta(shard, index, image, size)
  key = meta["key"]
  if key in LAION_CORRUPT:
    image = image[:200]
  members = {f"{key}.jpg": image, f"{key}.json": json.dumps(meta, indent=4).encode("utf-8")}
  if key not in LAION_UNCAPTIONED:
    members[f"{key}.txt"] = b"" if key in LAION_EMPTY_CAPTION else meta["caption"].encode("utf-8")
  return members, meta


def _write_parquet(path: Path, rows: list[dict]) -> bool:
  """img2dataset's per-shard .parquet of every sample's metadata, failed downloads included; False (nothing
  written) without pyarrow."""
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  pq.write_table(pa.Table.from_pylist(rows), path)
  return True


def write_laion(root: Path) -> dict:
  """img2dataset's `--output_format=webdataset` output of LAION in `root`: per shard `00000.tar` (`<key>.jpg`,
  `.json`, `.txt`), `00000.parquet` (pyarrow permitting) and `00000_stats.json`. Shorter sides 64-88 px, LAION
  scores spread over 0.20-0.45; one sample has no .txt, one an empty .txt, one a truncated JPEG; one download per
  shard failed (only in the parquet and stats). Returns {tars, samples, metas (key -> .json dict), parquet,
  uncaptioned, corrupt}."""
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  metas, tars, parquet = {}, [], True
  for shard in range(LAION_SHARDS):
    members, rows = {}, []
    for index in range(LAION_SAMPLES_PER_SHARD):
      sample, meta = _laion_sample(shard, index)
      members.update(sample)
      rows.append(meta)
      metas[meta["key"]] = meta
    rows.append(_laion_meta(shard, LAION_SAMPLES_PER_SHARD, None, (0, 0)))
    name = f"{shard:05d}"
    _write(root / f"{name}.tar", _tar(members, mode=0o444))
    parquet = _write_parquet(root / f"{name}.parquet", rows) and parquet
    failed = rows[-1]["error_message"]
    _write_json(
      root / f"{name}_stats.json",
      {
        "count": len(rows),
        "successes": len(rows) - 1,
        "failed_to_download": 1,
        "failed_to_resize": 0,
        "duration": 12.5,
        "start_time": 1650000000.0 + shard,
        "end_time": 1650000012.5 + shard,
        "status_dict": {"success": len(rows) - 1, failed: 1},
      },
      indent=4,
    )
    tars.append(str(root / f"{name}.tar"))
  return {
    "tars": tars,
    "samples": len(metas),
    "metas": metas,
    "parquet": parquet,
    "uncaptioned": LAION_UNCAPTIONED + LAION_EMPTY_CAPTION,
    "corrupt": LAION_CORRUPT,
  }


def write_laion_metadata(root: Path) -> dict:
  """LAION-2B-en's metadata with its scores (columns URL, TEXT, WIDTH, HEIGHT, similarity, hash, punsafe,
  pwatermark) of the pairs `write_laion` holds downloaded, as the parquet img2dataset reads (`--url_list`); the
  folder, without the file, where pyarrow is missing. Returns {rows, parquet}."""
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rows = []
  for shard in range(LAION_SHARDS):
    for index in range(LAION_SAMPLES_PER_SHARD + 1):
      meta = _laion_meta(shard, index, None, (0, 0))
      width, height = _laion_size(index)
      digest = int(hashlib.md5(meta["url"].encode()).hexdigest()[:15], 16)
      rows.append(
        {
          "URL": meta["url"],
          "TEXT": meta["caption"],
          "WIDTH": 4 * width,
          "HEIGHT": 4 * height,
          "similarity": meta["similarity"],
          "hash": digest,
          "punsafe": meta["punsafe"],
          "pwatermark": meta["pwatermark"],
        }
      )
  return {"rows": len(rows), "parquet": _write_parquet(root / "part-00000.parquet", rows)}


# ------------------------------------------------------------------------------------------ ImageNet-1K (TFDS)

IMAGENET1K_TRAIN_SYNSETS = ("n01751748", "n02105855", "n09193705")  # three of ImageNet-1K's classes
IMAGENET1K_TRAIN_PER_SYNSET, IMAGENET1K_VAL_IMAGES = 4, 8


def write_imagenet2012_manual(root: Path) -> dict:
  """The two ILSVRC2012 tars TFDS reads as manual downloads, in `root/downloads/manual/` (`root` is the TFDS data
  dir): `ILSVRC2012_img_train.tar` (one tar per synset, as the release) and `ILSVRC2012_img_val.tar` (flat
  `ILSVRC2012_val_00000001.JPEG`, ...: the first validation images by name, whose labels TFDS ships). Returns
  {manual_dir, train_classes, train_images, val_files}."""
  manual = Path(root) / "downloads" / "manual"
  train = {}
  for wnid in IMAGENET1K_TRAIN_SYNSETS:
    base = int(wnid[1:]) % 1000
    train[f"{wnid}.tar"] = _tar(
      {f"{wnid}_{100 + 7 * i}.JPEG": jpeg(base * 10 + i, 48, 40) for i in range(IMAGENET1K_TRAIN_PER_SYNSET)}
    )
  _write(manual / "ILSVRC2012_img_train.tar", _tar(train))
  val = {f"ILSVRC2012_val_{i:08d}.JPEG": jpeg(500 + i, 40 + 2 * i, 40) for i in range(1, IMAGENET1K_VAL_IMAGES + 1)}
  _write(manual / "ILSVRC2012_img_val.tar", _tar(val))
  return {
    "manual_dir": str(manual),
    "train_classes": list(IMAGENET1K_TRAIN_SYNSETS),
    "train_images": len(IMAGENET1K_TRAIN_SYNSETS) * IMAGENET1K_TRAIN_PER_SYNSET,
    "val_files": list(val),
  }


# ------------------------------------------------------------------------------------- COCO 2017 and Karpathy

COCO_TRAIN2014_IDS = (9, 25, 30, 34, 49)
COCO_VAL2014_IDS = (42, 73, 74, 133, 136, 139, 142, 285)
COCO_VAL2017_IDS = (74, 139, 285)  # val2017 is 5k of val2014; train2017 is everything else
KARPATHY_SPLIT = {
  **dict.fromkeys(COCO_TRAIN2014_IDS, "train"),
  42: "restval",
  73: "val",
  74: "val",
  133: "test",
  136: "test",
  139: "test",
  142: "test",
  285: "restval",
}
COCO_UNANNOTATED = (30,)  # train2017 images without any instance (about 1% of COCO's)
COCO_CROWD = (9,)  # images with an iscrowd=1 region (RLE)
COCO_CAPTION_COUNTS = {133: 6, 142: 7}  # some images have more than five captions; the others five
COCO_CATEGORIES = (
  {"supercategory": "person", "id": 1, "name": "person"},
  {"supercategory": "vehicle", "id": 3, "name": "car"},
  {"supercategory": "animal", "id": 17, "name": "cat"},
  {"supercategory": "animal", "id": 18, "name": "dog"},
)
COCO_INFO = {
  "description": "COCO 2017 Dataset",
  "url": "http://cocodataset.org",
  "version": "1.0",
  "year": 2017,
  "contributor": "COCO Consortium",
  "date_created": "2017/09/01",
}
COCO_LICENSES = [
  {
    "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
    "id": 1,
    "name": "Attribution-NonCommercial-ShareAlike License",
  }
]


def coco_size(image_id: int) -> tuple[int, int]:
  """(width, height) of a COCO stand-in image: 48-64 x 40-62 px."""
  return 48 + (image_id * 7) % 17, 40 + (image_id * 5) % 23


def coco_captions(image_id: int) -> list[str]:
  return [caption(image_id * 10 + n) for n in range(COCO_CAPTION_COUNTS.get(image_id, 5))]


def coco_image(image_id: int) -> bytes:
  return jpeg(image_id, *coco_size(image_id))  # the same photo in train2014/val2014 and train2017/val2017


def _coco_image_entry(image_id: int, folder: str) -> dict:
  width, height = coco_size(image_id)
  name = f"{image_id:012d}.jpg"
  return {
    "license": 1,
    "file_name": name,
    "coco_url": f"http://images.cocodataset.org/{folder}/{name}",
    "height": height,
    "width": width,
    "date_captured": "2013-11-14 11:18:45",
    "flickr_url": f"http://farm4.staticflickr.com/4/{image_id}_z.jpg",
    "id": image_id,
  }


def _rle(mask: np.ndarray) -> dict:
  """COCO's uncompressed RLE of a binary mask: run lengths in column-major order, starting with zeros."""
  flat = mask.flatten(order="F").astype(np.int8)
  changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  return {"counts": np.diff(np.concatenate([[0], changes])).tolist(), "size": list(mask.shape)}


def _coco_instances(image_id: int, next_id) -> list[dict]:
  width, height = coco_size(image_id)
  if image_id in COCO_UNANNOTATED:
    return []
  annotations = []
  for j in range(1 + image_id % 3):
    w, h = 10.0 + 3 * j + image_id % 7, 12.0 + 2 * j
    x, y = float(2 + 9 * j), float(3 + 5 * j)
    annotations.append(
      {
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
        "area": w * h,
        "iscrowd": 0,
        "image_id": image_id,
        "bbox": [x, y, w, h],
        "category_id": COCO_CATEGORIES[(image_id + j) % len(COCO_CATEGORIES)]["id"],
        "id": next_id(),
      }
    )
  if image_id in COCO_CROWD:
    mask = np.zeros((height, width), np.uint8)
    mask[20:36, 24:44] = 1
    annotations.append(
      {
        "segmentation": _rle(mask),
        "area": float(mask.sum()),
        "iscrowd": 1,
        "image_id": image_id,
        "bbox": [24.0, 20.0, 20.0, 16.0],
        "category_id": 1,
        "id": next_id(),
      }
    )
  return annotations


def _coco_split_files(root: Path, folder: str, ids: list[int], counter) -> None:
  """<folder>/*.jpg, annotations/instances_<folder>.json and captions_<folder>.json."""
  images = [_coco_image_entry(i, folder) for i in ids]
  for image_id in ids:
    _write(root / folder / f"{image_id:012d}.jpg", coco_image(image_id))
  instances = [a for i in ids for a in _coco_instances(i, counter)]
  _write_json(
    root / "annotations" / f"instances_{folder}.json",
    {
      "info": COCO_INFO,
      "licenses": COCO_LICENSES,
      "images": images,
      "annotations": instances,
      "categories": list(COCO_CATEGORIES),
    },
  )
  captions = [{"image_id": i, "id": counter(), "caption": c} for i in ids for c in coco_captions(i)]
  _write_json(
    root / "annotations" / f"captions_{folder}.json",
    {"info": COCO_INFO, "licenses": COCO_LICENSES, "images": images, "annotations": captions},
  )


def _karpathy_entry(imgid: int, filename: str, sentences: list[str], split: str, sentid: int, **extra) -> dict:
  sentids = list(range(sentid, sentid + len(sentences)))
  return {
    **extra,
    "sentids": sentids,
    "filename": filename,
    "imgid": imgid,
    "split": split,
    "sentences": [{"tokens": _tokens(s), "raw": s, "imgid": imgid, "sentid": n} for n, s in zip(sentids, sentences)],
  }


def write_karpathy_coco(root: Path) -> Path:
  """`root/dataset_coco.json` (Karpathy's caption_datasets.zip): every COCO 2014 image, splits train (train2014),
  restval, val and test (val2014)."""
  images, sentid = [], 0
  for imgid, image_id in enumerate(COCO_TRAIN2014_IDS + COCO_VAL2014_IDS):
    folder = "train2014" if image_id in COCO_TRAIN2014_IDS else "val2014"
    captions = coco_captions(image_id)
    images.append(
      _karpathy_entry(
        imgid,
        f"COCO_{folder}_{image_id:012d}.jpg",
        captions,
        KARPATHY_SPLIT[image_id],
        sentid,
        filepath=folder,
        cocoid=image_id,
      )
    )
    sentid += len(captions)
  path = Path(root) / "dataset_coco.json"
  _write_json(path, {"images": images, "dataset": "coco"})
  return path


def write_coco(root: Path) -> dict:
  """COCO as the runbooks unpack it in `root`: train2017.zip, val2017.zip and annotations_trainval2017.zip
  (instances and captions; the keypoint files, which nothing reads, are left out), val2014.zip and Karpathy's
  dataset_coco.json. train2017 holds Karpathy val/test images (73, 133, 136, 142), which --exclude_karpathy
  leaves out; image 30 has no instance, image 9 a crowd region. Returns {train2017, val2017, val2014,
  karpathy_eval, karpathy_test, categories}."""
  root = Path(root)
  train2017 = sorted(set(COCO_TRAIN2014_IDS + COCO_VAL2014_IDS) - set(COCO_VAL2017_IDS))
  annotation_ids = iter(range(100001, 1000000))
  counter = functools.partial(next, annotation_ids)
  _coco_split_files(root, "train2017", train2017, counter)
  _coco_split_files(root, "val2017", list(COCO_VAL2017_IDS), counter)
  for image_id in COCO_VAL2014_IDS:
    _write(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", coco_image(image_id))
  write_karpathy_coco(root)
  evaluation = sorted(i for i, split in KARPATHY_SPLIT.items() if split in ("val", "test"))
  return {
    "train2017": train2017,
    "val2017": list(COCO_VAL2017_IDS),
    "val2014": list(COCO_VAL2014_IDS),
    "karpathy_eval": evaluation,
    "karpathy_test": [i for i in evaluation if KARPATHY_SPLIT[i] == "test"],
    "categories": [c["name"] for c in COCO_CATEGORIES],
  }


# -------------------------------------------------------------------------------------------------- Flickr30k

FLICKR_IMAGES = (
  ("1000092795", "train"),
  ("10002456", "train"),
  ("1000268201", "train"),
  ("1000344755", "val"),
  ("1000366164", "test"),
  ("1000523639", "test"),
)


def write_flickr30k(root: Path) -> dict:
  """Flickr30k in `root`: flickr30k-images/<id>.jpg, the release's results_20130124.token and Karpathy's
  dataset_flickr30k.json (splits train, val, test; five captions an image). Returns {images, test}."""
  root = Path(root)
  entries, lines = [], []
  for imgid, (stem, split) in enumerate(FLICKR_IMAGES):
    name = f"{stem}.jpg"
    _write(root / "flickr30k-images" / name, jpeg(int(stem) % 100000, 60 - 2 * imgid, 44 + 3 * imgid))
    captions = [caption(5000 + 5 * imgid + n) for n in range(5)]
    entries.append(_karpathy_entry(imgid, name, captions, split, 5 * imgid))
    lines += [f"{name}#{n}\t{c}" for n, c in enumerate(captions)]
  _write_json(root / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"})
  _write(root / "results_20130124.token", ("\n".join(lines) + "\n").encode("utf-8"))
  return {
    "images": [f"{s}.jpg" for s, _ in FLICKR_IMAGES],
    "test": [f"{s}.jpg" for s, split in FLICKR_IMAGES if split == "test"],
  }


# ---------------------------------------------------------------------------------------------- Visual Genome

# (image id, folder, width, height, coco_id): 2 is a Karpathy test image, 5 a val one, 3 a train one.
VG_IMAGES = (
  (1, "VG_100K_2", 128, 96, None),
  (2, "VG_100K_2", 112, 96, 133),
  (3, "VG_100K", 96, 128, 9),
  (4, "VG_100K", 120, 100, None),
  (5, "VG_100K", 100, 120, 73),
)


def _vg_regions(image_id: int, width: int, height: int, next_id) -> list[dict]:
  """A region of at least 64 px, one under 64 px, one past the image's edge (clipped to 64 px or more); image 1
  also has an empty phrase."""
  boxes = ((4, 6, 70, 66), (10, 12, 30, 20), (width - 70, height - 66, 90, 80))
  regions = [
    {
      "region_id": next_id(),
      "width": w,
      "height": h,
      "image_id": image_id,
      "phrase": caption(9000 + 10 * image_id + n).rstrip(".").lower(),
      "y": y,
      "x": x,
    }
    for n, (x, y, w, h) in enumerate(boxes)
  ]
  if image_id == 1:
    regions.append({"region_id": next_id(), "width": 80, "height": 70, "image_id": 1, "phrase": "", "y": 2, "x": 3})
  return regions


def write_visual_genome(root: Path) -> dict:
  """Visual Genome 1.2 in `root`: region_descriptions.json, image_data.json, VG_100K/ and VG_100K_2/ (images
  96-128 px; two of them COCO's Karpathy val/test images by coco_id). Returns {images, regions, coco_ids}."""
  root = Path(root)
  region_ids = iter(range(1382, 10**7))
  described, image_data, regions = [], [], 0
  for image_id, folder, width, height, coco_id in VG_IMAGES:
    _write(root / folder / f"{image_id}.jpg", jpeg(3000 + image_id, width, height))
    image_regions = _vg_regions(image_id, width, height, functools.partial(next, region_ids))
    regions += len(image_regions)
    described.append({"regions": image_regions, "id": image_id})
    image_data.append(
      {
        "width": width,
        "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg",
        "height": height,
        "image_id": image_id,
        "coco_id": coco_id,
        "flickr_id": None if coco_id is None else 2000000 + image_id,
      }
    )
  _write_json(root / "region_descriptions.json", described)
  _write_json(root / "image_data.json", image_data)
  return {
    "images": len(VG_IMAGES),
    "regions": regions,
    "coco_ids": {image_id: coco for image_id, _, _, _, coco in VG_IMAGES if coco is not None},
  }


# ----------------------------------------------------------------------------------------------------- ADE20K

ADE_SPLITS = {"training": ("ADE_train", 8), "validation": ("ADE_val", 2)}


def ade_labels(index: int, width: int, height: int) -> np.ndarray:
  """A label map of 0 ('other') and three of the 150 classes in bands; image 0 also has class 150."""
  labels = np.zeros((height, width), np.uint8)
  classes = (1 + index, 13 + 2 * index, 150 if index == 0 else 100 + index)
  for band, label in enumerate(classes):
    labels[band * height // 4 : (band + 1) * height // 4] = label
  return labels


def write_ade20k(root: Path) -> dict:
  """ADEChallengeData2016.zip unpacked in `root`: images/{training,validation}/ADE_*_%08d.jpg and
  annotations/.../*.png (one channel, 0 = other, 1..150 the classes); objectInfo150.txt and sceneCategories.txt,
  which nothing reads, are left out. Returns {split: [stems]}."""
  root = Path(root)
  stems = {}
  for folder, (prefix, count) in ADE_SPLITS.items():
    stems[folder] = []
    for i in range(count):
      stem = f"{prefix}_{i + 1:08d}"
      width, height = 48 + 8 * i, 40 + 4 * i
      _write(root / "images" / folder / f"{stem}.jpg", jpeg(4000 + 10 * len(stems) + i, width, height))
      _write(root / "annotations" / folder / f"{stem}.png", png(ade_labels(i, width, height)))
      stems[folder].append(stem)
  return stems


# ------------------------------------------------------------------------------------------ uncaptioned images

IMAGE_TREE = (
  "00010.jpg",
  "batch_000/00000.jpg",
  "batch_000/00001.jpg",
  "batch_000/00002.jpg",
  "batch_001/00003.jpg",
  "batch_001/00004.JPEG",
  "batch_001/part_a/00005.jpg",
  "batch_001/part_a/00006.jpg",
  "batch_002/00007.jpeg",
  "batch_002/00008.jpg",
  "batch_002/00009.jpg",
)


def write_image_tree(root: Path) -> dict:
  """A folder tree of uncaptioned JPEGs in `root` (one at its top, the others in subfolders, one nested; a
  non-image file the tools ignore).
  Returns {images}."""
  root = Path(root)
  for i, relative in enumerate(IMAGE_TREE):
    _write(root / relative, jpeg(6000 + i, 40 + 4 * i, 36 + 2 * i))
  _write(root / "batch_000" / "LICENSE.txt", b"stand-in images, no licence terms\n")
  return {"images": list(IMAGE_TREE)}


# ------------------------------------------------------------------------------------------- your own photos

MY_CLASSES = ("beach", "forest", "kitchen", "street")
MY_PHOTOS_PER_CLASS = 8
MY_CAPTIONED = 24


def write_my_photos(root: Path) -> dict:
  """A researcher's photos in class folders, `root/<class>/IMG_<n>.jpg` (MY_CLASSES, 8 photos each, 40 to 60 px;
  one PNG per class), and beside the folder `my_class_names.txt`, the names they give the classes for zero-shot, one
  per line in label order. Returns {classes, images_per_class}."""
  root = Path(root)
  for c, name in enumerate(MY_CLASSES):
    for i in range(MY_PHOTOS_PER_CLASS):
      data = jpeg(7000 + 10 * c + i, 40 + 4 * (i % 6), 40 + 2 * (i % 11))
      suffix = "png" if i == 0 else "jpg"
      if suffix == "png":
        data = png(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
      _write(root / name / f"IMG_{1000 + i}.{suffix}", data)
  _write(root.parent / "my_class_names.txt", "".join(f"a {name}\n" for name in MY_CLASSES).encode("utf-8"))
  return {"classes": list(MY_CLASSES), "images_per_class": MY_PHOTOS_PER_CLASS}


def write_my_captioned(root: Path) -> dict:
  """Images each with a caption file of its name (`root/<n>.jpg` + `<n>.txt`, img2dataset's "files" layout, in
  subfolders of 10), one image without its caption file. Returns {pairs, uncaptioned}."""
  root = Path(root)
  for i in range(MY_CAPTIONED + 1):
    stem = root / f"{i // 10:05d}" / f"{i:09d}"
    _write(stem.with_suffix(".jpg"), jpeg(7100 + i, 48 + 2 * (i % 5), 40 + 3 * (i % 4)))
    if i < MY_CAPTIONED:
      _write(stem.with_suffix(".txt"), (caption(7100 + i) + "\n").encode("utf-8"))
  return {"pairs": MY_CAPTIONED, "uncaptioned": 1}


def write_my_table(root: Path) -> dict:
  """A CSV of path + caption, `root/captions.csv`, its paths relative to its folder (`images/<n>.jpg`); one row
  names an image that is not there. Returns {rows, missing}."""
  root = Path(root)
  rows = ["path,caption"]
  for i in range(MY_CAPTIONED):
    _write(root / "images" / f"{i:04d}.jpg", jpeg(7200 + i, 44 + 3 * (i % 5), 40 + 2 * (i % 3)))
    rows.append(f'images/{i:04d}.jpg,"{caption(7200 + i)}"')
  rows.append('images/missing.jpg,"A photo that was never downloaded."')
  _write(root / "captions.csv", ("\n".join(rows) + "\n").encode("utf-8"))
  return {"rows": MY_CAPTIONED + 1, "missing": 1}


# ------------------------------------------------------------------------------------------------------ models

CLIP_REPO, VIT_REPO = "openai/clip-vit-base-patch32", "google/vit-huge-patch14-224-in21k"
VIT_B16_REPO = "google/vit-base-patch16-224-in21k"
CLIP_FILES = (
  "config.json",
  "merges.txt",
  "model.safetensors",
  "preprocessor_config.json",
  "special_tokens_map.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "vocab.json",
)
VIT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
BPE_MERGES = (
  ("t", "h"),
  ("th", "e</w>"),
  ("o", "f</w>"),
  ("c", "a"),
  ("ca", "t</w>"),
  ("d", "o"),
  ("do", "g</w>"),
  ("i", "n</w>"),
  ("r", "e"),
  ("re", "d</w>"),
)


def _byte_alphabet() -> list[str]:
  """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's and CLIP's mapping: printable
  Latin-1 bytes stand for themselves, the others for the code points from 256 on)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  shifted = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _clip_vocab() -> dict[str, int]:
  """CLIP's vocabulary layout in miniature: the bytes, the bytes ending a word, the merges, then start and end of
  text (the last two ids)."""
  alphabet = _byte_alphabet()
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
  for a, b in BPE_MERGES:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  return vocab


# The miniature CLIP's text context: OpenAI's is 77 tokens. Every text its tower reads costs its length (the runbook's
# zero-shot evaluation embeds 8,000 prompts), and nothing reads the context's size but from config.json.
CLIP_CONTEXT = 16


def _build_clip(path: Path) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.clip import tokenization_clip  # pylint: disable=g-import-not-at-top

  vocab = _clip_vocab()
  tokenizer = tokenization_clip.CLIPTokenizer(vocab=vocab, merges=list(BPE_MERGES), model_max_length=CLIP_CONTEXT)
  tokenizer.save_pretrained(path)
  _write_json(path / "vocab.json", vocab)
  _write(path / "merges.txt", ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in BPE_MERGES)).encode("utf-8"))
  _write_json(
    path / "special_tokens_map.json",
    {
      "bos_token": "<|startoftext|>",
      "eos_token": "<|endoftext|>",
      "pad_token": "<|endoftext|>",
      "unk_token": "<|endoftext|>",
    },
  )
  # Token ids as OpenAI's config.json states them (bos 0, pad 1, eos 2: legacy values; its end of text is the
  # vocabulary's last id).
  text = dict(
    vocab_size=len(vocab),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=CLIP_CONTEXT,
    hidden_act="quick_gelu",
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
  )
  vision = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=32,
    hidden_act="quick_gelu",
  )
  torch.manual_seed(0)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
  transformers.CLIPModel(config).save_pretrained(path)
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
  processor.save_pretrained(path)


def _build_vit(path: Path, patch_size: int = 14) -> None:
  """A miniature ViTModel of `patch_size` px patches at twice that size."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(1)
  size = 2 * patch_size
  config = transformers.ViTConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=size,
    patch_size=patch_size,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    qkv_bias=True,
  )
  transformers.ViTModel(config, add_pooling_layer=True).save_pretrained(path)
  transformers.ViTImageProcessor(
    size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
  ).save_pretrained(path)


@functools.cache
def built_models() -> Path:
  """A temporary folder with both model repositories under their hub names, built once per process (removed at
  exit)."""
  folder = Path(tempfile.mkdtemp(prefix="visionfm_standin_models_"))
  atexit.register(shutil.rmtree, folder, True)
  _build_clip(folder / CLIP_REPO)
  _build_vit(folder / VIT_REPO)
  _build_vit(folder / VIT_B16_REPO, patch_size=16)
  return folder


def _copy_repo(repo: str, root: Path) -> dict:
  root = Path(root)
  shutil.copytree(built_models() / repo, root, dirs_exist_ok=True)
  return {"repo": repo, "files": sorted(os.listdir(root))}


def write_clip_vit_b32(root: Path) -> dict:
  """A tiny transformers CLIPModel repository with the files of `openai/clip-vit-base-patch32` (CLIP_FILES, the
  safetensors weights only): ViT tower with 32 px patches at 64 px, OpenAI's token layout and BPE files, a text
  context of CLIP_CONTEXT tokens."""
  return _copy_repo(CLIP_REPO, root)


def write_vit_huge_in21k(root: Path) -> dict:
  """A tiny transformers ViTModel repository with the files of `google/vit-huge-patch14-224-in21k` (VIT_FILES):
  14 px patches at 28 px, the pooler kept, mean / std 0.5."""
  return _copy_repo(VIT_REPO, root)


def write_vit_base_in21k(root: Path) -> dict:
  """A tiny transformers ViTModel repository with the files of `google/vit-base-patch16-224-in21k` (VIT_FILES):
  16 px patches at 32 px, the pooler kept, mean / std 0.5."""
  return _copy_repo(VIT_B16_REPO, root)


# ---------------------------------------------------------------------------------------------------------- all


# ------------------------------------------------------------------ ImageNet's test-only variants (zero-shot)


def write_imagenet_variants(root: Path) -> dict:
  """ImageNetV2 (matched-frequency), ImageNet-Sketch, ImageNet-R and ImageNet-A as their archives unpack under
  `root`: every class folder of each set (their readers require all of them), one small JPEG in each, named as
  the release names its files. Returns {set folder: images}."""
  from visionfm_jax.data.sources import imagenet_variants  # pylint: disable=g-import-not-at-top

  wnids = imagenet_variants.imagenet_wnids()
  folders = {
    "imagenetv2-matched-frequency-format-val": {f"{i}/{i:04x}a1b2c3.jpeg": i for i in range(len(wnids))},
    "sketch": {f"{w}/sketch_{i}.JPEG": i for i, w in enumerate(wnids)},
    "imagenet-r": {f"{w}/art_{i}.jpg": i for i, w in enumerate(imagenet_variants.class_wnids("imagenet_r"))},
    "imagenet-a": {f"{w}/0.000{i}_a.jpg": i for i, w in enumerate(imagenet_variants.class_wnids("imagenet_a"))},
  }
  images = [jpeg(9000 + k, 24, 20) for k in range(8)]
  for folder, files in folders.items():
    for name, i in files.items():
      _write(Path(root) / folder / name, images[i % len(images)])
  return {folder: len(files) for folder, files in folders.items()}


def write_all(root: Path, models: bool = True) -> dict:
  """Every stand-in where the runbooks place it under `root` (module docstring); without `models`, the hub
  repositories are left out. Returns {name: its writer's summary}."""
  root = Path(root)
  raw, data = root / "raw", root / "data"
  written = {
    "imagenet21k_fall11": write_imagenet21k_fall11(raw / "imagenet21k"),
    "imagenet21k_winter21": write_imagenet21k_winter21(raw / "imagenet21k"),
    "laion": write_laion(raw / "laion"),
    "laion_metadata": write_laion_metadata(raw / "laion2B-en-joined"),
    "visual_genome": write_visual_genome(raw / "vg"),
    "images": write_image_tree(raw / "images"),
    "my_photos": write_my_photos(raw / "my_photos"),
    "my_captioned": write_my_captioned(raw / "my_captioned"),
    "my_table": write_my_table(raw / "my_table"),
    "imagenet2012_manual": write_imagenet2012_manual(data / "tfds"),
    "coco": write_coco(data / "coco"),
    "flickr30k": write_flickr30k(data / "flickr30k"),
    "ade20k": write_ade20k(data / "ADEChallengeData2016"),
    "imagenet_variants": write_imagenet_variants(data / "imagenet_variants"),
  }
  (root / "models").mkdir(parents=True, exist_ok=True)
  if models:
    written["clip"] = write_clip_vit_b32(root / "hub" / CLIP_REPO)
    written["vit"] = write_vit_huge_in21k(root / "hub" / VIT_REPO)
    written["vit_b16"] = write_vit_base_in21k(root / "hub" / VIT_B16_REPO)
  return written
