"""The data section's checks between fields, made before any source is opened (training/checks.py runs them
with the other owners'): the training mixture's entries against config.data.source, and the evaluation
preprocessing's name. Opening the sources is the loaders' (and the dry run's) job."""

from __future__ import annotations

from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.transforms import host as transforms


def check(data_cfg) -> None:
  """ConfigError naming the field: a malformed config.data.mixture entry, a mixture beside a non-empty
  config.data.source, or an unknown config.data.eval_preprocess."""
  if data_cfg.mixture:
    sources.train_specs(data_cfg)
  transforms.check_eval_preprocess(data_cfg.eval_preprocess)
