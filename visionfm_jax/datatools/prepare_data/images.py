"""The image bytes a shard stores: an image file read within data/limits.py's bounds, then kept as stored, verified
or shrunk to a shorter side, as `ImageOptions` say; and the shorter side it had (`header_side` when it is not
decoded), so that a shard can count the images smaller than a recipe reads them."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import stat
import warnings

import numpy as np
from PIL import Image

from visionfm_jax.data import limits
from visionfm_jax.data.sources import records
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import DataError

RESIZE_REDUCING_GAP = 3.0  # box-reduce first, then Lanczos: per Pillow, near-identical to plain Lanczos, faster


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  resize_shorter: int = 0  # 0: keep the size
  verify: bool = False  # decode and drop undecodable images (always, when resizing: see `image_options`)


def image_options(resize_shorter: int, verify: bool) -> ImageOptions:
  return ImageOptions(resize_shorter, verify or resize_shorter > 0)


def shrink_to_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """`image` with its shorter side scaled down to `size`; as it is when that side is `size` or less."""
  width, height = image.size
  scale = size / min(width, height)
  if scale >= 1:
    return image
  new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
  return image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=RESIZE_REDUCING_GAP)


def header_side(data: bytes) -> int:
  """The shorter side of the image `data`, from its header alone (no pixel decoded); 0 when it has none."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        return min(image.size)
  except transforms.DECODE_ERRORS:
    return 0


def prepare_image(data: bytes, options: ImageOptions, name: str) -> tuple[bytes | None, str, int]:
  """(the bytes to store for one image, '', its shorter side as given (0: not decoded)), or (None, the
  data/limits.py reason, 0) with a warning naming `name` when it must be dropped."""
  if not options.verify:
    return data, "", 0
  try:
    pixels = transforms.decode_image(data)
  except transforms.DECODE_ERRORS as e:
    logging.warning("prepare_data: skipping %s: undecodable image: %s", name, e)
    return None, transforms.failure_reason(e), 0
  side = min(pixels.shape[:2])
  if options.resize_shorter and side > options.resize_shorter:
    resized = shrink_to_shorter_side(Image.fromarray(pixels), options.resize_shorter)
    return records.encode_jpeg(np.asarray(resized)), "", side
  return data, "", side  # small enough: the original bytes (and EXIF orientation), no second lossy encoding


def read_image_file(path: str, root: str, follow_links: bool = False) -> tuple[bytes | None, str]:
  """(the bytes of the image file `path`, ''), or (None, the data/limits.py reason) for a path that leads outside the
  resolved folder `root` (limits.OUTSIDE_ROOT: the input tree, or the folder a table's or annotation file's paths
  may name), a symbolic link (limits.LINK; with `follow_links` (--follow_links), only one that leads outside
  `root`), a device, a FIFO or a file over limits.MAX_IMAGE_BYTES; DataError when it cannot be read (missing, or a
  path no file system takes). The file is opened by `limits.open_inside`, so its folders are the ones checked: a
  folder swapped for a link to a private one while a conversion runs reads no byte of it."""
  try:
    opened = limits.open_inside(path, root, follow_links)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
  if opened == limits.OUTSIDE_ROOT:
    logging.warning("prepare_data: skipping %s: outside %s, the folder its paths may name", path, root)
  elif opened == limits.LINK:
    logging.warning(
      "prepare_data: skipping %s: a symbolic link%s",
      path,
      f" out of {root}" if follow_links else " (--follow_links follows those inside --input)",
    )
  elif opened == limits.NOT_A_FILE:
    logging.warning("prepare_data: skipping %s: not a regular file", path)
  if isinstance(opened, str):
    return None, opened
  try:
    with open(opened, "rb", buffering=0) as f:
      status = os.fstat(f.fileno())
      if not stat.S_ISREG(status.st_mode):
        logging.warning("prepare_data: skipping %s: not a regular file", path)
        return None, limits.NOT_A_FILE
      if status.st_size > limits.MAX_IMAGE_BYTES:
        logging.warning("prepare_data: skipping %s: %d bytes, over limits.MAX_IMAGE_BYTES", path, status.st_size)
        return None, limits.TOO_LARGE
      return f.read(), ""
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from e
