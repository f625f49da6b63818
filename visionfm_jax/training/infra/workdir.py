"""The workdir belongs to one run at a time, and must be able to hold what the run writes.

`claimed(workdir, wait_s)` holds an exclusive lock on `<workdir>/lock` for the run: a POSIX record lock
(`fcntl.lockf`, which NFS and the cluster file systems that lock at all honour across hosts) that the kernel
drops when the holder dies, so a lock left by a killed run is free again. The file names the holder (host,
pid, SLURM job id) for the error line of a run that is refused. Only process 0 locks; the others learn its
decision through `faults.agreed`. A stale record (its run gone) is taken over by one taker only: takers read and
rewrite the record under a second lock, the guard (`WorkdirLock`).

A holder of the same SLURM job id is this job's previous incarnation (a requeue keeps the id), perhaps still
saving: the run waits up to `wait_s` for it. Any other holder is refused at once.

`check_writable` and `check_room` probe a directory before the run (and every save) relies on it: bytes and
inodes; storage faults are `WorkdirError`s naming the path and the errno, and a disk full by inodes as such.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import struct
import time

from absl import logging
import jax

from visionfm_jax import cli
from visionfm_jax.errors import WorkdirError
from visionfm_jax.training.infra import faults

LOCK_FILE = "lock"
_HELD = (errno.EACCES, errno.EAGAIN)  # lockf: another process holds the lock
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a file system mounted without locking
# The lock file's bytes whose record locks are the lock and its guard (WorkdirLock); apart, so that the kernel, which
# merges the adjacent locks of one holder, keeps them two (`_other_lock` tells them from one over the file).
_LOCK_BYTE, _GUARD_BYTE = 0, 2
_FLOCK = "hhqqi"  # Linux's struct flock: l_type, l_whence, l_start, l_len, l_pid
GUARD_WAIT_S = 10.0  # a taker holds the guard for a lock attempt and a record's write
# Room a save needs beyond the state's bytes: Orbax's metadata, the data iterator's state, file system slack.
ROOM_FACTOR = 1.1
ROOM_MARGIN_BYTES = 16 << 20
# Files (inodes) a save creates: 27 for a pico state on one process (the step's, items' and Orbax's metadata and
# commit markers; the data, config and health items; the state's OCDBT manifests and 9 data files); a large state
# writes more data files per process.
ROOM_INODES_BASE = 64
ROOM_INODES_PER_PROCESS = 64


def storage_error(what: str, path, error: OSError) -> WorkdirError:
  """'<what> <path>: <strerror> (errno ENOSPC)' as a WorkdirError; an ENOSPC on a file system without a free
  inode says 'no free inodes on <mount point> (df -i)' instead of the strerror, which only speaks of space."""
  code = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else type(error).__name__
  reason = error.strerror or str(error)
  if error.errno == errno.ENOSPC:
    inodes = free_inodes(error.filename or path)
    if inodes is not None and inodes[1] == 0:
      reason = f"no free inodes on {inodes[0]} (df -i)"
  file = f", writing {error.filename}" if error.filename and error.filename != os.fspath(path) else ""
  return WorkdirError(f"{what} {os.fspath(path)}: {reason} (errno {code}{file})")


def make_dirs(path) -> None:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise storage_error("cannot create the directory", path, e) from e


def check_writable(directory) -> None:
  """WorkdirError naming `directory` and the errno when a file cannot be created, written and removed there."""
  probe = os.path.join(os.fspath(directory), f".write_probe.{socket.gethostname()}.{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"probe")
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(probe)  # created, then the write failed: nothing of the probe stays
    raise storage_error("cannot write to", directory, e) from e


def check_storage(checkpoint_dir, state_bytes: int, *others) -> None:
  """On every process: `checkpoint_dir` (created) and `others` writable, and room there for one checkpoint of
  `state_bytes`; a WorkdirError on every process when any one fails (the others name it as elsewhere)."""
  error = None
  try:
    make_dirs(checkpoint_dir)
    for directory in (*others, checkpoint_dir):
      check_writable(directory)
    check_room(checkpoint_dir, state_bytes)
  except WorkdirError as e:
    error = e
  faults.raise_together(
    error, WorkdirError(f"another process cannot write to {os.fspath(checkpoint_dir)} (its error line says why)")
  )


def room_needed(state_bytes: int) -> int:
  return int(state_bytes * ROOM_FACTOR) + ROOM_MARGIN_BYTES


def inodes_needed() -> int:
  return ROOM_INODES_BASE + ROOM_INODES_PER_PROCESS * jax.process_count()


def check_room(directory, state_bytes: int) -> None:
  """WorkdirError (errno ENOSPC) when `directory`'s file system has less room than one checkpoint of a state of
  `state_bytes` bytes plus margin (`room_needed`), or fewer free inodes than its files (`inodes_needed`)."""
  stats = os.statvfs(os.fspath(directory))
  free = stats.f_bavail * stats.f_frsize
  needed = room_needed(state_bytes)
  if free < needed:
    raise WorkdirError(
      f"no room for a checkpoint in {os.fspath(directory)}: {_size(free)} free, one checkpoint "
      f"needs about {_size(needed)} ({_size(state_bytes)} of state plus margin) (errno ENOSPC)"
    )
  inodes = free_inodes(directory)
  if inodes is not None and inodes[1] < inodes_needed():
    mount, left = inodes
    raise WorkdirError(
      f"no room for a checkpoint in {os.fspath(directory)}: {left or 'no'} free inodes on {mount} "
      f"(df -i), one checkpoint writes up to about {inodes_needed()} files (errno ENOSPC)"
    )


def free_inodes(path) -> tuple[str, int] | None:
  """(mount point, inodes free to this user) of the file system holding `path` (or its nearest existing
  parent); None where it keeps no inode count (f_files 0: btrfs, some network file systems) or cannot say."""
  existing = os.path.abspath(os.fspath(path))
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  try:
    stats = os.statvfs(existing)
  except OSError:
    return None
  if not stats.f_files:
    return None
  mount = os.path.realpath(existing)
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  return mount, min(stats.f_favail, stats.f_ffree)


def _size(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def tree_bytes(tree) -> int:
  """The bytes of every array leaf of `tree` (global sizes; arrays or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype"))


# ------------------------------------------------------------------------------------------------ lock


def this_holder() -> dict:
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "job": os.environ.get("SLURM_JOB_ID", ""),
    "pid_namespace": _pid_namespace(),
  }


def _pid_namespace() -> str:
  """Which pid numbering this process sees ('' where /proc does not say): containers on one host share its
  name but not their pids."""
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""


def describe(holder: dict | None) -> str:
  if not holder:
    return "a run that has not written its name yet"
  text = f"host {holder.get('host')}, pid {holder.get('pid')}"
  return text + (f", SLURM job {holder['job']}" if holder.get("job") else "")


def _read_holder(fd: int) -> dict | None:
  try:
    data = os.pread(fd, 4096, 0)
    holder = json.loads(data) if data.strip() else None
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _gone_from_this_host(holder: dict | None) -> bool:
  """True when `holder` ran on this host, with this process's pid numbering, and its process no longer exists
  (a lock a lost NFS client kept)."""
  if (
    not holder
    or holder.get("host") != socket.gethostname()
    or not isinstance(holder.get("pid"), int)
    or holder.get("pid_namespace") != _pid_namespace()
  ):
    return False
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  return False


def _other_lock(fd: int, byte: int) -> tuple[int, int] | None:
  """(start, length; 0: to the end) of the record lock another process holds over `byte` of `fd`, None when none
  does (F_GETLK, with Linux's struct flock). One lock over both the lock and the guard byte is the file locked whole,
  as runs before the guard did: the kernel merges only adjacent locks of one holder, and the two bytes are apart."""
  query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
  try:
    kind, _, start, length, _ = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
  except OSError:
    return None
  return None if kind == fcntl.F_UNLCK else (start, length)


def _unlinked(fd: int, path: str) -> bool:
  """Whether the file open as `fd` is no longer the one at `path`."""
  try:
    status, named = os.fstat(fd), os.stat(path)
  except FileNotFoundError:
    return True
  return (status.st_dev, status.st_ino) != (named.st_dev, named.st_ino)


def _is_our_requeue(holder: dict | None) -> bool:
  job = os.environ.get("SLURM_JOB_ID", "")
  return bool(job) and holder is not None and holder.get("job") == job


class WorkdirLock:
  """The exclusive lock of one workdir: `acquire(wait_s)`, then `release()`.

  The lock is a POSIX record lock on the file's first byte, and its record (the holder's host and pid) is written
  while holding it. A taker holds a second record lock, on the file's third byte (the guard), from its attempt to
  lock through the writing of its record: so a process that finds the lock held reads, under the guard, the
  record of the process that holds it, never the record of a run that ended before (which it would take for a gone
  holder, and take over while a live run holds the lock). Record locks, not flock: NFS implements flock with them.
  """

  def __init__(self, workdir):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd = None

  def _open(self) -> int:
    try:
      return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise storage_error("cannot create the lock file", self.path, e) from e

  def acquire(self, wait_s: float) -> None:
    """Takes the lock, waiting up to `wait_s` for a holder of this SLURM job id; WorkdirError naming the holder
    otherwise. A stale record (its run ended without releasing) is taken over with a warning."""
    fd, taken = self._open_past_a_gone_holder()
    try:
      if not taken:
        self._wait_for(fd, wait_s)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd

  def _open_past_a_gone_holder(self) -> tuple[int, bool]:
    """(the lock file's descriptor, whether this run took the lock); a fresh file's when the lock is held for a
    process gone from this host, which no live process can take (a lock a lost NFS client kept)."""
    while True:
      fd = self._open()
      try:
        with self._guard(fd):
          if _unlinked(fd, self.path):  # replaced by a taker of a gone holder's lock since it was opened
            os.close(fd)
            continue
          if self._take(fd):
            return fd, True
          holder = _read_holder(fd)  # under the guard: the record of the process holding the lock
          if not _gone_from_this_host(holder):
            return fd, False
          logging.warning("the lock %s is held for %s, which is gone: taking it over", self.path, describe(holder))
          os.unlink(self.path)  # under the guard: a taker that opened this file sees it unlinked and opens anew
      except BaseException:
        os.close(fd)
        raise
      os.close(fd)

  def _wait_for(self, fd: int, wait_s: float) -> None:
    """Takes the lock of `fd`, waiting up to `wait_s` when the holder is this job's predecessor; WorkdirError naming
    the holder when it stays held."""
    deadline = time.monotonic() + wait_s
    while not self._take_guarded(fd):
      holder = _read_holder(fd)
      left = deadline - time.monotonic()
      if not _is_our_requeue(holder) or left <= 0:
        waited = f" (waited {wait_s:g} s, config.lock_wait_s)" if _is_our_requeue(holder) else ""
        raise WorkdirError(
          f"--workdir {self.workdir} is in use by another run ({describe(holder)}; lock file "
          f"{self.path}){waited}: wait for it to end, or give this run another --workdir"
        )
      time.sleep(min(1.0, left))

  def _take_guarded(self, fd: int) -> bool:
    with self._guard(fd):
      return self._take(fd)

  def _take(self, fd: int) -> bool:
    """Locks `fd` and writes this run's record into it (the caller holds the guard); False when another holds it.
    A record found there is a stale one: its run ended without releasing."""
    if not self._try_lock(fd, _LOCK_BYTE):
      return False
    previous = _read_holder(fd)
    if previous:
      logging.warning(
        "taking over the stale lock %s of %s (that run ended without releasing it)", self.path, describe(previous)
      )
    self._write_holder(fd)
    return True

  @contextlib.contextmanager
  def _guard(self, fd: int):
    """Holds the guard byte of `fd` for the block. Its holders hold it for a lock attempt and a record's write (a
    millisecond). Not waited for when no takeover can follow: the file locked whole (by a run of an earlier version,
    which takes no guard), or the lock held by a run whose record names it alive (a refusal needs no guard). One held
    past GUARD_WAIT_S otherwise is a taker stopped in between: WorkdirError naming the file."""
    deadline = time.monotonic() + GUARD_WAIT_S
    while not self._try_lock(fd, _GUARD_BYTE, quiet=True):
      lock = _other_lock(fd, _LOCK_BYTE)
      whole_file = lock is not None and _other_lock(fd, _GUARD_BYTE) == lock
      holder = _read_holder(fd) if lock else None
      if whole_file or (holder and not _gone_from_this_host(holder)):
        yield
        return
      if time.monotonic() > deadline:
        raise WorkdirError(
          f"{self.path}: another process has been taking this lock for over {GUARD_WAIT_S:g} s "
          f"(a run stopped while starting?); retry when it has ended"
        )
      time.sleep(0.005)
    try:
      yield
    finally:
      with contextlib.suppress(OSError):
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, _GUARD_BYTE)

  def _try_lock(self, fd: int, byte: int = 0, quiet: bool = False) -> bool:
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
      return True
    except OSError as e:
      if e.errno in _HELD:
        return False
      if e.errno in _UNSUPPORTED:
        if not quiet:
          logging.warning(
            "the file system of %s does not support locks: nothing stops a second run from using "
            "this workdir at the same time",
            self.workdir,
          )
        return True
      raise storage_error("cannot lock", self.path, e) from e

  def _write_holder(self, fd: int) -> None:
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(this_holder()).encode() + b"\n", 0)
      os.fsync(fd)
    except OSError as e:
      raise storage_error("cannot write the lock file", self.path, e) from e

  def release(self) -> None:
    """Empties the record (a run that ends cleanly leaves no stale holder) and drops the lock. The file stays:
    removing it would let a run waiting on the old file and a new one on a fresh file both hold 'the' lock."""
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.ftruncate(self._fd, 0)
    os.close(self._fd)  # closing drops the lockf lock
    self._fd = None


@contextlib.contextmanager
def claimed(workdir, wait_s: float):
  """Creates `workdir` and holds its lock for the block (process 0 takes it; every process fails together when
  it cannot)."""
  lock, error = None, None
  created = jax.process_index() == 0 and not os.path.exists(workdir)
  if jax.process_index() == 0:
    try:
      make_dirs(workdir)
      lock = WorkdirLock(workdir)
      lock.acquire(wait_s)
    except WorkdirError as e:
      lock, error = None, e
  faults.raise_together(
    error,
    WorkdirError(f"process 0 could not take the lock of --workdir {os.fspath(workdir)} (its error line says why)"),
  )
  held = lock
  if held is not None:  # a Ctrl-C that ends the process at once leaves no stale holder either
    cli.interrupts.before_end_now.append(held.release)
  try:
    yield
  except BaseException:
    if lock is not None and created:
      lock.release()
      lock = None
      _remove_if_nothing_was_written(workdir)
    raise
  finally:
    if lock is not None:
      lock.release()
    if held is not None:
      cli.interrupts.before_end_now.remove(held.release)


def _remove_if_nothing_was_written(workdir) -> None:
  """Removes a workdir this run created and left holding only its lock file (and empty folders): a run that stopped
  at start-up (missing data, a bad override) leaves no workdir behind. No run waits on that lock: only a requeue of
  the same SLURM job waits, and its first attempt is this one."""
  root = os.fspath(workdir)
  for folder, _, files in os.walk(root):
    if [f for f in files if not (folder == root and f == LOCK_FILE)]:
      return
  with contextlib.suppress(OSError):
    os.unlink(os.path.join(root, LOCK_FILE))
    for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
      os.rmdir(folder)
