"""Tower configs of the composite models: CLIP's image tower (`config.model.image`) and Aurora's SwinV2 encoder
(`config.model.encoder`) are configured by their own fields plus the ones the composite model sets for all its
towers at once."""

from __future__ import annotations

import ml_collections

from visionfm_jax.config_lib import TOWER_HEADLESS, TOWER_SHARED_FIELDS


def tower_config(model_cfg, key: str, **fixed) -> ml_collections.ConfigDict:
  """`model_cfg[key]` completed by what its parent sets: the TOWER_SHARED_FIELDS of `model_cfg`, no head
  (TOWER_HEADLESS) and `fixed` (e.g. name='swinv2'). ValueError naming the field when the tower sets a shared
  field to another value than `model_cfg`."""
  fields = model_cfg[key].to_dict()
  for name in TOWER_SHARED_FIELDS:
    if name in fields and fields[name] != model_cfg[name]:
      raise ValueError(f"{key}.{name}={fields[name]!r} differs from {name}={model_cfg[name]!r}: set {name} "
                       f"(it applies to every tower)")
  fields.update({name: model_cfg[name] for name in TOWER_SHARED_FIELDS}, **TOWER_HEADLESS, **fixed)
  return ml_collections.ConfigDict(fields)
