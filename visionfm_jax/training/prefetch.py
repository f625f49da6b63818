"""Batches placed on the devices ahead of the step that uses them, with the data iterator's state kept exact.

`DevicePrefetch(iterator, sharding, depth)` keeps `depth` global batches whose host-to-device copies have been
started (`jax.make_array_from_process_local_data` returns before the copy ends), so that the copy of the next
batches overlaps the current step. The wrapped iterator runs `depth` batches ahead of the training step, so
its own state would resume `depth` batches too late: each buffered batch carries the iterator's state (and
record counts) taken right after it was read, and `get_state`, `read` and `skipped` answer for the last batch
handed out, as if there were no buffer (an iterator without `read`/`skipped` counts has none here either).
"""

from __future__ import annotations

import collections
from typing import Any, Literal

from jax.sharding import NamedSharding

from visionfm_jax.parallel import host_to_global


class DevicePrefetch:
  def __init__(self, iterator, sharding: NamedSharding, depth: int):
    self._it, self._sharding, self._depth = iterator, sharding, depth
    self._buffer: collections.deque[tuple[dict, bytes, int | None, int | None]] = collections.deque()
    self._handed_out: tuple[bytes, int | None, int | None] | None = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    while len(self._buffer) <= self._depth:
      self._buffer.append(self._read())
    batch, state, read, skipped = self._buffer.popleft()
    self._handed_out = (state, read, skipped)
    return batch

  def _read(self) -> tuple[dict, bytes, int | None, int | None]:
    batch = host_to_global(next(self._it), self._sharding)
    return batch, self._it.get_state(), getattr(self._it, "read", None), getattr(self._it, "skipped", None)

  def get_state(self) -> bytes:
    return self._it.get_state() if self._handed_out is None else self._handed_out[0]

  @property
  def read(self) -> int:
    return self._count("read", 1)

  @property
  def skipped(self) -> int:
    return self._count("skipped", 2)

  def _count(self, name: str, index: Literal[1, 2]) -> int:
    count = None if self._handed_out is None else self._handed_out[index]
    if count is None:
      return getattr(self._it, name)  # AttributeError for an iterator that does not count
    return count
