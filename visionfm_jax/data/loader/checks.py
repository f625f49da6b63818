"""The data section's checks between fields, made before any source is opened (training/checks.py runs them
with the other owners'): the training mixture's entries against config.data.source, and the evaluation
preprocessing's name. Opening the sources is the loaders' (and the dry run's) job; what they check of the opened
data against the config is here too: one batch a process (`check_one_batch`)."""

from __future__ import annotations

import os

from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import DataError

HOLDOUT_FLAGS = ("holdout_per_class", "holdout_examples")  # what datatools.prepare_data writes in dataset.json


def check(data_cfg) -> None:
  """ConfigError naming the field: a malformed config.data.mixture entry, a mixture beside a non-empty
  config.data.source, or an unknown config.data.eval_preprocess."""
  if data_cfg.mixture:
    sources.train_specs(data_cfg)
  transforms.check_eval_preprocess(data_cfg.eval_preprocess)


def check_found(data_cfg, absent_ok: bool = False) -> list[str]:
  """DataError naming the field and the path when what a training source reads (config.data.source, or each
  config.data.mixture entry, in config.data.train_split: `sources.disk_path`) matches nothing on disk: the first
  check of a run, before anything reads the data (sizing the head from its dataset.json, say). With `absent_ok` (a
  dry run that plans a job before its data arrives), a path whose folder does not exist yet is no error: returns
  those folders, sorted; a folder that exists without a match still fails (a mistyped file name)."""
  absent = set()
  for what, spec, _ in sources.train_specs(data_cfg):
    path = sources.disk_path(spec, data_cfg.train_split, data_cfg, what)
    if path is None or not sources.matches_nothing(path):
      continue
    folder = sources.fixed_folder(path)
    if absent_ok and not os.path.exists(folder):
      absent.add(folder)
      continue
    nothing = f"no files match {path!r}" if folder != path else f"no such file or folder {path}"
    raise DataError(f"{what} split {data_cfg.train_split!r}: {nothing}; {sources.PREPARE_HINT}")
  return sorted(absent)


def check_one_batch(mixture, batch_size: int, process_count: int, what: str) -> None:
  """DataError unless `mixture` (data/loader/mixture.py, opened) holds a batch of `batch_size` for each of
  `process_count` processes, naming its records, --config.global_batch_size, and the split that prepare_data held
  out of the same data (its dataset.json says so), which a smaller holdout would give back to training."""
  if mixture.records // process_count >= batch_size:
    return
  per_process = f" ({batch_size} for each of {process_count} processes)" if process_count > 1 else ""
  largest = mixture.records // process_count * process_count
  fix = (
    f"train with a --config.global_batch_size of at most {largest:,}, or on more data"
    if largest
    else "train on more data: each process needs a record of its own"
  )
  raise DataError(
    f"{what} has {mixture.records:,} records: fewer than one batch of --config.global_batch_size="
    f"{batch_size * process_count:,}{per_process}; {fix}"
    + "".join(_holdout_note(entry.source) for entry in mixture.entries)
  )


def _holdout_note(source) -> str:
  """'; prepare_data held 28 records of it out into split 'validation' (--holdout_per_class=50), ...' for a
  source whose dataset.json has a holdout split, else ''."""
  splits = (getattr(source, "metadata", None) or {}).get("splits", {})
  for split, entry in splits.items():
    for flag in HOLDOUT_FLAGS:
      if entry.get(flag):
        return (
          f"; prepare_data held {entry['records']:,} records of {entry.get('source') or 'it'} out into split "
          f"{split!r} (--{flag}={entry[flag]}): a smaller --{flag} leaves more to train on"
        )
  return ""
