"""What a training process leaves on its node when it dies, reaped: grain's data workers, multiprocessing's resource
tracker, and their shared memory in /dev/shm.

grain starts each data worker with multiprocessing's `spawn`. A worker hands its batches to the trainer in POSIX
shared-memory segments (/dev/shm/psm_*), their queues synchronise through named semaphores (/dev/shm/sem.mp-*), and
both are registered with the resource tracker, a process that unlinks whatever is still registered once every
process holding its pipe (the trainer and its workers) has gone. A trainer killed by SIGKILL (the OOM killer, a
watchdog) runs none of grain's clean-up: its workers lived on, blocked on queues nobody reads, and kept the tracker
and every segment alive with them.

- The workers end with the trainer: `EndWithTrainer`, the first op of a loader with workers, is an identity op whose
  unpickling in a worker (grain sends each worker its pipeline pickled, and offers a DataLoader no other hook into
  them) starts a thread that exits the worker within WATCH_INTERVAL_S of the trainer's end, however it ended (a
  zombie trainer counts as ended). Before it exits, the worker unlinks the run's segments and semaphores and takes
  them off the tracker's list; the tracker then reads end-of-file and exits. Left to the tracker, they would go
  too, with a 'There appear to be N leaked shared_memory objects' warning per kind (50 semaphores and 61 segments
  for the demo's run killed mid-training).
- A terminal's Ctrl-C reaches the workers too: they start with SIGINT blocked (`tie_workers_to_this_process`,
  cli.Interrupts) and ignore it once unpickled; their trainer stops, and they end with it.
- A trainer that ends on its own (done, an error, a preemption notice) unlinks what its workers made that it never
  took, once it has joined them (`tie_workers_to_this_process`).
- /dev/shm after a death that took the tracker too (SLURM ending a job step, `kill -9` of a process group): what the
  run creates there is named after its trainer (`run_tag`: pid namespace, pid, start time), and each start of a
  training loader (`remove_what_dead_runs_left`) removes the files of this user whose trainer is gone, with one
  line saying how many and how much space. Files of live runs, of other users, of other pid namespaces (containers
  sharing /dev/shm) and of other programs (names without a tag) stay.

Linux only (/proc, /dev/shm): elsewhere nothing is tagged, watched or removed.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import resource_tracker, shared_memory
import multiprocessing.util
import os
import re
import secrets
import signal
import stat
import threading
import time

from absl import logging
import grain

from visionfm_jax import cli

SHM_DIR = "/dev/shm"
WATCH_INTERVAL_S = 0.2
# The names multiprocessing gives segments (psm_<random>) and semaphores (sem.mp-<random>), with a run tag between.
_TAGGED = re.compile(r"(?:psm_|sem\.mp-)vfm-(\d+)-(\d+)-(\d+)-\w+")
_watching = False
_unlinking_at_exit = False


def supported() -> bool:
  return os.path.exists("/proc/self/ns/pid") and os.path.isdir(SHM_DIR)


def _pid_namespace() -> int:
  return os.stat("/proc/self/ns/pid").st_ino


def start_ticks(pid: int) -> int | None:
  """When process `pid` started (clock ticks after boot, /proc/<pid>/stat); None when no live process has the pid
  (a zombie has ended)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and ')'
  except OSError:
    return None
  return None if fields[0] in "ZX" else int(fields[19])


def run_tag(pid: int | None = None) -> str:
  """vfm-<pid namespace>-<pid>-<start ticks> of process `pid` (default: this one): no other process of this boot has
  it, even where pids are reused."""
  pid = os.getpid() if pid is None else pid
  return f"vfm-{_pid_namespace()}-{pid}-{start_ticks(pid)}"


def name_after(tag: str) -> None:
  """Names the segments and semaphores this process creates from now on (and the semaphores of the processes it
  starts) psm_<tag>-<random> and sem.mp-<tag>-<random>: multiprocessing keeps both prefixes in private names."""
  multiprocessing.current_process()._config["semprefix"] = f"/mp-{tag}"  # pylint: disable=protected-access
  shared_memory._make_filename = lambda: f"/psm_{tag}-{secrets.token_hex(4)}"  # pylint: disable=protected-access


class EndWithTrainer(grain.transforms.Map):
  """Passes elements through; unpickled in another process (a grain worker), it names that process's segments after
  the trainer (the process that made it) and, once the trainer has ended, unlinks what the run left in /dev/shm
  and exits the process."""

  def __init__(self):
    self.trainer = os.getpid()
    self.trainer_start, self.tag = start_ticks(self.trainer), run_tag(self.trainer)

  def map(self, element):
    return element

  def __reduce__(self):
    return _unpickled, (self.trainer, self.trainer_start, self.tag)


def _unpickled(trainer: int, trainer_start: int, tag: str) -> EndWithTrainer:
  op = EndWithTrainer.__new__(EndWithTrainer)
  op.trainer, op.trainer_start, op.tag = trainer, trainer_start, tag
  if os.getpid() != trainer:  # a copy made in the trainer itself is not a worker
    _end_with(trainer, trainer_start, tag)
  return op


def _end_with(trainer: int, trainer_start: int, tag: str) -> None:
  global _watching
  if _watching:
    return
  _watching = True
  name_after(tag)
  _leave_ctrl_c_to_the_trainer()
  # Polled rather than PR_SET_PDEATHSIG: that signal fires when the *thread* that started the worker ends, and grain
  # starts workers from its thread pools.
  threading.Thread(
    target=_exit_after, args=(trainer, trainer_start, tag), name="visionfm-trainer-watch", daemon=True
  ).start()


def _leave_ctrl_c_to_the_trainer() -> None:
  """A terminal's Ctrl-C reaches every process of its foreground group, the workers among them: a worker ignores it
  (Python would raise KeyboardInterrupt in it, printing its traceback) and ends with its trainer, which stops."""
  try:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  except ValueError:  # not the main thread: grain unpickles the pipeline in the worker's main thread
    pass


def _exit_after(trainer: int, trainer_start: int, tag: str) -> None:
  while start_ticks(trainer) == trainer_start:
    time.sleep(WATCH_INTERVAL_S)
  unlink_left_by(tag)  # each worker sweeps: whichever unlinks a file first unregisters it
  os._exit(1)


def tie_workers_to_this_process() -> list:
  """The ops to put first in a pipeline whose workers this process starts: [EndWithTrainer] ([] where unsupported);
  names this process's own segments and semaphores after it, and removes those left at its exit."""
  global _unlinking_at_exit
  if not supported():
    return []
  op = EndWithTrainer()
  name_after(op.tag)
  # Started now, before the workers: starting, multiprocessing's resource tracker unblocks SIGINT in this thread,
  # which the workers and their threads would inherit (cli.Interrupts)
  resource_tracker.ensure_running()
  cli.interrupts.block_here()
  if not _unlinking_at_exit:
    # Negative priority: multiprocessing runs it at exit after it has joined the workers, which make no more.
    multiprocessing.util.Finalize(None, unlink_left_by, args=(op.tag,), exitpriority=-1)
    _unlinking_at_exit = True
  return [op]


def unlink_left_by(tag: str, directory: str = SHM_DIR) -> int:
  """Unlinks the segments and semaphores named after `tag` that are still in `directory` (batches the workers made
  that the loop never took, the queues of a trainer that died) and takes each it unlinked off the resource
  tracker's list, which would otherwise remove them itself with a 'leaked ... objects' warning (and prints a
  traceback for a name it does not hold: a file another process unlinked first is left to that one). Returns how
  many."""
  count = 0
  for name in os.listdir(directory):
    if name.startswith(f"psm_{tag}-"):
      tracked, kind = f"/{name}", "shared_memory"
    elif name.startswith(f"sem.mp-{tag}-"):
      tracked, kind = f"/{name[len('sem.') :]}", "semaphore"
    else:
      continue
    try:
      os.unlink(os.path.join(directory, name))
    except FileNotFoundError:
      continue
    resource_tracker.unregister(tracked, kind)
    count += 1
  return count


def remove_what_dead_runs_left(directory: str = SHM_DIR) -> tuple[int, int]:
  """Removes the files in `directory` named after a trainer of this pid namespace that has ended (its pid gone, or
  now another process's) and owned by this user; logs one line when there were any. Returns (files, bytes held)."""
  if not supported():
    return 0, 0
  namespace, uid, started = _pid_namespace(), os.getuid(), {}
  removed = held = 0
  for name in os.listdir(directory):
    tag = _TAGGED.fullmatch(name)
    if tag is None or int(tag[1]) != namespace:
      continue
    pid, start = int(tag[2]), int(tag[3])
    if pid not in started:
      started[pid] = start_ticks(pid)
    if started[pid] == start:  # its trainer lives
      continue
    path = os.path.join(directory, name)
    try:
      info = os.lstat(path)
      if info.st_uid != uid or not stat.S_ISREG(info.st_mode):
        continue
      os.unlink(path)
    except FileNotFoundError:  # another start on this node removed it first
      continue
    removed += 1
    held += info.st_blocks * 512
  if removed:
    logging.info(
      "%s: removed %d shared-memory files (%.1f MiB) that runs which died on this node left",
      directory,
      removed,
      held / 2**20,
    )
  return removed, held
