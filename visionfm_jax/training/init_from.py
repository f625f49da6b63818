"""Starting points: a pretraining checkpoint (a workdir of this project or a `tools.import_hf` directory)
initialises a model of another resolution, window size or head, or one that holds the pretrained backbone
under a prefix (a segmentation or detection model's `backbone/...`, next to fresh `neck/...` and `head/...`).

  config.init_from          the directory
  config.init_from_subtree  the checkpoint's params to take, e.g. 'image' (a CLIP's image tower) or 'encoder'
                            (Aurora's); '' = all of them
  config.init_from_prefix   where they go in the model, e.g. 'backbone'; model params outside it stay fresh
  config.init_from_skip     regex over the model's param paths that stay fresh (e.g. 'head' for new classes)
  config.init_from_ema      take a training checkpoint's EMA of the params (training/ema.py) instead of them

What changes with the resolution is the model's to say (`adapt_checkpoint`, models/backbone.py):
  ViT      `pos_embed` (1, 1 + g*g, D): the class token's entry is kept, the g x g grid is resized bicubically
           (jax.image.resize) to the model's grid. Nothing else depends on the image size.
  SwinV2   no param: the continuous position bias is an MLP over a table of offsets computed from the window
           size (not a param), the shift masks and relative indices are computed too. Offsets are normalised
           by `config.model.pretrained_window_sizes`, the windows the checkpoint was trained with, which the
           config states (e.g. configs/swinv2_g_clip.py:ft640); the config's checks (training/checks.py) compare
           them with the windows of the checkpoint's model fields (model.json or config.json,
           `check_model_fields`) and a mismatch is a ConfigError naming the flag and the value to set.
The checkpoint's pretraining-only params, its classification `head` and a SimMIM `mask_token`, are dropped when
the model has no such param. Any other shape mismatch is a ConfigError naming the param and both shapes.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

from absl import logging
import numpy as np

from visionfm_jax import models
from visionfm_jax.errors import ConfigError
from visionfm_jax.param_rules import ParamRules, named_leaves
from visionfm_jax.training import ema, stored

# Checkpoint params a fine-tuned model may lack: a classification head, SimMIM's mask token.
PRETRAINING_ONLY = ParamRules.of_patterns((r"^head(/|$)", r"^mask_token$"), field="init_from.PRETRAINING_ONLY")


def place(source: dict[str, Any], *, subtree: str = "", prefix: str = "") -> dict[str, Any]:
  """The checkpoint's params under `subtree` (re-rooted), renamed to `prefix/<name>`."""
  if subtree:
    start = subtree.strip("/") + "/"
    source = {n[len(start) :]: v for n, v in source.items() if n.startswith(start)}
    if not source:
      raise ConfigError(f"config.init_from_subtree={subtree!r}: the checkpoint has no params under it")
  if prefix:
    source = {f"{prefix.strip('/')}/{n}": v for n, v in source.items()}
  return source


def adapt(
  source: dict[str, Any],
  target: dict[str, tuple[int, ...]],
  model,
  *,
  subtree: str = "",
  prefix: str = "",
  skip: str | Sequence[str] = (),
  origin: str = "the checkpoint",
) -> dict[str, Any]:
  """Maps the checkpoint's flat params ({path: array}) onto the model's ({path: shape}): `place`, drop the
  pretraining-only params the model lacks, let the model carry params of another resolution (`adapt_checkpoint`);
  ConfigError for other mismatches (`origin` names the checkpoint in it). Params matching a `skip` regex
  (`param_rules`) are left as they are."""
  placed = place(source, subtree=subtree, prefix=prefix)
  start = prefix.strip("/") + "/" if prefix else ""
  if not any(n.startswith(start) for n in target):
    tops = sorted({n.split("/")[0] for n in target})
    raise ConfigError(
      f"config.init_from_prefix={prefix!r}: the model has no params under it (its top level: {', '.join(tops)})"
    )
  dropped = [n for n in placed if n not in target and PRETRAINING_ONLY.matches(n[len(start) :])]
  if dropped:
    logging.info("init_from: dropping the checkpoint's pretraining-only params %s", dropped)
  out = {n: v for n, v in placed.items() if n not in dropped}
  out = _adapted(model, out, target)
  fresh = ParamRules.of_patterns(skip, field="config.init_from_skip")
  differ = {
    n: v for n, v in out.items() if n in target and tuple(np.shape(v)) != tuple(target[n]) and not fresh.matches(n)
  }
  mismatched = [f"{n}: checkpoint {tuple(np.shape(v))} vs model {tuple(target[n])}" for n, v in differ.items()]
  if mismatched:
    raise ConfigError(
      f"{origin}: shapes that cannot be resized: {'; '.join(mismatched)}. Only "
      f"ViT position embeddings are resized; set config.init_from_skip to a regex of the params "
      f"to initialise fresh (e.g. 'head' for another number of classes)."
    )
  return out


def _adapted(model, params: dict[str, Any], target: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """`params` carried to `target` where the model knows how (`models.adapt_checkpoint`, models/backbone.py),
  logging what it resized."""
  adapted = models.adapt_checkpoint(model, params, {n: tuple(s) for n, s in target.items()})
  for name, value in adapted.items():
    if name in params and np.shape(value) != np.shape(params[name]):
      logging.info("init_from: %s resized %s -> %s", name, tuple(np.shape(params[name])), tuple(np.shape(value)))
  return adapted


def fresh_outside(prefix: str, skip: str) -> tuple[str, ...]:
  """The skip regexes of `load`: every model param outside `prefix`, plus the user's."""
  outside = (f"^(?!{re.escape(prefix.strip('/'))}/)",) if prefix else ()
  return outside + ((skip,) if skip else ())


def load(config, target_params, model):
  """config.init_from's params in the structure, shapes and shardings of `target_params` (the params of `model`,
  the task's), via `adapt`."""
  user_skip = ParamRules.of_patterns(config.init_from_skip, field="config.init_from_skip")
  user_skip.require_matches([name for name, _ in named_leaves(target_params)])
  skip = fresh_outside(config.init_from_prefix, config.init_from_skip)
  fn = functools.partial(
    adapt,
    model=model,
    subtree=config.init_from_subtree,
    prefix=config.init_from_prefix,
    skip=skip,
    origin=f"config.init_from={config.init_from!r}",
  )
  return stored.load_params(
    config.init_from, target_params, skip=skip, adapt=fn, weights=ema.SUBTREE if config.init_from_ema else "params"
  )


# ---------------------------------------------------------------------------- model fields of the checkpoint


def _sub_fields(fields: dict[str, Any], key: str) -> dict[str, Any] | None:
  """`fields` (a model's config) or its tower `key` completed as the model's builder completes it (image_size,
  Aurora's encoder's name: `models.tower_fields`); None when the model has no such tower."""
  return models.tower_fields(fields, key) if key else fields


def _paired_fields(model_fields: dict[str, Any], source: dict[str, Any], subtree: str, prefix: str):
  """(key, the model's fields, the checkpoint's fields) of the configs that describe the same params: the
  model's sub-config `prefix` (or the model's config, the backbone config of a dense model) and the checkpoint's
  sub-config `subtree`; without either, the two configs and their towers of the same name."""
  subtree, prefix = subtree.strip("/"), prefix.strip("/")
  if subtree or prefix:
    key = prefix if isinstance(model_fields.get(prefix), dict) else ""
    pairs = [(key, _sub_fields(model_fields, key), _sub_fields(source, subtree))]
  else:
    pairs = [("", model_fields, source)] + [
      (k, _sub_fields(model_fields, k), _sub_fields(source, k)) for k, v in model_fields.items() if isinstance(v, dict)
    ]
  return [(key, ours, theirs) for key, ours, theirs in pairs if ours is not None and theirs is not None]


def check_model_fields(config) -> None:
  """ConfigError, one line naming each flag and the value to set, when config.model disagrees with the config of
  config.init_from's checkpoint on a field its model answers for (`models.checkpoint_conflicts`: a SwinV2's
  pretrained windows); nothing for a checkpoint that describes no model."""
  source = stored.Stored.at(config.init_from).model_fields() if config.init_from else None
  if not isinstance(source, dict):
    return
  mismatches = []
  for key, ours, theirs in _paired_fields(
    config.model.to_dict(), source, config.init_from_subtree, config.init_from_prefix
  ):
    for field, needed in models.checkpoint_conflicts(ours, theirs).items():
      path = f"config.model.{key + '.' if key else ''}{field}"
      mismatches.append(
        f"{path}={_shown(ours.get(field))} but the init_from checkpoint trained with "
        f'{_shown(needed)}: set --{path}="{_shown(needed)}"'
      )
  if mismatches:
    raise ConfigError("; ".join(mismatches))


def _shown(value: Any) -> Any:
  """A config value as a flag takes it: sequences (JSON lists among them) as tuples."""
  return tuple(value) if isinstance(value, (list, tuple)) else value
