"""The run's training data, recorded in the workdir and compared at a resume.

`<workdir>/data.json` holds the identity of the data the run reads (data/loader/identity.py: every shard's name,
records, bytes and what else its source records of it, each dataset.json's digest). A resume whose data differs from
the recorded one (a dataset re-prepared or replaced at the same paths, shards added or lost) is refused with one line
naming what changed, unless `config.resume.allow_changes` names the training data's field (`data.source`, or
`data.mixture`): then the change is logged, the record rewritten with the step of the newest checkpoint then
(`changed_after`), and the data iterator continues at the saved stream position in the new data instead of
replaying batches of the old; so does every later resume from a checkpoint saved before the new data was read. A
record that is missing, empty or unreadable at a resume is refused the same way (nothing would guard the data
otherwise), and with the same field allowed, rebuilt from this run's data as if it had changed.
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
  """Compares `identity` with the workdir's record when there is a checkpoint (`newest_step`; on every process an
  error when the data changed unasked, or when the record is missing, empty or unreadable unasked), then records
  it. Returns whether the saved data position belongs to other data, which the iterator then follows by position
  (`follow_changed_data`); every process returns the same."""
  path = os.path.join(workdir, FILE)
  recorded, lost = _read(path) if newest_step is not None else (None, None)
  saved = {k: v for k, v in (recorded or {}).items() if k != CHANGED_AFTER}
  changes = identity_lib.differences(saved, identity) if recorded and saved != identity else []
  allowed = config_lib.allowed_changes(config)
  accepted = bool(set(DATA_FIELDS) & set(allowed))
  accept = f"--config.resume.allow_changes={','.join([*allowed, _data_field(config)])}"
  error: Exception | None = None
  if lost and not accepted:
    error = WorkdirError(
      f"cannot resume {workdir}: {path} {lost}; it records the training data the checkpoints "
      f"were saved with, which a resume compares with this run's; restore it, or pass {accept} to "
      f"record this run's data anew and go on from the saved stream position"
    )
  elif changes and not accepted:
    error = ConfigError(
      f"cannot resume {workdir}: its training data changed since the checkpoints were saved: "
      f"{'; '.join(changes)}; restore the data, or pass {accept} to go on with this data from the "
      f"saved stream position"
    )
  faults.raise_together(
    error,
    ConfigError(
      f"cannot resume {workdir}: another process found its training data "
      f"changed, or its {FILE} missing, empty or unreadable"
    ),
  )
  if lost:
    logging.warning(
      "resuming %s without a record of the data its checkpoints were saved with (%s %s; "
      "config.resume.allow_changes): this run's data is recorded anew and read from the saved stream "
      "position",
      workdir,
      path,
      lost,
    )
  if changes:
    logging.warning(
      "resuming %s on changed training data (config.resume.allow_changes): %s", workdir, "; ".join(changes)
    )
  changed_after = newest_step if changes or lost else (recorded or {}).get(CHANGED_AFTER)
  if jax.process_index() == 0 and (changes or lost or newest_step is None):
    atomic.write(path, json.dumps({**identity, CHANGED_AFTER: changed_after}))
  follows = changed_after is not None and newest_step is not None and newest_step <= changed_after
  return not faults.agreed(not follows)


def _read(path: str) -> tuple[dict | None, str | None]:
  """(the recorded identity, None), or (None, why it records nothing: missing, empty, or cannot be read)."""
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
  except FileNotFoundError:
    return None, "is missing"
  except (OSError, ValueError) as e:
    return None, f"cannot be read ({e})"
  if not isinstance(recorded, dict) or not recorded.get("entries"):
    return None, "is empty" if not recorded else "holds no record of training data (no 'entries')"
  return recorded, None


def _data_field(config) -> str:
  return "data.source" if config.data.source else "data.mixture"
