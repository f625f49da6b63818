"""Loading a config file as `--config=path[:variant]` does, and naming the field an override misspells."""

from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections

from visionfm_jax.errors import ConfigError


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of `spec` = 'path/to/config.py[:variant]': the file's get_config(variant), as
  `--config=spec` loads it. ConfigError when the file does not exist, has no get_config, or rejects the
  variant (configs raise ConfigError for an unknown variant)."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config={spec}: no config file {path!r} (from {os.getcwd()})")
  module_spec = importlib.util.spec_from_file_location("visionfm_jax_config_file", path)
  if module_spec is None:  # a suffix no module loader takes
    raise ConfigError(f"--config={spec}: {path} is not a Python file (a config is a .py file with get_config())")
  assert module_spec.loader is not None  # a spec found by its suffix comes with that suffix's loader
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"--config={spec}: {path} line {e.lineno}: {e.msg}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config={spec}: {path} defines no get_config()")
  return module.get_config(variant) if variant else module.get_config()


def check_override(config: ml_collections.ConfigDict, flag: str) -> None:
  """ConfigError when `flag` ('--config.optim.lr=...' or 'config.optim.lr') names no field of `config`,
  with the closest field names as suggestions."""
  name = flag.lstrip("-").split("=", 1)[0]
  node, parts = config, name.split(".")[1:]
  for depth, key in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
      parent = ".".join(["config", *parts[:depth]])
      known = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      close = difflib.get_close_matches(key, known, n=3)
      hint = (
        f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else (f"; its fields: {', '.join(known)}" if known else f"; {parent} is a {type(node).__name__}, not a group")
      )
      raise ConfigError(f"--{name}: {parent} has no field {key!r}{hint}")
    node = node[key]
