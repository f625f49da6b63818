"""COCO object detection (`config.data.source='coco:<root>'`): the 2017 release as unpacked.

  <root>/train2017/*.jpg, <root>/val2017/*.jpg
  <root>/annotations/instances_train2017.json, instances_val2017.json

Splits 'train' and 'validation' map to train2017 and val2017. Categories become contiguous class ids
0..C-1 in increasing category-id order (`CocoIndex.category_ids[c]` is the COCO id of class c). Training
targets are the non-crowd boxes, xywh -> xyxy, clipped to the image, those with no area left dropped;
crowd annotations stay in the index for the evaluator's ground truth (`ground_truth`).

Records: {'image': encoded bytes, 'boxes': float32 (K, 4) xyxy in original pixels, 'classes': int32 (K,),
'image_id': the COCO image id}, images in increasing id order. With `skip_empty` (the training loader asks
for it, as mmdet's filter_empty_gt) images without a non-crowd box are left out; evaluation keeps them. An
image file that cannot be read is counted and served with image=None, which the pipelines skip.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np

from visionfm_jax.data import limits
from visionfm_jax.data.sources.kind import PREPARE_HINT, Request, SourceKind, errors_named
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import DataError

SPLIT_FOLDERS = {"train": "train2017", "validation": "val2017", "train2017": "train2017", "val2017": "val2017"}


def annotation_file(root: str, split: str) -> Path:
  if split not in SPLIT_FOLDERS:
    raise DataError(f"COCO: unknown split {split!r}; expected one of {tuple(SPLIT_FOLDERS)}")
  return Path(root).expanduser() / "annotations" / f"instances_{SPLIT_FOLDERS[split]}.json"


@dataclasses.dataclass(frozen=True)
class CocoIndex:
  """One annotation file in arrays. Images sorted by id; annotations grouped by image (`offsets`, in file
  order within an image), every field of the evaluator's ground truth kept."""

  category_ids: tuple[int, ...]  # COCO id of each contiguous class
  class_names: tuple[str, ...]
  image_ids: np.ndarray  # int64 (N,)
  file_names: tuple[str, ...]
  sizes: np.ndarray  # int32 (N, 2): (height, width) from the JSON
  offsets: np.ndarray  # int64 (N + 1,): the annotations of image i are rows offsets[i]:offsets[i + 1]
  bbox: np.ndarray  # float64 (A, 4): xywh as in the file
  classes: np.ndarray  # int32 (A,): contiguous class
  area: np.ndarray  # float64 (A,)
  iscrowd: np.ndarray  # bool (A,)
  ann_ids: np.ndarray  # int64 (A,)

  def train_targets(self, row: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes float32 (K, 4) xyxy clipped to the image, classes int32 (K,)) of image `row`, non-crowd only."""
    a, b = self.offsets[row], self.offsets[row + 1]
    keep = ~self.iscrowd[a:b]
    xywh, classes = self.bbox[a:b][keep], self.classes[a:b][keep]
    height, width = self.sizes[row]
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes = np.clip(boxes, 0, [width, height, width, height])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep].astype(np.float32), classes[keep].astype(np.int32)


def _parse(path: Path) -> CocoIndex:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    images = sorted(data["images"], key=lambda im: im["id"])
    annotations = data["annotations"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"COCO: cannot read {path} as an instances annotation file: {type(e).__name__}: {e}") from e
  del data
  category_ids = tuple(int(c["id"]) for c in categories)
  class_of = {cid: i for i, cid in enumerate(category_ids)}
  row_of = {int(im["id"]): i for i, im in enumerate(images)}
  try:
    rows = np.array([row_of[int(a["image_id"])] for a in annotations], np.int64)
    classes = np.array([class_of[int(a["category_id"])] for a in annotations], np.int32)
    bbox = np.array([a["bbox"] for a in annotations], np.float64).reshape(-1, 4)
    area = np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in annotations], np.float64)
    iscrowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], bool)
    ann_ids = np.array([a["id"] for a in annotations], np.int64)
    sizes = np.array([(im["height"], im["width"]) for im in images], np.int32).reshape(-1, 2)
  except KeyError as e:
    raise DataError(
      f"COCO: {path}: an annotation or image lacks a field or names an unknown image/category id ({e})"
    ) from e
  except (ValueError, TypeError) as e:
    raise DataError(f"COCO: {path}: malformed annotation: {e}") from e
  order = np.argsort(rows, kind="stable")
  offsets = np.searchsorted(rows[order], np.arange(len(images) + 1))
  return CocoIndex(
    category_ids=category_ids,
    class_names=tuple(str(c["name"]) for c in categories),
    image_ids=np.array([im["id"] for im in images], np.int64),
    file_names=tuple(str(im["file_name"]) for im in images),
    sizes=sizes,
    offsets=offsets,
    bbox=bbox[order],
    classes=classes[order],
    area=area[order],
    iscrowd=iscrowd[order],
    ann_ids=ann_ids[order],
  )


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime_ns: int, size: int) -> CocoIndex:
  del mtime_ns, size  # cache keys: a rewritten file is read again
  return _parse(Path(path))


def load_index(root: str, split: str) -> CocoIndex:
  """The parsed annotation file of `split` (cached while the file is unchanged)."""
  path = annotation_file(root, split)
  if not path.is_file():
    raise DataError(f"COCO: no annotation file {path}")
  stat = os.stat(path)
  return _cached(str(path), stat.st_mtime_ns, stat.st_size)


class CocoSource:
  """grain RandomAccessDataSource over the images of one COCO split (see the module docstring)."""

  def __init__(self, root: str, split: str, skip_empty: bool = False):
    self.root, self.split, self.skip_empty = str(Path(root).expanduser()), split, bool(skip_empty)
    self.index = load_index(self.root, split)
    self.image_dir = Path(self.root) / SPLIT_FOLDERS[split]
    if not self.image_dir.is_dir():
      raise DataError(f"COCO: no image folder {self.image_dir}")
    self._real_image_dir, self._resolved_folders = os.path.realpath(self.image_dir), {}
    counts = np.diff(self.index.offsets)
    if skip_empty:  # images with at least one non-crowd annotation (clipping may still empty a few)
      image_of = np.repeat(np.arange(len(counts)), counts)
      self.rows = np.flatnonzero(np.bincount(image_of[~self.index.iscrowd], minlength=len(counts)))
    else:
      self.rows = np.arange(len(counts))
    if not len(self.rows):
      raise DataError(f"COCO: {annotation_file(self.root, split)} lists no {'annotated ' * skip_empty}images")

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index) -> dict:
    row = int(self.rows[int(index)])
    boxes, classes = self.index.train_targets(row)
    record = {"image": None, "boxes": boxes, "classes": classes, "image_id": int(self.index.image_ids[row])}
    path = self.image_dir / self.index.file_names[row]
    if limits.resolve_inside(str(path), self._real_image_dir, self._resolved_folders) is None:
      transforms.count_failure(
        f"COCO image {path}",
        DataError(f"{limits.OUTSIDE_ROOT}: the annotation file names a path outside {self.image_dir}"),
      )
      return record
    try:
      record["image"] = path.read_bytes()
    except OSError as e:
      transforms.count_failure(f"COCO image {path}", e)
    return record

  def ground_truth(self, count: int) -> dict:
    """The COCO-format ground truth of records [0, count): original pixels, crowd annotations kept
    (iscrowd=1), areas from the file, category ids the contiguous classes 0..C-1."""
    index, rows = self.index, self.rows[:count]
    images, annotations = [], []
    for row in rows.tolist():
      height, width = index.sizes[row].tolist()
      images.append(
        {"id": int(index.image_ids[row]), "height": height, "width": width, "file_name": index.file_names[row]}
      )
      for a in range(index.offsets[row], index.offsets[row + 1]):
        annotations.append(
          {
            "id": int(index.ann_ids[a]),
            "image_id": int(index.image_ids[row]),
            "category_id": int(index.classes[a]),
            "bbox": index.bbox[a].tolist(),
            "area": float(index.area[a]),
            "iscrowd": int(index.iscrowd[a]),
          }
        )
    categories = [
      {"id": c, "name": name, "coco_id": cid}
      for c, (cid, name) in enumerate(zip(index.category_ids, index.class_names))
    ]
    return {"images": images, "annotations": annotations, "categories": categories}

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring an iterator state.
    return f"CocoSource({self.root!r}, split={self.split!r}, skip_empty={self.skip_empty}, images={len(self)})"


def _open(request: Request) -> CocoSource:
  with request.errors_named(PREPARE_HINT):
    return CocoSource(request.name, request.split, skip_empty=request.training)


def _train_class_names(root: str, data_cfg, what: str) -> list[str]:
  """Contiguous classes in category-id order, of config.data.train_split's annotation file."""
  with errors_named(f"{what} split {data_cfg.train_split!r}", PREPARE_HINT):
    return list(load_index(root, data_cfg.train_split).class_names)


SOURCE_KIND = SourceKind("coco", "'coco:<root>'", _open, _train_class_names, folder=True)
