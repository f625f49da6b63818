"""Which files in some folders are opened, by any process, while a block runs: inotify's IN_OPEN events on the
folders, read on a thread as they come (Linux only; no dependency but libc).

The kernel merges an event with an identical one still queued before it (the same file opened twice in a row), and
queues at most /proc/sys/fs/inotify/max_queued_events (16,384 by default): a burst faster than the thread reads them
overflows it (`overflowed`). So the opens counted are a lower bound, the files opened exact unless it overflowed.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading

_IN_OPEN, _IN_Q_OVERFLOW = 0x20, 0x4000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of the name


class FileOpens:
  """A context manager noting the opens of files whose names end in `suffix` in `directories` (not below them):
  `count` of opens so far, the `files` opened (names), `overflowed` when some events were lost."""

  def __init__(self, directories, suffix: str = ""):
    self.directories, self.suffix = [os.fspath(d) for d in directories], suffix.encode()
    self.count, self.files, self.overflowed = 0, set(), False
    self._lock, self._stop = threading.Lock(), threading.Event()
    self._fd, self._thread = -1, None

  def __enter__(self) -> FileOpens:
    libc = ctypes.CDLL(None, use_errno=True)
    self._fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if self._fd < 0:
      raise OSError(ctypes.get_errno(), "inotify_init1")
    for directory in self.directories:
      if libc.inotify_add_watch(self._fd, os.fsencode(directory), _IN_OPEN) < 0:
        os.close(self._fd)
        raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
    self._thread = threading.Thread(target=self._read_events, name="file-opens", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    self._thread.join()
    os.close(self._fd)

  def value(self) -> int:
    """The opens counted so far (those the kernel has queued and the thread has not read yet are read first)."""
    self._drain()
    return self.count

  def opened(self) -> int:
    """How many of the files have been opened so far (as `value`)."""
    self._drain()
    return len(self.files)

  def _read_events(self) -> None:
    while not self._stop.is_set():
      select.select([self._fd], [], [], 0.05)
      self._drain()
    self._drain()

  def _drain(self) -> None:
    with self._lock:
      while True:
        try:
          data = os.read(self._fd, 1 << 16)
        except BlockingIOError:
          return
        self._count(data)

  def _count(self, data: bytes) -> None:
    at = 0
    while at < len(data):
      _, mask, _, length = _EVENT.unpack_from(data, at)
      name = data[at + _EVENT.size : at + _EVENT.size + length].rstrip(b"\0")
      at += _EVENT.size + length
      if mask & _IN_Q_OVERFLOW:
        self.overflowed = True
      elif mask & _IN_OPEN and name.endswith(self.suffix):
        self.count += 1
        self.files.add(name)
