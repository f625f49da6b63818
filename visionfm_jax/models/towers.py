"""The image towers of the composite models (CLIP's image tower, Aurora's SwinV2 encoder, a dense model's
backbone): the backbones they may hold (`IMAGE_BUILDERS`, `IMAGE_FAMILIES`), a tower's config (its own fields plus
the ones the composite model sets for all its towers at once: `tower_config`; over a dict, `tower_fields`), and the
family questions a composite answers through its tower (`family`, `layer_id`, `adapt_checkpoint`)."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from visionfm_jax.config_lib import TOWER_HEADLESS, TOWER_SHARED_FIELDS
from visionfm_jax.models import backbone, swinv2, vit

IMAGE_BUILDERS = {"swinv2": swinv2.build, "vit": vit.build}  # config name -> builder(model_cfg, dtype)
IMAGE_FAMILIES: dict[type, backbone.Family] = {vit.ViT: vit.FAMILY, swinv2.SwinV2: swinv2.FAMILY}


def tower_config(model_cfg, key: str, **fixed) -> ml_collections.ConfigDict:
  """`model_cfg[key]` completed by what its parent sets (`tower_fields`). ValueError naming the field when the
  tower sets a shared field to another value than `model_cfg`."""
  tower = model_cfg[key]
  for name in TOWER_SHARED_FIELDS:
    if name in tower and tower[name] != model_cfg[name]:
      raise ValueError(
        f"{key}.{name}={tower[name]!r} differs from {name}={model_cfg[name]!r}: set {name} (it applies to every tower)"
      )
  return ml_collections.ConfigDict(tower_fields(model_cfg.to_dict(), key, **fixed))


def tower_fields(model_fields: dict[str, Any], key: str, **fixed) -> dict[str, Any] | None:
  """The tower `key` of a composite model's config (a dict, e.g. a workdir's config.json `model`) completed by
  what the model sets for it: the TOWER_SHARED_FIELDS of `model_fields`, no head (TOWER_HEADLESS) and `fixed`
  (e.g. name='swinv2'); None when it has no such tower."""
  tower = model_fields.get(key)
  if not isinstance(tower, dict):
    return None
  shared = {name: model_fields[name] for name in TOWER_SHARED_FIELDS if name in model_fields}
  return {**tower, **shared, **TOWER_HEADLESS, **fixed}


def family(tower) -> backbone.Family:
  """The family of `tower`, the image backbone another model holds (CLIP's image tower, Aurora's encoder, a dense
  model's backbone)."""
  return IMAGE_FAMILIES[type(tower)]


def _under(prefix: str, flat: dict[str, Any]) -> dict[str, Any]:
  start = prefix + "/"
  return {name[len(start) :]: value for name, value in flat.items() if name.startswith(start)}


def layer_id(prefix: str, tower, param_path: str) -> int | np.ndarray:
  """The layer id of a param of a model holding one backbone `tower` under `prefix`: the tower's own id for its
  params, the last id (with the heads) for the model's others."""
  tower_family, start = family(tower), prefix + "/"
  if param_path.startswith(start):
    return tower_family.layer_id(tower, param_path[len(start) :])
  return tower_family.num_layer_ids(tower) - 1


def adapt_checkpoint(prefix: str, tower, params: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """`adapt_checkpoint` of a model holding the backbone `tower` under `prefix`: the tower adapts its params
  (and may rename them), the others are returned as given; all as given for a tower that adapts nothing."""
  adapt = family(tower).adapt_checkpoint
  if adapt is None:
    return dict(params)
  adapted = adapt(tower, _under(prefix, params), _under(prefix, shapes))
  others = {name: value for name, value in params.items() if not name.startswith(prefix + "/")}
  return {**others, **{f"{prefix}/{name}": value for name, value in adapted.items()}}
