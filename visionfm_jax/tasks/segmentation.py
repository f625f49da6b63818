"""Semantic segmentation (ADE20K, the scenes demo): a ViT or SwinV2 backbone + UPerNet (models/segmenter.py),
per-pixel softmax cross-entropy with ignore label 255, mIoU / pixel accuracy on the eval split.

config.model is the backbone (config_lib.model_config('vit' | 'swinv2') with num_classes=0); config.head holds
the rest:
  num_classes     classes of the masks (ADE20K 150; scenes 9, background included)
  neck_channels   ViT's simple feature pyramid width; neck_strides its nominal strides (ignored for SwinV2)
  head_channels   UPerNet's width; ppm_scales its pyramid-pooling bins; dropout before the classifier
  eval_window     inference window (0: config.model.image_size, the training crop); eval_stride its step
Evaluation (evaluator 'seg': eval/seg/miou, eval/seg/pixel_acc, eval/seg/mean_acc) runs on the eval canvas of
data/loader/dense.py (image_size x (seg_eval_width or image_size)): one whole-image pass when the canvas equals the
window, else mmseg's sliding-window inference (windows every eval_stride pixels, logits averaged on overlaps).

With gradient accumulation each micro-batch's loss is the mean over its own labelled pixels (as mmseg's
per-GPU mean). `train_flops_per_example` is None: the UPerNet head's convolutions are a large share of the
FLOPs (about a third for ViT-H at 512 px) and no analytic counter covers them, so no `train/mfu` is logged.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from visionfm_jax.data.loader import dense as dense_data
from visionfm_jax.data.transforms.dense_transforms import IGNORE
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate.segmentation import SegmentationEvaluator
from visionfm_jax.losses import pixels
from visionfm_jax.models import segmenter
from visionfm_jax.tasks.base import EvalContext, Task, check_dense_config

KIND = "segmentation"


def check_config(config) -> None:
  """ConfigError for a missing or inconsistent `config.head` / backbone setting."""
  check_dense_config(config, KIND)
  window = config.head.eval_window or config.model.image_size
  if config.model.name == "vit" and window != config.model.image_size:
    raise ConfigError(
      f"config.head.eval_window={config.head.eval_window}: a ViT's position embeddings fix its "
      f"input at config.model.image_size={config.model.image_size}; use 0 or that size"
    )
  if window < 1 or config.head.eval_stride < 1:
    raise ConfigError(
      f"config.head.eval_window={config.head.eval_window} / eval_stride={config.head.eval_stride}: "
      f"expected a positive stride (and window, or 0 for the crop size)"
    )


class SegmentationTask(Task):
  augments_on_device = False  # data/transforms/dense_transforms.py flips on the host, with the labels

  def __init__(self, config, mesh=None):
    check_config(config)
    super().__init__(config, mesh)  # self.model: the backbone, wrapped next
    head = config.head
    self.num_classes = int(head.num_classes)
    self.model = segmenter.Segmenter(
      backbone=self.model,
      num_classes=self.num_classes,
      neck_channels=head.neck_channels,
      head_channels=head.head_channels,
      ppm_scales=tuple(head.ppm_scales),
      neck_strides=tuple(head.neck_strides),
      dropout=head.dropout,
      dtype=self.dtype,
    )
    self.eval_window = int(head.eval_window or config.model.image_size)
    self.eval_stride = int(head.eval_stride)

  def logits(self, params, images, *, train: bool, rng=None):
    """(B, H, W, num_classes) fp32 logits at the input resolution."""
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params}, self.normalize(images), train=train, rngs=rngs).astype(jnp.float32)

  def loss(self, params, batch, rng):
    labels = batch["mask"]
    logits = self.logits(params, batch["image"], train=True, rng=rng)
    loss = pixels.segmentation_cross_entropy(logits, labels, IGNORE)
    labelled = (labels != IGNORE) & (labels >= 0) & (labels < self.num_classes)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & labelled)
    pixel_acc = correct / jnp.maximum(jnp.sum(labelled), 1)
    return loss, {"train/pixel_acc": pixel_acc}

  def predict(self, params, images):
    """Eval logits of whole eval canvases: one pass when the canvas is the window, else sliding windows."""
    if images.shape[1:3] == (self.eval_window, self.eval_window):
      return self.logits(params, images, train=False)
    return segmenter.sliding_window_logits(
      lambda crops: self.logits(params, crops, train=False),
      images,
      self.eval_window,
      self.eval_stride,
      self.num_classes,
    )

  @functools.cached_property
  def class_names(self) -> list[str]:
    return dense_data.class_names(self.config.data, KIND)

  def train_loader(self, *, batch_size: int, seed: int, process_index: int, process_count: int):
    self.check_class_count("config.head.num_classes", self.num_classes, what="segmentation classes")
    return dense_data.make_dense_train_loader(
      self.config.data, KIND, batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count
    )

  def evaluators(self, ctx: EvalContext):
    evaluator = SegmentationEvaluator(self.predict, ctx, self.num_classes, IGNORE)
    source = ctx.open_eval_source(self.config.data)

    def run_seg(params):
      batches = dense_data.make_dense_eval_iterator(
        self.config.data,
        KIND,
        batch_size=ctx.local_batch_size,
        process_index=ctx.process_index,
        process_count=ctx.process_count,
        source=source,
      )
      return evaluator(params, batches)

    return {"seg": run_seg}

  def synthetic_batch(self, batch_size, rng):
    size = self.config.data.image_size
    mask = rng.integers(0, self.num_classes, (batch_size, size, size), dtype=np.int32)
    mask[rng.random(mask.shape) < 0.05] = IGNORE
    return {**super().synthetic_batch(batch_size, rng), "mask": mask}
