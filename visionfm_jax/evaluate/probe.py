"""Frozen-backbone evaluation: k-NN and linear-probe top-1 on a backbone's pooled features.

Features: every example of a labelled split through the backbone (`pooled_features`: an image backbone of
models/backbone.py, ViT or SwinV2, a CLIP's image tower, Aurora's encoder, a dense model's backbone), read by
the eval pipeline (full decode, central crop, no augmentation: deterministic), gathered to every process, which then
all compute the same numbers.

  k-NN (Wu et al. 2018, as DINO evaluates, Caron et al. 2021): cosine similarity of L2-normalised features;
    the k nearest train examples vote for their class with weight exp(similarity / T); top-1 of the votes.
    Defaults k = 20, T = 0.07.
  Linear probe: features standardised by the train split's mean and std, then softmax regression (weights and
    bias, penalty l2 / 2 * |W|^2 on the weights) fitted to the train features full-batch with L-BFGS (optax.lbfgs,
    zoom line search) for a fixed number of iterations from zeros: deterministic and no learning rate to tune.
    Defaults 100 iterations, l2 = 1e-4.

`config.probe` picks the splits and turns the two evaluators on (logged as eval/knn/top1 and
eval/linear_probe/top1); `tools.probe` runs them on a workdir's checkpoint.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from visionfm_jax import data
from visionfm_jax.data.sources.registry import eval_source_spec
from visionfm_jax.errors import ConfigError
from visionfm_jax.models.backbone import image_tower

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------- features


def pooled_features(task) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, uint8 images) -> fp32 (B, D) pooled features of the task's image backbone (before any head)."""
  model = task.model
  tower = image_tower(model)
  if tower is None:
    raise ConfigError(
      f"config.model.name={task.config.model.name!r}: probing needs a ViT or SwinV2 backbone "
      f"(a classifier's, a CLIP's image tower, Aurora's encoder)"
    )
  name = tower[1]
  method = lambda m, images: (getattr(m, name) if name else m)(images, train=False)["pooled"]

  def features(params, images):
    return model.apply({"params": params}, task.normalize(images), method=method).astype(jnp.float32)

  return features


def extract(features: Callable, params, local_batches, ctx) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) float32 features and (N,) labels of every real example (mask True) of the split, in split order, on
  every process. `features` is jitted by the caller."""
  feats, labels = [], []
  for local in local_batches:
    batch = ctx.to_global(local)
    out = features(params, batch["image"])
    mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True), bool)
    feats.append(np.asarray(multihost_utils.process_allgather(out, tiled=True), np.float32)[mask])
    labels.append(np.asarray(multihost_utils.process_allgather(batch["label"], tiled=True), np.int32)[mask])
  if not feats:
    raise ValueError("the probe split yielded no batches")
  return np.concatenate(feats), np.concatenate(labels)


# Train rows are zero-padded (and masked) to a multiple of ROW_BUCKET, test rows to CHUNK, so that probes of
# nearby sizes (evaluations during training, tools.probe with other --config.probe.*_examples) share one compile.
ROW_BUCKET = 1024
CHUNK = 1024


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  return np.pad(x, [(0, -len(x) % multiple)] + [(0, 0)] * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_votes(train_x, train_y, train_valid, queries, temperature, *, k: int, num_classes: int):
  sims = jnp.where(train_valid, jnp.matmul(queries, train_x.T, precision=HIGHEST), -jnp.inf)
  top, idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top / temperature)
  return jnp.sum(jax.nn.one_hot(train_y[idx], num_classes) * weights[..., None], axis=1)


def knn_top1(
  train_x, train_y, test_x, test_y, *, k: int = 20, temperature: float = 0.07, num_classes: int | None = None
) -> float:
  """Top-1 of the weighted k-NN vote: cosine similarity, the k nearest train rows vote exp(similarity / T)."""
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  num_classes = num_classes or int(max(np.max(train_y), np.max(test_y))) + 1
  n = len(train_y)
  train = [
    jax.device_put(_pad_rows(a, ROW_BUCKET))
    for a in (normalise(np.asarray(train_x, np.float32)), np.asarray(train_y, np.int32), np.ones(n, bool))
  ]
  test_x, test_y = normalise(np.asarray(test_x, np.float32)), np.asarray(test_y)
  correct = 0
  for start in range(0, len(test_y), CHUNK):
    queries = jax.device_put(_pad_rows(test_x[start : start + CHUNK], CHUNK))
    votes = np.asarray(_knn_votes(*train, queries, jnp.float32(temperature), k=min(k, n), num_classes=num_classes))
    labels = test_y[start : start + CHUNK]
    correct += int(np.sum(np.argmax(votes[: len(labels)], axis=1) == labels))
  return correct / max(len(test_y), 1)


# ------------------------------------------------------------------------------------------ linear probe


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_linear(x, y, valid, l2, *, num_classes: int, steps: int):
  def loss(w, x, y, valid):
    logits = jnp.matmul(x, w["kernel"], precision=HIGHEST) + w["bias"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(ce * valid) / jnp.sum(valid) + 0.5 * l2 * jnp.sum(jnp.square(w["kernel"]))

  value_fn = functools.partial(loss, x=x, y=y, valid=valid)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(value_fn)

  def step(_, carry):
    w, state = carry
    value, grad = value_and_grad(w, state=state)
    updates, state = solver.update(grad, state, w, value=value, grad=grad, value_fn=value_fn)
    return optax.apply_updates(w, updates), state

  w = {"kernel": jnp.zeros((x.shape[1], num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}
  w, _ = jax.lax.fori_loop(0, steps, step, (w, solver.init(w)))
  return w, value_fn(w)


def linear_probe_top1(
  train_x, train_y, test_x, test_y, *, steps: int = 100, l2: float = 1e-4, num_classes: int | None = None
) -> tuple[float, float]:
  """(top-1 on the test features, final train objective) of the L-BFGS softmax regression."""
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
  num_classes = num_classes or int(max(np.max(train_y), np.max(test_y))) + 1
  rows = [
    _pad_rows(a, ROW_BUCKET)
    for a in ((train_x - mean) / std, np.asarray(train_y, np.int32), np.ones(len(train_y), np.float32))
  ]
  w, objective = _fit_linear(*map(jax.device_put, rows), jnp.float32(l2), num_classes=num_classes, steps=int(steps))
  logits = np.asarray((test_x - mean) / std, np.float64) @ np.asarray(w["kernel"], np.float64) + np.asarray(w["bias"])
  return float(np.mean(np.argmax(logits, axis=1) == test_y)), float(objective)


# ------------------------------------------------------------------------------------------- evaluators


def split_config(probe_cfg, data_cfg, which: str):
  """A copy of config.data whose eval split is the probe's `which` ('train' or 'eval') split."""
  cfg = data_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    if which == "train":
      cfg.eval_source = probe_cfg.source or data_cfg.source
      cfg.eval_split = probe_cfg.train_split or data_cfg.train_split
      cfg.eval_examples = probe_cfg.train_examples
    else:
      cfg.eval_source = probe_cfg.source or eval_source_spec(data_cfg)
      if probe_cfg.eval_examples > 0:
        cfg.eval_examples = probe_cfg.eval_examples
  return cfg


class FeatureProbe:
  """Extracts train and eval features of the params once, then scores the k-NN and the linear probe."""

  def __init__(self, features: Callable, probe_cfg, data_cfg, ctx):
    self.cfg, self.ctx = probe_cfg, ctx
    self._features = jax.jit(features)
    self._splits = {w: split_config(probe_cfg, data_cfg, w) for w in ("train", "eval")}
    what = f"config.probe.source={probe_cfg.source!r}" if probe_cfg.source else None
    self._sources = {w: ctx.open_eval_source(cfg, what) for w, cfg in self._splits.items()}  # fail at start-up

  def features(self, params, which: str) -> tuple[np.ndarray, np.ndarray]:
    batches = data.make_eval_iterator(
      self._splits[which],
      batch_size=self.ctx.local_batch_size,
      process_index=self.ctx.process_index,
      process_count=self.ctx.process_count,
      source=self._sources[which],
    )
    return extract(self._features, params, batches, self.ctx)

  def __call__(self, params, which=("knn", "linear_probe")) -> dict[str, dict[str, float]]:
    t0 = time.perf_counter()
    (train_x, train_y), (test_x, test_y) = self.features(params, "train"), self.features(params, "eval")
    logging.info(
      "probe: %d train and %d eval features of width %d in %.1fs",
      len(train_y),
      len(test_y),
      train_x.shape[1],
      time.perf_counter() - t0,
    )
    return self.score((train_x, train_y), (test_x, test_y), which)

  def score(self, train, test, which=("knn", "linear_probe")) -> dict[str, dict[str, float]]:
    """{'knn': {'top1'}, 'linear_probe': {'top1', 'train_objective'}} of (features, labels) pairs."""
    (train_x, train_y), (test_x, test_y) = train, test
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    out = {}
    if "knn" in which:
      out["knn"] = {
        "top1": knn_top1(
          train_x,
          train_y,
          test_x,
          test_y,
          k=self.cfg.knn_k,
          temperature=self.cfg.knn_temperature,
          num_classes=num_classes,
        )
      }
    if "linear_probe" in which:
      top1, objective = linear_probe_top1(
        train_x, train_y, test_x, test_y, steps=self.cfg.linear_steps, l2=self.cfg.linear_l2, num_classes=num_classes
      )
      out["linear_probe"] = {"top1": top1, "train_objective": objective}
    return out


def evaluators(task, ctx) -> dict[str, Callable[[Any], dict[str, float]]]:
  """{'knn': ..., 'linear_probe': ...} as config.probe turns them on. Both share one feature extraction per
  params: the loop calls them one after the other with the same params."""
  probe_cfg = task.config.probe
  names = [n for n, on in (("knn", probe_cfg.knn), ("linear_probe", probe_cfg.linear)) if on]
  if not names:
    return {}
  probe = FeatureProbe(pooled_features(task), probe_cfg, task.config.data, ctx)
  cache: dict[str, Any] = {}

  def evaluator(name):
    def evaluate(params):
      if cache.get("params") is not params:
        cache.clear()
        cache.update(params=params, results=probe(params, names), served=set())
      cache["served"].add(name)
      result = cache["results"][name]
      if cache["served"] == set(names):
        cache.clear()  # do not hold on to the params
      return result

    return evaluate

  return {name: evaluator(name) for name in names}
