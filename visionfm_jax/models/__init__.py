"""The model registry: every family of models (models/backbone.py's `Family`) by its Linen class, and what the
tasks, converters and tools ask of a model through it: the model of `config.model` (`build`), a model's registry
name (`name_of`) and family (`family_of`), its training FLOPs, layer ids, checkpoint adaptation, description,
checkpoint fields and converter (backbone.py's contract), the backbone a tools.import_hf model.json describes
(`from_checkpoint_fields`), the config fields on which a model and the checkpoint it starts from disagree
(`checkpoint_conflicts`) and a composite model's tower config completed (`tower_fields`)."""

import copy
from typing import Any

import numpy as np

from visionfm_jax.errors import ConfigError
from visionfm_jax.models import aurora, backbone, clip, dense_heads, kernels, swinv2, vit

# The one registry: each family under its Linen class (subclasses, such as the dense models, share their base's).
FAMILIES: dict[type, backbone.Family] = {
  family.module: family for family in (vit.FAMILY, swinv2.FAMILY, clip.FAMILY, aurora.FAMILY, dense_heads.FAMILY)
}
# config.model.name -> builder(model_cfg, dtype): the families a config builds by name.
BUILDERS = {family.name: family.build for family in FAMILIES.values() if family.name}


def name_of(model) -> str | None:
  """`model`'s key in the registry (`config.model.name`), None for a module that is not a whole model."""
  family = FAMILIES.get(type(model))
  return family.name if family else None


def family_of(model) -> backbone.Family | None:
  """The family of `model`'s class or of its nearest registered base; None for a module outside the registry (a
  text tower)."""
  return next((FAMILIES[cls] for cls in type(model).__mro__ if cls in FAMILIES), None)


def _answer(model, question: str):
  """What `model`'s family gives for `question` (a `backbone.Family` field): its function (its converter's name);
  None when it gives none."""
  return getattr(family_of(model), question, None)


def train_flops_per_example(model) -> float | None:
  """`model`'s analytic training FLOPs per example (backbone.py); None for a model without a count."""
  count = _answer(model, "train_flops_per_example")
  return count(model) if count else None


def layer_ids(model, names) -> tuple[dict[str, int | np.ndarray], int] | None:
  """({name: layer id} of the params `names` as `model` numbers them, L, its number of blocks) (backbone.py:
  BEiT's numbering, embeddings 0, block i i + 1, final norm and heads L + 1); None for a model without layer ids
  (one that has no backbone, or several towers of blocks: CLIP, Aurora)."""
  family = family_of(model)
  if family is None or family.layer_id is None:
    return None
  return {name: family.layer_id(model, name) for name in names}, family.num_layer_ids(model) - 2


def adapt_checkpoint(model, params: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """A checkpoint's {path: array} carried to `model`'s {path: shape} where the model knows how (backbone.py);
  what it cannot carry, and everything of a model that adapts nothing, as given."""
  adapt = _answer(model, "adapt_checkpoint")
  return adapt(model, params, shapes) if adapt else dict(params)


def description(model) -> str | None:
  """One line about `model`'s architecture; None for a family that gives none."""
  describe = _answer(model, "description")
  return describe(model) if describe else None


def checkpoint_fields(model) -> dict[str, Any] | None:
  """The fields that rebuild `model` (tools.import_hf's model.json; `from_checkpoint_fields`, backbone.py); None
  for a model that does not rebuild from fields alone (its family names no variant)."""
  family = family_of(model)
  return backbone.checkpoint_fields(model, family.name, family.variant(model)) if family and family.variant else None


def hf_converter(model) -> str | None:
  """The module under visionfm_jax.convert that writes `model` for transformers; None for a model without one."""
  return _answer(model, "hf_converter")


def from_checkpoint_fields(fields: dict):
  """The backbone that `fields` (its `checkpoint_fields`, e.g. a tools.import_hf model.json) describe; KeyError
  naming a missing field, or 'name' when it names no model that rebuilds from its fields alone (a ViT, a SwinV2)."""
  family = next((f for f in FAMILIES.values() if f.name == fields.get("name") and f.variant), None)
  if family is None:
    raise KeyError("name")
  return backbone.from_checkpoint_fields(family.module, fields)


def build(model_cfg, dtype, platform: str):
  """The model of `model_cfg` computing in `dtype`, its 'auto' fields resolved for the devices it will run on
  (`platform`: the mesh's, e.g. 'gpu' for a deviceless GPU compile on a CPU host): the one place a model's
  backend choices are made."""
  if model_cfg.name not in BUILDERS:
    raise ConfigError(f"config.model.name={model_cfg.name!r}: known models are {sorted(BUILDERS)}")
  try:
    return BUILDERS[model_cfg.name](for_platform(model_cfg, platform, dtype), dtype)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e


def for_platform(model_cfg, platform: str, dtype):
  """A copy of `model_cfg` whose 'auto' attention fields (every tower's) name what runs on `platform` in `dtype`
  (kernels.resolve_attention)."""
  resolved = copy.deepcopy(model_cfg)
  nodes = [resolved]
  while nodes:
    node = nodes.pop()
    for key, value in node.items():
      if hasattr(value, "items"):
        nodes.append(value)
      elif key == "attention" and value == "auto":
        node[key] = kernels.resolve_attention(value, platform, dtype)
  return resolved


def check_platform(model_cfg, platform: str) -> None:
  """ConfigError naming the attention field of `model_cfg` (any tower's) that has no kernel for a run on
  `platform` (kernels.check_platform: SwinV2's Pallas window kernel off a GPU)."""
  nodes = [("", model_cfg)]
  while nodes:
    prefix, node = nodes.pop()
    for key, value in node.items():
      if hasattr(value, "items"):
        nodes.append((f"{prefix}{key}.", value))
      elif key == "attention":
        try:
          kernels.check_platform(value, platform, f"config.model.{prefix}{key}")
        except ValueError as e:
          raise ConfigError(str(e)) from e


def _named(model_fields: dict) -> backbone.Family | None:
  """The family a model config (a dict) names; None for an unknown name."""
  return next((f for f in FAMILIES.values() if f.name and f.name == model_fields.get("name")), None)


def checkpoint_conflicts(model_fields: dict, checkpoint_fields: dict) -> dict[str, Any]:
  """{field: the value it needs} of a model config (a dict) initialised from a checkpoint described by its config
  fields, where the two disagree (backbone.py; SwinV2: `pretrained_window_sizes`); {} for a family that names none."""
  conflicts = getattr(_named(model_fields), "checkpoint_conflicts", None)
  return conflicts(model_fields, checkpoint_fields) if conflicts else {}


def tower_fields(model_fields: dict, key: str) -> dict[str, Any] | None:
  """The config fields (a dict) of the image tower `key` of a model config (a dict), completed as the model's
  builder completes them (backbone.py; Aurora's encoder: its name swinv2, the model's image_size); None when the
  model has no such tower."""
  complete = getattr(_named(model_fields), "tower_fields", None)
  return complete(model_fields, key) if complete else None
