"""Device peaks, for `train/mfu` = examples/s x FLOPs per example / (peak x devices).

The FLOPs per example are the model's own analytic count (its family's `train_flops_per_example`,
models/backbone.py, asked through the task): 3 x forward (the backward pass costs two forwards), one multiply-add
counts 2 FLOPs, recomputation from remat not counted (MFU, not hardware utilisation).
"""

from __future__ import annotations

import jax

# Dense (no sparsity) peak FLOP/s per device for 16-bit matmuls (bf16/fp16), from the vendors' data sheets.
PEAK_FLOPS_16BIT: dict[str, float] = {
  "H200": 989e12,
  "H100": 989e12,  # SXM
  "H100 PCIe": 756e12,
  "H800": 989e12,
  "A100": 312e12,
  "A800": 312e12,
  "L40S": 362e12,
  "B200": 2250e12,
  "GH200": 989e12,
}


def device_peak_flops(compute_dtype: str) -> float | None:
  """The 16-bit peak of this process's first device (the longest table name in its device_kind), or None when
  unknown or when computing in fp32."""
  if compute_dtype not in ("bfloat16", "float16"):
    return None
  kind = jax.devices()[0].device_kind
  for name in sorted(PEAK_FLOPS_16BIT, key=len, reverse=True):
    if name in kind:
      return PEAK_FLOPS_16BIT[name]
  return None
