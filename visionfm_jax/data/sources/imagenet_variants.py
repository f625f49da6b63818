r"""ImageNet's test-only variants, read from their released folders (`config.data.source` kinds, e.g. as zero-shot
benchmarks: config.eval.zeroshot_benchmarks):

  | spec                    | release (as it unpacks)                                | classes | images |
  |-------------------------|--------------------------------------------------------|---------|--------|
  | imagenet_a:<root>       | imagenet-a.tar: <root>/<wnid>/*.jpg                    | 200     | 7,500  |
  | imagenet_r:<root>       | imagenet-r.tar: <root>/<wnid>/*.jpg                    | 200     | 30,000 |
  | imagenet_sketch:<root>  | ImageNet-Sketch.zip: sketch/<wnid>/*.JPEG              | 1000    | 50,889 |
  | imagenetv2:<root>       | imagenetv2-matched-frequency.tar.gz:                   | 1000    | 10,000 |
  |                         | imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg|         |        |

<root> is the folder holding the class folders (e.g. /data/imagenet-r). A set's classes are ImageNet-1k classes
in ImageNet's class-index order (WordNet ids sorted, data/sources/assets/imagenet_wnids.txt); a record's label is the
index within the set's own class list (0..199 for ImageNet-A and -R, whose 200 classes are
data/sources/assets/imagenet_{a,r}_wnids.txt), and `class_wnids` names them, so a reader of the labels maps them back to
ImageNet classes by WordNet id. ImageNetV2 names its folders by ImageNet class index instead of WordNet id.

Images of a class are read in file-name order, classes in label order. Files ending in .jpg, .jpeg or .png (any
case) are images; other files are left out. Nothing is downloaded: a missing root or class folder, a class
folder without images, or a folder that is not one of the set's classes is a DataError naming it, raised when
the set is opened (at start-up). An image that cannot be read later is counted (`transforms.count_failure`) and
served with image=None, which the pipelines skip. Records: {'image': encoded bytes, 'label': int32}.
`SOURCE_KINDS` are their `config.data.source` kinds, one per set.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from pathlib import Path

import numpy as np

from visionfm_jax.data.sources.kind import Request, SourceKind, errors_named
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# kind -> (the asset listing its classes' WordNet ids, whether its folders are named by class index)
KINDS = {
  "imagenet_a": ("imagenet_a_wnids.txt", False),
  "imagenet_r": ("imagenet_r_wnids.txt", False),
  "imagenet_sketch": ("imagenet_wnids.txt", False),
  "imagenetv2": ("imagenet_wnids.txt", True),
}
VARIANTS_HINT = "see docs/data_preparation.md, 'Zero-shot benchmarks: ImageNet variants'"


@functools.lru_cache(maxsize=None)
def _read_wnids(asset: str) -> tuple[str, ...]:
  text = importlib.resources.files("visionfm_jax.data.sources").joinpath("assets", asset).read_text(encoding="utf-8")
  return tuple(line.strip() for line in text.splitlines() if line.strip())


def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 WordNet ids of ImageNet-1k in class-index order (n01440764 ... n15075141)."""
  return _read_wnids("imagenet_wnids.txt")


def class_wnids(kind: str) -> tuple[str, ...]:
  """The WordNet ids of the set's classes, index = label, in ImageNet class-index order."""
  return _read_wnids(KINDS[kind][0])


def _folder_names(kind: str) -> list[str]:
  """The class folders' names in label order: WordNet ids, or ImageNet class indices (ImageNetV2)."""
  wnids = class_wnids(kind)
  if KINDS[kind][1]:
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    return [str(index[w]) for w in wnids]
  return list(wnids)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFolderSource:
  """Random access to a variant's images: record i is {'image': bytes, 'label': labels[i]}."""

  kind: str
  root: Path
  paths: tuple[Path, ...]
  labels: np.ndarray  # int32 (N,), non-decreasing

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index) -> dict:
    index = int(index)
    record = {"image": None, "label": np.int32(self.labels[index])}
    try:
      record["image"] = self.paths[index].read_bytes()
    except OSError as e:
      transforms.count_failure(f"image {self.paths[index]}", e)
    return record

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.kind}:{self.root}, images={len(self)}, classes={len(class_wnids(self.kind))})"


def _images(folder: Path) -> list[Path]:
  return sorted(
    (Path(e.path) for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)),
    key=lambda p: p.name,
  )


def _shown(names: list[str]) -> str:
  return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def open_variant(kind: str, root: str) -> ImageFolderSource:
  """The set `kind` (a KINDS key) unpacked at `root`, its folders listed and checked (module docstring)."""
  root_path = Path(root).expanduser()
  if not root_path.is_dir():
    raise DataError(f"no folder {root_path}")
  expected = _folder_names(kind)
  present = {e.name for e in os.scandir(root_path) if e.is_dir() and not e.name.startswith(".")}
  missing = [name for name in expected if name not in present]
  if missing:
    raise DataError(
      f"{root_path} lacks {len(missing)} of the {len(expected)} class folders of {kind}: {_shown(missing)}"
    )
  unknown = sorted(present - set(expected))
  if unknown:
    raise DataError(f"{root_path} holds {len(unknown)} folders that are not classes of {kind}: {_shown(unknown)}")
  paths, counts = [], []
  for name in expected:
    images = _images(root_path / name)
    if not images:
      raise DataError(f"class folder {root_path / name} has no images ({', '.join(IMAGE_SUFFIXES)})")
    paths.extend(images)
    counts.append(len(images))
  labels = np.repeat(np.arange(len(expected), dtype=np.int32), counts)
  return ImageFolderSource(kind=kind, root=root_path, paths=tuple(paths), labels=labels)


def _source_kind(kind: str) -> SourceKind:
  """The `config.data.source` kind of the set `kind` (a KINDS key)."""

  def open_set(request: Request) -> ImageFolderSource:
    with errors_named(request.what, VARIANTS_HINT):  # every split is the whole set: none is named
      return open_variant(kind, request.name)

  usage = f"one of {', '.join(k + ':<root>' for k in KINDS)}"  # the sets are listed together
  return SourceKind(kind, usage, open_set, lambda name, data_cfg, what: list(class_wnids(kind)), folder=True)


SOURCE_KINDS = tuple(_source_kind(kind) for kind in KINDS)
