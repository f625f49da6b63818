"""Model builders: the one explicit registry, `config.model.name` -> builder(model_cfg, dtype)."""

from visionfm_jax.errors import ConfigError
from visionfm_jax.models import aurora, clip, swinv2, vit

BUILDERS = {
    "vit": vit.build,
    "swinv2": swinv2.build,
    "clip": clip.build,
    "aurora": aurora.build,
}


def build(model_cfg, dtype):
  if model_cfg.name not in BUILDERS:
    raise ConfigError(f"config.model.name={model_cfg.name!r}: known models are {sorted(BUILDERS)}")
  try:
    return BUILDERS[model_cfg.name](model_cfg, dtype)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e
