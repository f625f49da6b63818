"""Supervised image classification (ViT-Huge-Pretrain on ImageNet-21K): softmax cross-entropy, top-1; with
config.probe, k-NN and linear-probe top-1 of the frozen pooled features (evaluate/probe.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from visionfm_jax import data
from visionfm_jax.evaluate import classification as classification_eval
from visionfm_jax.evaluate import panels, probe
from visionfm_jax.tasks.base import EvalContext, Task

PANEL_EXAMPLES = 8


class ClassificationTask(Task):
  def logits(self, params, inputs, *, train: bool, rng=None):
    """fp32 logits of normalised `inputs` (train_images or normalize)."""
    rngs = {"dropout": rng} if rng is not None else {}
    out = self.model.apply({"params": params}, inputs, train=train, rngs=rngs)
    return out["logits"].astype(jnp.float32)

  def loss(self, params, batch, rng):
    logits = self.logits(params, self.train_images(batch), train=True, rng=rng)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"train/top1": top1}

  def train_loader(self, *, batch_size: int, seed: int, process_index: int, process_count: int):
    # Exact: the loaders label by the data's class names (a mixture's union of them), so a larger head only adds
    # outputs no label names; a new set of classes gets a fresh head (config.init_from_skip='head').
    self.check_class_count("config.model.num_classes", self.config.model.num_classes, exact=True)
    return data.make_train_loader(
      self.config.data,
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      num_classes=self.config.model.num_classes,
    )

  def evaluators(self, ctx: EvalContext):
    def predict(params, images):
      return self.logits(params, self.normalize(images), train=False)

    top1 = classification_eval.TopKEvaluator(predict, ctx, ks=(1, 5))
    source = ctx.open_eval_source(self.config.data)

    def run_val(params):
      batches = data.make_eval_iterator(
        self.config.data,
        batch_size=ctx.local_batch_size,
        process_index=ctx.process_index,
        process_count=ctx.process_count,
        source=source,
      )
      return top1(params, batches)

    return {"val": run_val, **probe.evaluators(self, ctx)}

  def panel(self, ctx: EvalContext):
    """PANEL_EXAMPLES validation images, each with its true class and the 3 most probable ones."""
    source = ctx.open_eval_source(self.config.data)
    names = panels.class_names_or_numbers(lambda: self.class_names, self.config.model.num_classes)
    probabilities = jax.jit(
      lambda params, batch: jax.nn.softmax(self.logits(params, self.normalize(batch["image"]), train=False), -1)
    )

    def draw(params):
      batches = data.make_eval_iterator(
        self.config.data,
        batch_size=ctx.local_batch_size,
        process_index=ctx.process_index,
        process_count=ctx.process_count,
        source=source,
      )
      rows = panels.first_rows(probabilities, params, next(iter(batches)), ctx, PANEL_EXAMPLES)
      cells = [
        panels.Cell(image, (f"true: {names[label]}", *panels.top_k(p, names)))
        for image, label, p, valid in zip(rows["image"], rows["label"], rows["out"], rows["mask"])
        if valid
      ]
      return panels.render([cells], "true class; top-3 predicted")

    return draw

  def synthetic_batch(self, batch_size, rng):
    labels = rng.integers(0, self.config.model.num_classes, (batch_size,), dtype=np.int32)
    return {**super().synthetic_batch(batch_size, rng), "label": labels}
