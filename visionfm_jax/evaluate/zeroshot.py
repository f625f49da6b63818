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

from visionfm_jax.evaluate.classification import TopKEvaluator


def read_lines(name: str) -> list[str]:
  """A shipped data file (`evaluate/assets/<name>`), one entry per line."""
  text = importlib.resources.files("visionfm_jax.evaluate").joinpath("assets", name).read_text(encoding="utf-8")
  return [line.strip() for line in text.splitlines() if line.strip()]


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
    classes = class_embeddings(self._embed_texts, params, self.prompt_tokens, self.num_classes)
    return self._topk((params, classes), local_batches)
