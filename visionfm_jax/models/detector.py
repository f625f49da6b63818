"""Object detection, OneNet-style (Sun et al. 2021): a dense set predictor trained with one-to-one matching.

Backbone (our ViT or SwinV2, params under `backbone` named as in pretraining) -> `neck` (ViT: ViTDet's simple
feature pyramid at the nominal `levels`; SwinV2: an FPN over the stages whose stride is in `levels`, with a
LayerNorm per stage output) -> `head` (`DenseDetectionHead`, shared across levels). Every location of every
level predicts sigmoid class logits and a box; training matches predictions to targets one-to-one (Hungarian,
cost = focal class cost + L1 + GIoU, see `matching`), so inference needs no NMS: `evaluate.detection.top_k_detections`
keeps the k best (location, class) scores.

`Detector.__call__(images, train)` -> {"logits": (B, Q, C) fp32, "boxes": (B, Q, 4) fp32 xyxy divided by the
image size (may reach slightly past [0, 1])}, Q = locations of all levels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from visionfm_jax.models import dense_heads


def check_levels(backbone, levels, name: str = "levels") -> None:
  """ValueError naming `name` when `backbone` (an image backbone) cannot predict at `levels`: none, a repeated
  one, or for a hierarchical backbone (SwinV2) a stride none of its stages has. A plain backbone (ViT) takes
  any: its pyramid resamples to each."""
  if not levels or len(set(levels)) != len(levels):
    raise ValueError(f"{name}={tuple(levels)}: expected distinct strides, at least one")
  strides = [int(s) for s in backbone.feature_strides()]
  if len(strides) > 1 and not set(levels) <= set(strides):
    raise ValueError(f"{name}={tuple(levels)}: the backbone's stages have strides {strides}")


class Detector(dense_heads.DenseModel):
  num_classes: int
  levels: tuple[int, ...] = (8, 16, 32)  # nominal strides of the pyramid levels that predict
  neck_channels: int = 256
  head_channels: int = 256
  num_convs: int = 2
  prior_prob: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    maps, strides = dense_heads.backbone_maps(self.backbone, images, train)
    check_levels(self.backbone, self.levels)
    if len(maps) == 1:  # a plain backbone (ViT): ViTDet's simple pyramid
      maps, strides = dense_heads.SimpleFeaturePyramid(
        int(strides[0]), self.neck_channels, self.levels, self.dtype, name="neck"
      )(maps[0])
    else:
      picked = [i for i, s in enumerate(strides) if int(s) in self.levels]
      maps = dense_heads.FPN(self.neck_channels, input_norms=True, dtype=self.dtype, name="neck")(
        [maps[i] for i in picked]
      )
      strides = [strides[i] for i in picked]
    return dense_heads.DenseDetectionHead(
      self.num_classes, self.head_channels, self.num_convs, self.prior_prob, self.dtype, name="head"
    )(maps, strides, images.shape[1:3])
