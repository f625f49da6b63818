"""A warm interpreter for the suite's commands: `python -m visionfm_jax.<module> ...` in a process forked from a
server that has imported the package and its libraries already, instead of a fresh interpreter that imports them
again (about 1 CPU s a command: JAX, Flax, Orbax, Grain and this package). Each command still runs in a process of
its own, with its own argv, environment, working directory, standard streams and exit status.

`Server(env, folder)` starts the server (`python tests/warm_python.py SOCKET MODULE_PREFIX...`) and writes a `python`
program into `server.bin`: put that folder first on a command's PATH, with VISIONFM_WARM_PYTHON=server.socket (its
`env()`), and `python -m <module>` of a served module runs warm. Anything else (another module, `-c`, a script, a
server that is gone or declines) runs in the real interpreter, as before.

What a fresh interpreter reads at start-up and the server read at its own: the JAX options set by environment
variables are applied again in each command (`_apply_jax_environment`); a command whose PYTHONPATH, Python
options or suite profile differ from the server's is declined. The command's process joins its caller's process
group where both share a session, and dies when its caller does (SIGKILL included); the signals a caller can catch
are passed on to it."""

import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

PRELOAD = (
  "visionfm_jax.training.train",
  "visionfm_jax.training.dry_run",
  "visionfm_jax.tasks",
  "visionfm_jax.models",
  "visionfm_jax.data",
  "visionfm_jax.evaluate",
  "visionfm_jax.tools.evaluate",
  "visionfm_jax.tools.summary",
  "visionfm_jax.tools.caption",
  "visionfm_jax.datatools.prepare_data",
  "visionfm_jax.datatools.index_tars",
  "visionfm_jax.datatools.train_tokenizer",
  "orbax.checkpoint",
  "grain",
  "tokenizers",
  "absl.app",
  "ml_collections.config_flags",
)
# JAX's coordination service watches its parent (the launcher) to end with it: a forked one's parent is the server.
NOT_SERVED = ("visionfm_jax.parallel.coordination",)
# Read by the interpreter (or the suite profile) at start-up: a command that differs from the server is declined.
STARTUP_ENVIRONMENT = (
  "PYTHONPATH",
  "PYTHONHOME",
  "PYTHONHASHSEED",
  "PYTHONOPTIMIZE",
  "PYTHONWARNINGS",
  "PYTHONSAFEPATH",
  "PYTHONNODEBUGRANGES",
  "PYTHONDEVMODE",
  "PYTHONMALLOC",
  "VISIONFM_SUITE_PROFILE",
)
FORWARDED_SIGNALS = (
  signal.SIGINT,
  signal.SIGTERM,
  signal.SIGHUP,
  signal.SIGQUIT,
  signal.SIGUSR1,
  signal.SIGUSR2,
  signal.SIGALRM,
  signal.SIGCONT,
  signal.SIGWINCH,
)

SHIM = r"""#!{python} -IS
import json, os, signal, socket, struct, sys
REAL = {python!r}
args = sys.argv[1:]
unbuffered = args[:1] == ["-u"]
rest = args[unbuffered:]
address = os.environ.get("VISIONFM_WARM_PYTHON")
if not address or len(rest) < 2 or rest[0] != "-m":
  os.execv(REAL, [REAL, *args])
request = json.dumps(dict(module=rest[1], argv=rest[2:], unbuffered=unbuffered, env=dict(os.environ),
                          cwd=os.getcwd(), pgid=os.getpgrp())).encode()
try:
  conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  conn.connect(address)
  socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
  replies = conn.makefile("r")
  first = json.loads(replies.readline() or "{{}}")
except (OSError, ValueError):
  first = {{}}
if "pid" not in first:
  os.execv(REAL, [REAL, *args])
for number in {signals}:
  signal.signal(number, lambda n, _, pid=first["pid"]: os.kill(pid, n))
status = json.loads(replies.readline() or '{{"exit": 1}}')
if "signal" in status:
  signal.signal(status["signal"], signal.SIG_DFL)
  os.kill(os.getpid(), status["signal"])
os._exit(status.get("exit", 128 + status.get("signal", 0)))
"""


class Server:
  """The server, started with `env` (the environment its commands share, less what each sets for itself) and
  serving the modules under `prefixes`; a context manager that stops it."""

  def __init__(self, env: dict, folder: str, prefixes=("visionfm_jax.",)):
    self.folder = folder
    # A socket's path has at most 107 bytes: its own short folder, whatever the temporary folder's length.
    self._socket_folder = tempfile.mkdtemp(prefix="vfm_warm_", dir="/tmp" if os.path.isdir("/tmp") else None)
    self.socket = os.path.join(self._socket_folder, "socket")
    self.bin = os.path.join(self.folder, "bin")
    os.makedirs(self.bin, exist_ok=True)
    with open(self.python, "w", encoding="utf-8") as f:
      f.write(SHIM.format(python=sys.executable, signals=tuple(int(s) for s in FORWARDED_SIGNALS)))
    os.chmod(self.python, 0o755)
    self.log = open(os.path.join(self.folder, "server.log"), "wb")  # pylint: disable=consider-using-with
    self.process = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), self.socket, *prefixes],
      env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      stdin=subprocess.DEVNULL,
      stdout=self.log,
      stderr=self.log,
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(self.socket):
      if self.process.poll() is not None or time.monotonic() > deadline:
        with open(self.log.name, encoding="utf-8", errors="replace") as log:
          raise RuntimeError(f"the warm interpreter did not start: {log.read()[-2000:]}")
      time.sleep(0.05)

  @property
  def python(self) -> str:
    """This server's `python` program: `[server.python, "-m", module, ...]` with `env=server.env(...)`."""
    return os.path.join(self.bin, "python")

  def env(self, env: dict | None = None) -> dict:
    """`env` (this process's environment by default) with this server's `python` first on PATH."""
    env = dict(os.environ if env is None else env)
    return dict(env, PATH=f"{self.bin}:{env.get('PATH', '')}", VISIONFM_WARM_PYTHON=self.socket)

  def close(self):
    if self.process.poll() is None:
      self.process.terminate()
      self.process.wait(timeout=30)
    self.log.close()
    shutil.rmtree(self._socket_folder, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *_):
    self.close()


# ------------------------------------------------------------------------------------------ the server process


def _read_request(conn) -> tuple[dict, list[int]]:
  data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
  size = struct.unpack("!I", data[:4])[0]
  data = data[4:]
  while len(data) < size:
    chunk = conn.recv(size - len(data))
    if not chunk:
      raise ConnectionError("the caller left mid-request")
    data += chunk
  return json.loads(data), list(fds)


def _declined(request: dict, prefixes) -> str | None:
  module = request["module"]
  if not module.startswith(tuple(prefixes)) or module.startswith(NOT_SERVED):
    return f"{module} is not served"
  for name in STARTUP_ENVIRONMENT:
    if request["env"].get(name) != os.environ.get(name):
      return f"{name} differs from the server's"
  return None


def _apply_jax_environment(env: dict) -> None:
  """Sets each JAX option whose JAX_<NAME> variable the command's environment gives otherwise than the server's:
  a fresh interpreter reads them when JAX is imported, which the server did before the command was known."""
  import jax  # pylint: disable=g-import-not-at-top

  for name in jax.config.values:
    value, before = env.get(name.upper()), os.environ.get(name.upper())
    if value == before or value is None:
      continue
    current = jax.config.values[name]
    if isinstance(current, bool):
      parsed = value.lower() in ("1", "true", "t", "yes", "y", "on")
    elif isinstance(current, int):
      parsed = int(value)
    elif isinstance(current, float):
      parsed = float(value)
    else:
      parsed = value
    jax.config.update(name, parsed)


def _die_with_caller(conn) -> None:
  """The caller holds the other end of `conn` until it exits: its end closing ends this command too."""

  def watch():
    while conn.recv(1):
      pass
    os.kill(os.getpid(), signal.SIGKILL)

  threading.Thread(target=watch, daemon=True).start()


def _run_command(request: dict, fds: list[int], conn) -> None:
  """In the forked process: becomes the command and exits with its status."""
  import runpy  # pylint: disable=g-import-not-at-top

  for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
    signal.signal(number, signal.SIG_IGN if number == signal.SIGPIPE else signal.SIG_DFL)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    os.setpgid(0, request["pgid"])
  except OSError:  # another session: a group of its own
    os.setpgid(0, 0)
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
    os.close(fd)
  _die_with_caller(conn)
  os.chdir(request["cwd"])
  _apply_jax_environment(request["env"])
  os.environ.clear()
  os.environ.update(request["env"])
  if request["unbuffered"] or request["env"].get("PYTHONUNBUFFERED"):
    sys.stdout.reconfigure(line_buffering=True, write_through=True)
  sys.path[0] = request["cwd"]
  sys.argv = ["-m", *request["argv"]]
  sys.modules.pop(request["module"], None)
  code = 0
  try:
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = _exit_code(e)
  except KeyboardInterrupt:
    code = -signal.SIGINT
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  threading._shutdown()  # pylint: disable=protected-access  # as the interpreter does at its end
  import atexit  # pylint: disable=g-import-not-at-top

  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
  os._exit(code & 0xFF)


def _exit_code(stop: SystemExit) -> int:
  """The status the interpreter exits with on `stop`: its int code, 0 for None, else 1 with the code printed."""
  if stop.code is None or isinstance(stop.code, int):
    return stop.code or 0
  print(stop.code, file=sys.stderr)
  return 1


def _status(wait_status: int) -> dict:
  if os.WIFSIGNALED(wait_status):
    return {"signal": os.WTERMSIG(wait_status)}
  return {"exit": os.WEXITSTATUS(wait_status)}


def serve(address: str, prefixes) -> None:
  import importlib  # pylint: disable=g-import-not-at-top

  sys.path[0] = os.getcwd()  # as for `python -m` run from the checkout, not this file's folder
  for module in PRELOAD:
    importlib.import_module(module)
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(address + ".binding")
  listener.listen(64)
  os.rename(address + ".binding", address)  # the socket appears once it accepts
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # Server.close: exits through atexit (the suite profile)
  wake_r, wake_w = os.pipe()
  os.set_blocking(wake_w, False)
  signal.set_wakeup_fd(wake_w)
  signal.signal(signal.SIGCHLD, lambda *_: None)
  selector = selectors.DefaultSelector()
  selector.register(listener, selectors.EVENT_READ)
  selector.register(wake_r, selectors.EVENT_READ)
  running, parent = {}, os.getppid()  # {command's pid: its caller's connection}
  while os.getppid() == parent:
    for key, _ in selector.select(timeout=1.0):
      if key.fileobj is listener:
        _accept(listener, prefixes, running, (wake_r, wake_w))
      else:
        os.read(wake_r, 4096)
    _reap(running)


def _reply(conn, message: dict) -> None:
  conn.sendall(json.dumps(message).encode() + b"\n")


def _accept(listener, prefixes, running: dict, wake_pipe) -> None:
  """Takes one request: declines it, or forks its command (which never returns here) and records it."""
  conn, _ = listener.accept()
  try:
    request, fds = _read_request(conn)
  except (OSError, ValueError, struct.error):
    conn.close()
    return
  reason = _declined(request, prefixes)
  if reason is not None:
    for fd in fds:
      os.close(fd)
    _reply(conn, {"declined": reason})
    conn.close()
    return
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    signal.set_wakeup_fd(-1)  # before its pipe closes: a signal would write to whatever reused the number
    for other in (listener, *running.values()):
      other.close()
    for fd in wake_pipe:
      os.close(fd)
    _run_command(request, fds, conn)
  for fd in fds:
    os.close(fd)
  _reply(conn, {"pid": pid})
  running[pid] = conn


def _reap(running: dict) -> None:
  """Tells the caller of each command that has ended its status."""
  while running:
    pid, wait_status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
      return
    conn = running.pop(pid, None)
    if conn is not None:
      try:
        _reply(conn, _status(wait_status))
      except OSError:
        pass
      conn.close()


if __name__ == "__main__":
  try:
    serve(sys.argv[1], sys.argv[2:])
  finally:
    if os.path.exists(sys.argv[1]):
      os.unlink(sys.argv[1])
