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

`Interrupt` is Ctrl-C in the loop: the loop reads it after each step, where it reads a preemption notice, and stops
there without a save; `cli.Interrupts` ends a start-up or a first compile that outlasts its grace.

`agreed(ok)` is how the processes carry out one decision together (a workdir lock, a failed save, an
unreadable checkpoint): every process calls it at the same point and all get the same answer.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from visionfm_jax import cli
from visionfm_jax.parallel import coordination

HUNG_EXIT_CODE = coordination.REQUEUE_EXIT_CODE  # EX_TEMPFAIL: the job may succeed if requeued


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
      logging.warning(
        "jax_enable_preemption_service is off: each of the %d processes reads its own SIGTERM, so a "
        "notice that reaches them at different steps can leave them saving different steps",
        jax.process_count(),
      )
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


class Interrupt:
  """Ctrl-C (cli.Interrupts, which the entry point starts) as the loop sees it. Until `polling()` the main thread is
  interrupted where it is; from then on the loop reads `requested()` after each step and stops there. `step` is the
  step trained last (None while the run starts); `newest()` the newest committed checkpoint's step, or None. The
  line said is 'interrupted at step N; the newest checkpoint is step M'."""

  def __init__(self, newest: Callable[[], int | None]):
    self.step: int | None = None
    self._newest = newest
    cli.interrupts.describe = self.line

  def line(self) -> str:
    where = "while starting" if self.step is None else f"at step {self.step}"
    newest = self._newest()
    saved = "there is no checkpoint yet" if newest is None else f"the newest checkpoint is step {newest}"
    return f"interrupted {where}; {saved}"

  def polling(self, on: bool = True) -> None:
    cli.interrupts.polled = on

  @staticmethod
  def requested() -> bool:
    return cli.interrupts.requested.is_set()


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
    message = (
      f"process {jax.process_index()} of {jax.process_count()} has waited {time.monotonic() - started:.0f}s "
      f"in {name} at step {step} (config.step_timeout_s={self.timeout_s:g}): another process has "
      f"probably stopped or died. Dumping every thread's stack and exiting with code {HUNG_EXIT_CODE} so "
      f"the job can be requeued; it resumes from the newest checkpoint."
    )
    logging.error(message)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(HUNG_EXIT_CODE)  # the main thread is blocked in native code: only a hard exit ends the process


class PeerWatch:
  """Ends this process within `timeout_s` of another process of the job dying, with one `error:` line naming it.

  A process killed outright (the OOM killer, a failed node: no chance to save or say anything) leaves the others
  waiting in their next collective. JAX's coordination service notices only after its own heartbeat timeout
  (set longer than this one by `parallel.distributed.initialize`), and then aborts every process with pages of
  C++ logs that name no one. Here each process beats (a counter under `visionfm/alive/<index>` in the service's
  key-value store) every `timeout_s` / 10 seconds (0.2 to 5) from a daemon thread, and watches the others' beats:
  a peer whose counter has not moved for `timeout_s` is gone, and this process exits with `HUNG_EXIT_CODE` so
  the scheduler requeues the job, which resumes from the newest complete checkpoint. A process that ends says
  so (`close`): 'done' lets the others finish alone; 'failed' (an error it has printed) ends those that are still
  running `timeout_s` later (an error all processes agree on ends each of them on its own, with its own line).
  The service (in process 0, or in a process the launcher started) holds the others' beats and their view of one
  another: stopped or cut off, a call to it just waits (JAX's client aborts at its heartbeat deadline, 3x
  `timeout_s`), so a second thread, which never calls the service, names it once the service has not answered this
  process's beat for `timeout_s`. Killed outright, it is named at once by the relay this process joins it through
  (parallel/relay.py).

  A process stopped for longer than `timeout_s` (SIGSTOP, a suspended VM) and then continued has been given up by
  its peers: it judges each peer afresh once it runs again, and a peer whose beat has not moved within
  `THAW_GRACE_BEATS` beats of that is gone. (Stopped and continued together, as a suspended job is, the peers beat
  again within one.)
  """

  PREFIX = "visionfm/alive/"
  THAW_GRACE_BEATS = 3

  def __init__(self, timeout_s: float):
    from jax._src import distributed  # pylint: disable=g-import-not-at-top

    self.timeout_s = float(timeout_s)
    self._client = distributed.global_state.client
    self._me, self._count = jax.process_index(), jax.process_count()
    self._interval = min(max(self.timeout_s / 10, 0.2), 5.0)
    self._stop = threading.Event()
    self._thread = None
    # peer -> (its beat as last read, when this process first read that beat)
    self._last_seen = {p: (None, time.monotonic()) for p in range(self._count) if p != self._me}
    self._answered = time.monotonic()  # when the service last took this process's beat
    address = distributed.global_state.coordinator_address  # None: not distributed, so never watched
    self._service = (
      ""
      if distributed.global_state.service is not None or address is None
      else (coordination.describe_service(address))
    )
    if self.timeout_s > 0 and self._count > 1 and self._client is not None:
      self._thread = threading.Thread(target=self._watch, name="visionfm-peer-watch", daemon=True)
      self._thread.start()
      if self._service:
        threading.Thread(target=self._watch_coordinator, name="visionfm-coordinator-watch", daemon=True).start()

  def name_a_lost_peer(self) -> None:
    """Keeps watching for `timeout_s` and a beat (an error this process hit may be a dead peer's doing: a
    collective whose peer is gone fails at once on the CPU): a peer found gone ends this process naming it."""
    if self._thread is not None:
      logging.warning("an error stopped this process: watching its peers for %gs before reporting it", self.timeout_s)
      self._thread.join(self.timeout_s + 2 * self._interval)

  def close(self, failed: bool = False) -> None:
    """Stops beating and tells the others this process ended ('failed': with an error of its own), waiting at most
    a second: the process is about to exit, and a call to a coordinator that is gone may hang."""
    if self._thread is None:
      return
    self._stop.set()
    tell = threading.Thread(target=self._tell, args=("failed" if failed else "done",), daemon=True)
    tell.start()
    tell.join(timeout=1.0)
    if failed and self._me == 0:
      self._outlive_peers()

  def _kv(self):
    """The coordination service's client: the methods below run only once the watch started, which takes one."""
    assert self._client is not None
    return self._client

  def _outlive_peers(self, wait_s: float = 2.0, grace_s: float = 0.25) -> None:
    """The coordinator, failing, waits (at most `wait_s`) until the others have said they ended, and `grace_s`
    more for them to exit: the service ends with it, and JAX's client aborts a process that is still connected
    (status 134, after its own error line) where that process would have exited with its own status."""
    deadline = time.monotonic() + wait_s
    peers = [p for p in range(self._count) if p != self._me]
    while peers and time.monotonic() < deadline:
      try:
        peers = [p for p in peers if self._kv().key_value_try_get(f"{self.PREFIX}{p}") not in ("failed", "done")]
      except Exception:  # pylint: disable=broad-except  # a peer's key not there yet
        pass
      if peers:
        time.sleep(0.05)
    time.sleep(grace_s)

  def _tell(self, state: str) -> None:
    try:
      self._kv().key_value_set(f"{self.PREFIX}{self._me}", state, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # the service is gone: there is no one left to tell
      pass

  def _watch(self) -> None:
    host, beats = socket.gethostname(), 0
    last_seen, ticked, thawed = self._last_seen, time.monotonic(), None
    while not self._stop.wait(self._interval):
      beats += 1
      try:
        self._kv().key_value_set(f"{self.PREFIX}{self._me}", f"{beats} {host} {os.getpid()}", allow_overwrite=True)
      except Exception as e:  # pylint: disable=broad-except
        if not self._stop.is_set():
          self._abort(
            f"{self._service or f'the coordinator, process 0 of {self._count},'} is gone (its key-value "
            f"store refused this process's heartbeat: {str(e).splitlines()[0][:200]})"
          )
        return
      # over timeout_s since the last tick, the heartbeat's write included (a stop can land in either): this process
      # was stopped longer than its peers wait
      now = self._answered = time.monotonic()
      stopped_s, ticked = now - ticked, now
      thawing = stopped_s > self.timeout_s
      if thawing:  # a peer's silence counts from the thaw, not across this process's own stop
        last_seen.update({peer: (value, now) for peer, (value, _) in last_seen.items()})
      self._read_beats(last_seen, now)
      if thawing:
        thawed = (stopped_s, now, {peer: value for peer, (value, _) in last_seen.items()})
      elif thawed and now - thawed[1] > self.THAW_GRACE_BEATS * self._interval:
        self._judge_after_thaw(last_seen, *thawed)
        thawed = None

  def _read_beats(self, last_seen: dict, now: float) -> None:
    """Reads each peer's beat into `last_seen`; ends this process naming a peer silent for `timeout_s`."""
    for peer, (value, since) in list(last_seen.items()):
      try:
        current = self._kv().key_value_try_get(f"{self.PREFIX}{peer}")
      except Exception:  # pylint: disable=broad-except  # no beat yet
        current = None
      if current == "done":
        del last_seen[peer]
      elif current != value:
        last_seen[peer] = (current, now)
      elif current == "failed" and now - since > self.timeout_s:  # its error did not end this process too
        self._abort(
          f"process {peer} of {self._count} stopped {now - since:.0f}s ago with an error (its own error "
          f"line says which)"
        )
      elif now - since > self.timeout_s:
        self._abort(
          f"process {peer} of {self._count}{self._where(value)} has sent no heartbeat for "
          f"{now - since:.0f}s (config.peer_timeout_s={self.timeout_s:g}): it died, or its node did"
        )

  def _judge_after_thaw(self, last_seen: dict, stopped_s: float, resumed: float, beats: dict) -> None:
    """After this process was stopped `stopped_s` seconds and resumed at `resumed`: a peer whose beat is still the
    one it read first (`beats`) is gone."""
    for peer, (value, _) in last_seen.items():
      if value == beats.get(peer) and value != "failed":
        self._abort(
          f"process {peer} of {self._count}{self._where(value)} has sent no heartbeat in the "
          f"{time.monotonic() - resumed:.0f}s since this process resumed after being stopped for "
          f"{stopped_s:.0f}s (longer than config.peer_timeout_s={self.timeout_s:g}, after which its peers "
          f"give up on it): it gave up on this process, or died"
        )

  def _watch_coordinator(self) -> None:
    """Ends this process once the service has not taken its beat for `timeout_s`: the beat's call waits on a
    coordinator that is stopped or cut off, so this thread keeps the time. A gap in its own ticks longer than half
    of that is this process having been stopped or starved: it counts afresh instead of blaming the coordinator."""
    ticked = time.monotonic()
    while not self._stop.wait(self._interval):
      now = time.monotonic()
      if now - ticked > self.timeout_s / 2:
        self._answered = now
      ticked = now
      silent = now - self._answered
      if silent > self.timeout_s:
        self._abort(
          f"{self._coordinator()} has not answered for {silent:.0f}s (config.peer_timeout_s="
          f"{self.timeout_s:g}): it is stopped, or its node is lost or cut off from this one"
        )

  def _coordinator(self) -> str:
    """The service as the lines name it: process 0 (as last seen) where it hosts it, else the service itself."""
    if not coordination.hosted_by_launcher():
      return f"the coordinator, process 0 of {self._count}{self._where(self._last_seen.get(0, (None, 0.0))[0])},"
    return self._service

  @staticmethod
  def _where(beat: str | None) -> str:
    """' (last seen: host H, pid P)' from a peer's last beat ('<count> <host> <pid>'), or '' before its first."""
    if not beat or len(beat.split()) != 3:
      return ""
    _, host, pid = beat.split()
    return f" (last seen: host {host}, pid {pid})"

  def _abort(self, what: str) -> None:
    if self._stop.is_set():  # this process is ending on its own, with its own line
      return
    coordination.exit_for_requeue(what, self._me)  # the main thread may be blocked in a collective
