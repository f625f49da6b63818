"""Fills the fields a recipe leaves to the run (config_lib/sizing.py) in place, once, before any check reads the
config, with a warning line for each that says what it chose: the class count from the training data's
dataset.json, a `:small` recipe's image size, batch and steps from the machine (`accelerator`), the step cadence
from total_steps, and the zero-shot class names from the zero-shot data. config.json
then holds the values chosen, so a tool that rebuilds the model from a workdir needs no data."""

from __future__ import annotations

import glob
import importlib.util
import os

from absl import logging
import jax
from jax._src import xla_bridge

from visionfm_jax import config_lib, data, models
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.errors import ConfigError, DataError


def fill(config) -> list[str] | None:
  """Replaces every field of `config` left to the run by its value, logging a line for each. Returns the training
  data's class names where it read them (to size config.model.num_classes), for the task to take rather than read
  them again (`tasks.build`); else None."""
  lines, names = [], None
  if config_lib.is_sized(config, config_lib.NUM_CLASSES):
    names = _class_names(config)
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    lines.append(
      config_lib.fill_value(
        config, config_lib.NUM_CLASSES, len(names), f"the classes of {sources.training_what(config.data)} ({shown})"
      )
    )
  if any(config_lib.is_sized(config, path) for path in config_lib.MACHINE_FIELDS):  # the steps' rules read them
    lines += config_lib.fill_machine(config, accelerator(), _flops_per_example)
  lines += config_lib.fill_steps(config) + config_lib.fill_zeroshot(config)
  for line in lines:
    logging.warning("%s", line)
  return names


def accelerator() -> str | None:
  """The accelerator this process trains on ('gpu', 'tpu'), None on a CPU, known without starting JAX's backend
  (main sizes the config before jax.distributed.initialize, which must come first): the backend's own platform once
  it runs; else the first of JAX_PLATFORMS (jax_platforms) where set; else a GPU where an NVIDIA or AMD device is
  and jax has its plugin, a TPU where libtpu is and a TPU device."""
  if xla_bridge.backends_are_initialized():
    platform = jax.default_backend()
  # jax.config sets its flags as attributes at run time; its class declares none
  elif platforms := jax.config.jax_platforms:  # type: ignore[attr-defined]
    platform = platforms.split(",")[0].strip()
  elif glob.glob("/dev/nvidia[0-9]*") and _installed("jax_cuda12_plugin", "jax_cuda13_plugin"):
    platform = "gpu"
  elif os.path.exists("/dev/kfd") and _installed("jax_rocm7_plugin", "jax_rocm60_plugin"):
    platform = "gpu"
  elif glob.glob("/dev/accel[0-9]*") and _installed("libtpu"):
    platform = "tpu"
  else:
    platform = "cpu"
  platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
  return None if platform == "cpu" else platform


def _installed(*modules: str) -> bool:
  return any(importlib.util.find_spec(name) is not None for name in modules)


def _flops_per_example(config) -> float | None:
  """The analytic training FLOPs of one example of `config`'s model (models.train_flops_per_example)."""
  return models.train_flops_per_example(models.build(config.model, config.precision.compute_dtype, "cpu"))


def _class_names(config) -> list[str]:
  """The training data's class names, which size config.model.num_classes; ConfigError when it names none."""
  try:
    return data.train_class_names(config.data)
  except DataError as e:
    raise ConfigError(
      f"config.model.num_classes={config_lib.SIZED} takes the class count from the training "
      f"data's dataset.json, but {e}; set --config.model.num_classes="
    ) from e
