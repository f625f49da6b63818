"""What a process tree holds and reads, from /proc (no other dependency): the process, its descendants (`Probe`
samples them, `Sample` is one sample) and the /dev/shm entries they hold.

Per process: descriptors (entries of /proc/PID/fd), RSS (VmRSS of /proc/PID/status), threads, CPU seconds (user +
system, /proc/PID/stat) and the bytes its read calls returned (`rchar` of /proc/PID/io: files, pipes and /proc
alike, from the page cache or the disk). A sample sums the descendants' figures and counts the /dev/shm entries
the tree holds or has held; the bytes read per record are the tree's `rchar` over the interval since the previous
sample, less what the probe itself reads, over the records drawn in it.
"""

from __future__ import annotations

import dataclasses
import os


def descendants(pid: int) -> list[int]:
  """Every process below `pid` (children first), from /proc/PID/task/*/children."""
  out, queue = [], [pid]
  while queue:
    parent = queue.pop(0)
    try:
      tasks = os.listdir(f"/proc/{parent}/task")
    except OSError:
      continue
    for task in tasks:
      try:
        with open(f"/proc/{parent}/task/{task}/children", encoding="ascii") as f:
          kids = [int(k) for k in f.read().split()]
      except OSError:
        continue
      out.extend(kids)
      queue.extend(kids)
  return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_figures(pid: int) -> dict | None:
  """{'pid', 'role', 'fds', 'rss_mb', 'threads', 'cpu_s' (user + system)} of a live process; None once it has
  gone."""
  try:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
      status = dict(line.split(":", 1) for line in f if ":" in line)
    with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
      fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
  except OSError:
    return None
  return {
    "pid": pid,
    "role": _role(cmdline),
    "fds": fds,
    "threads": int(status["Threads"]),
    "rss_mb": round(int(status.get("VmRSS", "0 kB").split()[0]) / 1024, 2),
    "cpu_s": round((int(fields[11]) + int(fields[12])) / CLOCK_TICKS, 2),
  }  # utime, stime


def _role(cmdline: str) -> str:
  if "resource_tracker" in cmdline:
    return "resource_tracker"
  if "multiprocessing" in cmdline:
    return "worker"
  return "other"


def bytes_read(pid: int) -> int | None:
  """`rchar` of /proc/PID/io: the bytes the process's read calls have returned (files, pipes, /proc; from the page
  cache or the disk); None once it has gone or where /proc does not let this process read it."""
  try:
    with open(f"/proc/{pid}/io", encoding="ascii") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
  except (OSError, ValueError, IndexError, StopIteration):
    return None


SHM = "/dev/shm"


def shm_held(pid: int) -> set[str]:
  """The /dev/shm names a process holds open or mapped (grain's batches, multiprocessing's semaphores)."""
  names = set()
  try:
    for fd in os.listdir(f"/proc/{pid}/fd"):
      try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
      except OSError:
        continue
      if target.startswith(SHM + "/"):
        names.add(os.path.basename(target.split(" ")[0]))
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
      for line in f:
        at = line.find(SHM + "/")
        if at >= 0:
          names.add(os.path.basename(line[at:].split()[0]))
  except OSError:
    pass
  return names


def shm_entries() -> set[str]:
  try:
    return set(os.listdir(SHM))
  except OSError:
    return set()


def load_average() -> float:
  try:
    with open("/proc/loadavg", encoding="ascii") as f:
      return float(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return 0.0


@dataclasses.dataclass
class Sample:
  step: int
  seconds: float  # since the first batch was asked for
  records_per_s: float  # over the interval since the previous sample
  bytes_per_record: float  # the tree's bytes read over the same interval per record drawn in it (`Probe`)
  main: dict  # process_figures', with 'rchar' (bytes_read; None where unreadable)
  children: list[dict]  # the live descendants', the same
  shm: int  # /dev/shm entries this process tree holds or has held (`Probe`)
  shm_all: int  # the machine's
  cpu_s: float  # user + system seconds of the live processes of the tree
  load: float  # the machine's one-minute load average

  def series(self) -> dict[str, float]:
    """The judged figures: the main process's, and summed over its descendants; the tree's bytes read per
    record."""
    total = lambda key: sum(c[key] for c in self.children)  # noqa: E731
    return {
      "descriptors (main)": self.main["fds"],
      "descriptors (children)": total("fds"),
      "RSS MB (main)": self.main["rss_mb"],
      "RSS MB (children)": total("rss_mb"),
      "threads (main)": self.main["threads"],
      "threads (children)": total("threads"),
      "processes": len(self.children),
      "/dev/shm entries": self.shm,
      "bytes read per record": self.bytes_per_record,
    }


class Probe:
  """Samples this process and its descendants. Other jobs' /dev/shm entries come and go on a shared machine, so
  the tree's own are those it holds at a sample or held at an earlier one and that still exist: a segment that
  passed through it and was never unlinked stays counted.

  The bytes read over an interval are the rises of the tree's `rchar` since the previous sample (since the probe
  was made, for the first): a process that appeared in the interval counts all it read, one that ended in it
  nothing of the interval. The probe reads /proc from this process, so this process's count restarts after each
  sample: what the probe reads is not charged to the pipeline."""

  def __init__(self):
    self.pid = os.getpid()
    self._seen = set()
    self._read = self._bytes_read([self.pid, *descendants(self.pid)])

  @staticmethod
  def _bytes_read(pids: list[int]) -> dict[int, int]:
    counts = {pid: bytes_read(pid) for pid in pids}
    return {pid: count for pid, count in counts.items() if count is not None}

  def sample(self, step: int, seconds: float, records: int, interval_s: float) -> Sample:
    """The figures after `step`, `seconds` after the first batch was asked for, `records` drawn over the
    `interval_s` seconds since the previous sample."""
    own = bytes_read(self.pid)  # before this probe reads anything
    pids = [self.pid, *descendants(self.pid)]
    read = self._bytes_read(pids[1:])
    if own is not None:
      read[self.pid] = own
    figures = {pid: process_figures(pid) for pid in pids}
    children = [figures[pid] for pid in pids[1:] if figures[pid] is not None]
    for pid, figure in figures.items():
      if figure is not None:
        figure["rchar"] = read.get(pid)
    entries = shm_entries()
    self._seen = (self._seen | set().union(*map(shm_held, pids))) & entries
    cpu = sum(f["cpu_s"] for f in [figures[self.pid], *children])
    load = load_average()
    rise = sum(count - self._read.get(pid, 0) for pid, count in read.items())
    self._read = {**read, **self._bytes_read([self.pid])}  # this process's after the probe's own reads
    return Sample(
      step,
      round(seconds, 3),
      round(records / max(interval_s, 1e-9), 1),
      round(rise / records, 1) if records else 0.0,
      figures[self.pid],
      children,
      len(self._seen),
      len(entries),
      round(cpu, 2),
      load,
    )
