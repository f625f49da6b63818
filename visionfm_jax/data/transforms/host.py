"""Host-side image transforms as grain transforms: numpy and Pillow only, uint8 HWC in and out.

The host decodes and does the geometric work (crops, resizes, RandAugment); the per-pixel work (flip, colour
jitter, normalisation) happens on the device (data/transforms/device_augment.py, called by the task), from per-example
parameters that the host draws (DEVICE_KEYS). `RandomMap`s draw from grain's
per-record generator, so an augmented batch is a pure function of (seed, record index).
"""

from __future__ import annotations

import io
import logging
import math
import warnings

import grain
import numpy as np
from PIL import ExifTags, Image, ImageOps

from visionfm_jax import token_ids
from visionfm_jax.data import limits
from visionfm_jax.data.transforms import randaugment
from visionfm_jax.errors import ConfigError

EVAL_CROP_FRACTION = 0.875  # resize the shorter side to size / 0.875, then take the central size x size
# config.data.eval_preprocess -> its resampling filter: 'inception' = ImageNet classification's shorter side to
# size / 0.875, bilinear, central crop; 'clip' = CLIP's shorter side to size, bicubic, central crop (zero-shot and
# retrieval). Both are `resize_shorter_side_and_crop`, which transformers' image processors compute exactly.
EVAL_FILTERS = {"inception": Image.Resampling.BILINEAR, "clip": Image.Resampling.BICUBIC}
EVAL_PREPROCESS = tuple(EVAL_FILTERS)
# What Pillow raises on bytes that are not an image it can decode (and OSError for files that cannot be read).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_decode_failures = 0


def decode_failures() -> int:
  """How many records this process has dropped as undecodable."""
  return _decode_failures


def count_failure(what: str, error: Exception) -> None:
  """Logs and counts one undecodable record (an image, or a whole serialized record); see decode_failures."""
  global _decode_failures
  _decode_failures += 1
  logging.warning("skipping an undecodable %s (%d so far in this process): %s", what, _decode_failures, error)


def failure_reason(error: Exception) -> str:
  """The data/limits.py reason a decode error counts under."""
  if isinstance(error, (limits.ImageTooLarge, Image.DecompressionBombError)):
    return limits.TOO_MANY_PIXELS
  return limits.UNDECODABLE


def _to_rgb_array(image) -> np.ndarray:
  """A decoded image (HW, HW1, HW3 or HW4 array) as uint8 HWC RGB; a fourth channel is alpha, composited onto
  white (`on_white`)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    alpha = image[:, :, 3:].astype(np.float32) / 255.0
    image = np.round(image[:, :, :3] * alpha + 255.0 * (1.0 - alpha))
  if image.dtype != np.uint8:
    image = np.clip(image, 0, 255).astype(np.uint8)
  return image


def decode_image(data: bytes, min_side: int = 0) -> np.ndarray:
  """JPEG/PNG/... bytes -> uint8 HWC RGB, upright as its EXIF orientation says, transparency composited onto
  white (as `transformers`' image processors do); limits.ImageTooLarge, before any pixel is decoded, for an image
  of more than limits.MAX_IMAGE_PIXELS.

  Without `min_side` the image is decoded in full, as transformers' image processors, timm and published
  evaluations decode it: evaluation, the probes, `visionfm_jax.load` and the tools decode so (then resize as the
  exported image processor says). With `min_side` (training only: data/loader/pipeline.py's `train_decode_side`),
  JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least `min_side` pixels
  (Pillow's draft mode): up to twice as fast on camera-size photos (docs/data.md), but not the pixels a
  full decode resized gives.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, from the same header
    image = Image.open(io.BytesIO(data))
  with image:
    limits.check_pixels(*image.size)
    if min_side and image.format == "JPEG":
      image.draft("RGB", (min_side, min_side))
    image = upright(image)
    if image.mode in HIGH_DEPTH_MODES:
      return _to_rgb_array(to_8_bits(np.asarray(image), image.mode))
    return np.asarray(on_white(image))


def upright(image: Image.Image) -> Image.Image:
  """`image` turned as its EXIF orientation tag says (a phone's portrait photo is stored sideways)."""
  if image.getexif().get(ExifTags.Base.Orientation, 1) in (1, None):
    return image
  return ImageOps.exif_transpose(image)


def on_white(image: Image.Image) -> Image.Image:
  """`image` as RGB; an alpha channel or a palette's transparent entry composited onto white."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
  return image.convert("RGB")


# Pillow's single-channel modes deeper than 8 bits: its convert("RGB") clips them at 255 (a 16-bit PNG comes out
# nearly white). Each maps to 8 bits by the full range of its depth.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8_bits(pixels: np.ndarray, mode: str) -> np.ndarray:
  """A high-depth single-channel image as uint8 by its depth's range: 16-bit 0..65535 and 32-bit integers (how
  Pillow may hold a 16-bit PNG) by 65535 / 255 when any value exceeds 255; floats are taken as 0..1."""
  pixels = pixels.astype(np.float64)
  if mode == "F":
    pixels = pixels * 255.0
  elif mode.startswith("I;16") or pixels.max(initial=0) > 255:
    pixels = pixels / 257.0  # 65535 -> 255
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


class Decode(grain.transforms.Map):
  """Decodes record['image'] when it holds encoded bytes (in full; with `min_side`, training's JPEG draft decode:
  `decode_image`); arrays pass through as uint8 RGB.

  An undecodable image is logged, counted (see `decode_failures`) and marked with image=None, for
  `MarkUndecodable` (training) or the eval iterator's padding mask to handle. image=None (a record its
  source could not read, already counted there) passes through.
  """

  def __init__(self, min_side: int = 0):
    self.min_side = min_side

  def map(self, element: dict) -> dict:
    element = dict(element)
    image = element["image"]
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
      try:
        element["image"] = decode_image(bytes(image), self.min_side)
      except DECODE_ERRORS as e:
        count_failure("image", e)
        element["image"] = None
    elif image is not None:
      element["image"] = _to_rgb_array(image)
    return element


class MarkUndecodable(grain.transforms.Map):
  """Sets 'valid': False for a record `Decode` could not decode, whose image becomes a black `size` x `size`
  placeholder, True otherwise. Training batches keep their size and per-record random streams;
  `skipping.SkippingIterator` drops the placeholders and counts them."""

  def __init__(self, size: int):
    self.size = int(size)

  def map(self, element: dict) -> dict:
    if element["image"] is None:
      return {**element, "image": np.zeros((self.size, self.size, 3), np.uint8), "valid": False}
    return {**element, "valid": True}


def _carry_fields(element: dict, example: dict) -> dict:
  """The example with the record's 'valid' and its device augmentation parameters (DEVICE_KEYS), if any."""
  for key in ("valid", *DEVICE_KEYS):
    if key in element:
      example[key] = element[key]
  return example


def crop_window(
  height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10
) -> tuple[int, int, int, int]:
  """The Inception-style random crop (top, left, h, w).

  Area is uniform in scale * (height * width), aspect ratio log-uniform in `ratio`; the first of `tries`
  draws that fits wins, else the central crop with the aspect ratio clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(tries):
    u_area, u_ratio, u_top, u_left = rng.random(4).tolist()
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def resize_box(image: np.ndarray, box, size: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of the region box=(left, top, right, bottom) to size^2."""
  out = Image.fromarray(image).resize((size, size), Image.BILINEAR, box=tuple(float(b) for b in box))
  return np.asarray(out)


class RandomResizedCrop(grain.transforms.RandomMap):
  """Random area/aspect crop (see `crop_window`), resized bilinearly to size x size."""

  def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = element["image"]
    top, left, h, w = crop_window(image.shape[0], image.shape[1], rng, self.scale, self.ratio)
    return {**element, "image": resize_box(image, (left, top, left + w, top + h), self.size)}


# Per-pixel augmentations run on the device (data/transforms/device_augment.py): the host draws their per-example
# parameters from grain's per-record generator, at the same points of its stream as when the host applied them
# (so an example and its augmentation stay a pure function of (seed, record position)), and the example ops
# carry them into the batch under these keys.
FLIP = "flip"  # uint8 (), 1: mirror left-right
JITTER = "jitter"  # float32 (3,): brightness, contrast and saturation factors
JITTER_ORDER = "jitter_order"  # int32 (3,): the order in which the three adjustments apply (indices into JITTER)
DEVICE_KEYS = (FLIP, JITTER, JITTER_ORDER)


def draw_flip(rng: np.random.Generator) -> np.uint8:
  return np.uint8(rng.random() < 0.5)


def draw_jitter(strength: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """torchvision's ColorJitter(brightness=s, contrast=s, saturation=s) draws: each factor uniform in
  [max(0, 1 - s), 1 + s], and a random order of the three adjustments."""
  factors = rng.uniform(max(0.0, 1 - strength), 1 + strength, size=3).astype(np.float32)
  return factors, rng.permutation(3).astype(np.int32)


class RandomFlip(grain.transforms.RandomMap):
  """Mirrors the image left-right with probability 1/2: on the host, or, with `on_device`, by recording
  'flip' for device_augment (where it runs after the colour jitter, with which it commutes)."""

  def __init__(self, on_device: bool = True):
    self.on_device = bool(on_device)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    flip = draw_flip(rng)
    if self.on_device:
      return {**element, FLIP: flip}
    return {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])} if flip else element


class ColorJitter(grain.transforms.RandomMap):
  """Draws the colour jitter of strength s (see `draw_jitter`) into 'jitter' and 'jitter_order';
  device_augment.color_jitter applies it."""

  def __init__(self, strength: float):
    if strength <= 0:
      raise ValueError(f"ColorJitter strength={strength}: expected > 0 (leave the op out to disable it)")
    self.strength = float(strength)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    factors, order = draw_jitter(self.strength, rng)
    return {**element, JITTER: factors, JITTER_ORDER: order}


def flip_on_device(augment) -> bool:
  """Whether config.data.augment's flip can wait for the device: it must commute with every host op after it,
  which RandAugment's geometric operations do not (they are not mirror-symmetric per draw)."""
  geometric = augment.randaugment_ops > 0 and set(_randaugment_ops(augment)) & set(randaugment.GEOMETRIC_OPS)
  return not geometric


def device_params_spec(augment) -> dict:
  """{key: (shape, dtype)} of the per-example parameters that `train_transforms(augment)` leaves to the device."""
  spec = {}
  if augment.flip and flip_on_device(augment):
    spec[FLIP] = ((), np.uint8)
  if augment.color_jitter > 0:
    spec.update({JITTER: ((3,), np.float32), JITTER_ORDER: ((3,), np.int32)})
  return spec


def random_device_params(augment, batch_size: int, rng: np.random.Generator) -> dict:
  """Per-example device parameters for `batch_size` examples, drawn as the loader draws them (synthetic
  batches in the train loader's layout)."""
  spec, params = device_params_spec(augment), {}
  if FLIP in spec:
    params[FLIP] = np.array([draw_flip(rng) for _ in range(batch_size)], np.uint8)
  if JITTER in spec:
    params[JITTER], params[JITTER_ORDER] = (
      np.stack(column) for column in zip(*(draw_jitter(augment.color_jitter, rng) for _ in range(batch_size)))
    )
  return params


def check_eval_preprocess(name: str) -> str:
  if name not in EVAL_PREPROCESS:
    raise ConfigError(f"config.data.eval_preprocess={name!r}: expected one of {EVAL_PREPROCESS}")
  return name


def eval_resize_side(size: int, preprocess: str = "inception") -> int:
  """The shorter side that evaluation resizes a fully decoded image to before its central crop (the exported image
  processor's shortest_edge)."""
  return round(size / EVAL_CROP_FRACTION) if check_eval_preprocess(preprocess) == "inception" else size


def resize_shorter_side_and_crop(image: np.ndarray, side: int, size: int, resample) -> np.ndarray:
  """The shorter side to `side` (the longer to int(side * longer / shorter)) with Pillow's `resample` filter,
  then the central size x size at whole-pixel offsets (new - size) // 2: what transformers' image processors
  compute for size={'shortest_edge': side}, crop_size={'height': size, 'width': size} (and torchvision's
  Resize(side) + CenterCrop(size) but for its offsets' rounding)."""
  height, width = image.shape[:2]
  if height <= width:
    new_height, new_width = side, int(side * width / height)
  else:
    new_height, new_width = int(side * height / width), side
  resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), resample))
  top, left = (new_height - size) // 2, (new_width - size) // 2
  return resized[top : top + size, left : left + size]


class EvalTransform(grain.transforms.Map):
  """The central size x size view of evaluation, as `preprocess` (EVAL_PREPROCESS) says: the shorter side to
  `eval_resize_side` with its EVAL_FILTERS filter, then the central crop (`resize_shorter_side_and_crop`); a
  no-op on size x size images."""

  def __init__(self, size: int, preprocess: str = "inception"):
    self.size, self.preprocess = size, check_eval_preprocess(preprocess)

  def map(self, element: dict) -> dict:
    image = element["image"]
    if image is None or image.shape[:2] == (self.size, self.size):
      return element
    side = eval_resize_side(self.size, self.preprocess)
    view = resize_shorter_side_and_crop(image, side, self.size, EVAL_FILTERS[self.preprocess])
    return {**element, "image": view}


class SelectKeys(grain.transforms.Map):
  """The record -> example op of classification: uint8 'image' and int32 'label'.

  With `num_classes` (training), a label outside [0, num_classes) is counted like an undecodable record and its
  example marked invalid (valid=False: `skipping.SkippingIterator` drops it and counts it against
  config.data.max_skipped_fraction): a cross-entropy over such a label is NaN.

  Every example op has `spec(image_size)`: {key: (shape, dtype)} of one example, from which the eval
  iterator builds its (padded) batches.
  """

  def __init__(self, num_classes: int = 0):
    self.num_classes = int(num_classes)

  def map(self, element: dict) -> dict:
    label = element["label"] if element.get("valid", True) else element.get("label", 0)
    example = _carry_fields(element, {"image": element["image"], "label": np.int32(label)})
    if self.num_classes and element.get("valid", True) and not 0 <= int(label) < self.num_classes:
      count_failure("label", ValueError(f"label {int(label)} outside [0, {self.num_classes})"))
      example.update(label=np.int32(0), valid=False)
    return example

  def spec(self, image_size: int) -> dict:
    return {"image": ((image_size, image_size, 3), np.uint8), "label": ((), np.int32)}


class SelectPair(grain.transforms.Map):
  """The record -> example op of image-text pairs and image-only records: uint8 'image', int32 'text'
  (max_len,) tokens of record['caption'], bool 'has_text', and int32 'label' when `with_label` (sources with
  labels: zero-shot evaluation). A record without a caption (or with an empty one) is image-only: its 'text' is
  all PAD (token_ids.PAD_ID) and 'has_text' False. A caption over limits.MAX_TEXT_BYTES is never tokenized: the
  record is counted (`count_failure`) and marked 'valid' False, as an undecodable one.
  """

  def __init__(self, tokenizer, with_label: bool):
    self.tokenizer, self.with_label = tokenizer, bool(with_label)

  def map(self, element: dict) -> dict:
    if not element.get("valid", True):  # a placeholder (see MarkUndecodable): its fields may be missing
      element = {"label": 0, **element}
    caption = element.get("caption")
    if caption and limits.text_too_large(caption):
      count_failure("caption", limits.TextTooLarge(len(caption.encode("utf-8", "surrogatepass"))))
      element, caption = {**element, "valid": False}, None
    if caption:
      text, has_text = self.tokenizer.encode(caption), True
    else:
      text, has_text = np.full((self.tokenizer.max_len,), token_ids.PAD_ID, np.int32), False
    example = {"image": element["image"], "text": text, "has_text": np.bool_(has_text)}
    if self.with_label:
      example["label"] = np.int32(element["label"])
    return _carry_fields(element, example)

  def spec(self, image_size: int) -> dict:
    spec = {
      "image": ((image_size, image_size, 3), np.uint8),
      "text": ((self.tokenizer.max_len,), np.int32),
      "has_text": ((), np.bool_),
    }
    if self.with_label:
      spec["label"] = ((), np.int32)
    return spec


def mim_mask(grid: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
  """SimMIM's mask: uint8 (grid, grid) with exactly ceil(grid * grid * ratio) ones at random positions."""
  n = grid * grid
  mask = np.zeros(n, np.uint8)
  mask[rng.permutation(n)[: math.ceil(n * ratio)]] = 1
  return mask.reshape(grid, grid)


class AddMimMask(grain.transforms.RandomMap):
  """Adds 'mim_mask', uint8 (grid, grid) with grid = image_size // mask_patch_size: a `mim_mask` of `ratio`.

  Follows the example op (it has `spec` too). In training grain's per-record generator draws it; the eval
  iterator passes np.random.default_rng(record index), so held-out masks are the same in every evaluation.
  """

  def __init__(self, image_size: int, mask_patch_size: int, ratio: float):
    image_size, mask_patch_size, ratio = int(image_size), int(mask_patch_size), float(ratio)
    if mask_patch_size <= 0 or image_size % mask_patch_size:
      raise ValueError(f"mask_patch_size={mask_patch_size} must be positive and divide image_size={image_size}")
    if not 0 < ratio < 1:
      raise ValueError(f"ratio={ratio}: the masked fraction must be in (0, 1)")
    self.image_size, self.mask_patch_size, self.ratio = image_size, mask_patch_size, ratio
    self.grid = image_size // mask_patch_size

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return {**element, "mim_mask": mim_mask(self.grid, self.ratio, rng)}

  def spec(self, image_size: int) -> dict:
    if image_size != self.image_size:
      raise ValueError(f"AddMimMask was built for image_size={self.image_size}, not {image_size}")
    return {"mim_mask": ((self.grid, self.grid), np.uint8)}


def _randaugment_ops(augment) -> tuple[str, ...]:
  exclude = tuple(augment.randaugment_exclude)
  unknown = [op for op in exclude if op not in randaugment.OPS]
  ops = tuple(op for op in randaugment.OPS if op not in exclude)
  if unknown or not ops:
    raise ConfigError(
      f"config.data.augment.randaugment_exclude={exclude}: unknown {unknown} or nothing left; "
      f"the operations are {randaugment.OPS}"
    )
  return ops


def train_transforms(image_size: int, augment, decode_min_side: int = 0, example=None) -> list:
  """Decode + the augmentations named in config.data.augment, ending in uint8 size x size images, then
  `example` (the record -> example op; SelectKeys when None). Examples carry 'valid' (see MarkUndecodable) and
  the per-example parameters of the device's part (`device_params_spec`), which device_augment.augment applies.

  For captions that name positions (the shapes captions do), turn flip off, exclude
  randaugment.GEOMETRIC_OPS and keep crop_scale near 1 (or random_resized_crop off): these move or mirror
  the content and make such captions wrong.
  """
  ops = [Decode(decode_min_side), MarkUndecodable(image_size)]
  if augment.random_resized_crop:
    ops.append(RandomResizedCrop(image_size, augment.crop_scale, augment.crop_ratio))
  else:
    ops.append(EvalTransform(image_size))
  if augment.flip:
    ops.append(RandomFlip(on_device=flip_on_device(augment)))
  if augment.randaugment_ops > 0:
    ops.append(
      randaugment.RandAugment(augment.randaugment_ops, augment.randaugment_magnitude, _randaugment_ops(augment))
    )
  if augment.color_jitter > 0:
    ops.append(ColorJitter(augment.color_jitter))
  ops.append(SelectKeys() if example is None else example)
  return ops
