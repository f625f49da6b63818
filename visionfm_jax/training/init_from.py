"""Starting points: a pretraining checkpoint (a workdir of this project or a `tools.import_hf` directory)
initialises a model of another resolution, window size or head, or one that holds the pretrained backbone
under a prefix (a segmentation or detection model's `backbone/...`, next to fresh `neck/...` and `head/...`).

  config.init_from          the directory
  config.init_from_subtree  the checkpoint's params to take, e.g. 'image' (a CLIP's image tower) or 'encoder'
                            (Aurora's); '' = all of them
  config.init_from_prefix   where they go in the model, e.g. 'backbone'; model params outside it stay fresh
  config.init_from_skip     regex over the model's param paths that stay fresh (e.g. 'head' for new classes)

What changes shape with the resolution, and how it is carried over:
  ViT      `pos_embed` (1, 1 + g*g, D): the class token's entry is kept, the g x g grid is resized bicubically
           (jax.image.resize) to the model's grid. Nothing else depends on the image size.
  SwinV2   nothing: the continuous position bias is an MLP over a table of offsets computed from the window
           size (not a param), the shift masks and relative indices are computed too. Offsets are normalised
           by `config.model.pretrained_window_sizes`, which must name the windows the checkpoint was trained
           with: a warning gives the value when the checkpoint's metadata shows it differs.
The checkpoint's pretraining-only params, its classification `head` and a SimMIM `mask_token`, are dropped when
the model has no such param. Any other shape mismatch is a ConfigError naming the param and both shapes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from visionfm_jax.training import checkpoint
from visionfm_jax.errors import ConfigError
from visionfm_jax.training.param_rules import ParamRules, named_leaves
from visionfm_jax.models import swinv2

# Checkpoint params a fine-tuned model may lack: a classification head, SimMIM's mask token.
PRETRAINING_ONLY = ParamRules.of_patterns((r"^head(/|$)", r"^mask_token$"), field="init_from.PRETRAINING_ONLY")
NUM_PREFIX_TOKENS = 1  # ViT's class token precedes the patch grid in pos_embed


def resize_pos_embed(pos: np.ndarray, length: int, num_prefix: int = NUM_PREFIX_TOKENS) -> np.ndarray:
  """(1, num_prefix + g*g, D) -> (1, length, D): prefix entries kept, the g x g grid resized bicubically to the
  square grid of length - num_prefix entries. ValueError when either grid is not square."""
  grid_in, grid_out = math.isqrt(pos.shape[1] - num_prefix), math.isqrt(length - num_prefix)
  if grid_in ** 2 != pos.shape[1] - num_prefix or grid_out ** 2 != length - num_prefix:
    raise ValueError(f"{pos.shape[1]} -> {length} position embeddings are not {num_prefix} + a square grid")
  prefix, grid = pos[:, :num_prefix], pos[0, num_prefix:].reshape(grid_in, grid_in, -1)
  resized = jax.image.resize(jnp.asarray(grid, jnp.float32), (grid_out, grid_out, grid.shape[-1]), "bicubic")
  resized = np.asarray(resized, pos.dtype).reshape(1, grid_out * grid_out, -1)
  return np.concatenate([prefix, resized], axis=1)


def _resizable(name: str, source_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
  return (name.rsplit("/", 1)[-1] == "pos_embed" and len(source_shape) == len(target_shape) == 3
          and source_shape[0] == target_shape[0] == 1 and source_shape[2] == target_shape[2])


def place(source: dict[str, Any], *, subtree: str = "", prefix: str = "") -> dict[str, Any]:
  """The checkpoint's params under `subtree` (re-rooted), renamed to `prefix/<name>`."""
  if subtree:
    start = subtree.strip("/") + "/"
    source = {n[len(start):]: v for n, v in source.items() if n.startswith(start)}
    if not source:
      raise ConfigError(f"config.init_from_subtree={subtree!r}: the checkpoint has no params under it")
  if prefix:
    source = {f"{prefix.strip('/')}/{n}": v for n, v in source.items()}
  return source


def adapt(source: dict[str, Any], target: dict[str, tuple[int, ...]], *, subtree: str = "", prefix: str = "",
          skip: str | Sequence[str] = (), origin: str = "the checkpoint") -> dict[str, Any]:
  """Maps the checkpoint's flat params ({path: array}) onto the model's ({path: shape}): `place`, drop the
  pretraining-only params the model lacks, resize position embeddings; ConfigError for other mismatches
  (`origin` names the checkpoint in it). Params matching a `skip` regex (`param_rules`) are left as they are."""
  placed = place(source, subtree=subtree, prefix=prefix)
  start = prefix.strip("/") + "/" if prefix else ""
  if not any(n.startswith(start) for n in target):
    tops = sorted({n.split("/")[0] for n in target})
    raise ConfigError(f"config.init_from_prefix={prefix!r}: the model has no params under it (its top level: "
                      f"{', '.join(tops)})")
  dropped = [n for n in placed if n not in target and PRETRAINING_ONLY.matches(n[len(start):])]
  if dropped:
    logging.info("init_from: dropping the checkpoint's pretraining-only params %s", dropped)
  out = {n: v for n, v in placed.items() if n not in dropped}
  fresh = ParamRules.of_patterns(skip, field="config.init_from_skip")
  mismatched = []
  for name, value in out.items():
    shape = tuple(np.shape(value))
    if name not in target or shape == tuple(target[name]) or fresh.matches(name):
      continue
    if _resizable(name, shape, target[name]):
      try:
        out[name] = resize_pos_embed(np.asarray(value), target[name][1])
        logging.info("init_from: %s resized %s -> %s", name, shape, tuple(target[name]))
        continue
      except ValueError:
        pass
    mismatched.append(f"{name}: checkpoint {shape} vs model {tuple(target[name])}")
  if mismatched:
    raise ConfigError(f"{origin}: shapes that cannot be resized: {'; '.join(mismatched)}. Only "
                      f"ViT position embeddings are resized; set config.init_from_skip to a regex of the params "
                      f"to initialise fresh (e.g. 'head' for another number of classes).")
  return out


def fresh_outside(prefix: str, skip: str) -> tuple[str, ...]:
  """The skip regexes of `load`: every model param outside `prefix`, plus the user's."""
  outside = (f"^(?!{re.escape(prefix.strip('/'))}/)",) if prefix else ()
  return outside + ((skip,) if skip else ())


def load(config, target_params):
  """config.init_from's params in the structure, shapes and shardings of `target_params`, via `adapt`."""
  user_skip = ParamRules.of_patterns(config.init_from_skip, field="config.init_from_skip")
  user_skip.require_matches([name for name, _ in named_leaves(target_params)])
  warn_swin_windows(config.init_from, config.init_from_subtree, config.init_from_prefix, config.model)
  skip = fresh_outside(config.init_from_prefix, config.init_from_skip)
  fn = functools.partial(adapt, subtree=config.init_from_subtree, prefix=config.init_from_prefix, skip=skip,
                         origin=f"config.init_from={config.init_from!r}")
  return checkpoint.load_params(config.init_from, target_params, skip=skip, adapt=fn)


# ------------------------------------------------------------------------------------- SwinV2 windows

def source_model_fields(path: str) -> dict[str, Any] | None:
  """The checkpoint's model fields: `model.json` (tools.import_hf) or the workdir's config.json `model`."""
  path = os.path.expanduser(path)
  for file, key in (("model.json", None), ("config.json", "model"), (os.path.join("..", "config.json"), "model")):
    try:
      with open(os.path.join(path, file), encoding="utf-8") as f:
        fields = json.load(f)
    except (OSError, json.JSONDecodeError):
      continue
    return fields.get(key) if key else fields
  return None


def _swin_fields(fields: dict[str, Any], key: str = "") -> dict[str, Any] | None:
  """`fields` (a model's config) or its sub-config `key` (a tower, a backbone) completed by the fields its parent
  sets for it (image_size, ...); None unless that is a SwinV2."""
  if key:
    sub = fields.get(key.strip("/"))
    if not isinstance(sub, dict):
      return None
    fields = {**fields, **sub, "name": sub.get("name")}
  return fields if fields.get("name") == "swinv2" else None


def _normalising_windows(fields: dict[str, Any]) -> tuple[int, ...] | None:
  """The per-stage windows a SwinV2's position-bias offsets are normalised by (model.json or config.model)."""
  depths = fields.get("depths") or swinv2.SIZES.get(fields.get("variant"), (0, ()))[1]
  patch = fields.get("patch") or fields.get("patch_size")
  if not depths or not patch:
    return None
  windows = swinv2.pretrained_windows(int(fields["image_size"]), fields["window_size"], len(depths), int(patch))
  pretrained = tuple(fields.get("pretrained_window_sizes") or ()) or (0,) * len(windows)
  return tuple(int(p) if p else w for p, w in zip(swinv2.per_stage(pretrained, len(windows), "p"), windows))


def warn_swin_windows(path: str, subtree: str, prefix: str, model_cfg) -> None:
  """Warns when a SwinV2 (the model, or its sub-config named like `prefix`) normalises position-bias offsets by
  other windows than the checkpoint (or its `subtree`) was trained with."""
  source = source_model_fields(path)
  source = _swin_fields(source, subtree) if isinstance(source, dict) else None
  target = _swin_fields(model_cfg.to_dict(), prefix)
  if source is None or target is None:
    return
  try:
    had, has = _normalising_windows(source), _normalising_windows(target)
  except (KeyError, TypeError, ValueError):
    return
  if had and has and had != has:
    logging.warning("init_from: the checkpoint's SwinV2 position bias was trained with windows %s, this model "
                    "normalises offsets by %s; set --config.model.%spretrained_window_sizes='%s' to transfer it as "
                    "trained", had, has, f"{prefix.strip('/')}." if prefix else "", had)
