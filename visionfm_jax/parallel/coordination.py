"""JAX's coordination service in a process of its own, which the launcher starts beside the trainers, and the
trainers' way of joining it.

jax.distributed.initialize() hosts the service inside process 0, so it dies with that process. Hosted by the
launcher (launch/local.sh, launch/slurm.sbatch), it outlives every trainer: a dead process 0 is a lost peer like
any other, which the others' PeerWatch (training/infra/faults.py) names in one `error:` line before they exit 75.
Wherever the service runs, a process that does not host it joins it through a relay (parallel/relay.py): JAX's
client would abort the process with a stack dump (status 134) the moment the service died; the relay notices first,
and the process prints one `error:` line naming the service and exits 75, so that the job is requeued.

  python -m visionfm_jax.parallel.coordination --processes=N --ready_file=F [--port=P]

serves until SIGTERM or SIGINT, or until the process that started it ends (stopped and continued, as a suspended
job is, it serves on); once it serves it writes the port (P, or
a free one) to F, and exits 3 without writing it where this jax cannot host or join the service this way (the
launcher then leaves the service to process 0, as jax.distributed.initialize does).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time

from absl import logging

from visionfm_jax import atomic, errors
from visionfm_jax.parallel import relay

# Set by the launcher for the trainers: "launcher" = join the service the launcher hosts, start none; and the
# service's pid, which a trainer's line names when the service dies.
SERVICE_ENV = "VISIONFM_COORDINATION_SERVICE"
SERVICE_PID_ENV = "VISIONFM_COORDINATION_SERVICE_PID"
# EX_TEMPFAIL: a process that lost its peers or its service; the job may succeed if requeued.
REQUEUE_EXIT_CODE = 75
# How long the service waits on a silent trainer before it fails the job: above any sensible
# config.peer_timeout_s, so that the trainers' own watch names a lost peer first.
HEARTBEAT_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 300


def _jax_distributed_module():
  """jax's module that starts the service in process 0 (jax._src.distributed: its `_jax` is the native library)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  if not hasattr(getattr(distributed, "_jax", None), "get_distributed_runtime_service"):
    raise ImportError("jax._src.distributed._jax.get_distributed_runtime_service")
  return distributed


def _native_library():
  """The native library that jax._src.distributed calls (jaxlib._jax), imported without JAX: all the launcher's
  service needs (0.5 against 1.7 CPU s of imports). Its C++ logs at warning and above, as importing JAX sets."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import jaxlib._jax as native  # pylint: disable=g-import-not-at-top

  if not hasattr(native, "get_distributed_runtime_service"):
    raise ImportError("jaxlib._jax.get_distributed_runtime_service")
  return native


def hosted_by_launcher() -> bool:
  return os.environ.get(SERVICE_ENV) == "launcher"


def describe_service(address: str) -> str:
  """The service at `address` as an error line names it: where it runs, and its process where that is known."""
  if not hosted_by_launcher():
    return f"JAX's coordination service at {address} (in process 0)"
  pid = os.environ.get(SERVICE_PID_ENV)
  return f"JAX's coordination service at {address} ({f'pid {pid}, ' if pid else ''}started by the launcher)"


def exit_for_requeue(what: str, process_index: int):
  """Prints `what` as the process's one error line and ends it with REQUEUE_EXIT_CODE, at once: its other threads
  may be blocked in native code, where only a hard exit ends the process."""
  errors.say(
    f"error: {what}. Process {process_index} exits with code {REQUEUE_EXIT_CODE} so that the job is "
    f"requeued; it resumes from the newest complete checkpoint."
  )
  os._exit(REQUEUE_EXIT_CODE)


class JoinFailed(Exception):
  """jax.distributed.initialize's client did not join the service at `address` (its own address, not its relay's):
  the service refused it, or did not let it in within its start-up bound; `after_s`: how long it tried."""

  def __init__(self, address: str, after_s: float):
    super().__init__(f"joining JAX's coordination service at {address} failed after {after_s:.0f}s")
    self.address, self.after_s = address, after_s


class _Native:
  """The native library as jax.distributed.initialize calls it, with the client joining the service through a relay
  (parallel/relay.py) where this process does not host the service, and starting no service where
  `start_service` is False (the launcher's serves).

  The client gets a fatal-error callback of ours: JAX's own aborts the process with a fatal C++ line and a stack
  dump, 300 s of silence after a join that nothing answers or at once when another process registers with the same
  index, where ours makes the failed join an exception (JoinFailed, from joining_service) that the caller names in
  one line. jaxlib 0.10 cannot pass the callback its status (std::bad_cast), which ends the join all the same. After
  the join the callback stays (a client's callback is fixed): a failed leave at exit is then an exception too, which
  `_leave_reported` makes one warning line; a fatal error in the client's own threads still aborts the process, with
  'terminate called after throwing an instance of std::bad_cast' instead of JAX's line and stack dump; the watches
  of training/infra/faults.py and the relay name every fault this repository knows of before that."""

  def __init__(self, native, distributed, start_service: bool):
    self._native, self._distributed, self._start_service = native, distributed, start_service
    self._hosts_service = False
    self.address, self.joining_since, self.joined = "", None, False

  def get_distributed_runtime_service(self, *args, **kwargs):
    if not self._start_service:
      return None
    self._hosts_service = True
    return self._native.get_distributed_runtime_service(*args, **kwargs)

  def get_distributed_runtime_client(self, address, *args, **kwargs):
    self.address, self.joining_since = address, time.monotonic()
    if not self._hosts_service:
      address = _relay_to(address, self._distributed)
    kwargs.setdefault("missed_heartbeat_callback", self._fatal)
    return self._native.get_distributed_runtime_client(address, *args, **kwargs)

  def _fatal(self, status) -> None:
    """The client's fatal error (where a jaxlib passes it): joining, it fails the join; joined, it ends the process
    naming the status."""
    if not self.joined:
      raise RuntimeError(str(status))
    exit_for_requeue(
      f"{describe_service(self.address)} reported a fatal error: {status}", self._distributed.global_state.process_id
    )

  def __getattr__(self, name):
    return getattr(self._native, name)


_links: list[relay.Link] = []


def _relay_to(address: str, distributed) -> str:
  """The local address of a relay to the service at `address`, whose death ends this process with one line."""

  def gone(why: str) -> None:
    exit_for_requeue(f"{describe_service(address)} is gone: {why}", distributed.global_state.process_id)

  def lost(pid: int, how: str) -> None:
    exit_for_requeue(
      f"the relay (pid {pid}) that joins this process to {describe_service(address)} ended, "
      f"{how}: the process cannot reach the service without it",
      distributed.global_state.process_id,
    )

  try:
    link = relay.Link(address, gone, lost)
  except OSError as e:
    logging.warning(
      "no relay to JAX's coordination service (%s): this process's client joins it directly, and "
      "aborts with a stack dump if the service dies",
      e,
    )
    return address
  _links.append(link)
  return link.address


def ending() -> None:
  """This process shuts down: the service may close from now on (call before jax.distributed.shutdown)."""
  for link in _links:
    link.ending()


def joining_service():
  """A context within which jax.distributed.initialize() joins the service through a relay, as a client only where
  the launcher hosts it (in process 0 too); everything else it does (device visibility, the preemption manager,
  shutdown at exit) is its own. A join that fails raises JoinFailed. ImportError where this jax cannot."""
  return _native_replaced(_jax_distributed_module(), start_service=not hosted_by_launcher())


@contextlib.contextmanager
def _native_replaced(distributed, start_service: bool):
  native = distributed._jax  # pylint: disable=protected-access
  distributed._jax = replaced = _Native(native, distributed, start_service)  # pylint: disable=protected-access
  try:
    yield
  except RuntimeError as e:
    if replaced.joining_since is None:  # before the client: jax's own checks
      raise
    raise JoinFailed(replaced.address, time.monotonic() - replaced.joining_since) from e
  finally:
    replaced.joined = True
    distributed._jax = native  # pylint: disable=protected-access
  if replaced.joining_since is not None:
    _leave_reported(distributed.global_state, replaced.address)


def _leave_reported(state, address: str) -> None:
  """jax's shutdown at exit (jax._src.api.clean_up, after the backends) leaves the service through the client, whose
  failed leave (the shutdown barrier: another process did not leave with this one) comes back from `_Native`'s
  callback as a RuntimeError, where JAX's own aborted the process: one warning line instead of a traceback, the
  service this process hosts shut down all the same, and the process keeps its exit status."""
  shutdown = state.shutdown

  def reported() -> None:
    try:
      shutdown()
    except RuntimeError:
      errors.say(
        f"warning: leaving {describe_service(address)} failed: another process did not leave with this one "
        f"(it ended earlier or hangs, or the service is gone)"
      )
      state.client = None
      if state.service is not None:
        state.service.shutdown()
        state.service = None

  state.shutdown = reported


def free_port() -> int:
  with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def serve(processes: int, ready_file: str, port: int = 0) -> None:
  """Hosts the service for `processes` trainers on every address's `port` (0: a free one) until a stop signal or
  the parent ends; `ready_file` gets the port once it serves."""
  parent = os.getppid()
  stops = {signal.SIGTERM, signal.SIGINT}
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # A launcher's background job (launch/local.sh): a terminal's Ctrl-C is the trainers' to carry out; the launcher
    # stops the service once they have ended (SIGTERM). Blocked, an ignored SIGINT would still be taken here.
    stops.discard(signal.SIGINT)
  # Blocked before the native service starts its threads, which inherit the mask: a stop signal that reached one
  # of them unblocked, while this thread was between waits, would end the process by the default action (-15).
  signal.pthread_sigmask(signal.SIG_BLOCK, stops)
  native = _native_library()
  port = port or free_port()
  service = native.get_distributed_runtime_service(
    f"[::]:{port}", processes, heartbeat_timeout=HEARTBEAT_TIMEOUT_S, shutdown_timeout=SHUTDOWN_TIMEOUT_S
  )
  atomic.write(ready_file, f"{port}\n")
  try:
    while os.getppid() == parent and not _stop_signal(signal.sigtimedwait(stops, 1.0), stops):
      pass
  finally:
    service.shutdown()


def _stop_signal(info, stops) -> bool:
  """Whether sigtimedwait's answer `info` is one of `stops`. A wait that a SIGSTOP/SIGCONT interrupts past its
  deadline answers an empty siginfo (signal 0) rather than None: a suspended job's service serves on."""
  return info is not None and info.si_signo in stops


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m visionfm_jax.parallel.coordination", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--processes", type=int, required=True)
  parser.add_argument("--ready_file", required=True, help="gets the port once the service serves")
  parser.add_argument("--port", type=int, default=0, help="0: a free one")
  args = parser.parse_args(argv)
  try:
    _native_library()
  except ImportError as e:
    print(
      f"warning: this jax has no {e.name or e}: the launcher leaves JAX's coordination service to process 0, "
      "whose death then aborts the others",
      file=sys.stderr,
    )
    return 3
  serve(args.processes, args.ready_file, args.port)
  return 0


if __name__ == "__main__":
  sys.exit(main())
