"""A trainer's connection to JAX's coordination service, through a relay process that tells the service's death
from a dropped connection.

JAX's client aborts its process (a fatal C++ log line, a stack dump, status 134) the moment a connection to the
service closes, and the callback jaxlib offers for it (`missed_heartbeat_callback`) cannot be a Python function
that handles it: jaxlib 0.10 and 0.11 fail to pass it the status (std::bad_cast) and abort all the same outside the
join (within it the failure is an exception: parallel/coordination.py `_Native`). So the client talks to the
service through this relay, which runs as a process of its own (forwarding needs no GIL, which a trainer's thread
may hold while it waits on the service). When the service's side of a connection closes, the relay dials the
service afresh, a few times: refused, the service is gone, and the relay tells the trainer over their control
socket while it keeps the client's connections open and silent, so that the trainer exits with its own line before
its client notices anything. Accepted, only that connection dropped, and the relay closes it as the network would
have. The relay hands the trainer its end of each client connection too (SCM_RIGHTS), which the trainer holds: a
relay that dies (SIGKILL, the OOM killer) leaves the client's connections open and silent rather than closed, and the
control socket's end tells the trainer, which exits with one line naming the relay.

  python -I relay.py --upstream=HOST:PORT --control_fd=FD

The control socket carries "port <n>" (where the relay listens, on 127.0.0.1), "conn <id>" (with the relay's end
of a client connection attached), "closed <id>" and "gone <why>" to the trainer, and "ending" from it (the trainer
shuts down: the service may close from then on). The relay exits once the trainer's end of the control socket
closes, however the trainer ended. Standard library only: it runs as a
script, without the package (whose import pulls in JAX).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

PROBE_TIMEOUT_S = 2.0
PROBE_TRIES, PROBE_GAP_S = 5, 0.1


def address(text: str) -> tuple[str, int]:
  """'HOST:PORT' ('[::1]:PORT' too) as (host, port)."""
  host, _, port = text.rpartition(":")
  return host.strip("[]"), int(port)


def refused(upstream: tuple[str, int]) -> str | None:
  """Why fresh connections to `upstream` fail ('connection refused', ...), or None where they are accepted for
  PROBE_TRIES tries PROBE_GAP_S apart: a process being killed closes its connections before its listening socket,
  which may accept the first try."""
  for _ in range(PROBE_TRIES):
    try:
      socket.create_connection(upstream, timeout=PROBE_TIMEOUT_S).close()
    except socket.gaierror as e:
      return f"{upstream[0]} does not resolve ({e.strerror})"
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
    """Until the trainer's end of the control socket closes: once the service is gone too, its client's connections
    stay open and silent however long the trainer takes to read that (stopped, it reads it when continued), as they
    do in the trainer's hands if this process dies."""
    self.control.sendall(f"port {self.listener.getsockname()[1]}\n".encode())
    while True:
      for key, _ in self.selector.select():
        if key.data == "control":
          if not self._read_control():
            return
        elif key.data == "accept":
          self._accept()
        else:
          assert isinstance(key.fileobj, socket.socket)  # every object registered is a socket
          self._forward(key.fileobj)

  def _read_control(self) -> bool:
    try:
      data = self.control.recv(4096)
    except OSError:  # reset: the trainer ended with lines of ours unread
      return False
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
    self._tell(f"conn {client.fileno()}", fds=[client.fileno()])

  def _forward(self, s: socket.socket) -> None:
    try:
      data = s.recv(1 << 16)
    except OSError:
      data = b""
    if data and self.gone:  # the client's words to a service that is gone: silence, until the trainer exits
      return
    if data:
      try:
        self.peer[s].sendall(data)
        return
      except OSError:
        pass
    if s not in self.client_side and not self.ending and not self.gone:
      why = refused(self.upstream)
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
    self._tell(f"gone its connection closed and a new one fails ({why})")

  def _tell(self, line: str, fds: list[int] | None = None) -> None:
    """Sends the trainer `line` (with the descriptors `fds`); one that has ended hears nothing, and the control
    socket's end then ends this process."""
    with contextlib.suppress(OSError):
      if fds:
        socket.send_fds(self.control, [f"{line}\n".encode()], fds)
      else:
        self.control.sendall(f"{line}\n".encode())

  def _close_pair(self, s: socket.socket) -> None:
    for end in (s, self.peer.pop(s, None)):
      if end is None:
        continue
      self.peer.pop(end, None)
      try:
        self.selector.unregister(end)
      except (KeyError, ValueError):
        pass
      if end in self.client_side:  # the trainer holds this end too: shutdown, not close, ends the connection
        self.client_side.discard(end)
        with contextlib.suppress(OSError):
          end.shutdown(socket.SHUT_RDWR)
        self._tell(f"closed {end.fileno()}")
      end.close()


class Link:
  """The trainer's end: starts the relay for the service at `upstream` ('host:port'), whose local address the client
  dials instead (`address`), holds the relay's end of each client connection, and calls, from a thread of its own,
  `on_gone(why)` once the relay finds the service gone, or `on_lost(pid, how)` (how: 'killed by signal KILL', ...)
  once the relay (process `pid`) has ended before this process said it is ending. OSError where the relay does not
  start."""

  START_TIMEOUT_S = 60.0

  def __init__(self, upstream: str, on_gone, on_lost):
    mine, theirs = socket.socketpair()
    with theirs:
      self._process = subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), f"--upstream={upstream}", f"--control_fd={theirs.fileno()}"],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
      )
    self.pid = self._process.pid
    self._control, self._pending = mine, b""
    self._fds: list[int] = []  # received, not yet named by their "conn" line
    self._held: dict[str, int] = {}  # the relay's ends of the client's connections, by the relay's id
    self._ending = False
    mine.settimeout(self.START_TIMEOUT_S)
    first = self._line()
    if not first.startswith("port "):
      raise OSError(f"the coordination service's relay did not start (it said {first!r})")
    mine.settimeout(None)
    self.address = f"127.0.0.1:{int(first.split()[1])}"
    threading.Thread(target=self._watch, args=(on_gone, on_lost), name="visionfm-service-watch", daemon=True).start()

  def _line(self) -> str:
    """The relay's next line ('' once it has ended); the descriptors that came with it join `_fds`."""
    while b"\n" not in self._pending:
      data, fds, _, _ = socket.recv_fds(self._control, 4096, 16)
      for fd in fds:
        os.set_inheritable(fd, False)
      self._fds += fds
      if not data:
        return ""
      self._pending += data
    line, _, self._pending = self._pending.partition(b"\n")
    return line.decode().strip()

  def _watch(self, on_gone, on_lost) -> None:
    while line := self._line():
      word, _, rest = line.partition(" ")
      if word == "conn":
        self._held[rest] = self._fds.pop(0)
      elif word == "closed" and rest in self._held:
        os.close(self._held.pop(rest))
      elif word == "gone":
        on_gone(rest)
        return
    if not self._ending:
      on_lost(self.pid, self._how_it_ended())

  def _how_it_ended(self) -> str:
    try:
      code = self._process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      return "its control socket closed"
    if code < 0:
      return f"killed by signal {signal.Signals(-code).name.removeprefix('SIG')}"
    return f"with status {code}"

  def ending(self) -> None:
    """This process is shutting down: the service may close its connections from now on without being gone."""
    self._ending = True
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
  Relay(address(args.upstream), control).serve()
  return 0


if __name__ == "__main__":
  sys.exit(main())
