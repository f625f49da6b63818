"""Fills the fields a recipe leaves to the run (config_lib/sizing.py) in place, once, before any check reads the
config, with a warning line for each that says what it chose: the step cadence from total_steps, the zero-shot
class names from the zero-shot data, and the class count from the training data's dataset.json. config.json
then holds the values chosen, so a tool that rebuilds the model from a workdir needs no data."""

from __future__ import annotations

from absl import logging

from visionfm_jax import config_lib, data
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.errors import ConfigError, DataError


def fill(config) -> None:
  """Replaces every field of `config` left to the run by its value, logging a line for each."""
  lines = config_lib.fill_steps(config) + config_lib.fill_zeroshot(config)
  if config_lib.is_sized(config, config_lib.NUM_CLASSES):
    lines.append(_fill_num_classes(config))
  for line in lines:
    logging.warning("%s", line)


def _fill_num_classes(config) -> str:
  """config.model.num_classes from the training data's class names; ConfigError when it names none."""
  try:
    names = data.train_class_names(config.data)
  except DataError as e:
    raise ConfigError(f"config.model.num_classes={config_lib.SIZED} takes the class count from the training "
                      f"data's dataset.json, but {e}; set --config.model.num_classes=") from e
  shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
  return config_lib.fill_value(config, config_lib.NUM_CLASSES, len(names),
                               f"the classes of {sources.training_what(config.data)} ({shown})")
