"""Where a training loader resumes when the number of processes or data workers has changed.

The training loaders (`pipeline.grain_train_loader`) read one global stream: a shuffled order of all records per
epoch, a pure function of (seed, epoch). Global position g of that stream is read by process g mod P (P
processes), and within a process by worker (g div P) mod W (W = max(1, data workers)): every process and
worker owns a residue class of positions modulo P * W, and grain's DataLoader state records, per worker, the
last position it read ('last_seen_indices').

The stream is a mixture's (data/loader/mixture.py): one source's records, or several sources' interleaved, each
shuffled per its own epoch; positions are stream positions either way.

So a saved iterator state is a set of consumed positions, whatever P and W were. Restoring onto other P or W
cannot reproduce the old order of batches, but it can continue the same global stream: the new loaders start
at the first position that is past everything any old process consumed and that begins a whole round of the
new P * W residues. No record is read twice within the epoch; the positions that the slower old processes or
workers had not reached before the frontier (at most P * W + one batch per old worker) are not read in it.
"""

from __future__ import annotations

import json
from typing import Sequence

# Keys of grain.DataLoader's iterator state (JSON).
LAST_SEEN = "last_seen_indices"
LAST_WORKER = "last_worker_index"
WORKER_COUNT = "worker_count"
SAMPLER = "sampler"
DATA_SOURCE = "data_source"


def frontier(loader_state: dict, offset: int, process_count: int) -> int:
  """One past the furthest global position consumed by one process, from its grain DataLoader state taken
  before the raw batch in hand, of which `offset` rows were used (`skipping.SkippingIterator`)."""
  workers = int(loader_state[WORKER_COUNT])
  stride = max(workers, 1) * process_count  # positions between two successive records of one worker
  last_seen = {int(worker): int(position) for worker, position in loader_state[LAST_SEEN].items()}
  furthest = max(last_seen.values())
  if offset:  # the first `offset` records of the in-hand batch, from the worker after the last one read
    in_hand = (int(loader_state[LAST_WORKER]) + 1) % workers if workers else 0
    furthest = max(furthest, last_seen[in_hand] + offset * stride)
  return furthest + 1


def restart_position(frontiers: Sequence[int], process_count: int, worker_count: int) -> int:
  """The first position at or past every frontier where a whole round of the new residues begins."""
  stride = max(worker_count, 1) * process_count
  return -(-max(frontiers) // stride) * stride


def loader_state_at(template: dict, position: int, process_index: int, process_count: int, worker_count: int) -> dict:
  """A grain DataLoader state (with `template`'s sampler and source descriptions) whose next record, for the
  loader of `process_index` of `process_count` with `worker_count` workers, is global `position` +
  process_index (`position` from `restart_position`)."""
  workers = max(worker_count, 1)
  stride = workers * process_count
  if position % stride:
    raise ValueError(f"position {position} does not begin a round of {stride} residues")
  # Worker j's records are process_index + j * process_count + m * stride; it last saw the one before
  # `position`'s round.
  last_seen = {str(j): position + process_index + j * process_count - stride for j in range(workers)}
  return {**template, LAST_SEEN: last_seen, LAST_WORKER: workers - 1, WORKER_COUNT: int(worker_count)}


def parse(state: bytes | str | dict) -> dict:
  if isinstance(state, dict):
    return state
  return json.loads(state.decode() if isinstance(state, bytes) else state)
