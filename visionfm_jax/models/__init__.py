"""Model builders: the one explicit registry, `config.model.name` -> builder(model_cfg, dtype); a model's registry
name (`name_of`); the backbone a tools.import_hf model.json describes (`from_checkpoint_fields`); and the config
fields a model takes from the checkpoint it starts from (`fields_from_checkpoint`)."""

import copy

import jax

from visionfm_jax.errors import ConfigError
from visionfm_jax.models import aurora, clip, layers, swinv2, vit

BUILDERS = {
    "vit": vit.build,
    "swinv2": swinv2.build,
    "clip": clip.build,
    "aurora": aurora.build,
}
CLASSES = {"vit": vit.ViT, "swinv2": swinv2.SwinV2, "clip": clip.CLIP, "aurora": aurora.Aurora}  # BUILDERS' names


def name_of(model) -> str | None:
  """`model`'s key in the registry (`config.model.name`), None for a module that is not a whole model."""
  return next((name for name, cls in CLASSES.items() if type(model) is cls), None)


def from_checkpoint_fields(fields: dict):
  """The backbone that `fields` (its `checkpoint_fields`, e.g. a tools.import_hf model.json) describe; KeyError
  naming a missing field, or 'name' when it names no model that rebuilds from its fields alone (a ViT, a SwinV2)."""
  model_class = CLASSES.get(fields.get("name"))
  if not hasattr(model_class, "from_checkpoint_fields"):
    raise KeyError("name")
  return model_class.from_checkpoint_fields(fields)


def build(model_cfg, dtype, platform: str | None = None):
  """The model of `model_cfg` computing in `dtype`, its 'auto' fields resolved for the devices it will run on
  (`platform`: the mesh's, e.g. 'gpu' for a deviceless GPU compile on a CPU host; this process's backend when
  None)."""
  if model_cfg.name not in BUILDERS:
    raise ConfigError(f"config.model.name={model_cfg.name!r}: known models are {sorted(BUILDERS)}")
  try:
    return BUILDERS[model_cfg.name](for_platform(model_cfg, platform or jax.default_backend(), dtype), dtype)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e


def for_platform(model_cfg, platform: str, dtype):
  """A copy of `model_cfg` whose 'auto' attention fields (every tower's) name what runs on `platform` in `dtype`
  (layers.resolve_attention)."""
  resolved = copy.deepcopy(model_cfg)
  nodes = [resolved]
  while nodes:
    node = nodes.pop()
    for key, value in node.items():
      if hasattr(value, "items"):
        nodes.append(value)
      elif key == "attention" and value == "auto":
        node[key] = layers.resolve_attention(value, platform, dtype)
  return resolved


def fields_from_checkpoint(model_fields: dict, checkpoint_fields: dict) -> dict:
  """Fields of a model config (a dict) whose value the checkpoint it is initialised from implies, where that
  differs from what the config gives: {'pretrained_window_sizes': the windows a SwinV2 checkpoint normalised its
  position bias by} (swinv2.windows_from_checkpoint); {} for the others (training/init_from.py applies them)."""
  windows = swinv2.windows_from_checkpoint(model_fields, checkpoint_fields)
  return {"pretrained_window_sizes": windows} if windows else {}
