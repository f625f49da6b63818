"""Image-text retrieval: recall@k in both directions over a held-out set of pairs.

For image i the true text is text i (and vice versa). rank = number of candidates scoring strictly higher
than the true pair, plus tied candidates at a lower index (ties favour the lower index, so a constant
scorer gets chance, not 100%); R@k = mean(rank < k).
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

KS = (1, 5, 10)


def ranks(scores: np.ndarray) -> np.ndarray:
  """Rank of the diagonal entry in each row of a (N, N) score matrix."""
  true = np.diag(scores)[:, None]
  lower = np.arange(scores.shape[1])[None, :] < np.arange(scores.shape[0])[:, None]
  return np.sum((scores > true) | ((scores == true) & lower), axis=1)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, ks=KS) -> dict[str, float]:
  """{'i2t_r1': ..., 't2i_r10': ...} for N matching pairs of embeddings (row i of each is pair i)."""
  scores = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
  i2t, t2i = ranks(scores), ranks(scores.T)
  out = {}
  for name, r in (("i2t", i2t), ("t2i", t2i)):
    out.update({f"{name}_r{k}": float(np.mean(r < k)) for k in ks})
  return out


class RetrievalEvaluator:
  """Embeds every eval pair on device, gathers the embeddings to every host, scores recall@k there."""

  def __init__(self, embed_pairs: Callable, ctx, ks=KS):
    self.ctx, self.ks = ctx, ks
    self._embed = jax.jit(lambda params, batch: embed_pairs(params, batch["image"], batch["text"]))

  def __call__(self, params, local_batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    images, texts = [], []
    for local in local_batches:
      batch = self.ctx.to_global(local)
      img, txt = self._embed(params, batch)
      mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True), bool)
      images.append(np.asarray(multihost_utils.process_allgather(img, tiled=True))[mask])
      texts.append(np.asarray(multihost_utils.process_allgather(txt, tiled=True))[mask])
    if not images:
      raise ValueError("the retrieval split yielded no batches")
    image_emb, text_emb = np.concatenate(images), np.concatenate(texts)
    return {**recall_at_k(image_emb, text_emb, self.ks), "count": float(len(image_emb))}
