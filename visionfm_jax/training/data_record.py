"""The run's training data, recorded in the workdir and compared at a resume.

`<workdir>/data.json` holds the identity of the data the run reads (data/loader/identity.py: every shard's name,
bytes and records, each dataset.json's digest). A resume whose data differs from the recorded one (a dataset
re-prepared or replaced at the same paths, shards added or lost) is refused with one line naming what changed,
unless `config.resume.allow_changes` names the training data's field (`data.source`, or `data.mixture`): then the
change is logged, the record rewritten, and the data iterator continues at the saved stream position in the new
data instead of replaying batches of the old.
"""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from visionfm_jax import atomic, config_lib
from visionfm_jax.data.loader import identity as identity_lib
from visionfm_jax.errors import ConfigError, WorkdirError
from visionfm_jax.training.infra import faults

FILE = "data.json"
DATA_FIELDS = ("data.source", "data.mixture")  # either one, in config.resume.allow_changes, accepts new data


def check(config, workdir: str, identity: dict, resuming: bool) -> bool:
  """Compares `identity` with the workdir's record when `resuming` (ConfigError on every process when it
  changed unasked), then records it. Returns whether the data changed and the change was allowed."""
  recorded = read(workdir) if resuming else None
  changes = identity_lib.differences(recorded, identity) if recorded is not None else []
  allowed = bool(set(DATA_FIELDS) & set(config_lib.allowed_changes(config)))
  error = None
  if changes and not allowed:
    error = ConfigError(f"cannot resume {workdir}: its training data changed since the checkpoints were saved: "
                        f"{'; '.join(changes)}; restore the data, or pass --config.resume.allow_changes="
                        f"{_data_field(config)} to go on with this data from the saved stream position")
  faults.raise_together(error, ConfigError(f"cannot resume {workdir}: another process found its training data "
                                           f"changed"))
  if changes:
    logging.warning("resuming %s on changed training data (config.resume.allow_changes): %s", workdir,
                    "; ".join(changes))
  if jax.process_index() == 0 and identity != recorded:
    atomic.write(os.path.join(workdir, FILE), json.dumps(identity))
  return bool(changes)


def read(workdir: str) -> dict | None:
  """The recorded identity, None when there is none (a workdir of a version before it)."""
  path = os.path.join(workdir, FILE)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path}: unreadable record of the run's training data: {e}; move it away to record the "
                       f"data anew") from e


def _data_field(config) -> str:
  return "data.source" if config.data.source else "data.mixture"
