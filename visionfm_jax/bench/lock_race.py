r"""Two processes take one stale lock at once: how often both hold it (training/infra/workdir.py `WorkdirLock`, which
also guards datatools.prepare_data's output).

  python -m visionfm_jax.bench.lock_race [--rounds=300] [--write_delay_s=0] [--dir=/tmp/visionfm_lock_race]

Each round writes, in a fresh folder under `--dir`, a lock file holding the record of a run that ended without
releasing it (a pid gone from this host), then releases two worker processes at once to `acquire` it. A round where
both hold the lock is a double hold; where neither does, a lost lock. `--write_delay_s` makes the writing of a
holder's record take that much longer, as a network file system's round trips do (on a local disk it takes
microseconds, and the processes rarely meet within it). Printed: one line of counts, then one JSON
line {rounds, double_holds, none_held, taken_over, seconds}. The rounds' folders, in a fresh folder under `--dir`, are
removed after.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags, logging

from visionfm_jax import cli
from visionfm_jax.errors import WorkdirError
from visionfm_jax.training.infra import workdir

_WORKERS = 2
_BARRIER_TIMEOUT_S = 60.0


def dead_pid() -> int:
  """The pid of a process that has ended (its number not yet reused, in all likelihood)."""
  return int(
    subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout
  )


def _round_dir(directory: str, number: int) -> str:
  return os.path.join(directory, f"round{number:05d}")


class _SlowLock(workdir.WorkdirLock):
  """A WorkdirLock whose holder's record takes `delay_s` longer to write."""

  def __init__(self, path: str, delay_s: float):
    super().__init__(path)
    self.delay_s = delay_s

  def _write_holder(self, fd: int) -> None:
    time.sleep(self.delay_s)
    super()._write_holder(fd)


def _worker(directory: str, rounds: int, delay_s: float, barrier, results) -> None:
  """Per round: waits for the start, tries to take the round's lock without waiting, reports whether it holds it,
  waits for every report, then releases."""
  logging.set_verbosity(logging.ERROR)  # the takeover's warning, once a round
  for number in range(rounds):
    barrier.wait(_BARRIER_TIMEOUT_S)
    lock = _SlowLock(_round_dir(directory, number), delay_s)
    try:
      lock.acquire(0)
      held = True
    except WorkdirError:
      held = False
    results.put((number, held))
    barrier.wait(_BARRIER_TIMEOUT_S)
    lock.release()


def race(rounds: int, directory: str, write_delay_s: float = 0.0) -> dict:
  """The counts of `rounds` rounds of two worker processes taking a stale lock under `directory` at once, each
  record's write `write_delay_s` slower: {rounds, double_holds, none_held, taken_over (rounds where one held it),
  seconds}."""
  stale = {**workdir.this_holder(), "pid": dead_pid()}
  context = multiprocessing.get_context("spawn")  # a fresh interpreter: the caller may run threads (JAX's)
  barrier, results = context.Barrier(_WORKERS + 1), context.Queue()
  workers = [
    context.Process(target=_worker, args=(directory, rounds, write_delay_s, barrier, results), daemon=True)
    for _ in range(_WORKERS)
  ]
  for worker in workers:
    worker.start()
  holders, start = [], None
  try:
    for number in range(rounds):
      folder = _round_dir(directory, number)
      os.makedirs(folder)
      with open(os.path.join(folder, workdir.LOCK_FILE), "w", encoding="utf-8") as f:
        json.dump(stale, f)
      barrier.wait(_BARRIER_TIMEOUT_S)
      start = start or time.monotonic()
      barrier.wait(_BARRIER_TIMEOUT_S)  # both have tried and reported
      holders.append(sum(results.get(timeout=_BARRIER_TIMEOUT_S)[1] for _ in range(_WORKERS)))
  finally:
    for worker in workers:
      worker.join(_BARRIER_TIMEOUT_S)
      if worker.is_alive():
        worker.kill()
        worker.join()
  return {
    "rounds": rounds,
    "double_holds": sum(h > 1 for h in holders),
    "none_held": holders.count(0),
    "taken_over": holders.count(1),
    "seconds": round(time.monotonic() - start, 2) if start else 0.0,
  }


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  for name, default, help_text in (
    ("rounds", 300, "rounds of two processes taking one stale lock"),
    ("write_delay_s", 0.0, "seconds added to each write of a holder's record"),
  ):
    (flags.DEFINE_integer if isinstance(default, int) else flags.DEFINE_float)(
      name, default, help_text, lower_bound=0, flag_values=fv
    )
  flags.DEFINE_string(
    "dir",
    "/tmp/visionfm_lock_race",
    "where the rounds' folders are made (in a fresh folder, removed after)",
    flag_values=fv,
  )
  return fv


def _body(fv, rest):
  cli.check_args(fv, rest)
  os.makedirs(fv.dir, exist_ok=True)
  rounds_dir = tempfile.mkdtemp(prefix="lock_race.", dir=fv.dir)
  try:
    result = race(fv.rounds, rounds_dir, fv.write_delay_s)
  finally:
    shutil.rmtree(rounds_dir, ignore_errors=True)
  print(
    f"{result['rounds']} rounds: {result['double_holds']} double holds, {result['none_held']} with no holder, "
    f"{result['taken_over']} taken over by one ({result['seconds']} s)\n{json.dumps(result)}"
  )


def main(argv) -> int:
  return cli.run(argv, make_flags(), __doc__, _body)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
