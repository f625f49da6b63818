"""Held-out losses: sum per-batch statistics over a split on device, then finish them into metrics.

`stats(params, global_batch) -> {name: scalar sum}` runs jitted; the sums are global (every process gets the
same numbers); `finish(totals) -> {metric: float}` turns them into means, perplexities, ...
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np


class SumsEvaluator:
  def __init__(self, stats: Callable, finish: Callable[[dict[str, float]], dict[str, float]], ctx):
    self.ctx, self.finish = ctx, finish
    self._stats = jax.jit(stats)

  def __call__(self, params, local_batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    totals = None
    for local in local_batches:
      s = self._stats(params, self.ctx.to_global(local))
      totals = s if totals is None else jax.tree.map(jnp.add, totals, s)
    if totals is None:
      raise ValueError("the evaluation split yielded no batches")
    return self.finish({k: float(v) for k, v in jax.device_get(totals).items()})


def perplexity(sum_nll: float, count: float) -> float:
  """exp(mean token negative log-likelihood); inf for an empty split."""
  return math.exp(sum_nll / count) if count > 0 else math.inf


def unigram_perplexity(token_batches: Iterable[np.ndarray], pad_id: int = 0) -> float:
  """Perplexity of the best context-free model of the predicted tokens (text[:, 1:], non-pad): exp of the
  entropy of their frequencies. A captioner that beats it on held-out pairs uses the image or the context."""
  counts: dict[int, int] = {}
  for tokens in token_batches:
    labels = np.asarray(tokens)[:, 1:]
    ids, n = np.unique(labels[labels != pad_id], return_counts=True)
    for i, c in zip(ids.tolist(), n.tolist()):
      counts[i] = counts.get(i, 0) + c
  freq = np.asarray(list(counts.values()), np.float64)
  if not len(freq):
    raise ValueError("no tokens to count")
  p = freq / freq.sum()
  return float(np.exp(-np.sum(p * np.log(p))))
