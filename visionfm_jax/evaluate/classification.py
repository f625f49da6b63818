"""Top-k accuracy over a held-out split, with padded final batches masked out."""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.evaluate import sums


class TopKEvaluator:
  """Counts correct top-k predictions on device; sums are global (every process gets the same numbers).

  `predict(params, images) -> (B, classes) scores` is called as given, each batch, before the counting program:
  pass a jitted function, which the task's other evaluators and its panel may share (`Task.jitted`)."""

  def __init__(self, predict: Callable, ctx, ks=(1, 5)):
    self.predict, self.ctx, self.ks = predict, ctx, ks
    self._counts = jax.jit(functools.partial(_counts, ks=ks))

  def __call__(self, params, local_batches: Iterable[dict[str, np.ndarray]], with_count: bool = False
               ) -> dict[str, float]:
    """{'top1', 'top5'} over the examples of `local_batches` (plus 'count', how many, `with_count`)."""
    totals = sums.totals(lambda batch: self._counts(self.predict(params, batch["image"]), batch["label"],
                                                    batch["mask"]), local_batches, self.ctx)
    out = {name: v if name == "count" else v / max(totals["count"], 1.0) for name, v in totals.items()}
    return out if with_count else {k: v for k, v in out.items() if k != "count"}


def _counts(logits, labels, mask, *, ks):
  mask = mask.astype(jnp.float32)
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  # Ties count against the true class when they sit at a lower index (as argmax breaks them), so a constant
  # predictor scores chance, not 100%.
  lower = jnp.arange(logits.shape[-1])[None, :] < labels[:, None]
  rank = jnp.sum((logits > true) | ((logits == true) & lower), axis=-1)
  out = {f"top{k}": jnp.sum((rank < k) * mask) for k in ks if k <= logits.shape[-1]}
  out["count"] = jnp.sum(mask)
  return out
