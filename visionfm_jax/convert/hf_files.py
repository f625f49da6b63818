"""Reads and writes directories in transformers' `save_pretrained` layout: config.json and safetensors weights.

Weights are read with safetensors' numpy backend (single file or a sharded index). Pickled PyTorch files
(`pytorch_model.bin`) are never opened: they can run code when loaded. `write_dir` writes one float32
model.safetensors (tagged as PyTorch weights, which `from_pretrained` requires) and config.json;
`write_preprocessor` an image processor config (the shorter side resized, the central crop, rescale to [0, 1],
normalise). Files get the mode the user's umask gives.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import safetensors
from safetensors import safe_open
from safetensors.numpy import save_file

from visionfm_jax import atomic
from visionfm_jax.errors import CheckpointError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_json(file: str) -> dict[str, Any]:
  try:
    with open(file) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{file}: unreadable JSON: {e}") from e
  if not isinstance(data, dict):
    raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
  return data


def config_error(path: str, message: str) -> CheckpointError:
  """The error about a field of `path`/config.json: `message` names it."""
  return CheckpointError(f"{path}/config.json: {message}")


def read_config(path: str) -> dict[str, Any]:
  """The model's config.json as a dict."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{path!r}: no such directory (expected one written by transformers' save_pretrained)")
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise CheckpointError(f"{path!r}: no config.json (expected a directory written by transformers' save_pretrained)")
  return read_json(file)


def weight_files(path: str) -> list[str]:
  """The safetensors files of `path`: model.safetensors, or the shards its index names."""
  single, index = os.path.join(path, WEIGHTS), os.path.join(path, INDEX)
  if os.path.exists(single):
    return [single]
  if os.path.exists(index):
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{index}: no 'weight_map'")
    return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
  pickles = [f for f in PICKLES if os.path.exists(os.path.join(path, f))]
  hint = (
    (
      f" (found {', '.join(pickles)}: pickled weights are never loaded; re-save them with "
      f"`save_pretrained(dir, safe_serialization=True)`)"
    )
    if pickles
    else ""
  )
  raise CheckpointError(f"{path!r}: no {WEIGHTS} or {INDEX}{hint}")


def _read_file(file: str) -> dict[str, np.ndarray]:
  if not os.path.exists(file):
    raise CheckpointError(f"{file}: missing weight shard")
  try:
    with safe_open(file, framework="numpy") as f:
      keys = list(f.keys())
      bf16 = [k for k in keys if f.get_slice(k).get_dtype() == "BF16"]
      out = {k: f.get_tensor(k) for k in keys if k not in bf16}
    if bf16:
      # numpy has no bfloat16: read those through jax and widen them to float32 (exact).
      with safe_open(file, framework="flax") as f:
        out.update({k: np.asarray(f.get_tensor(k), np.float32) for k in bf16})
  except safetensors.SafetensorError as e:
    raise CheckpointError(f"{file}: unreadable safetensors file: {e}") from e
  return out


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the directory's safetensors file(s), by name."""
  tensors: dict[str, np.ndarray] = {}
  for file in weight_files(path):
    part = _read_file(file)
    repeated = sorted(set(part) & set(tensors))
    if repeated:
      raise CheckpointError(f"{file}: tensors also found in another shard: {', '.join(repeated[:8])}")
    tensors.update(part)
  return tensors


def _write_json(file: str, data: dict[str, Any]) -> None:
  atomic.write(file, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_dir(path: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  """Writes `path`/config.json and `path`/model.safetensors (float32), as `save_pretrained` would."""
  os.makedirs(path, exist_ok=True)
  stale = [f for f in (INDEX, *PICKLES) if os.path.exists(os.path.join(path, f))]
  if stale:  # transformers would load those instead of (or besides) the new weights
    raise CheckpointError(f"{path!r}: holds {', '.join(stale)} from another model; choose an empty directory")
  arrays = {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}  # ascontiguousarray makes 0-d 1-d
  weights = os.path.join(path, WEIGHTS)
  save_file(arrays, weights, metadata={"format": "pt"})
  os.chmod(weights, 0o666 & ~_umask())  # safetensors writes through a temporary file of mode 0600
  _write_json(os.path.join(path, "config.json"), config)


def _umask() -> int:
  mask = os.umask(0o022)  # the only way to read it is to set it; set back at once
  os.umask(mask)
  return mask


def write_preprocessor(
  path: str, processor: str, *, shortest_edge: int, crop_size: int, resample: int, mean, std
) -> None:
  """`path`/preprocessor_config.json of transformers' `processor` class (an image processor with a shorter-side
  resize and a central crop: CLIPImageProcessor, BitImageProcessor): the shorter side to `shortest_edge` with
  Pillow's `resample` filter, the central crop_size x crop_size, scale to [0, 1], normalise by mean / std."""
  _write_json(
    os.path.join(path, "preprocessor_config.json"),
    {
      "image_processor_type": processor,
      "do_convert_rgb": True,
      "do_resize": True,
      "size": {"shortest_edge": int(shortest_edge)},
      "resample": int(resample),
      "do_center_crop": True,
      "crop_size": {"height": int(crop_size), "width": int(crop_size)},
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "image_mean": [float(x) for x in mean],
      "image_std": [float(x) for x in std],
    },
  )


def write_naflex_preprocessor(path: str, *, patch_size: int, max_num_patches: int, mean, std) -> None:
  """`path`/preprocessor_config.json of transformers' Siglip2ImageProcessor: each image resized bilinearly to its
  largest patch grid within `max_num_patches` (SigLIP 2's NaFlex, data/transforms/naflex.py), scaled to [0, 1],
  normalised by mean / std, its patches padded to the budget."""
  _write_json(
    os.path.join(path, "preprocessor_config.json"),
    {
      "image_processor_type": "Siglip2ImageProcessor",
      "do_convert_rgb": True,
      "do_resize": True,
      "resample": 2,
      "patch_size": int(patch_size),
      "max_num_patches": int(max_num_patches),
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "image_mean": [float(x) for x in mean],
      "image_std": [float(x) for x in std],
    },
  )


def read_normalisation(path: str) -> dict[str, list[float]]:
  """{'mean', 'std'}: image_mean / image_std of `path`'s image processor (preprocessor_config.json); {} when it
  has none or does not normalise."""
  file = os.path.join(path, "preprocessor_config.json")
  if not os.path.exists(file):
    return {}
  cfg = read_json(file)
  if not cfg.get("do_normalize", True) or "image_mean" not in cfg or "image_std" not in cfg:
    return {}
  return {"mean": [float(x) for x in cfg["image_mean"]], "std": [float(x) for x in cfg["image_std"]]}
