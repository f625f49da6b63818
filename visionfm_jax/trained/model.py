"""A trained model from Python: `visionfm_jax.load(path)` over a training workdir (its newest checkpoint, or
`step`; the EMA of its params with `ema=True`), a tools.import_hf directory (a ViT, a SwinV2 or a CLIP) or a
transformers CLIPModel directory (trained/loader.py reads all three), with what its task supports:

  encode_image(images)                   unit embeddings (CLIP, Aurora) or pooled backbone features (the others)
  encode_text(texts)                     unit embeddings, by the run's own tokenizer (CLIP, Aurora)
  features(images)                       pooled backbone features, before any head or projection (every task)
  classify(images, top_k=5)              [(class name, probability), ...] per image (a classifier)
  zero_shot(images, names, templates)    [(class name, cosine), ...] per image; OpenAI's 80 templates by default
  class_embeddings(names, templates)     the unit class embeddings zero_shot ranks by, held for the next call
  logits(images[, names, templates])     a classifier's head logits; an image-text model's scaled class cosines
  caption(images, beam_size=1)           one caption per image (Aurora)

Images are uint8 HxWx3 arrays (one, a list, or an NHWC batch), PIL images or image files (decoded in full, as
transformers' image processors decode them), viewed as the run's evaluation views them (config.data.eval_preprocess,
data/transforms/host.py's EvalTransform); a NaFlex run's
(config.data.naflex) as its zero-shot evaluation packs them: each whole, at its aspect, as the largest patch grid
within `max_tokens` patches (data/transforms/naflex.py), the run's training budget unless `load` is given another
(`load(path, max_tokens=64)`; a model per budget, each compiling its own). Every call runs
jitted, split over all of JAX's devices with the params replicated (the model must fit on one device), in batches
of `batch_size`; a smaller call (or the rest of a larger one) is padded up to the smallest of BATCH_BUCKETS that
holds it, so that one image runs a batch of one (of one per device) and each bucket compiles once, on its first
use. The embeddings, zero-shot classes and captions are the tasks' and evaluators' own code (evaluate/zeroshot.py,
models/generate.py), so they equal what the tools compute; the class embeddings are the evaluators' cache
(zeroshot.ClassEmbeddings), so a class set goes through the text tower once per model. The time of a first call
and of the next ones: BENCHMARKS.md, "The notebook API (CPU)" (`python -m visionfm_jax.bench.notebook`).

Example (a notebook; WORKDIR is a CLIP's training workdir):

  import numpy as np
  import visionfm_jax
  from visionfm_jax.data.embedded import shapes

  model = visionfm_jax.load(WORKDIR)  # or ema=True, step=N; or an import_hf / transformers CLIP directory
  source = shapes.ShapesSource("validation", 4, 64)
  images = [source[i]["image"] for i in range(4)]  # uint8 HxWx3 arrays, PIL images or file paths
  image_emb = model.encode_image(images)  # (4, D), unit norm
  text_emb = model.encode_text(["a large red circle", "a small blue square"])
  print(np.round(image_emb @ text_emb.T, 3))  # cosine similarities
  for top in model.zero_shot(images, ["circle", "square", "triangle"], top_k=2):
    print(top)  # [(class name, cosine), ...], best first
"""

from __future__ import annotations

import functools
import numbers
import os
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image

from visionfm_jax import data, parallel
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.data.transforms import naflex
from visionfm_jax.errors import ConfigError, UserError
from visionfm_jax.evaluate import panels, probe, zeroshot
from visionfm_jax.models import generate
from visionfm_jax.trained import loader
from visionfm_jax.trained import workdir as workdir_lib

IMAGE_TEXT_TASKS = ("contrastive", "aurora")
BATCH_BUCKETS = (1, 8, 64)  # the batch sizes below `batch_size` that a call is padded up to (each rounded up to a
# multiple of the device count): one compile each, so that one image costs a batch of one, not of `batch_size`


def load(
  path: str, *, step: int | None = None, ema: bool = False, batch_size: int = 64, max_tokens: int | None = None
) -> TrainedModel:
  """The model at `path` (module docstring) as a TrainedModel: a training workdir of any task (its newest
  checkpoint, or `step`; the EMA of its params with `ema=True`), a tools.import_hf CLIP directory or a
  transformers CLIPModel directory. `batch_size`: the most images (or texts) run at once; smaller calls run in
  the smallest of BATCH_BUCKETS that holds them. `max_tokens`: a NaFlex model's patches an image (its training
  budget, config.data.naflex.max_tokens, by default). UserError naming the argument (path, step, ema, max_tokens)
  for anything else. A newest checkpoint whose params are damaged gives way to the newest intact one, with one
  warning naming both; a damaged `step` is a CheckpointError naming it and the part."""
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size}: must be positive")
  if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral)):
    raise UserError(f"max_tokens={max_tokens!r}: expected a positive int, the patches an image may take")
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  mesh = parallel.data_mesh()
  loaded = loader.load(path, step, NamedSharding(mesh, P()), mesh=mesh, use_ema=ema, names=workdir_lib.PARAMETERS)
  return TrainedModel(loaded, mesh, batch_size, _token_budget(loaded, max_tokens))


def _token_budget(loaded: loader.Loaded, max_tokens: int | None) -> int | None:
  """The patches an image of a NaFlex model (`max_tokens`, else its training budget); None for square images."""
  if loaded.task.naflex is None:
    if max_tokens is not None:
      raise UserError(
        f"max_tokens={max_tokens}: the model at {loaded.origin} takes square images (its config has "
        "no data.naflex); give no max_tokens"
      )
    return None
  if max_tokens is None:
    return loaded.task.naflex[1]
  try:
    return naflex.check(loaded.task.naflex[0], int(max_tokens))[1]
  except ConfigError as e:  # naflex.check's range, said of the argument rather than of the config field
    raise UserError(str(e).replace("config.data.naflex.max_tokens", "max_tokens", 1)) from e


def batch_buckets(batch_size: int, devices: int) -> tuple[int, ...]:
  """The padded batch sizes of a model loaded with `batch_size` on `devices`: BATCH_BUCKETS below it and
  `batch_size` itself, each rounded up to a multiple of `devices`."""
  round_up = lambda n: -(-n // devices) * devices
  return tuple(sorted({round_up(min(b, batch_size)) for b in BATCH_BUCKETS + (batch_size,)}))


class TrainedModel:
  """A task and its params, answering what the task supports (module docstring); `task`, `params`, `config`,
  `path` and `step` (a workdir's checkpoint, else None) are the loaded model's, `buckets` the batch sizes its calls
  are padded to and `batch_size` the largest; `max_tokens` a NaFlex model's patches an image (None: square
  images)."""

  def __init__(self, loaded: loader.Loaded, mesh: Mesh, batch_size: int, max_tokens: int | None = None):
    self.task, self.params, self.path, self.step = loaded.task, loaded.params, loaded.origin, loaded.step
    self.config = self.task.config
    self.max_tokens = max_tokens
    self.buckets = batch_buckets(batch_size, mesh.size)
    self.batch_size = self.buckets[-1]
    self._batch_sharding = parallel.batch_sharding(mesh)
    self._jitted: dict[str, Callable] = {}

  def __repr__(self) -> str:
    step = f", step={self.step}" if self.step is not None else ""
    tokens = f", max_tokens={self.max_tokens}" if self.max_tokens else ""
    return (
      f"TrainedModel(task={self.config.task!r}, model={self.config.model.name!r}, path={self.path!r}{step}{tokens})"
    )

  # ------------------------------------------------------------------------------------------ what it answers

  def encode_image(self, images) -> np.ndarray:
    """`images` (module docstring) -> (N, D) float32: unit embeddings of an image-text model, the pooled backbone
    features of the others (`features`)."""
    name = "embed_images" if self._is_image_text else "pooled_features"
    return self._run_batched(name, self.preprocess(images))

  def encode_text(self, texts: str | Sequence[str]) -> np.ndarray:
    """A text or a list of them -> (N, D) float32 unit embeddings, tokenised by the run's tokenizer (an image-text
    model)."""
    self._require(IMAGE_TEXT_TASKS, "encode_text")
    return self._run_batched("embed_texts", self.task.tokenizer.encode_batch(_as_list(texts)))

  def features(self, images) -> np.ndarray:
    """`images` -> (N, D) float32 pooled features of the image backbone, before any head or projection (the
    linear probe's features; a CLIP's image tower before its projection)."""
    return self._run_batched("pooled_features", self.preprocess(images))

  def logits(
    self, images, class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None
  ) -> np.ndarray:
    """`images` -> (N, C) float32 logits. A classifier: its head's, over `class_names` (the property); give no
    names. An image-text model: exp(logit_scale) * cosine (+ logit_bias, SigLIP) against the embeddings of the
    given `class_names` under `templates` (`class_embeddings`), as its training loss scores pairs."""
    if not self._is_image_text:
      self._require(("classification",), "logits")
      if class_names is not None or templates is not None:
        raise UserError(
          "logits: a classifier's logits are over its own classes (`class_names`); give no names or templates"
        )
      return self._run_batched("logits", self.preprocess(images))
    if class_names is None:
      raise UserError("logits: an image-text model scores images against class names; give class_names")
    cosines = self.encode_image(images) @ self.class_embeddings(class_names, templates).T
    scale = float(np.exp(self.params["logit_scale"]))
    return cosines * scale + float(self.params.get("logit_bias", 0.0))

  def classify(self, images, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """`images` -> per image, the `top_k` most probable classes of the model's head as (name, probability), best
    first; names from the training data (its dataset.json, a folder's classes) when it has them, else
    'class <i>'."""
    self._require(("classification",), "classify")
    return _top_k(_softmax(self.logits(images)), self.class_names, top_k)

  def zero_shot(
    self, images, class_names: Sequence[str], templates: Sequence[str] | None = None, top_k: int = 5
  ) -> list[list[tuple[str, float]]]:
    """`images` -> per image, the `top_k` nearest of `class_names` as (name, cosine), best first, against
    `class_embeddings(class_names, templates)` (computed once, then held)."""
    self._require(IMAGE_TEXT_TASKS, "zero_shot")
    classes = self.class_embeddings(class_names, templates)
    return _top_k(self.encode_image(images) @ classes.T, _as_list(class_names), top_k)

  def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
    """(len(class_names), D) float32 unit class embeddings (an image-text model): each class the normalised mean
    of its prompts' unit embeddings, the prompts `templates` with '{}' for the name (OpenAI's 80 ImageNet templates
    by default). Held per (names, templates): a repeated set, or a subset of one held under the same templates,
    is not embedded again."""
    self._require(IMAGE_TEXT_TASKS, "class_embeddings")
    class_names = _as_list(class_names)
    templates = _as_list(_openai_templates() if templates is None else templates)
    if not class_names or not templates or not all("{}" in t for t in templates):
      raise UserError(
        f"class_names, templates: give class names, and templates with '{{}}' for the name; got "
        f"{len(class_names)} names, templates {templates[:3]}"
      )
    return np.asarray(self.task.class_embeddings(self.params, class_names, templates), np.float32)

  def caption(self, images, *, beam_size: int = 1, max_len: int = 0, length_penalty: float = 0.0) -> list[str]:
    """`images` -> one caption (str) per image (an Aurora model): greedy, or beam search with `beam_size` > 1, as
    tools.caption; `max_len` tokens at most (0: the model's)."""
    self._require(("aurora",), "caption")
    pixels = self.preprocess(images)
    captions = []
    for start in range(0, len(pixels), self.batch_size):
      rows = pixels[start : start + self.batch_size]
      captions += generate.caption_images(
        self.task,
        self.params,
        _pad(rows, self._bucket(len(rows))),
        beam_size=beam_size,
        max_len=max_len or None,
        length_penalty=length_penalty,
      )[: len(rows)]
    return captions

  def preprocess(self, images) -> np.ndarray:
    """`images` (module docstring) -> (N, S, S, 3) uint8, as the run's evaluation views them; a NaFlex model's
    packed, (N, 1 + max_tokens, p*p*3) uint8 (naflex.pack), each decoded whole as its evaluation decodes it."""
    if self.max_tokens:
      patches = naflex.Patches(self.task.naflex[0], self.max_tokens)
      return np.stack([patches.map({"image": _rgb(image)})["image"] for image in _image_list(images)])
    transform = transforms.EvalTransform(self.config.data.image_size, self.config.data.eval_preprocess)
    return np.stack([transform.map({"image": _rgb(image)})["image"] for image in _image_list(images)])

  @functools.cached_property
  def class_names(self) -> list[str]:
    """The head's class names (a classifier): the training data's, else 'class <i>'."""
    self._require(("classification",), "class_names")
    return panels.class_names_or_numbers(
      lambda: data.train_class_names(self.config.data), self.config.model.num_classes
    )

  # ------------------------------------------------------------------------------------------------- running

  @property
  def _is_image_text(self) -> bool:
    return self.config.task in IMAGE_TEXT_TASKS

  def _require(self, task_names: Sequence[str], what: str) -> None:
    if self.config.task not in task_names:
      raise UserError(
        f"{what}: the model at {self.path} is a {self.config.task!r} model; {what} needs a "
        f"{' or '.join(map(repr, task_names))} one"
      )

  def _forward(self, name: str) -> Callable:
    task = self.task
    if name == "pooled_features":
      return probe.pooled_features(task)
    if name == "logits":
      return lambda params, images: task.logits(params, task.normalize(images), train=False)
    return getattr(task, name)  # embed_images, embed_texts

  def _jit(self, name: str) -> Callable:
    if name not in self._jitted:
      self._jitted[name] = jax.jit(self._forward(name))
    return self._jitted[name]

  def _bucket(self, rows: int) -> int:
    """The smallest padded batch size that holds `rows` (at most `batch_size`)."""
    return next(size for size in self.buckets if size >= rows)

  def _run_batched(self, name: str, rows: np.ndarray) -> np.ndarray:
    """`name`'s forward over `rows` in batches of `batch_size`, the last padded to its bucket, as float32 numpy."""
    if not len(rows):
      raise UserError(f"{name}: no inputs given")
    fn, out = self._jit(name), []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start : start + self.batch_size]
      batch = jax.device_put(_pad(chunk, self._bucket(len(chunk))), self._batch_sharding)
      out.append(np.asarray(fn(self.params, batch), np.float32)[: len(chunk)])
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------------ inputs


def _as_list(items) -> list:
  return [items] if isinstance(items, str) else list(items)


def _pad(rows: np.ndarray, size: int) -> np.ndarray:
  """`rows` filled up to `size` with copies of its last row (dropped after the forward: one compile per size)."""
  return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)]) if len(rows) < size else rows


def _image_list(images) -> list:
  """One image, a sequence of them or an NHWC batch -> a list of single images; UserError for none."""
  if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim < 4):
    images = [images]
  images = list(images)
  if not images:
    raise UserError("images: none given (uint8 HxWx3 arrays, an NHWC batch, PIL images or image files)")
  return images


def _rgb(image: Any) -> np.ndarray:
  """A uint8 HxWx3 RGB array of a PIL image (upright, transparency on white, as decoding does), an image file
  (decoded in full, as transformers' image processors decode it) or an array."""
  if isinstance(image, (str, os.PathLike)):
    try:
      with open(image, "rb") as f:
        encoded = f.read()
    except OSError as e:
      raise UserError(f"images: cannot read {os.fspath(image)}: {e.strerror or e}") from e
    try:
      return transforms.decode_image(encoded)
    except transforms.DECODE_ERRORS as e:  # Pillow's UnidentifiedImageError is an OSError
      raise UserError(f"images: cannot decode {os.fspath(image)}: {e}") from e
  if isinstance(image, Image.Image):
    return np.asarray(transforms.on_white(transforms.upright(image)))
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise UserError(
      f"images: expected uint8 HxWx3 RGB arrays (or PIL images, image files); got {array.dtype} of shape {array.shape}"
    )
  return array


@functools.cache
def _openai_templates() -> tuple[str, ...]:
  """OpenAI's 80 ImageNet prompt templates, read once."""
  return tuple(zeroshot.class_names_and_templates("imagenet")[1])


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def _top_k(scores: np.ndarray, names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
  if k < 1:
    raise UserError(f"top_k={k}: must be positive")
  best = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
  return [[(names[j], float(row[j])) for j in order] for row, order in zip(scores, best)]
