"""A trainer's connection to JAX's coordination service, through a relay process that tells the service's death
from a dropped connection.

JAX's client aborts its process (a fatal C++ log line, a stack dump, status 134) the moment a connection to the
service closes, and the callback jaxlib offers for it (`missed_heartbeat_callback`) cannot be a Python function:
jaxlib 0.10 and 0.11 fail to pass it the status (std::bad_cast) and abort all the same. So the client talks to the
service through this relay, which runs as a process of its own (forwarding needs no GIL, which a trainer's thread
may hold while it waits on the service). When the service's side of a connection closes, the relay dials the
service afresh, a few times: refused, the service is gone, and the relay tells the trainer over their control
socket while it keeps the client's connections open and silent, so that the trainer exits with its own line before
its client notices anything. Accepted, only that connection dropped, and the relay closes it as the network would
have.

  python -I relay.py --upstream=HOST:PORT --control_fd=FD

The control socket carries "port <n>" (where the relay listens, on 127.0.0.1) and later "gone <why>" to the
trainer, and "ending" from it (the trainer shuts down: the service may close from then on). The relay exits once
the trainer's end of the control socket closes, however the trainer ended. Standard library only: it runs as a
script, without the package (whose import pulls in JAX).
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import subprocess
import sys
import threading
import time

PROBE_TIMEOUT_S = 2.0
PROBE_TRIES, PROBE_GAP_S = 5, 0.1
# How long the relay keeps the client's connections silent after telling the trainer the service is gone; if the
# trainer has not exited by then (its reporting thread never got to run), the connections close as they would have.
GONE_GRACE_S = 10.0


def _address(text: str) -> tuple[str, int]:
  host, _, port = text.rpartition(":")
  return host.strip("[]"), int(port)


def _refused(upstream: tuple[str, int]) -> str | None:
  """Why fresh connections to `upstream` fail ('connection refused', ...), or None where they are accepted for
  PROBE_TRIES tries PROBE_GAP_S apart: a process being killed closes its connections before its listening socket,
  which may accept the first try."""
  for _ in range(PROBE_TRIES):
    try:
      socket.create_connection(upstream, timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
      return os.strerror(e.errno).lower() if e.errno else str(e) or type(e).__name__
    time.sleep(PROBE_GAP_S)
  return None


class Relay:
  """Forwards every connection made to its listening socket to `upstream`, until the control socket closes."""

  def __init__(self, upstream: tuple[str, int], control: socket.socket):
    self.upstream, self.control = upstream, control
    self.listener = socket.create_server(("127.0.0.1", 0))
    self.selector = selectors.DefaultSelector()
    self.selector.register(self.listener, selectors.EVENT_READ, "accept")
    self.selector.register(control, selectors.EVENT_READ, "control")
    self.peer: dict[socket.socket, socket.socket] = {}
    self.client_side: set[socket.socket] = set()
    self.ending = False
    self.gone = False

  def serve(self) -> None:
    self.control.sendall(f"port {self.listener.getsockname()[1]}\n".encode())
    deadline = None
    while deadline is None or time.monotonic() < deadline:
      for key, _ in self.selector.select(timeout=1.0):
        if key.data == "control":
          if not self._read_control():
            return
        elif key.data == "accept":
          self._accept()
        else:
          self._forward(key.fileobj)
      if self.gone and deadline is None:
        deadline = time.monotonic() + GONE_GRACE_S

  def _read_control(self) -> bool:
    data = self.control.recv(4096)
    if b"ending" in data:
      self.ending = True
    return bool(data)

  def _accept(self) -> None:
    client, _ = self.listener.accept()
    try:
      service = socket.create_connection(self.upstream, timeout=PROBE_TIMEOUT_S)
    except OSError:
      client.close()  # the client retries; a service that stays away is reported by its other connections
      return
    for s in (client, service):
      s.settimeout(None)
      s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      self.selector.register(s, selectors.EVENT_READ, "data")
    self.peer[client], self.peer[service] = service, client
    self.client_side.add(client)

  def _forward(self, s: socket.socket) -> None:
    try:
      data = s.recv(1 << 16)
    except OSError:
      data = b""
    if data:
      try:
        self.peer[s].sendall(data)
        return
      except OSError:
        pass
    if s not in self.client_side and not self.ending and not self.gone:
      why = _refused(self.upstream)
      if why is not None:
        self._report_gone(why)
        return
    self._close_pair(s)

  def _report_gone(self, why: str) -> None:
    """Tells the trainer, and stops reading the service's side: the client's connections stay open, silent."""
    self.gone = True
    for s in list(self.peer):
      if s not in self.client_side:
        self.selector.unregister(s)
    self.control.sendall(f"gone its connection closed and a new one fails ({why})\n".encode())

  def _close_pair(self, s: socket.socket) -> None:
    for end in (s, self.peer.pop(s, None)):
      if end is None:
        continue
      self.peer.pop(end, None)
      self.client_side.discard(end)
      try:
        self.selector.unregister(end)
      except (KeyError, ValueError):
        pass
      end.close()


class Link:
  """The trainer's end: starts the relay for the service at `upstream` ('host:port'), whose local address the client
  dials instead (`address`), and calls `on_gone(why)` from a thread of its own once the relay finds the service
  gone. OSError where the relay does not start."""

  START_TIMEOUT_S = 60.0

  def __init__(self, upstream: str, on_gone):
    mine, theirs = socket.socketpair()
    with theirs:
      self._process = subprocess.Popen(
          [sys.executable, "-I", os.path.abspath(__file__), f"--upstream={upstream}",
           f"--control_fd={theirs.fileno()}"], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    self._control = mine
    mine.settimeout(self.START_TIMEOUT_S)
    first = self._line()
    if not first.startswith("port "):
      raise OSError(f"the coordination service's relay did not start (it said {first!r})")
    mine.settimeout(None)
    self.address = f"127.0.0.1:{int(first.split()[1])}"
    threading.Thread(target=self._watch, args=(on_gone,), name="visionfm-service-watch", daemon=True).start()

  def _line(self) -> str:
    """The relay's next line ('' once it has ended)."""
    line = b""
    while not line.endswith(b"\n"):
      byte = self._control.recv(1)
      if not byte:
        break
      line += byte
    return line.decode().strip()

  def _watch(self, on_gone) -> None:
    while line := self._line():
      if line.startswith("gone "):
        on_gone(line[len("gone "):])
        return

  def ending(self) -> None:
    """This process is shutting down: the service may close its connections from now on without being gone."""
    try:
      self._control.sendall(b"ending\n")
    except OSError:
      pass


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--upstream", required=True, help="the service's HOST:PORT")
  parser.add_argument("--control_fd", type=int, required=True, help="the trainer's control socket")
  args = parser.parse_args(argv)
  control = socket.socket(fileno=args.control_fd)
  Relay(_address(args.upstream), control).serve()
  return 0


if __name__ == "__main__":
  sys.exit(main())
