"""Fills the fields a recipe leaves to the run (config_lib/sizing.py) in place, once, before any check reads the
config, with a warning line for each that says what it chose: the step cadence from total_steps, the zero-shot
class names from the zero-shot data, and the class count from the training data's dataset.json. config.json
then holds the values chosen, so a tool that rebuilds the model from a workdir needs no data."""

from __future__ import annotations

from absl import logging

from visionfm_jax import config_lib, data
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.errors import ConfigError, DataError


def fill(config) -> list[str] | None:
  """Replaces every field of `config` left to the run by its value, logging a line for each. Returns the training
  data's class names where it read them (to size config.model.num_classes), for the task to take rather than read
  them again (`tasks.build`); else None."""
  lines, names = config_lib.fill_steps(config) + config_lib.fill_zeroshot(config), None
  if config_lib.is_sized(config, config_lib.NUM_CLASSES):
    names = _class_names(config)
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    lines.append(config_lib.fill_value(config, config_lib.NUM_CLASSES, len(names),
                                       f"the classes of {sources.training_what(config.data)} ({shown})"))
  for line in lines:
    logging.warning("%s", line)
  return names


def _class_names(config) -> list[str]:
  """The training data's class names, which size config.model.num_classes; ConfigError when it names none."""
  try:
    return data.train_class_names(config.data)
  except DataError as e:
    raise ConfigError(f"config.model.num_classes={config_lib.SIZED} takes the class count from the training "
                      f"data's dataset.json, but {e}; set --config.model.num_classes=") from e
