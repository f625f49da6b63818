"""Top-k accuracy over a held-out split, with padded final batches masked out."""

from __future__ import annotations

from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from visionfm_jax.evaluate.sums import SumsEvaluator


class TopKEvaluator:
  """Counts correct top-k predictions on device; sums are global (every process gets the same numbers)."""

  def __init__(self, predict: Callable, ctx, ks=(1, 5)):
    self.ctx = ctx
    self.ks = ks

    def counts(params, batch):
      logits = predict(params, batch["image"])
      labels = batch["label"]
      mask = batch["mask"].astype(jnp.float32)
      true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
      # Ties count against the true class when they sit at a lower index (as argmax breaks them), so a
      # constant predictor scores chance, not 100%.
      lower = jnp.arange(logits.shape[-1])[None, :] < labels[:, None]
      rank = jnp.sum((logits > true) | ((logits == true) & lower), axis=-1)
      out = {f"top{k}": jnp.sum((rank < k) * mask) for k in ks if k <= logits.shape[-1]}
      out["count"] = jnp.sum(mask)
      return out

    def rates_and_count(totals):
      return {name: v if name == "count" else v / max(totals["count"], 1.0) for name, v in totals.items()}

    self._sums = SumsEvaluator(counts, rates_and_count, ctx)

  def __call__(
    self, params, local_batches: Iterable[dict[str, np.ndarray]], with_count: bool = False
  ) -> dict[str, float]:
    """{'top1', 'top5'} over the examples of `local_batches` (plus 'count', how many, `with_count`)."""
    out = self._sums(params, local_batches)
    return out if with_count else {k: v for k, v in out.items() if k != "count"}
