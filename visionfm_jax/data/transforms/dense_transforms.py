"""Host-side transforms of dense records (segmentation masks, detection boxes) as grain transforms.

Geometry: an image of (original) size (h, w) is resized by one factor `scale` and placed with its top-left
corner at `offset` (oy, ox) on a fixed canvas; a point (x, y) of the original image (pixel edges: the image
spans [0, w] x [0, h]) lands at (x * scale + ox, y * scale + oy). Offsets may be negative (a crop). Only the
visible part is resampled (Pillow's box resize: bilinear, antialiased when shrinking, for images; nearest for
masks). Images may have been decoded smaller (JPEG draft mode); `scale` always refers to the original size.
Canvas pixels outside the image are 0 in the image and IGNORE (255) in masks.
"""

from __future__ import annotations

import io
import logging

import grain
import numpy as np
from PIL import Image

from visionfm_jax.data import limits
from visionfm_jax.data.transforms import host as transforms

# The mask label of pixels that count for nothing in the segmentation loss and mIoU: unlabelled or uncertain
# pixels of the sources (scenes, ADE20K) and canvas padding.
IGNORE = 255
_truncated_boxes = 0


def truncated_boxes() -> int:
  """How many objects this process has dropped beyond config.data.max_boxes."""
  return _truncated_boxes


def decode_with_size(data: bytes, min_side: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
  """(uint8 HWC RGB, (h, w) of the stored image): JPEGs decode at the smallest DCT scale keeping both sides
  >= `min_side` (see transforms.decode_image), so the array may be smaller than the original. The EXIF
  orientation is not applied: boxes and masks are given in the stored image's pixels."""
  with Image.open(io.BytesIO(data)) as image:
    limits.check_pixels(*image.size)
    size = (image.height, image.width)
    if min_side and image.format == "JPEG":
      image.draft("RGB", (min_side, min_side))
    return np.asarray(transforms.on_white(image)), size


class DecodeDense(grain.transforms.Map):
  """Decodes record['image'] bytes and adds 'orig_size' (h, w); arrays pass through with their own size.

  Undecodable images, and masks whose size differs from the image's, are counted (transforms.count_failure)
  and become image=None, for `MarkInvalid` or the eval iterator's padding.
  """

  def __init__(self, min_side: int = 0):
    self.min_side = int(min_side)

  def map(self, element: dict) -> dict:
    element = dict(element)
    image = element["image"]
    if image is None:
      return element
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
      try:
        image, size = decode_with_size(bytes(image), self.min_side)
      except transforms.DECODE_ERRORS as e:
        transforms.count_failure("image", e)
        element["image"] = None
        return element
    else:
      image = np.asarray(image, np.uint8)
      size = image.shape[:2]
    mask = element.get("mask")
    if mask is not None and mask.shape != tuple(size):
      transforms.count_failure(
        "image/mask pair",
        ValueError(f"mask {mask.shape} for an image of {size} (record {element.get('key', element.get('image_id'))})"),
      )
      element["image"] = None
      return element
    element["image"], element["orig_size"] = image, tuple(int(s) for s in size)
    return element


class MarkInvalid(grain.transforms.Map):
  """transforms.MarkUndecodable for dense records: 'valid' False with a black `size` x `size` image, an
  all-IGNORE mask (when the record has the key) and no boxes; the skipping iterator drops it."""

  def __init__(self, size: int):
    self.size = int(size)

  def map(self, element: dict) -> dict:
    if element["image"] is not None:
      return {**element, "valid": True}
    element = {
      **element,
      "image": np.zeros((self.size, self.size, 3), np.uint8),
      "valid": False,
      "orig_size": (self.size, self.size),
    }
    if "mask" in element:
      element["mask"] = np.full((self.size, self.size), IGNORE, np.uint8)
    if "boxes" in element:
      element["boxes"], element["classes"] = np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
    return element


def place(array: np.ndarray, orig_size, scale: float, offset, canvas, fill, resample) -> np.ndarray:
  """`array` (covering an original image of `orig_size` (h, w)) resized by `scale` onto a `canvas` (h, w)
  filled with `fill`, its top-left corner at `offset` (oy, ox); see the module docstring."""
  h, w = orig_size
  oy, ox = offset
  ch, cw = canvas
  th, tw = max(1, round(h * scale)), max(1, round(w * scale))  # the resized image's extent
  y0, y1, x0, x1 = max(oy, 0), min(oy + th, ch), max(ox, 0), min(ox + tw, cw)
  out = np.full((ch, cw) + array.shape[2:], fill, array.dtype)
  if y0 >= y1 or x0 >= x1:
    return out
  if (th, tw) == array.shape[:2]:  # no resampling: a plain copy
    out[y0:y1, x0:x1] = array[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    return out
  ry, rx = array.shape[0] / (h * scale), array.shape[1] / (w * scale)  # canvas px -> array px
  box = ((x0 - ox) * rx, (y0 - oy) * ry, min(array.shape[1], (x1 - ox) * rx), min(array.shape[0], (y1 - oy) * ry))
  out[y0:y1, x0:x1] = np.asarray(Image.fromarray(array).resize((x1 - x0, y1 - y0), resample, box=box))
  return out


def place_boxes(boxes: np.ndarray, classes: np.ndarray, scale: float, offset, side: int):
  """Boxes (xyxy, original pixels) moved like `place`, clipped to the side x side canvas; those less than a
  pixel wide or high afterwards are dropped."""
  oy, ox = offset
  moved = np.clip(boxes * np.float32(scale) + np.array([ox, oy, ox, oy], np.float32), 0, side)
  keep = (moved[:, 2] - moved[:, 0] >= 1) & (moved[:, 3] - moved[:, 1] >= 1)
  return moved[keep], classes[keep]


def pad_boxes(boxes: np.ndarray, classes: np.ndarray, side: int, max_boxes: int):
  """(float32 (max_boxes, 4) xyxy / side, int32 (max_boxes,) with -1 after the real ones); objects beyond
  `max_boxes` are dropped, counted and logged."""
  global _truncated_boxes
  if len(boxes) > max_boxes:
    if not _truncated_boxes:
      logging.warning(
        "an image has %d objects, more than config.data.max_boxes=%d: keeping the first (counted "
        "in dense_transforms.truncated_boxes())",
        len(boxes),
        max_boxes,
      )
    _truncated_boxes += len(boxes) - max_boxes
    boxes, classes = boxes[:max_boxes], classes[:max_boxes]
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_classes = np.full((max_boxes,), -1, np.int32)
  out_boxes[: len(boxes)] = boxes / np.float32(side)
  out_classes[: len(classes)] = classes
  return out_boxes, out_classes


def _uniform(rng: np.random.Generator, low_high) -> float:
  low, high = low_high
  return low + (high - low) * rng.random()


def _random_offset(rng: np.random.Generator, extent: int, side: int) -> int:
  """Where an `extent` long image starts on a `side` canvas: anywhere it fits, or a random crop."""
  return int(rng.integers(0, side - extent + 1)) if extent <= side else -int(rng.integers(0, extent - side + 1))


def _flip(example: dict, side: int) -> dict:
  example = {**example, "image": np.ascontiguousarray(example["image"][:, ::-1])}
  if "mask" in example:
    example["mask"] = np.ascontiguousarray(example["mask"][:, ::-1])
  if "boxes" in example:
    boxes = example["boxes"]
    example["boxes"] = np.stack([side - boxes[:, 2], boxes[:, 1], side - boxes[:, 0], boxes[:, 3]], axis=1)
  return example


class SegmentationTrain(grain.transforms.RandomMap):
  """Short side to size * r, r ~ U(scale_range); a random size x size window (a smaller image sits at the
  top-left, padded); a horizontal flip with probability 1/2 when `flip`. Out: {'image', 'mask' int32, 'valid'}."""

  def __init__(self, size: int, scale_range, flip: bool):
    self.size, self.scale_range, self.flip = int(size), tuple(scale_range), bool(flip)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    h, w = element["orig_size"]
    scale = self.size * _uniform(rng, self.scale_range) / min(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    offset = (-int(rng.integers(0, max(th - self.size, 0) + 1)), -int(rng.integers(0, max(tw - self.size, 0) + 1)))
    return _segmentation_example(element, scale, offset, (self.size, self.size), self.flip and rng.random() < 0.5)


class SegmentationEval(grain.transforms.Map):
  """Short side to `size`, centred on a size x width canvas (cropping the long side when wider, padding when
  narrower). Out: {'image', 'mask' int32}."""

  def __init__(self, size: int, width: int):
    self.size, self.width = int(size), int(width)

  def map(self, element: dict) -> dict:
    h, w = element["orig_size"]
    scale = self.size / min(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    offset = ((self.size - th) // 2, (self.width - tw) // 2)
    return _segmentation_example(element, scale, offset, (self.size, self.width), False)


def _segmentation_example(element: dict, scale: float, offset, canvas, flip: bool) -> dict:
  size = element["orig_size"]
  example = {
    "image": place(element["image"], size, scale, offset, canvas, 0, Image.BILINEAR),
    "mask": place(element["mask"], size, scale, offset, canvas, IGNORE, Image.NEAREST),
  }
  if flip:
    example = _flip(example, canvas[1])
  example["mask"] = example["mask"].astype(np.int32)
  if "valid" in element:
    example["valid"] = element["valid"]
  return example


class DetectionTrain(grain.transforms.RandomMap):
  """Long side to size * r, r ~ U(scale_range), at a random offset on the size x size canvas (a random crop
  when larger); a horizontal flip with probability 1/2 when `flip`. Out: {'image', 'boxes' (max_boxes, 4)
  xyxy / size, 'classes' (-1: padding), 'valid'}."""

  def __init__(self, size: int, scale_range, flip: bool, max_boxes: int):
    self.size, self.scale_range, self.flip, self.max_boxes = int(size), tuple(scale_range), bool(flip), int(max_boxes)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    h, w = element["orig_size"]
    scale = self.size * _uniform(rng, self.scale_range) / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    offset = (_random_offset(rng, th, self.size), _random_offset(rng, tw, self.size))
    example = _detection_example(element, scale, offset, self.size)
    if self.flip and rng.random() < 0.5:
      example = _flip(example, self.size)
    example["boxes"], example["classes"] = pad_boxes(example["boxes"], example["classes"], self.size, self.max_boxes)
    if "valid" in element:
      example["valid"] = element["valid"]
    return example


class DetectionEval(grain.transforms.Map):
  """Long side to `size` at the top-left of the size x size canvas. Out: the DetectionTrain keys plus
  'image_id' int64, 'orig_size' int32 (h, w) and 'scale' float32: original xyxy = normalised xyxy * size / scale."""

  def __init__(self, size: int, max_boxes: int):
    self.size, self.max_boxes = int(size), int(max_boxes)

  def map(self, element: dict) -> dict:
    h, w = element["orig_size"]
    scale = self.size / max(h, w)
    example = _detection_example(element, scale, (0, 0), self.size)
    example["boxes"], example["classes"] = pad_boxes(example["boxes"], example["classes"], self.size, self.max_boxes)
    example.update(
      image_id=np.int64(element["image_id"]), orig_size=np.array([h, w], np.int32), scale=np.float32(scale)
    )
    return example


def _detection_example(element: dict, scale: float, offset, side: int) -> dict:
  image = place(element["image"], element["orig_size"], scale, offset, (side, side), 0, Image.BILINEAR)
  boxes, classes = place_boxes(
    np.asarray(element["boxes"], np.float32).reshape(-1, 4),
    np.asarray(element["classes"], np.int32),
    scale,
    offset,
    side,
  )
  return {"image": image, "boxes": boxes, "classes": classes}
