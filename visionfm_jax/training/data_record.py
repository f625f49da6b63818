"""The run's training data, recorded in the workdir and compared at a resume.

`<workdir>/data.json` holds the identity of the data the run reads (data/loader/identity.py: every shard's name,
records, bytes and what else its source records of it, each dataset.json's digest). A resume whose data differs from
the recorded one (a dataset re-prepared or replaced at the same paths, shards added or lost) is refused with one line
naming what changed, unless `config.resume.allow_changes` names the training data's field (`data.source`, or
`data.mixture`): then the change is logged, the record rewritten with the step of the newest checkpoint then
(`changed_after`), and the data iterator continues at the saved stream position in the new data instead of
replaying batches of the old; so does every later resume from a checkpoint saved before the new data was read.
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax

from visionfm_jax import atomic, config_lib
from visionfm_jax.data.loader import identity as identity_lib
from visionfm_jax.errors import ConfigError, WorkdirError
from visionfm_jax.training.infra import faults

FILE = "data.json"
CHANGED_AFTER = "changed_after"  # the newest checkpoint's step when the data last changed; None: never
DATA_FIELDS = ("data.source", "data.mixture")  # either one, in config.resume.allow_changes, accepts new data


def check(config, workdir: str, identity: dict, newest_step: int | None) -> bool:
  """Compares `identity` with the workdir's record when there is a checkpoint (`newest_step`; ConfigError on every
  process when the data changed unasked), then records it. Returns whether the saved data position belongs to other
  data, which the iterator then follows by position (`follow_changed_data`); every process returns the same."""
  try:
    recorded = read(workdir) if newest_step is not None else None
  except WorkdirError as e:
    recorded, error = None, e
  else:
    error = None
  saved = {k: v for k, v in (recorded or {}).items() if k != CHANGED_AFTER}
  changes = identity_lib.differences(saved, identity) if recorded and saved != identity else []
  allowed = bool(set(DATA_FIELDS) & set(config_lib.allowed_changes(config)))
  if changes and not allowed and error is None:
    error = ConfigError(f"cannot resume {workdir}: its training data changed since the checkpoints were saved: "
                        f"{'; '.join(changes)}; restore the data, or pass --config.resume.allow_changes="
                        f"{_data_field(config)} to go on with this data from the saved stream position")
  faults.raise_together(error, ConfigError(f"cannot resume {workdir}: another process found its training data "
                                           f"changed, or could not read {FILE}"))
  if newest_step is not None and recorded is None:
    logging.warning("%s has no record of the training data it was saved with (%s): this resume is not compared",
                    workdir, FILE)
  changed_after = newest_step if changes else (recorded or {}).get(CHANGED_AFTER)
  if changes:
    logging.warning("resuming %s on changed training data (config.resume.allow_changes): %s", workdir,
                    "; ".join(changes))
  if jax.process_index() == 0 and (changes or recorded is None):
    atomic.write(os.path.join(workdir, FILE), json.dumps({**identity, CHANGED_AFTER: changed_after}))
  follows = changed_after is not None and newest_step is not None and newest_step <= changed_after
  return not faults.agreed(not follows)


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
