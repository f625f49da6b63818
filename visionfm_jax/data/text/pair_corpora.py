"""Image-text pairs from captioned data sets in their released layouts, listed for `datatools.prepare_data`.

  coco_pairs(root, folder)   <root>/annotations/captions_<folder>.json (`caption_sets.read_coco_captions`),
                             images <root>/<folder>/<file_name>; e.g. train2017: 118,287 images, 591,753 captions
  visual_genome_pairs(root)  <root>/region_descriptions.json [{id, regions: [{region_id, image_id, phrase, x, y,
                             width, height}]}] and <root>/image_data.json [{image_id (or id), url, width, height,
                             coco_id, flickr_id}], images <root>/VG_100K/<image_id>.jpg or VG_100K_2/...;
                             108,077 images, 5.4M region descriptions

Every caption becomes its own pair (`PairItem`): COCO's five per image are five records, all seen each epoch,
rather than one record per image with a caption drawn per epoch, which the record format and the pipelines
(one caption per record) do not have, and which would show the model a fifth of the captions per epoch. Two
captions of one image in a batch are false negatives for the contrastive loss; with 591k COCO pairs a batch of
2048 holds ~0.014 siblings per example (fewer in a mixture), which is negligible.

A Visual Genome phrase describes one region ('white clouds in blue sky'), not the image: paired with the whole
image it would be a weak, often wrong, caption of it (50 phrases per image, most about small parts), so by
default the pair is the phrase with its region's crop (`regions='crop'`, the region-text pairs of RegionCLIP /
Florence-style pretraining). Regions whose shorter side is under `min_region_size` pixels (of the released
image) are left out and counted: a 20 px crop upsampled to 448 px teaches nothing. `regions='image'` pairs each
phrase with the whole image instead.

Both can leave out the images of an evaluation benchmark (`karpathy_eval_ids`): COCO train2017 holds most of
Karpathy's 5k test images (they come from val2014), and ~51k Visual Genome images are COCO images (`coco_id`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

from visionfm_jax.data.text import caption_sets
from visionfm_jax.errors import DataError

VG_IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")
VG_REGION_MODES = ("crop", "image")
DEFAULT_MIN_REGION_SIZE = 64
KARPATHY_EVAL_SPLITS = ("val", "test")


class PairItem(NamedTuple):
  """One pair to write: the image file (path under the data set's root), its caption, the record's key, and
  the region (x, y, width, height, in the image's pixels) to crop, or None for the whole image."""

  path: str
  caption: str
  key: str
  box: tuple | None = None


def _load_json(path: Path):
  if not path.is_file():
    raise DataError(f"no file {path}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read {path} as JSON: {type(e).__name__}: {e}") from e


def karpathy_eval_ids(path: str | os.PathLike) -> set[int]:
  """The COCO ids (`cocoid`) of the images in Karpathy's val and test splits (dataset_coco.json)."""
  path = Path(path).expanduser()
  try:
    return {int(entry["cocoid"]) for entry in _load_json(path)["images"] if entry["split"] in KARPATHY_EVAL_SPLITS}
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(
      f"{path}: not Karpathy's dataset_coco.json (images[].cocoid, split): {type(e).__name__}: {e}"
    ) from e


def coco_pairs(
  root: str | os.PathLike, folder: str = "train2017", exclude_ids: frozenset | set = frozenset()
) -> tuple[list[PairItem], dict]:
  """(pairs, counts): every caption of every image of `folder` whose id is not in `exclude_ids`, images in
  increasing id, captions in file order; key '<file_name>#<n>' (n-th caption of the image). counts:
  {'images', 'excluded_images', 'missing_images'} (a listed file name that `folder` lacks is left out). A
  file_name with folders ('../x.jpg', an absolute path, 'sub/x.jpg') is listed as it reads, for the reader
  to confine to the folder the user named: one that leads outside it is skipped there as limits.OUTSIDE_ROOT, as
  a table's path is, not taken for a missing file."""
  root = Path(root).expanduser()
  entries = caption_sets.read_coco_captions(root / "annotations" / f"captions_{folder}.json")
  if not (root / folder).is_dir():
    raise DataError(f"no image folder {root / folder}")
  present = set(os.listdir(root / folder))
  pairs, counts = [], {"images": 0, "excluded_images": 0, "missing_images": 0}
  for image_id, name, captions in entries:
    if image_id in exclude_ids:
      counts["excluded_images"] += 1
    elif name not in present and not _has_folders(name):
      counts["missing_images"] += 1
    else:
      counts["images"] += 1
      pairs += [PairItem(os.path.join(folder, name), c, f"{name}#{n}") for n, c in enumerate(captions) if c]
  _warn_missing(counts, root / folder)
  return pairs, counts


def _has_folders(name: str) -> bool:
  """Whether the file name an annotation gives names folders too (or is one: '..'), not a file of the folder."""
  return os.sep in name or name in (".", "..") or (os.altsep is not None and os.altsep in name)


def _warn_missing(counts: dict, where) -> None:
  if counts["missing_images"]:
    logging.warning("pair_corpora: %d listed images are not in %s; left out", counts["missing_images"], where)


def _vg_image_id(entry: dict) -> int:
  return int(entry["image_id"] if "image_id" in entry else entry["id"])


def _vg_image_files(root: Path) -> dict[int, str]:
  """{image id: path under root} of the .jpg files in the VG image folders present."""
  folders = [f for f in VG_IMAGE_FOLDERS if (root / f).is_dir()]
  if not folders:
    raise DataError(f"no image folder {root / VG_IMAGE_FOLDERS[0]} (or {VG_IMAGE_FOLDERS[1]})")
  files = {}
  for folder in folders:
    for name in os.listdir(root / folder):
      stem, extension = os.path.splitext(name)
      if extension.lower() == ".jpg" and stem.isdigit():
        files[int(stem)] = f"{folder}/{name}"
  return files


def _clipped_box(region: dict, width: int, height: int) -> tuple[int, int, int, int]:
  x0, y0 = max(0, int(region["x"])), max(0, int(region["y"]))
  x1 = min(width, int(region["x"]) + int(region["width"]))
  y1 = min(height, int(region["y"]) + int(region["height"]))
  return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def visual_genome_pairs(
  root: str | os.PathLike,
  regions: str = "crop",
  min_region_size: int = DEFAULT_MIN_REGION_SIZE,
  exclude_coco_ids: frozenset | set = frozenset(),
) -> tuple[list[PairItem], dict]:
  """(pairs, counts): the region descriptions of Visual Genome (module docstring), images in the order of
  region_descriptions.json, regions in file order; key '<image_id>#<region_id>'. With `regions='crop'` the box
  is clipped to the image (image_data.json's size) and regions under `min_region_size` left out. counts:
  {'images', 'excluded_images' (their coco_id in `exclude_coco_ids`), 'missing_images', 'small_regions',
  'empty_phrases'}."""
  if regions not in VG_REGION_MODES:
    raise DataError(f"visual genome regions={regions!r}: expected one of {VG_REGION_MODES}")
  root = Path(root).expanduser()
  region_path, image_path = root / "region_descriptions.json", root / "image_data.json"
  described, image_data = _load_json(region_path), _load_json(image_path)
  files = _vg_image_files(root)
  counts = dict.fromkeys(("images", "excluded_images", "missing_images", "small_regions", "empty_phrases"), 0)
  pairs = []
  try:
    info = {_vg_image_id(entry): entry for entry in image_data}
    for entry in described:
      image_regions = entry["regions"]
      image_id = int(image_regions[0]["image_id"]) if image_regions else _vg_image_id(entry)
      meta = info[image_id]
      if meta.get("coco_id") is not None and int(meta["coco_id"]) in exclude_coco_ids:
        counts["excluded_images"] += 1
        continue
      if image_id not in files:
        counts["missing_images"] += 1
        continue
      counts["images"] += 1
      for region in image_regions:
        phrase = str(region["phrase"]).strip()
        if not phrase:
          counts["empty_phrases"] += 1
          continue
        box = None
        if regions == "crop":
          box = _clipped_box(region, int(meta["width"]), int(meta["height"]))
          if min(box[2:]) < max(1, min_region_size):
            counts["small_regions"] += 1
            continue
        pairs.append(PairItem(files[image_id], phrase, f"{image_id}#{region['region_id']}", box))
  except KeyError as e:
    raise DataError(
      f"{region_path} / {image_path}: an entry lacks a field of the released layout (regions[]."
      f"image_id, region_id, phrase, x, y, width, height; image_id or id, width, height) or names an "
      f"image {image_path.name} does not list ({e})"
    ) from e
  except (ValueError, TypeError) as e:
    raise DataError(f"{region_path}: malformed region descriptions: {type(e).__name__}: {e}") from e
  _warn_missing(counts, root)
  return pairs, counts


def crop_box(pixels, box: tuple):
  """The (x, y, width, height) region of an HWC array, clipped to it (the released sizes match the files; a
  box beyond a file's edge is clipped again here)."""
  x, y, width, height = box
  return pixels[y : y + height, x : x + width]
