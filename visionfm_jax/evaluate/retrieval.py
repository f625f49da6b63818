"""Image-text retrieval: recall@k in both directions, with any number of captions per image.

Caption c describes image caption_image[c]; held-out pairs are the case of one caption each (caption_image =
0..N-1), COCO and Flickr30k the case of about five (data/text/caption_sets.py), as papers report them.

A query's candidates are ordered by decreasing score, ties in index order (ties favour the lower index, so a
constant scorer gets chance, not 100%); its rank is the position of its first true candidate in that order:
the number of candidates scoring strictly higher than its best-scoring true one, plus the tied candidates at a
lower index than the lowest-indexed true one with that score. R@k = mean(rank < k). Image -> text: a hit when
ANY of the image's captions is among the top k captions; text -> image: the one true image among the top k.
Scores are cosine similarities (the embeddings are unit vectors) in float64.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
from jax.experimental import multihost_utils
import numpy as np

KS = (1, 5, 10)
CHUNK = 1024  # query rows scored at once: CHUNK x candidates float64 (200 MB for COCO's 25k captions)


def ranks(scores: np.ndarray, true: np.ndarray | None = None) -> np.ndarray:
  """Rank of each row's first true candidate (module docstring) in a (Q, C) score matrix; `true` (Q, C) bool
  marks the true candidates, at least one a row; None: the diagonal (pairs). NaN scores count as -inf."""
  if true is None:
    true = np.eye(*scores.shape, dtype=bool)
  scores = np.where(np.isnan(scores), -np.inf, scores)  # a NaN embedding scores last, never a hit by a tie
  if not np.all(np.any(true, axis=1)):
    raise ValueError("ranks: a query has no true candidate")
  true_scores = np.where(true, scores, -np.inf)
  best = np.max(true_scores, axis=1, keepdims=True)
  first = np.argmax(true & (true_scores == best), axis=1)[:, None]  # lowest index among the best true ones
  lower = np.arange(scores.shape[1])[None, :] < first
  return np.sum((scores > best) | ((scores == best) & lower), axis=1)


def recall_at_k(
  image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray | None = None, ks=KS
) -> dict[str, float]:
  """{'i2t_r1': ..., 't2i_r10': ...} of N image and C caption embeddings, caption c describing image
  caption_image[c] (int (C,)); None: C = N pairs, row i of each is pair i. Every image needs a caption."""
  image_emb, text_emb = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
  num_images = len(image_emb)
  owner = np.arange(num_images) if caption_image is None else np.asarray(caption_image)
  if owner.shape != (len(text_emb),) or (owner.size and not 0 <= owner.min() <= owner.max() < num_images):
    raise ValueError(
      f"recall_at_k: caption_image {owner.shape} must give each of the {len(text_emb)} captions "
      f"an image index in [0, {num_images})"
    )
  uncaptioned = num_images - len(np.unique(owner))
  if uncaptioned:
    raise ValueError(f"recall_at_k: {uncaptioned} of the {num_images} images have no caption")
  images = np.arange(num_images)
  i2t = np.concatenate(
    [
      ranks(image_emb[a : a + CHUNK] @ text_emb.T, owner[None, :] == images[a : a + CHUNK, None])
      for a in range(0, num_images, CHUNK)
    ]
  )
  t2i = np.concatenate(
    [
      ranks(text_emb[a : a + CHUNK] @ image_emb.T, images[None, :] == owner[a : a + CHUNK, None])
      for a in range(0, len(text_emb), CHUNK)
    ]
  )
  out = {}
  for name, r in (("i2t", i2t), ("t2i", t2i)):
    out.update({f"{name}_r{k}": float(np.mean(r < k)) for k in ks})
  return out


def _gathered(tree):
  """Every process's rows of the global arrays in `tree`, as numpy, on every host."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class RetrievalEvaluator:
  """Held-out pairs: embeds every eval pair on device, gathers the embeddings to every host, scores recall@k
  there (one caption per image)."""

  def __init__(self, embed_pairs: Callable, ctx, ks=KS):
    self.ctx, self.ks = ctx, ks
    self._embed = jax.jit(lambda params, batch: embed_pairs(params, batch["image"], batch["text"]))

  def __call__(self, params, local_batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    images, texts = [], []
    for local in local_batches:
      batch = self.ctx.to_global(local)
      img, txt, mask = _gathered((*self._embed(params, batch), batch["mask"]))
      images.append(img[mask.astype(bool)])
      texts.append(txt[mask.astype(bool)])
    if not images:
      raise ValueError("the retrieval split yielded no batches")
    image_emb, text_emb = np.concatenate(images), np.concatenate(texts)
    return {**recall_at_k(image_emb, text_emb, ks=self.ks), "count": float(len(image_emb))}


class CaptionRetrievalEvaluator:
  """A retrieval benchmark with several captions per image (data/text/caption_sets.py): images and captions are
  embedded separately, each in batches sharded over the processes, gathered to every host by their index.

  `embed_images(params, images)` / `embed_texts(params, tokens)` -> unit embeddings, called as given (pass jitted
  functions; several benchmarks share their compilations). `image_batches()` / `caption_batches()` -> this
  process's local batches {'image' | 'text', 'index', 'mask'} (caption_sets.image_batches, caption_batches).
  Images the pipeline could not decode (mask False throughout) are left out with their captions; 'count' (images)
  and 'captions' say how many were scored.
  """

  def __init__(
    self,
    embed_images: Callable,
    embed_texts: Callable,
    caption_image: np.ndarray,
    image_batches: Callable[[], Iterable],
    caption_batches: Callable[[], Iterable],
    ctx,
    ks=KS,
  ):
    self.embed_images, self.embed_texts = embed_images, embed_texts
    self.caption_image = np.asarray(caption_image)
    self.image_batches, self.caption_batches = image_batches, caption_batches
    self.ctx, self.ks = ctx, ks

  def _embed_all(self, embed, params, local_batches, key: str, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(total, D) float32 embeddings by index, and which indices some process embedded."""
    out, seen = None, np.zeros((total,), bool)
    for local in local_batches:
      batch = self.ctx.to_global(local)
      emb, index, mask = _gathered((embed(params, batch[key]), batch["index"], batch["mask"]))
      rows = index[mask.astype(bool)]
      if out is None:
        out = np.zeros((total, emb.shape[-1]), np.float32)
      out[rows], seen[rows] = emb[mask.astype(bool)], True
    if out is None:
      raise ValueError(f"the retrieval benchmark yielded no {key} batches")
    return out, seen

  def embeddings(self, params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_emb (N', D), text_emb (C', D), caption_image (C',)) of the images scored and their captions."""
    num_images = int(self.caption_image.max()) + 1
    image_emb, decoded = self._embed_all(self.embed_images, params, self.image_batches(), "image", num_images)
    text_emb, embedded = self._embed_all(
      self.embed_texts, params, self.caption_batches(), "text", len(self.caption_image)
    )
    if not embedded.all():
      raise ValueError(f"caption batches left out {np.sum(~embedded)} captions")
    keep = decoded[self.caption_image]
    new_index = np.cumsum(decoded) - 1  # image i -> its row among the decoded ones
    return image_emb[decoded], text_emb[keep], new_index[self.caption_image[keep]]

  def __call__(self, params) -> dict[str, float]:
    image_emb, text_emb, caption_image = self.embeddings(params)
    if not len(image_emb):
      raise ValueError("the retrieval benchmark has no decodable image")
    return {
      **recall_at_k(image_emb, text_emb, caption_image, self.ks),
      "count": float(len(image_emb)),
      "captions": float(len(text_emb)),
    }
