"""Zero-shot classification: class names x prompt templates -> one text embedding per class, then top-k.

Each class embedding is the mean of its L2-normalised prompt embeddings, normalised again (CLIP's prompt
ensembling). Images are classified by cosine similarity with the class embeddings; the counting (masked
padding rows, ties) is `classification.TopKEvaluator`'s.
"""

from __future__ import annotations

import importlib.resources
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.data import shapes
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate.classification import TopKEvaluator

ZEROSHOT_SETS = ("imagenet", "imagenet_simple", "shapes")


def read_lines(name: str) -> list[str]:
  """A shipped data file (`evaluate/assets/<name>`), one entry per line."""
  text = importlib.resources.files("visionfm_jax.evaluate").joinpath("assets", name).read_text(encoding="utf-8")
  return [line.strip() for line in text.splitlines() if line.strip()]


def class_names_and_templates(name: str) -> tuple[list[str], list[str]]:
  """(class names, prompt templates) of a zero-shot benchmark, the one place they come from.

  'imagenet': OpenAI's curated names of the 1000 ImageNet classes and its 80 prompt templates (CLIP, Radford et
  al. 2021) in OpenAI's order, the protocol behind published zero-shot figures (the assets are generated from
  open_clip's zero_shot_metadata.py; OpenAI names two classes 'missile' and two 'sunglasses'); 'imagenet_simple':
  the same names with 8 of those templates (faster, about a point lower); 'shapes': the embedded set's 8 shapes, with prompts in the grammar
  of its captions ('a large red {}'), every size and colour, so that the ensemble averages them out.
  """
  if name in ("imagenet", "imagenet_simple"):
    names = [line.split("\t", 1)[1] for line in read_lines("imagenet_classes.txt")]
    return names, read_lines("imagenet_templates.txt" if name == "imagenet" else "imagenet_simple_templates.txt")
  if name == "shapes":
    templates = [f"a {size} {colour} {{}}" for size in ("large", "small") for colour in shapes.COLOUR_NAMES]
    return list(shapes.SHAPE_NAMES), templates
  raise ConfigError(f"config.eval.zeroshot_classes={name!r}: expected one of {ZEROSHOT_SETS}")


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Class-major list: all templates of class 0, then class 1, ..."""
  return [t.format(name) for name in class_names for t in templates]


def class_embeddings(embed_texts: Callable, params, tokens: np.ndarray, num_classes: int,
                     chunk: int = 1024) -> jax.Array:
  """(num_classes, D) unit class embeddings from (num_classes * T, L) prompt tokens."""
  parts = [embed_texts(params, jnp.asarray(tokens[i:i + chunk])) for i in range(0, len(tokens), chunk)]
  emb = jnp.concatenate(parts).astype(jnp.float32)
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  emb = emb.reshape(num_classes, -1, emb.shape[-1]).mean(axis=1)
  return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)


class ZeroShotEvaluator:
  """top-1 / top-5 of images against text embeddings of their class names."""

  def __init__(self, embed_images: Callable, embed_texts: Callable, prompt_tokens: np.ndarray, num_classes: int,
               ctx, ks=(1, 5)):
    self.prompt_tokens, self.num_classes = prompt_tokens, num_classes
    self._embed_texts = jax.jit(embed_texts)

    def predict(params_and_classes, images):
      params, classes = params_and_classes
      return embed_images(params, images).astype(jnp.float32) @ classes.T

    self._topk = TopKEvaluator(predict, ctx, ks)

  def __call__(self, params, local_batches) -> dict[str, float]:
    """{'top1', 'top5', 'count'}: 'count' is the number of images scored, to check a protocol's coverage (the
    50,000 of ImageNet's validation split)."""
    classes = class_embeddings(self._embed_texts, params, self.prompt_tokens, self.num_classes)
    return self._topk((params, classes), local_batches, with_count=True)
