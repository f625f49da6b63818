"""Tower configs of the composite models: CLIP's image tower (`config.model.image`) and Aurora's SwinV2 encoder
(`config.model.encoder`) are configured by their own fields plus the ones the composite model sets for all its
towers at once."""

from __future__ import annotations

import ml_collections

# Fields of a tower's config that config.model (the composite model's config) sets for every tower.
SHARED_FIELDS = ("image_size", "scan", "remat_policy", "kernels")


def tower_config(model_cfg, key: str, **fixed) -> ml_collections.ConfigDict:
  """`model_cfg[key]` completed by what its parent sets: the SHARED_FIELDS of `model_cfg`, no head
  (num_classes=0, head_bias_init=0.0) and `fixed` (e.g. name='swinv2'). ValueError naming the field when the
  tower sets a shared field to another value than `model_cfg`."""
  fields = model_cfg[key].to_dict()
  for name in SHARED_FIELDS:
    if name in fields and fields[name] != model_cfg[name]:
      raise ValueError(f"{key}.{name}={fields[name]!r} differs from {name}={model_cfg[name]!r}: set {name} "
                       f"(it applies to every tower)")
  fields.update({name: model_cfg[name] for name in SHARED_FIELDS}, num_classes=0, head_bias_init=0.0, **fixed)
  return ml_collections.ConfigDict(fields)
