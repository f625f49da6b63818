"""JAX's coordination service in a process of its own, which the launcher starts beside the trainers.

jax.distributed.initialize() hosts the service inside process 0, so it dies with that process, and JAX's client in
every other process then aborts at once with a stack dump (status 134) whatever the loop does. Hosted by the
launcher (launch/local.sh, launch/slurm.sbatch), it outlives every trainer: a dead process 0 is a lost peer like
any other, which the others' PeerWatch (training/infra/faults.py) names in one `error:` line before they exit 75.

  python -m visionfm_jax.parallel.coordination --processes=N --ready_file=F [--port=P]

serves until SIGTERM or SIGINT, or until the process that started it ends; once it serves it writes the port (P, or
a free one) to F, and exits 3 without writing it where this jax cannot host or join the service this way (the launcher then leaves the service
to process 0, as jax.distributed.initialize does).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys

from visionfm_jax import atomic

# Set by the launcher for the trainers: "launcher" = join the service the launcher hosts, start none.
SERVICE_ENV = "VISIONFM_COORDINATION_SERVICE"
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


def hosted_by_launcher() -> bool:
  return os.environ.get(SERVICE_ENV) == "launcher"


class _NativeWithoutService:
  """The native library as jax.distributed.initialize calls it, but starting no service: the launcher's serves."""

  def __init__(self, native):
    self._native = native

  def get_distributed_runtime_service(self, *args, **kwargs):  # pylint: disable=unused-argument
    return None

  def __getattr__(self, name):
    return getattr(self._native, name)


def joining_launcher_service():
  """A context within which jax.distributed.initialize() joins the service at JAX_COORDINATOR_ADDRESS as a client
  only, in process 0 too; everything else it does (device visibility, the preemption manager, shutdown at exit) is
  its own. ImportError where this jax cannot."""
  return _starting_no_service(_jax_distributed_module())


@contextlib.contextmanager
def _starting_no_service(distributed):
  native = distributed._jax  # pylint: disable=protected-access
  distributed._jax = _NativeWithoutService(native)  # pylint: disable=protected-access
  try:
    yield
  finally:
    distributed._jax = native  # pylint: disable=protected-access


def free_port() -> int:
  with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def serve(processes: int, ready_file: str, port: int = 0) -> None:
  """Hosts the service for `processes` trainers on every address's `port` (0: a free one) until a stop signal or
  the parent ends; `ready_file` gets the port once it serves."""
  native = _jax_distributed_module()._jax  # pylint: disable=protected-access
  port = port or free_port()
  service = native.get_distributed_runtime_service(f"[::]:{port}", processes, heartbeat_timeout=HEARTBEAT_TIMEOUT_S,
                                                   shutdown_timeout=SHUTDOWN_TIMEOUT_S)
  parent = os.getppid()
  stops = {signal.SIGTERM, signal.SIGINT}
  signal.pthread_sigmask(signal.SIG_BLOCK, stops)
  atomic.write(ready_file, f"{port}\n")
  try:
    while os.getppid() == parent and signal.sigtimedwait(stops, 1.0) is None:
      pass
  finally:
    service.shutdown()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m visionfm_jax.parallel.coordination", description=__doc__.split(
      "\n\n")[0])
  parser.add_argument("--processes", type=int, required=True)
  parser.add_argument("--ready_file", required=True, help="gets the port once the service serves")
  parser.add_argument("--port", type=int, default=0, help="0: a free one")
  args = parser.parse_args(argv)
  try:
    _jax_distributed_module()
  except ImportError as e:
    print(f"warning: this jax has no {e.name or e}: the launcher leaves JAX's coordination service to process 0, "
          "whose death then aborts the others", file=sys.stderr)
    return 3
  serve(args.processes, args.ready_file, args.port)
  return 0


if __name__ == "__main__":
  sys.exit(main())
