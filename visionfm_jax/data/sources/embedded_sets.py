"""The source kinds of the embedded procedural sets (data/embedded/, a layer below this one, so their records live
here): split sizes config.data.shapes_train_size (the 'train' split) and shapes_eval_size (any other), images of
config.data.image_size.

  shapes                the embedded labelled, captioned set (`shapes.ShapesSource`, seed shapes.SEED)
  shapes:images         the same drawing, other images (seed shapes.IMAGES_SEED), records with only an 'image': the
                        embedded uncaptioned, unlabelled set (image-only data in a mixture)
  shapes:mixed_aspect   the 'shapes' records, each widened or heightened to an aspect of its own (shapes.ASPECTS;
                        NaFlex demos)
  scenes                the multi-object set for segmentation and detection (`scenes.ScenesSource`); its class
                        names are the shapes', its masks add background as 0
"""

from __future__ import annotations

from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.embedded.scenes import ScenesSource
from visionfm_jax.data.embedded.shapes import SHAPE_NAMES, ShapesSource
from visionfm_jax.data.sources.kind import Request, SourceKind
from visionfm_jax.errors import DataError

SHAPES_NAMES = ("", "images", "mixed_aspect")  # what may follow 'shapes:'


def _size(request: Request) -> int:
  data_cfg = request.data_cfg
  return data_cfg.shapes_train_size if request.split == "train" else data_cfg.shapes_eval_size


def _open_shapes(request: Request) -> ShapesSource:
  data_cfg = request.data_cfg
  if request.name == "images":
    return ShapesSource(request.split, _size(request), data_cfg.image_size, seed=shapes.IMAGES_SEED, annotated=False)
  return ShapesSource(
    request.split,
    _size(request),
    data_cfg.image_size,
    seed=shapes.SEED,
    caption_style=data_cfg.shapes_captions,
    mixed_aspect=request.name == "mixed_aspect",
  )


def _shapes_class_names(name: str, data_cfg, what: str) -> list[str]:
  if name == "images":
    raise DataError(f"{what}: uncaptioned, unlabelled images have no class names")
  return list(SHAPE_NAMES)


def _open_scenes(request: Request) -> ScenesSource:
  data_cfg = request.data_cfg
  return ScenesSource(
    request.split, _size(request), data_cfg.image_size, seed=shapes.SEED, max_objects=data_cfg.scenes_max_objects
  )


SHAPES = SourceKind(
  "shapes",
  "'shapes', 'shapes:images', 'shapes:mixed_aspect'",
  _open_shapes,
  _shapes_class_names,
  parse=lambda rest: (rest, "") if rest in SHAPES_NAMES else None,
)
SCENES = SourceKind(
  "scenes",
  "'scenes'",
  _open_scenes,
  lambda name, data_cfg, what: list(SHAPE_NAMES),
  parse=lambda rest: ("", "") if not rest else None,
)
