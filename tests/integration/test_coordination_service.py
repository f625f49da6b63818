"""JAX's coordination service hosted by the launcher (visionfm_jax/parallel/coordination.py): process 0 joins it as
a client instead of starting its own, and the service ends with the process that started it. Its death in a
two-process job through launch/local.sh is one line in each trainer and one in the launcher, exit 75; the relay the
trainers join it through (parallel/relay.py) tells its death from a dropped connection. Process 0's death in such a
job is tests/integration/test_multiprocess.py's
`test_sigkills_and_preemption_notices_along_one_chain_of_reruns_that_ends_bitwise`."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from visionfm_jax.parallel import coordination, relay
from visionfm_jax.training.infra import faults

from conftest import ROOT
from test_frozen_coordinator import ABORT_SIGNS
from test_multiprocess import _Job, _no_job_outlives_its_test, _trained_a_step, _wait_for, _wait_gone  # noqa: F401 (a fixture)

JOIN = """
import jax
from visionfm_jax.parallel import distributed
distributed.initialize("on")
from jax._src import distributed as jax_distributed
assert jax_distributed.global_state.service is None, "process 0 started a service of its own"
print("joined", jax.process_index(), jax.process_count(), int(jax.numpy.arange(4).sum()), flush=True)
"""


def _serve(tmp_path, parent_argv=None, python_options=(), stderr=None) -> tuple[subprocess.Popen, int]:
  """Starts the service for one process (under a shell parent when `parent_argv`; with the interpreter's
  `python_options`, its stderr to the file `stderr`); returns (process, port)."""
  ready = tmp_path / "ready"
  argv = [
    sys.executable,
    *python_options,
    "-m",
    "visionfm_jax.parallel.coordination",
    "--processes=1",
    f"--ready_file={ready}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # "; exit" keeps bash from becoming the service (exec) so that it stays its parent
  proc = subprocess.Popen(
    parent_argv + [" ".join(argv) + "; exit"] if parent_argv else argv,
    cwd=ROOT,
    env=env,
    stderr=stderr,
    start_new_session=True,
  )
  deadline = time.monotonic() + 60
  while not ready.exists():
    assert proc.poll() is None and time.monotonic() < deadline, "the service did not start"
    time.sleep(0.05)
  return proc, int(ready.read_text())


def test_process_0_joins_the_launchers_service_instead_of_starting_one(tmp_path):
  service, port = _serve(tmp_path)
  try:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
    env.update(
      JAX_PLATFORMS="cpu",
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES="1",
      JAX_PROCESS_ID="0",
      **{coordination.SERVICE_ENV: "launcher"},
    )
    joined = subprocess.run(
      [sys.executable, "-c", JOIN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
  finally:
    service.terminate()
    assert service.wait(timeout=30) == 0
  assert joined.returncode == 0, joined.stderr[-4000:]
  assert "joined 0 1 6" in joined.stdout


def test_the_service_starts_without_jax_and_logs_nothing_below_warning(tmp_path):
  """The launcher's service needs JAX's native library only: its process imports neither JAX nor Flax
  (`coordination._native_library`), and the library's C++ INFO lines stay off the console, as under JAX."""
  log = tmp_path / "stderr"
  with open(log, "w", encoding="utf-8") as stderr:
    service, _ = _serve(tmp_path, python_options=("-X", "importtime"), stderr=stderr)
  service.terminate()
  assert service.wait(timeout=30) == 0
  lines = log.read_text().splitlines()
  imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
  assert "jaxlib._jax" in imported and not imported & {"jax", "flax", "visionfm_jax.parallel.sharding"}
  assert not [line for line in lines if not line.startswith("import time:")], lines[-20:]


def test_a_stopped_and_continued_service_serves_on(tmp_path):
  """A SLURM suspension stops and continues the job's processes: the service, stopped past its wait's 1 s deadline,
  took the empty answer of the interrupted wait for a stop signal and exited 0, so that its trainers exited 75."""
  service, port = _serve(tmp_path)
  try:
    os.kill(service.pid, signal.SIGSTOP)
    time.sleep(1.5)
    os.kill(service.pid, signal.SIGCONT)
    time.sleep(1.0)  # the interrupted wait has answered
    assert service.poll() is None, f"the service ended with status {service.returncode} when continued"
    socket.create_connection(("localhost", port), timeout=10).close()
  finally:
    service.terminate()
  assert service.wait(timeout=30) == 0


def test_the_service_ends_when_the_launcher_that_started_it_is_killed(tmp_path):
  launcher, _ = _serve(tmp_path, parent_argv=["bash", "-c"])
  with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children", encoding="utf-8") as f:
    service = [int(p) for p in f.read().split()]
  assert len(service) == 1
  os.kill(launcher.pid, signal.SIGKILL)
  launcher.wait()
  deadline = time.monotonic() + 15
  while os.path.exists(f"/proc/{service[0]}") and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not os.path.exists(f"/proc/{service[0]}") or _zombie(service[0]), "the service outlived its launcher"


def _zombie(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().split(")")[-1].split()[0] == "Z"
  except FileNotFoundError:
    return True


def _children(pid: int) -> list[int]:
  with open(f"/proc/{pid}/task/{pid}/children", encoding="utf-8") as f:
    return [int(p) for p in f.read().split()]


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().decode(errors="replace")
  except FileNotFoundError:
    return ""


@pytest.mark.slow
def test_the_services_death_is_one_line_in_each_trainer_and_in_the_launcher_and_exit_75(tmp_path):
  """SIGKILL of the service local.sh hosts, mid-run: JAX's client would abort both trainers with a fatal C++ line
  and a stack dump (status 134), and the launcher would blame process 0."""
  job = _Job(tmp_path / "run", "--config.total_steps=100000")
  _wait_for(lambda: _trained_a_step(job.workdir), job, "a train step", poll=0.05)
  (service,) = (pid for pid in _children(job.proc.pid) if "visionfm_jax.parallel.coordination" in _cmdline(pid))
  os.kill(service, signal.SIGKILL)
  killed = time.monotonic()
  code, out = job.finish(timeout=60)
  assert time.monotonic() - killed < 10
  assert code == faults.HUNG_EXIT_CODE, out[-6000:]
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  # the probe's reason is the OS's: a service being killed refuses it, or accepts and resets it
  trainer_line = (
    rf"error: JAX's coordination service at localhost:\d+ \(pid {service}, started by the launcher\) is "
    rf"gone: its connection closed and a new one fails \(connection (refused|reset by peer)\). "
    rf"Process {{}} exits with code {faults.HUNG_EXIT_CODE} so that the job is requeued; it resumes from "
    rf"the newest complete checkpoint."
  )
  for i in range(2):  # the lines in full where one differs (a list in the message would be cut to 240 characters)
    assert sum(bool(re.fullmatch(trainer_line.format(i), line)) for line in errors) == 1, "\n".join(errors)
  launcher = [line for line in errors if line.startswith("error: JAX's coordination service (pid")]
  assert len(launcher) == 1 and re.match(
    rf"error: JAX's coordination service \(pid {service}, localhost:\d+\) ended "
    rf"first, by signal KILL \(status 137\)",
    launcher[0],
  ), errors
  assert len(errors) == 3, errors
  assert not [sign for sign in ABORT_SIGNS if sign in out], out[-6000:]


@pytest.mark.slow
def test_a_suspended_service_serves_on_and_a_dead_relay_is_named_by_its_trainer_which_exits_75(tmp_path):
  """Two faults along one job of launch/local.sh 2 (a job costs more than its faults):
  - The service stopped past its wait's deadline and continued (as a SLURM suspension does) exited 0, and the job
    with it (exit 75). Now the job trains on.
  - SIGKILL of process 1's relay (parallel/relay.py): JAX's client aborted the trainer within 0.2 s with a fatal C++
    line and a ~160-line stack dump (status 134), and the launcher blamed the trainer. Now the trainer names the
    relay in one line and exits 75; its peer names it in turn after config.peer_timeout_s; the committed checkpoint
    stays; nothing is left running."""
  job = _Job(tmp_path / "run", "--config.total_steps=100000", "--config.peer_timeout_s=5")
  job.wait_for_checkpoint(10)
  (service,) = (pid for pid in _children(job.proc.pid) if "visionfm_jax.parallel.coordination" in _cmdline(pid))
  os.kill(service, signal.SIGSTOP)
  time.sleep(1.5)  # past the service's 1 s wait, within the trainers' 5 s peer timeout
  os.kill(service, signal.SIGCONT)
  job.wait_for_a_step_after(job.wait_for_a_step_after(10) + 5)
  assert _wait_gone(service, timeout=0.1) is None, "the service ended when continued"
  trainers = job.trainers()
  relays = {pid: [child for child in _children(pid) if "relay.py" in _cmdline(child)] for pid in trainers}
  [relay_pid] = relays[trainers[1]]
  os.kill(relay_pid, signal.SIGKILL)
  waited = _wait_gone(trainers[1], timeout=30)
  code, out = job.finish(timeout=60)
  assert waited is not None and waited < 10, (waited, out[-6000:])
  assert code == faults.HUNG_EXIT_CODE, out[-6000:]
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert re.fullmatch(
    rf"error: the relay \(pid {relay_pid}\) that joins this process to JAX's coordination service "
    rf"at localhost:\d+ \(pid \d+, started by the launcher\) ended, killed by signal KILL: the "
    rf"process cannot reach the service without it. Process 1 exits with code "
    rf"{faults.HUNG_EXIT_CODE} .*",
    errors[0],
  ), errors
  launcher = f"error: process 1 of 2 (pid {trainers[1]}) ended first, with status 75 (requeue), at"
  assert errors[1].startswith(launcher), errors
  assert re.match(r"error: process 1 of 2 .* has sent no heartbeat", errors[2]) and len(errors) == 3, errors
  assert not [sign for sign in ABORT_SIGNS if sign in out], out[-6000:]
  assert (tmp_path / "run" / "checkpoints" / "10" / "state").is_dir()
  left = [pid for pid in [*trainers, *sum(relays.values(), [])] if _wait_gone(pid, timeout=5) is None]
  assert not left, [_cmdline(pid) for pid in left]


class _Service:
  """A TCP server standing in for the service: answers each byte it reads with the same byte."""

  def __init__(self):
    self.listener = socket.create_server(("127.0.0.1", 0))
    self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
    self.connections = []
    threading.Thread(target=self._serve, daemon=True).start()

  def _serve(self):
    while True:
      try:
        connection, _ = self.listener.accept()
      except OSError:
        return
      self.connections.append(connection)
      threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

  @staticmethod
  def _echo(connection):
    while data := connection.recv(4096):
      connection.sendall(data)


def _through(link) -> socket.socket:
  client = socket.create_connection(("127.0.0.1", int(link.address.rsplit(":", 1)[1])), timeout=10)
  client.sendall(b"ping")
  assert client.recv(4) == b"ping"
  return client


def test_the_relay_tells_the_services_death_from_a_dropped_connection():
  service, gone = _Service(), []
  link = relay.Link(service.address, gone.append, lambda *lost: gone.append(lost))
  client = _through(link)
  service.connections[0].shutdown(socket.SHUT_RDWR)  # one connection dropped; the service still serves
  assert client.recv(4) == b"" and not gone  # closed, as the network would have
  client = _through(link)
  service.listener.shutdown(socket.SHUT_RDWR)  # stops listening (close alone waits for the blocked accept)
  service.listener.close()
  for connection in service.connections:
    with contextlib.suppress(OSError):  # the relay's probe, which it closed itself
      connection.shutdown(socket.SHUT_RDWR)
  deadline = time.monotonic() + 10
  while not gone and time.monotonic() < deadline:
    time.sleep(0.01)
  assert gone == ["its connection closed and a new one fails (connection refused)"]
  client.settimeout(0.3)
  with pytest.raises(TimeoutError):  # the client's connection stays open, silent, while the trainer exits
    client.recv(4)
  link.ending()


def test_a_relay_that_dies_leaves_the_clients_connections_open_and_is_named():
  """SIGKILL of the relay closed the client's connections, and JAX's client aborted its trainer with a stack dump
  (status 134) before anything named the relay."""
  service, lost = _Service(), []
  link = relay.Link(service.address, lambda why: lost.append(("gone", why)), lambda *args: lost.append(args))
  client = _through(link)
  os.kill(link.pid, signal.SIGKILL)
  deadline = time.monotonic() + 10
  while not lost and time.monotonic() < deadline:
    time.sleep(0.01)
  assert lost == [(link.pid, "killed by signal KILL")]
  client.settimeout(0.3)
  with pytest.raises(TimeoutError):  # open and silent: the trainer exits with its own line first
    client.recv(4)


WRITES = """
import os, sys
class Writes:  # each write to stderr as one line of stdout
  def write(self, text):
    os.write(1, (repr(text) + "\\n").encode())
  def flush(self):
    pass
sys.stderr = Writes()
from visionfm_jax.parallel import coordination
coordination.exit_for_requeue("the service is gone", 1)
"""


def test_the_requeue_line_is_one_write_so_that_two_processes_lines_do_not_interleave():
  """The trainers of a job share the launcher's stream, unbuffered under PYTHONUNBUFFERED: print's two writes (text,
  then newline) let the other trainer's line in between, and the two lines became one."""
  done = subprocess.run(
    [sys.executable, "-c", WRITES],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
    env=dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu"),
  )
  assert done.returncode == coordination.REQUEUE_EXIT_CODE, done.stderr[-2000:]
  writes = done.stdout.splitlines()
  assert len(writes) == 1 and writes[0].startswith("'error: the service is gone. Process 1 exits with code 75"), writes
  assert writes[0].endswith("\\n'"), writes
