"""Analytic training FLOPs and device peaks, for `train/mfu`.

Training FLOPs = 3 x forward (the backward pass costs two forwards); one multiply-add counts 2 FLOPs.
Recomputation from remat is not counted (MFU, not hardware utilisation).
"""

from __future__ import annotations

import jax

from visionfm_jax.models import swinv2

# Dense (no sparsity) peak FLOP/s per device for 16-bit matmuls (bf16/fp16), from the vendors' data sheets.
PEAK_FLOPS_16BIT: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
    "GH200": 989e12,
}


def device_peak_flops(compute_dtype: str, device=None) -> float | None:
  """The device's 16-bit peak, or None when unknown or when computing in fp32."""
  if compute_dtype not in ("bfloat16", "float16"):
    return None
  kind = (device or jax.devices()[0]).device_kind
  if "PCIe" in kind and "H100" in kind:
    return 756e12
  for name in sorted(PEAK_FLOPS_16BIT, key=len, reverse=True):
    if name in kind:
      return PEAK_FLOPS_16BIT[name]
  return None


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Pre-norm transformer encoder: qkv + out projections, attention scores and mixing, MLP."""
  per_layer = 2 * tokens * width * (4 * width + 2 * mlp_dim) + 4 * tokens * tokens * width
  return depth * per_layer


def vit_train_flops_per_image(model) -> float:
  grid = model.image_size // model.patch_size
  patches = grid * grid
  tokens = patches + 1
  forward = (2 * patches * model.patch_size ** 2 * 3 * model.width
             + transformer_forward_flops(tokens, model.width, model.depth, model.mlp_dim)
             + 2 * model.width * model.num_classes)
  return 3.0 * forward


def swinv2_train_flops_per_image(model) -> float:
  """SwinV2 matmul FLOPs x 3 (forward + backward): patch embed, window attention blocks, merging, head.

  Per block on n tokens of width C in windows of N tokens: qkv + out projections 8nC^2, MLP 4 * mlp_ratio * nC^2,
  scores and mixing 4nNC. Padding to whole windows counts as the model computes it.
  """
  stages = swinv2.stage_windows(model.image_size, model.window_size, len(model.depths), model.patch_size)
  width = model.embed_dim
  forward = 2.0 * (model.image_size // model.patch_size) ** 2 * model.patch_size ** 2 * 3 * width
  for s, ((feature, window, _), depth) in enumerate(zip(stages, model.depths)):
    padded = -(-feature // window) * window
    tokens = padded * padded
    per_block = (8 + 4 * model.mlp_ratio) * tokens * width * width + 4 * tokens * window * window * width
    forward += depth * per_block
    if s < len(model.depths) - 1:
      half = -(-feature // 2)
      forward += 2 * half * half * (4 * width) * (2 * width)
      width *= 2
  forward += 2 * width * model.num_classes
  return 3.0 * forward


def clip_train_flops_per_pair(model) -> float:
  """CLIP: the image tower's, the text tower's (all max_len positions) and both projections', x 3."""
  image = model.image
  if isinstance(image, swinv2.SwinV2):
    flops = swinv2_train_flops_per_image(image)
    pooled = image.embed_dim * 2 ** (len(image.depths) - 1)
  else:
    flops = vit_train_flops_per_image(image)
    pooled = image.width
  text = model.text
  text_forward = (transformer_forward_flops(text.max_len, text.width, text.depth, text.mlp_dim)
                  + 2 * text.width * text.embed_dim)
  return flops + 3.0 * (text_forward + 2 * pooled * model.embed_dim)


def aurora_train_flops_per_example(model, image_size: int, text_len: int) -> float:
  """Aurora: the encoder (twice with mim_view='separate': clean and masked passes), poolers, MIM head, text
  encoder (text_len + CLS positions), decoder (self + cross attention, two MLPs), vocabulary projection; x 3.
  Recomputation (remat, the feature pass of accumulation) is not counted, as MFU conventionally does not."""
  encoder = model.encoder
  encoder_flops = swinv2_train_flops_per_image(encoder) * (2 if model.mim_view == "separate" else 1)
  tokens = (image_size // model.stride) ** 2
  final = encoder.embed_dim * 2 ** (len(encoder.depths) - 1)
  text, decoder = model.text, model.decoder
  width, memory = text.width, model.caption_queries

  def pooler(queries):
    return 2 * 2 * tokens * final * width + 2 * 2 * queries * width * width + 4 * queries * tokens * width

  forward = (pooler(1) + pooler(memory) + 2 * tokens * final * model.stride ** 2 * 3 + 2 * width * model.embed_dim
             + transformer_forward_flops(text_len + 1, width, text.depth, text.mlp_dim) + 2 * width * text.embed_dim
             + transformer_forward_flops(text_len, width, decoder.depth, decoder.mlp_dim)
             + decoder.depth * (2 * text_len * width * (2 * width + 2 * decoder.mlp_dim)  # cross q/out, 2nd MLP
                                + 4 * memory * width * width + 4 * text_len * memory * width)
             + 2 * text_len * width * decoder.vocab_size)
  return encoder_flops + 3.0 * forward
