"""Necks and heads for dense prediction on our backbones: ViTDet's simple feature pyramid, an FPN (optionally
with UPerNet's pyramid pooling on the top level), the UPerNet segmentation head and a OneNet-style dense
detection head.

Maps are channels-last (B, H, W, C), listed finest first, each with its stride in input pixels.
- `backbone_maps`: the backbone's `feature_maps` (models/backbone.py). A plain backbone gives one map (ViT: the
  patch tokens after the final norm at stride p, class token dropped), a hierarchical one every stage's output
  (SwinV2: before the next patch merging, strides patch * 2**s, no norm: the FPN adds one LayerNorm per input
  level with `input_norms`, as UPerNet-on-Swin does).
- `SimpleFeaturePyramid` (Li et al. 2022): from the stride-p ViT map, 2x2 stride-2 transposed convs (LN + GELU
  between two of them) up, identity, or 2x2 max-pools down, round(log2(s / p)) steps for a nominal stride s
  (p = 16: 4, 8, 16, 32 -> two up, one up, none, one down; p = 14 gives the same steps, so strides 3.5 ... 28);
  then a 1x1 and a 3x3 conv, each with a norm, per level.
- `FPN` (Lin et al. 2017) with `ppm_scales`: UPerNet's (Xiao et al. 2018) pyramid pooling replaces the top
  lateral; lateral 1x1 convs, top-down bilinear upsampling and adds, 3x3 output convs.
- `UPerHead`: FPN with pyramid pooling, all levels upsampled to the finest and concatenated, a 3x3 fuse conv,
  dropout and a 1x1 per-pixel classifier (fp32 logits at the finest level).
- `DenseDetectionHead` (OneNet, Sun et al. 2021): a small conv tower shared across levels; every location
  predicts sigmoid class logits and (l, t, r, b) = exp(raw) * stride distances from its centre.

Norms are LayerNorms over channels in fp32 where mmseg/mmdet use BatchNorm: they need no batch statistics and
give the same result whatever the data-parallel split. Conv kernels carry logical names (None, None, embed,
None): under zero3 the input channels shard over fsdp. Params are fp32, `dtype` is the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.models import backbone as backbone_lib
from visionfm_jax.models import layers, towers
from visionfm_jax.models.layers import CLASSES, EMBED

# mmseg / detectron2 initialise convs feeding ReLUs with He normal over the fan-out.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
NORM_EPS = 1e-6
ACTIVATIONS = {"relu": nn.relu, "gelu": lambda x: nn.gelu(x, approximate=False), None: lambda x: x}


def conv(
  features: int,
  kernel: int,
  dtype: Any,
  *,
  strides: int = 1,
  use_bias: bool = True,
  transpose: bool = False,
  kernel_init=CONV_INIT,
  bias_init=nn.initializers.zeros,
  out_axis: str | None = None,
  name: str | None = None,
) -> nn.Module:
  """A k x k conv (SAME padding) or, with `transpose`, a k x k stride-k transposed conv, fp32 params."""
  names = (None, None, EMBED, out_axis)
  kwargs = dict(
    features=features,
    kernel_size=(kernel, kernel),
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=layers.logical(kernel_init, names),
    bias_init=layers.logical(bias_init, (out_axis,)),
    name=name,
  )
  if transpose:
    return nn.ConvTranspose(strides=(kernel, kernel), padding="VALID", **kwargs)
  return nn.Conv(strides=(strides, strides), padding="SAME", **kwargs)


def _interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out, in) linear interpolation weights with half-pixel centres, sources clamped to the edge pixels."""
  src = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, in_size - 1)
  weights = np.zeros((out_size, in_size), np.float32)
  np.add.at(weights, (np.arange(out_size), lo), 1 - (src - lo))
  np.add.at(weights, (np.arange(out_size), hi), src - lo)
  return weights


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C), bilinear with half-pixel centres and no antialiasing (PyTorch's
  `interpolate(mode='bilinear', align_corners=False)`), as two matmuls with constant weights (cheaper to
  compile than `jax.image.resize`, same values)."""
  size = tuple(int(s) for s in size)
  if tuple(x.shape[1:3]) == size:
    return x
  rows = jnp.asarray(_interpolation_matrix(size[0], x.shape[1]), x.dtype)
  cols = jnp.asarray(_interpolation_matrix(size[1], x.shape[2]), x.dtype)
  return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols)


def _pool_matrix(size: int, bins: int) -> np.ndarray:
  """(bins, size) averaging weights of PyTorch's adaptive pooling: bin i covers [floor(i n / b), ceil((i+1) n / b))."""
  weights = np.zeros((bins, size), np.float32)
  for i in range(bins):
    lo, hi = (i * size) // bins, -(-((i + 1) * size) // bins)
    weights[i, lo:hi] = 1.0 / (hi - lo)
  return weights


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  """(B, H, W, C) -> (B, bins, bins, C) as PyTorch's `adaptive_avg_pool2d`; fp32 accumulation."""
  rows, cols = _pool_matrix(x.shape[1], bins), _pool_matrix(x.shape[2], bins)
  pooled = jnp.einsum("ih,bhwc,jw->bijc", rows, x.astype(jnp.float32), cols)
  return pooled.astype(x.dtype)


def pyramid_steps(patch_size: int, stride: int) -> int:
  """Resolution steps from the stride-`patch_size` map to nominal `stride`: > 0 down (pool), < 0 up."""
  return int(round(math.log2(stride / patch_size)))


def backbone_maps(backbone: nn.Module, images: jax.Array, train: bool) -> tuple[list[jax.Array], list[float]]:
  """Feature maps (finest first) and their strides from an image backbone (models/backbone.py; its params land
  under the backbone's own name)."""
  if not isinstance(backbone, backbone_lib.ImageBackbone):
    raise ValueError(f"dense heads take an image backbone (vit.ViT, swinv2.SwinV2), got {type(backbone).__name__}")
  if getattr(backbone, "num_classes", 0):
    raise ValueError(
      f"the backbone of a dense model has a classification head (num_classes="
      f"{backbone.num_classes}); build it with num_classes=0"
    )
  return backbone.feature_maps(images, train), list(backbone.feature_strides())


class DenseModel(nn.Module):
  """Base of the dense models (segmenter.py, detector.py): an image backbone under `backbone` (params named as
  in pretraining) plus a neck and a head. Their family (`FAMILY`) answers layer ids and checkpoint adaptation
  through the backbone; the neck and head take the last layer id."""

  backbone: nn.Module  # a backbone.ImageBackbone with num_classes=0


def num_layer_ids(model: DenseModel) -> int:
  """The backbone's: the neck and head share its last id."""
  return towers.family(model.backbone).num_layer_ids(model.backbone)


def layer_id(model: DenseModel, param_path: str) -> int | np.ndarray:
  """The backbone's id of a param under 'backbone', the last id for the neck's and head's."""
  return towers.layer_id("backbone", model.backbone, param_path)


def adapt_checkpoint(model: DenseModel, params: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """`params` with the backbone's adapted by it; the neck's and head's as given."""
  return towers.adapt_checkpoint("backbone", model.backbone, params, shapes)


# No FLOP count: the backbone's would leave out the neck and head, a large share of the FLOPs (UPerNet's
# convolutions: about a third for ViT-H at 512 px) that no analytic counter covers; no `train/mfu` is logged.
FAMILY = backbone_lib.Family(
  module=DenseModel, num_layer_ids=num_layer_ids, layer_id=layer_id, adapt_checkpoint=adapt_checkpoint
)


class ConvNorm(nn.Module):
  """conv (no bias) -> channel LayerNorm (fp32) -> optional activation ('relu', 'gelu' or None)."""

  features: int
  kernel: int = 1
  act: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv(self.features, self.kernel, self.dtype, use_bias=False, name="conv")(x.astype(self.dtype))
    x = layers.LayerNorm(NORM_EPS, self.dtype, name="norm")(x)
    return ACTIVATIONS[self.act](x)


class SimpleFeaturePyramid(nn.Module):
  """ViTDet's pyramid from one stride-`patch_size` map: returns (maps, strides) for the nominal `strides`."""

  patch_size: int
  channels: int = 256
  strides: tuple[int, ...] = (4, 8, 16, 32)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x) -> tuple[list[jax.Array], list[float]]:
    maps, strides = [], []
    for stride in self.strides:
      steps = pyramid_steps(self.patch_size, stride)
      y, width = x.astype(self.dtype), x.shape[-1]
      for i in range(-steps):  # up: halve the width per transposed conv (ViTDet), norm + GELU in between
        if i:
          y = ACTIVATIONS["gelu"](layers.LayerNorm(NORM_EPS, self.dtype, name=f"s{stride}_up_norm_{i - 1}")(y))
        width = max(width // 2, 1)
        y = conv(width, 2, self.dtype, transpose=True, name=f"s{stride}_up_{i}")(y)
      for _ in range(steps):
        y = nn.max_pool(y, (2, 2), strides=(2, 2), padding="SAME")
      y = ConvNorm(self.channels, 1, dtype=self.dtype, name=f"s{stride}_lateral")(y)
      maps.append(ConvNorm(self.channels, 3, dtype=self.dtype, name=f"s{stride}_output")(y))
      strides.append(self.patch_size * 2.0**steps)
    return maps, strides


class PyramidPooling(nn.Module):
  """PSPNet's module: average-pool to each scale, 1x1 ConvNorm, upsample, concat with the input, 3x3 ConvNorm."""

  channels: int
  scales: tuple[int, ...] = (1, 2, 3, 6)
  act: str | None = "relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    size = x.shape[1:3]
    branches = [x.astype(self.dtype)]
    for scale in self.scales:
      pooled = ConvNorm(self.channels, 1, self.act, self.dtype, name=f"scale_{scale}")(adaptive_avg_pool(x, scale))
      branches.append(resize_bilinear(pooled, size))
    return ConvNorm(self.channels, 3, self.act, self.dtype, name="bottleneck")(jnp.concatenate(branches, axis=-1))


class FPN(nn.Module):
  """Feature pyramid over maps (finest first) -> as many maps of `channels`.

  `input_norms`: a channel LayerNorm on every input first (hierarchical backbones' raw stage outputs).
  `ppm_scales`: the top level goes through `PyramidPooling` instead of a lateral conv and gets no output conv
  (UPerNet); empty: plain FPN.
  """

  channels: int = 256
  ppm_scales: tuple[int, ...] = ()
  input_norms: bool = False
  act: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array]) -> list[jax.Array]:
    if self.input_norms:
      maps = [layers.LayerNorm(NORM_EPS, self.dtype, name=f"input_norm_{i}")(m) for i, m in enumerate(maps)]
    n, ppm = len(maps), bool(self.ppm_scales)
    laterals = [ConvNorm(self.channels, 1, self.act, self.dtype, name=f"lateral_{i}")(maps[i]) for i in range(n - ppm)]
    if ppm:
      laterals.append(PyramidPooling(self.channels, self.ppm_scales, self.act, self.dtype, name="ppm")(maps[-1]))
    for i in range(n - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outputs = [
      ConvNorm(self.channels, 3, self.act, self.dtype, name=f"output_{i}")(laterals[i]) for i in range(n - ppm)
    ]
    return outputs + laterals[n - ppm :]


class UPerHead(nn.Module):
  """UPerNet's decoder: (B, H0, W0, num_classes) fp32 logits at the finest input level."""

  num_classes: int
  channels: int = 512
  ppm_scales: tuple[int, ...] = (1, 2, 3, 6)
  input_norms: bool = False
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], train: bool = False):
    maps = FPN(self.channels, self.ppm_scales, self.input_norms, "relu", self.dtype, name="fpn")(maps)
    size = maps[0].shape[1:3]
    fused = jnp.concatenate([maps[0]] + [resize_bilinear(m, size) for m in maps[1:]], axis=-1)
    fused = ConvNorm(self.channels, 3, "relu", self.dtype, name="fuse")(fused)
    fused = nn.Dropout(self.dropout)(fused, deterministic=not train)
    return conv(
      self.num_classes, 1, jnp.float32, kernel_init=nn.initializers.normal(0.01), out_axis=CLASSES, name="classifier"
    )(fused.astype(jnp.float32))


class DenseDetectionHead(nn.Module):
  """Every location of every level predicts class logits and a box; all levels share the weights.

  Returns {"logits": (B, Q, C) fp32, "boxes": (B, Q, 4) fp32 xyxy divided by the image size}, Q = locations
  of all levels, finest level first, row-major. A box is centre -/+ exp(raw) * stride (raw clipped at
  `MAX_LOG_DISTANCE`); it may reach past the image: clip when converting to pixels.
  """

  num_classes: int
  channels: int = 256
  num_convs: int = 2
  prior_prob: float = 0.01
  dtype: Any = jnp.float32

  MAX_LOG_DISTANCE = 8.0

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], strides: Sequence[float], image_hw: Sequence[int]):
    tower = [ConvNorm(self.channels, 3, "relu", self.dtype, name=f"conv_{i}") for i in range(self.num_convs)]
    prior = -math.log((1 - self.prior_prob) / self.prior_prob)  # sigmoid(bias) = prior_prob at the start
    classify = conv(
      self.num_classes,
      3,
      self.dtype,
      kernel_init=nn.initializers.normal(0.01),
      bias_init=nn.initializers.constant(prior),
      out_axis=CLASSES,
      name="classifier",
    )
    regress = conv(4, 3, self.dtype, kernel_init=nn.initializers.normal(0.01), name="box")
    all_logits, all_boxes = [], []
    for x, stride in zip(maps, strides):
      y = x.astype(self.dtype)
      for layer in tower:
        y = layer(y)
      batch, h, w, _ = y.shape
      all_logits.append(classify(y).astype(jnp.float32).reshape(batch, h * w, self.num_classes))
      distances = jnp.exp(jnp.minimum(regress(y).astype(jnp.float32), self.MAX_LOG_DISTANCE))
      all_boxes.append(_boxes_from_distances(distances, stride, image_hw).reshape(batch, h * w, 4))
    return {"logits": jnp.concatenate(all_logits, axis=1), "boxes": jnp.concatenate(all_boxes, axis=1)}


def _boxes_from_distances(distances: jax.Array, stride: float, image_hw: Sequence[int]) -> jax.Array:
  """(B, h, w, 4) (l, t, r, b) in strides -> normalised xyxy around each location's centre."""
  _, h, w, _ = distances.shape
  sx, sy = stride / image_hw[1], stride / image_hw[0]
  cx = (jnp.arange(w, dtype=jnp.float32) + 0.5) * sx
  cy = (jnp.arange(h, dtype=jnp.float32) + 0.5) * sy
  centres = jnp.stack(jnp.broadcast_arrays(cx[None, :], cy[:, None]), axis=-1)  # (h, w, 2) as (x, y)
  scale = jnp.asarray([sx, sy], jnp.float32)
  return jnp.concatenate([centres - distances[..., :2] * scale, centres + distances[..., 2:] * scale], axis=-1)
