"""Faults the training loop cannot prevent but must survive: preemption notices and hung processes.

`Preemption` answers, once per step, "is this the step every process saves at and stops?". One process
alone turns SIGTERM into a flag. Several processes use JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`): a SIGTERM that reaches any one of them, at any time, is
posted to the coordination service, every process reports the step it is at, and all of them agree on the
next step after the furthest one, so the same step is saved by all, whenever (or whether) the others see
the signal themselves.

`Watchdog` ends a process that waits too long in one phase of the loop (a step, a save, an evaluation):
typically on a collective that another process has abandoned. It dumps every thread's stack, names the
step and phase, and exits with `HUNG_EXIT_CODE` so that the scheduler can requeue the job instead of
holding the allocation until its time limit.

`agreed(ok)` is how the processes carry out one decision together (a workdir lock, a failed save, an
unreadable checkpoint): every process calls it at the same point and all get the same answer.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

HUNG_EXIT_CODE = 75  # EX_TEMPFAIL: the job may succeed if requeued


def agreed(ok: bool) -> bool:
  """True when `ok` holds on every process: how the processes learn one another's decisions (a collective
  with several processes, which every process must call at the same point)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def raise_together(error: Exception | None, elsewhere: Exception) -> None:
  """Every process raises when any has an `error`: its own, or `elsewhere` (naming the cause as another
  process's) where it had none. Every process must call it at the same point."""
  if not agreed(error is None):
    raise error or elsewhere


def _sync_manager_available() -> bool:
  """True when jax.distributed runs a preemption sync manager (several processes, the service enabled)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client is not None and distributed.global_state.preemption_sync_manager is not None


class Preemption:
  """`reached(step)`: True at the one step where every process checkpoints and stops after a SIGTERM.

  Call it at every step, with the step just completed, at one point of the loop (the flag is read there and
  nowhere else). With several processes, the SIGTERM handler belongs to JAX's coordination client (installed
  by jax.distributed.initialize); this class must not replace it, so it installs no handler of its own there.
  """

  def __init__(self):
    self.coordinated = jax.process_count() > 1 and _sync_manager_available()
    self._requested = False
    self._previous = None
    if self.coordinated:
      return
    if jax.process_count() > 1:
      logging.warning("jax_enable_preemption_service is off: each of the %d processes reads its own SIGTERM, so a "
                      "notice that reaches them at different steps can leave them saving different steps",
                      jax.process_count())
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: preemption is the caller's business
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    if self.coordinated:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Watchdog:
  """Exits the process when one phase of the loop lasts longer than `timeout_s` (0 disables it).

  `watchdog.phase(name, step)` starts a phase (and ends the previous one); `watchdog.idle()` ends it without
  starting another. A daemon thread checks the deadline every timeout / 10 seconds (at most 10 s, at least 0.05 s).
  """

  def __init__(self, timeout_s: float):
    self.timeout_s = float(timeout_s)
    self._lock = threading.Lock()
    self._phase: tuple[str, int, float] | None = None
    self._stop = threading.Event()
    self._thread = None
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, name="visionfm-watchdog", daemon=True)
      self._thread.start()

  def phase(self, name: str, step: int) -> None:
    with self._lock:
      self._phase = (name, step, time.monotonic())

  def idle(self) -> None:
    with self._lock:
      self._phase = None

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _watch(self) -> None:
    interval = min(max(self.timeout_s / 10, 0.05), 10.0)
    while not self._stop.wait(interval):
      with self._lock:
        phase = self._phase
      if phase is not None and time.monotonic() - phase[2] > self.timeout_s:
        self._abort(*phase)

  def _abort(self, name: str, step: int, started: float) -> None:
    message = (f"process {jax.process_index()} of {jax.process_count()} has waited {time.monotonic() - started:.0f}s "
               f"in {name} at step {step} (config.step_timeout_s={self.timeout_s:g}): another process has "
               f"probably stopped or died. Dumping every thread's stack and exiting with code {HUNG_EXIT_CODE} so "
               f"the job can be requeued; it resumes from the newest checkpoint.")
    logging.error(message)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(HUNG_EXIT_CODE)  # the main thread is blocked in native code: only a hard exit ends the process
