"""ADE20K semantic segmentation (`config.data.source='ade20k:<root>'`): the ADEChallengeData2016 folder layout.

  <root>/images/{training,validation}/*.jpg
  <root>/annotations/{training,validation}/*.png   single-channel labels, same stem as the image

Splits 'train' and 'validation' map to the folders 'training' and 'validation'. Labels follow mmseg's
reduce_zero_label: 0 ('other') becomes IGNORE (255), 1..150 become class ids 0..149, anything above 150
IGNORE. The 150 class names (`class_names`, from data/sources/assets/ade20k_classes.txt) are the first names of
objectInfo150.csv, in label order.

Records: {'image': the encoded image bytes (decoded by the pipeline, which counts undecodable ones), 'mask':
uint8 (H, W) class ids, 'image_id': the index, 'key': the file stem}. An image or annotation file that cannot
be read is counted (`transforms.count_failure`) and served with image=None, which the pipelines skip.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
from pathlib import Path

import numpy as np
from PIL import Image

from visionfm_jax.data import limits
from visionfm_jax.data.sources.kind import PREPARE_HINT, Request, SourceKind
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.data.transforms.dense_transforms import IGNORE
from visionfm_jax.errors import DataError

NUM_CLASSES = 150
SPLIT_FOLDERS = {"train": "training", "validation": "validation", "training": "training"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@functools.lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
  asset = importlib.resources.files("visionfm_jax.data.sources").joinpath("assets", "ade20k_classes.txt")
  text = asset.read_text("utf-8")
  names = tuple(line.strip() for line in text.splitlines() if line.strip())
  assert len(names) == NUM_CLASSES, len(names)
  return names


def _label_table() -> np.ndarray:
  table = np.full(256, IGNORE, np.uint8)
  table[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)
  return table


_LABELS = _label_table()


def decode_annotation(data: bytes) -> np.ndarray:
  """ADE label PNG bytes -> uint8 (H, W) class ids (see the module docstring); ValueError if not single-channel."""
  with Image.open(io.BytesIO(data)) as image:
    limits.check_pixels(*image.size)
    labels = np.asarray(image)
  if labels.ndim != 2 or labels.dtype.kind not in "ui":
    raise ValueError(f"expected a single-channel integer label image, got {labels.dtype} {labels.shape}")
  return _LABELS[np.minimum(labels, 255)]


class ADE20KSource:
  """grain RandomAccessDataSource over one split of an ADEChallengeData2016 folder, images in name order."""

  def __init__(self, root: str, split: str):
    if split not in SPLIT_FOLDERS:
      raise DataError(f"ADE20K: unknown split {split!r}; expected one of {tuple(SPLIT_FOLDERS)}")
    self.root, self.split = str(Path(root).expanduser()), split
    folder = SPLIT_FOLDERS[split]
    self.image_dir = Path(self.root) / "images" / folder
    self.annotation_dir = Path(self.root) / "annotations" / folder
    for directory in (self.image_dir, self.annotation_dir):
      if not directory.is_dir():
        raise DataError(f"ADE20K: no folder {directory} (expected the ADEChallengeData2016 layout)")
    self.files = sorted(p.name for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not self.files:
      raise DataError(f"ADE20K: no images ({'/'.join(IMAGE_SUFFIXES)}) in {self.image_dir}")
    annotations = {p.name for p in self.annotation_dir.iterdir()}
    missing = [f for f in self.files if Path(f).stem + ".png" not in annotations]
    if missing:
      raise DataError(
        f"ADE20K: {len(missing)} images in {self.image_dir} have no <stem>.png in "
        f"{self.annotation_dir}, e.g. {missing[:3]}"
      )

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index) -> dict:
    index = int(index)
    name = self.files[index]
    stem = Path(name).stem
    record = {"image": None, "mask": None, "image_id": index, "key": stem}
    try:
      image = (self.image_dir / name).read_bytes()
      mask = decode_annotation((self.annotation_dir / f"{stem}.png").read_bytes())
    except transforms.DECODE_ERRORS as e:
      transforms.count_failure(f"ADE20K image/annotation {self.image_dir / name}", e)
      return record
    return {**record, "image": image, "mask": mask}

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring an iterator state.
    return f"ADE20KSource({self.root!r}, split={self.split!r}, images={len(self)})"


def _open(request: Request) -> ADE20KSource:
  with request.errors_named(PREPARE_HINT):
    return ADE20KSource(request.name, request.split)


SOURCE_KIND = SourceKind(
  "ade20k", "'ade20k:<root>'", _open, lambda name, data_cfg, what: list(class_names()), folder=True
)
