"""A bounded set of open shards, shared by the reading threads of one process.

A globally shuffled stream touches a new shard at nearly every record (LAION's 232,000 shards: a batch of 2,048
touches some 2,040), so a reader that keeps every shard it has opened holds, in every data worker, a descriptor and
its buffers for every shard of the corpus within hours. `OpenShards` keeps at most `LIMIT` idle ones, closing the
least recently used; a shard in use by a thread is never closed under it, so the open count is at most LIMIT
plus the threads reading at once (`bound`).

What it costs: at 232,000 shards nearly every read opens its shard (the hit rate is LIMIT / shards); opening an
ArrayRecord shard reads its footer, some hundreds of microseconds beside the milliseconds an image's decoding and
augmentation take, and a process's first open of a shard checks it against its index row, a few microseconds more
(BENCHMARKS.md, "Input pipeline at the seeds' cardinalities").
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Callable

# Idle shards kept open per source and process: past the reading threads' working set nothing is gained (grain
# reads with 16 threads per worker; the evaluation reader with as many as the loader has workers).
LIMIT = 16
# grain's reading threads per worker process (its ReadOptions.num_threads default, which the loaders set).
READ_THREADS = 16


def bound(threads: int = READ_THREADS, limit: int = LIMIT) -> int:
  """The most handles an OpenShards holds with `threads` reading at once: the idle ones and one per thread."""
  return limit + threads


class Unopenable(Exception):
  """A shard that could not be opened; `__cause__` holds why."""


class OpenShards:
  """Open handles keyed by path, made by `open_fn(path)` and closed by their `close()`."""

  def __init__(self, open_fn: Callable[[str], object], limit: int = LIMIT):
    self._open_fn, self._limit = open_fn, int(limit)
    self._idle = collections.OrderedDict()  # path -> handle, least recently used first
    self._busy = {}  # path -> [handle, threads using it]
    self._lock = threading.Lock()

  def __len__(self) -> int:
    """Handles open now."""
    with self._lock:
      return len(self._idle) + len(self._busy)

  @contextlib.contextmanager
  def use(self, path: str):
    """The open handle of `path` for the duration of the block; Unopenable when it cannot be opened."""
    handle = self._acquire(path)
    try:
      yield handle
    finally:
      self._release(path)

  def _acquire(self, path: str):
    with self._lock:
      if path in self._busy:
        self._busy[path][1] += 1
        return self._busy[path][0]
      if path in self._idle:
        handle = self._idle.pop(path)
        self._busy[path] = [handle, 1]
        return handle
    try:
      handle = self._open_fn(path)  # outside the lock: other threads read meanwhile
    except Exception as e:
      raise Unopenable(path) from e
    with self._lock:
      if path in self._busy:  # another thread opened it meanwhile: share theirs
        self._busy[path][1] += 1
        handle, spare = self._busy[path][0], handle
      else:
        if path in self._idle:  # another thread opened, read and released it meanwhile: take that one
          handle, spare = self._idle.pop(path), handle
        else:
          spare = None
        self._busy[path] = [handle, 1]
        self._trim()
    if spare is not None:
      spare.close()
    return handle

  def _release(self, path: str) -> None:
    with self._lock:
      entry = self._busy[path]
      entry[1] -= 1
      if entry[1] == 0:
        del self._busy[path]
        self._idle[path] = entry[0]
        self._trim()

  def _trim(self) -> None:
    """Closes the least recently used idle handles while more than `limit` are open (under the lock)."""
    while self._idle and len(self._idle) + len(self._busy) > self._limit:
      _, handle = self._idle.popitem(last=False)
      handle.close()
