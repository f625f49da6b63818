"""Skipping undecodable training records without losing determinism, and counting them.

The grain loader never drops a record: an undecodable image (see `transforms.MarkUndecodable`) travels as a
placeholder with valid=False, so the workers' batches keep their fixed size and grain's per-record random
streams are untouched. `SkippingIterator`, in the main process, takes the valid rows of those raw batches
into full batches of the same size (carrying the rest of a raw batch over to the next batch), counts what
it skipped, and stops the run with a `DataError` when too much of the data is bad.

Its state is (the loader's state before the raw batch in hand, how many of its rows are used, counts), so a
restored iterator yields the same batches bitwise. A state saved with another number of data workers, or the
states of all processes of a run with another number of processes, restore to the same global stream
position instead (`resume`): the epoch goes on without repeating a record. A rollback past bad data
(training/health.py) continues the stream further on (`skip_to`).
"""

from __future__ import annotations

import contextlib
import json
import logging

import numpy as np

from visionfm_jax.data.loader import resume, shm_room
from visionfm_jax.errors import DataError, UserError

VALID = "valid"


def position_of(state: bytes | str | dict, process_count: int) -> int:
  """One past the furthest global stream position consumed by the process whose `SkippingIterator.get_state`
  this is (of `process_count` processes)."""
  state = resume.parse(state)
  return resume.frontier(resume.parse(state["loader"]), int(state["offset"]), process_count)


class SkippingLoader:
  """Wraps a grain.DataLoader whose batches carry 'valid'; `iter()` gives a `SkippingIterator`."""

  def __init__(
    self,
    loader,
    batch_size: int,
    *,
    max_fraction: float,
    check_after: int,
    what: str,
    process_index: int = 0,
    process_count: int = 1,
    open_files: int = 0,
    shm_need: str = "",
    identity: dict | None = None,
  ):
    self.loader, self.batch_size = loader, int(batch_size)
    self.open_files = int(open_files)  # descriptors the pipeline may hold (data/loader/open_files.py)
    self.shm_need = shm_need  # what its workers hold in /dev/shm, in words (data/loader/shm_room.py)
    self.identity = identity or {}  # what names the data (data/loader/identity.py)
    self.max_fraction, self.check_after, self.what = float(max_fraction), int(check_after), what
    self.process_index, self.process_count = int(process_index), int(process_count)

  def __iter__(self) -> "SkippingIterator":
    return SkippingIterator(
      iter(self.loader),
      self.batch_size,
      max_fraction=self.max_fraction,
      check_after=self.check_after,
      what=self.what,
      process_index=self.process_index,
      process_count=self.process_count,
      shm_need=self.shm_need,
    )


class _WorkersNamed:
  """A grain iterator whose calls re-raise a failure of its data workers' shared memory, or a worker's death, as
  one line (`shm_room.explained`; `shm_need` says what the workers hold there). The workers start at its first
  call (grain makes its queues and processes then)."""

  def __init__(self, iterator, shm_need: str):
    self._it, self._shm_need = iterator, shm_need or "the data workers hand their batches over there"

  def __next__(self):
    return self._named(next, self._it)

  def get_state(self):
    return self._named(self._it.get_state)

  def set_state(self, state):
    return self._named(self._it.set_state, state)

  def start_prefetch(self):
    if hasattr(self._it, "start_prefetch"):
      self._named(self._it.start_prefetch)

  def stop_workers(self) -> None:
    """Stops the data workers and waits for them (grain's close of the pipeline; its DataLoaderIterator keeps it
    as `_iterator` and offers no close of its own): a stop that the main process is about to report leaves no
    worker decoding, and warning, under its line."""
    pipeline = getattr(self._it, "_iterator", self._it)
    if hasattr(pipeline, "close"):
      with contextlib.suppress(Exception):  # the report matters, not a failure of the clean-up
        pipeline.close()

  def _named(self, call, *args):
    try:
      return call(*args)
    except UserError:  # a worker's one-line data error: the others stop before it is reported
      self.stop_workers()
      raise
    except (OSError, RuntimeError) as e:
      line = shm_room.explained(e, self._shm_need)
      if line is None:
        raise
      self.stop_workers()
      raise line from None


class SkippingIterator:
  """Full batches of valid rows; `read` and `skipped` count the records this process has consumed and dropped.

  Raises DataError once `read` >= `check_after` and `skipped` > `max_fraction` * `read`, and a UserError naming
  /dev/shm when the data workers run out of it, or naming the signal that killed a worker (`shm_room.explained`).
  """

  def __init__(
    self,
    iterator,
    batch_size: int,
    *,
    max_fraction: float,
    check_after: int,
    what: str,
    process_index: int = 0,
    process_count: int = 1,
    shm_need: str = "",
  ):
    self._it, self.batch_size = _WorkersNamed(iterator, shm_need), batch_size
    self.process_index, self.process_count = process_index, process_count
    self.max_fraction, self.check_after, self.what = max_fraction, check_after, what
    self.read = self.skipped = 0
    self._raw = self._valid = self._raw_state = None
    self._offset = 0
    self.replays = True  # False: a saved state continues at its stream position (`follow_changed_data`)

  def __iter__(self):
    return self

  def _next_raw(self) -> None:
    self._raw_state = self._it.get_state()
    raw = dict(next(self._it))
    self._valid = np.asarray(raw.pop(VALID), bool)
    self._raw, self._offset = raw, 0

  def _take(self, need: int) -> dict:
    """Up to `need` valid rows from the raw batch in hand, from `_offset` on."""
    valid_rows = np.flatnonzero(self._valid[self._offset :]) + self._offset
    chosen = valid_rows[:need]
    end = int(chosen[-1]) + 1 if len(chosen) == need else len(self._valid)
    self.read += end - self._offset
    self.skipped += end - self._offset - len(chosen)
    whole = self._offset == 0 and len(chosen) == len(self._valid)
    self._offset = end
    return self._raw if whole else {k: v[chosen] for k, v in self._raw.items()}

  def __next__(self) -> dict:
    parts, have = [], 0
    while have < self.batch_size:
      if self._raw is None or self._offset == len(self._valid):
        self._next_raw()
      part = self._take(self.batch_size - have)
      self._check()
      parts.append(part)
      have += len(next(iter(part.values())))
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def _check(self) -> None:
    if self.read >= self.check_after and self.skipped > self.max_fraction * self.read:
      self._it.stop_workers()
      raise DataError(
        f"{self.what}: {self.skipped} of the {self.read} records read so far by this process are corrupt or "
        f"undecodable ({self.skipped / self.read:.1%} > config.data.max_skipped_fraction="
        f"{self.max_fraction}); check the data (the warnings above name records)"
      )

  def get_state(self) -> bytes:
    in_hand = self._raw is not None and self._offset < len(self._valid)
    loader_state = self._raw_state if in_hand else self._it.get_state()
    return json.dumps(
      {
        "loader": loader_state.decode(),
        "offset": self._offset if in_hand else 0,
        "read": self.read,
        "skipped": self.skipped,
      }
    ).encode()

  def set_state(self, state: bytes) -> None:
    """Continues where `get_state` was taken. A state saved with another number of data workers continues
    at its global stream position instead (`resume`): its batches cannot be replayed by other workers."""
    state = resume.parse(state)
    fresh = resume.parse(self._it.get_state())
    loader_state = resume.parse(state["loader"])
    replay = self.replays and loader_state[resume.WORKER_COUNT] == fresh[resume.WORKER_COUNT]
    if replay:
      self._it.set_state(json.dumps(loader_state).encode())
    else:
      self._restart_after([resume.frontier(loader_state, int(state["offset"]), self.process_count)], fresh)
    self._set_counts(int(state["read"]), int(state["skipped"]))
    if replay and state["offset"]:
      self._next_raw()
      self._offset = int(state["offset"])

  def follow_changed_data(self) -> None:
    """A state saved over other data (a resume that allows it) continues at its global stream position in the
    data read now, instead of replaying batches of records that may no longer be there."""
    self.replays = False

  def continue_from(self, states) -> None:
    """Continues the global stream after the states of all processes of a run with another number of
    processes (`states[k]` saved by process k of len(states)). The records read and skipped so far are split
    evenly between the processes now, so that their sums stay the run's."""
    states = [resume.parse(s) for s in states]
    frontiers = [resume.frontier(resume.parse(s["loader"]), int(s["offset"]), len(states)) for s in states]
    self._restart_after(frontiers, resume.parse(self._it.get_state()))
    share = lambda total: total // self.process_count + int(self.process_index < total % self.process_count)
    self._set_counts(share(sum(int(s["read"]) for s in states)), share(sum(int(s["skipped"]) for s in states)))

  def skip_to(self, position: int) -> int:
    """Continues the global stream at the first position at or past `position` where a round of this run's
    residues begins (the same on every process given the same `position`), dropping the batch in hand and
    keeping the counts; returns that position. A rollback past bad data (training/health.py) calls it."""
    workers = int(resume.parse(self._it.get_state())[resume.WORKER_COUNT])
    position = resume.restart_position([position], self.process_count, workers)
    self._restart_at(position, resume.parse(self._it.get_state()))
    self._set_counts(self.read, self.skipped, quiet=True)
    return position

  def _restart_at(self, position: int, fresh_state: dict) -> None:
    workers = int(fresh_state[resume.WORKER_COUNT])
    self._it.set_state(
      json.dumps(
        resume.loader_state_at(fresh_state, position, self.process_index, self.process_count, workers)
      ).encode()
    )

  def _restart_after(self, frontiers, fresh_state: dict) -> None:
    position = resume.restart_position(frontiers, self.process_count, int(fresh_state[resume.WORKER_COUNT]))
    self._restart_at(position, fresh_state)
    logging.info(
      "%s: the saved data position belongs to another number of processes or workers; continuing the "
      "global stream at position %d (the furthest saved one was %d)",
      self.what,
      position,
      max(frontiers) - 1,
    )

  def _set_counts(self, read: int, skipped: int, quiet: bool = False) -> None:
    self.read, self.skipped = read, skipped
    self._raw = self._valid = self._raw_state = None
    self._offset = 0
    if self.skipped and not quiet:
      logging.info("%s: %d of %d records read so far were skipped", self.what, self.skipped, self.read)

  def start_prefetch(self) -> None:
    self._it.start_prefetch()
