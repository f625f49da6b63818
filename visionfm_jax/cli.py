"""The shared `main` of the CLIs (main, bench, tools, datatools): help, flag parsing, one `error:` line with exit
status 2 for bad input, and Ctrl-C.

Ctrl-C (SIGINT) ends a program with one line (`interrupted`, or what the program says: the trainer names its step
and newest checkpoint) and exit status 130, without a traceback (`Interrupts`). A thread of its own takes it: it asks
the main thread to stop (a KeyboardInterrupt at its next line of Python, or a flag that the training loop reads after
each step), and ends the process itself, with the line, `INTERRUPT_GRACE_S` later or at a second Ctrl-C: the main
thread may be in native code for minutes (a compile). The trainer blocks SIGINT in its main thread, so in every
thread and process started after it: its grain workers receive a terminal's Ctrl-C too, and end with it instead.
"""

from __future__ import annotations

import _thread
import logging
import os
import re
import signal
import socket
import sys
import threading
from typing import Any, Callable, Sequence

from absl import flags

from visionfm_jax import config_lib, errors
from visionfm_jax.errors import ConfigError, UserError

HELP_FLAGS = ("-h", "--help", "--helpshort")
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports for a program that Ctrl-C ended
INTERRUPT_GRACE_S = 5.0
TAKE_SIGINT_ENV = "VISIONFM_TAKE_SIGINT"  # "1": take SIGINT over though it is ignored (a launcher's background job)


class Interrupted(KeyboardInterrupt):
  """A Ctrl-C carried out where the program reads `Interrupts.requested`: it stops there, and says its line."""


class Interrupts:
  """Ctrl-C for the process, from `start()` (in the main thread) to `close()`: see the module's docstring.

  `requested`: set at the first SIGINT. `polled`: while True, the main thread reads `requested` itself (the training
  loop, after each step) instead of being interrupted. `describe()`: the line to say. `before_end_now`: what to do
  before an exit that runs no `finally` (release a workdir's lock).

  Each SIGINT is taken once, whichever way it comes: pending, where every thread blocks it (the thread's
  `sigtimedwait`), or as the byte Python's signal handler writes to its wakeup socket from the thread the kernel
  picked, read by the thread or, first, by the main thread's handler (a blocking call there ends at once). With
  `block` (the trainer) SIGINT is blocked in the main thread: the threads and processes started after it never
  take it, its grain workers among them (multiprocessing unblocks it in the thread that starts its resource tracker:
  `block_here` blocks it again). Without (the tools), the processes a tool starts take a terminal's Ctrl-C as
  they always did.
  """

  def __init__(self, grace_s: float = INTERRUPT_GRACE_S):
    self.grace_s = grace_s
    self.requested = threading.Event()
    self.polled = False
    self.describe: Callable[[], str] = lambda: "interrupted"
    self.before_end_now: list[Callable[[], None]] = []
    self._said = threading.Lock()
    self._taking = threading.RLock()  # one taker of the socket's bytes at a time (the handler may nest)
    self._closed = threading.Event()
    self._timer: threading.Timer | None = None
    self._simulated = 0  # the wakeup bytes of our own interrupt_main calls, not a Ctrl-C
    self._raised = False  # the KeyboardInterrupt of this Ctrl-C, raised once
    self._reader: socket.socket | None = None
    self._main_takes_it = False  # SIGINT unblocked in the main thread (a tool): a real one wakes its blocking call
    self._before: tuple | None = None  # (handler, mask, wakeup fd, writer) to give back at close

  def start(self, block: bool = False) -> Interrupts:
    """Takes SIGINT over; does nothing outside the main thread or where SIGINT is ignored (a shell's background
    job), unless the launcher that started it says its processes take a terminal's Ctrl-C themselves
    (`TAKE_SIGINT_ENV`: launch/local.sh)."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN and os.environ.get(TAKE_SIGINT_ENV) != "1"
    if self._before is not None or threading.current_thread() is not threading.main_thread() or ignored:
      return self
    self.requested, self.polled, self._closed = threading.Event(), False, threading.Event()
    self._said, self._simulated, self._raised = threading.Lock(), 0, False
    self._reader, writer = socket.socketpair()
    self._reader.setblocking(False)
    writer.setblocking(False)
    handler = signal.signal(signal.SIGINT, self._in_main_thread)
    wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())  # as it is
    if block:
      self.block_here()
    self._main_takes_it = not block
    self._before = (handler, mask, wakeup, writer)
    threading.Thread(target=self._watch, args=(self._closed, self._reader), name="visionfm-ctrl-c", daemon=True).start()
    return self

  def block_here(self) -> None:
    """Blocks SIGINT in the calling thread, and so in the threads and processes it starts, while this holds it."""
    if self._reader is not None:
      signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

  def close(self) -> None:
    """Gives SIGINT back (a program that ends here keeps it: a Ctrl-C while it exits ends it at once)."""
    if self._before is None:
      return
    self._closed.set()
    if self._timer is not None:
      self._timer.cancel()
    handler, mask, wakeup, writer = self._before
    signal.set_wakeup_fd(wakeup)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    signal.signal(signal.SIGINT, handler)
    writer.close()
    self._before = None

  def say(self) -> int:
    """Says the line, once whoever asks; returns the exit status."""
    if self._said.acquire(blocking=False):
      errors.say(self.describe())
    return INTERRUPTED_EXIT_CODE

  def end_now(self) -> None:
    """Says the line where it is not said yet and exits at once: the workers and /dev/shm files follow their
    trainer (data/loader/reaping.py); a checkpoint being saved is abandoned, the committed ones stay."""
    self.say()
    for action in list(self.before_end_now):
      action()
    sys.stdout.flush()
    os._exit(INTERRUPTED_EXIT_CODE)

  def _in_main_thread(self, signum, frame) -> None:
    """Python's handler, run by the main thread at its next line: takes the Ctrl-C that reached it, and raises its
    KeyboardInterrupt (once) where the main thread is not polling."""
    del signum, frame
    self._take(self._reader, in_main=True)
    if self.requested.is_set() and not self.polled and not self._raised:
      self._raised = True
      raise KeyboardInterrupt

  def _watch(self, closed: threading.Event, reader: socket.socket) -> None:
    while not closed.is_set():
      # A wait that a SIGSTOP/SIGCONT interrupts past its deadline answers an empty siginfo (signal 0), not None.
      info = signal.sigtimedwait({signal.SIGINT}, 0.1)
      pending = info is not None and info.si_signo == signal.SIGINT
      self._take(reader, pending=pending)
    reader.close()

  def _take(self, reader: socket.socket | None, pending: bool = False, in_main: bool = False) -> None:
    """Carries out the Ctrl-Cs on `reader` (less the bytes of our own interrupt_main calls), and one more where one
    was `pending`."""
    with self._taking:
      try:
        woken = reader.recv(64).count(signal.SIGINT) if reader is not None else 0
      except (BlockingIOError, OSError):
        woken = 0
      own = min(woken, self._simulated)
      self._simulated -= own
      for _ in range(woken - own + pending):
        self._request(in_main)

  def _request(self, in_main: bool) -> None:
    if self.requested.is_set():
      self.end_now()
    self.requested.set()
    if not (self.polled or in_main):
      self._simulated += 1
      if self._main_takes_it:
        # The watcher's wait can take a Ctrl-C before the main thread's handler does; a SIGINT sent to the main
        # thread then ends the call it blocks in (a sleep, a read) at once, as the terminal's would have.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
      else:
        _thread.interrupt_main()  # runs `_in_main_thread` at the main thread's next line
    self._timer = threading.Timer(self.grace_s, self.end_now)
    self._timer.daemon = True
    self._timer.start()


interrupts = Interrupts()  # the process's: main and `run` start it, the training loop polls it


def last_line(error: Exception) -> str:
  """absl and ml_collections put tracebacks in their messages: the last line names the problem."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def error_line(error: Exception) -> str:
  """The `error: ...` line printed for a UserError: its message on one line."""
  return "error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def parse(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """`fv(argv)`, and the config file of a `--config` flag loaded with its overrides. A bad flag, a config file
  that does not load, an unknown variant or an override of a field the config lacks is a UserError whose one
  line names it (absl and ml_collections report these with tracebacks and without the culprit)."""
  try:
    rest = fv(list(argv))
    if "config" in fv and fv["config"].present:
      fv.config.keys()  # a config file that failed to load raises here
    return rest
  except (flags.Error, AttributeError, KeyError, OSError, ConfigError) as e:
    raise UserError(_explain(e, argv)) from e


def _explain(error: Exception, argv: Sequence[str]) -> str:
  """The culprit of a failed parse: the config file or the override that does not fit it, found by loading the
  file again; else the last line of the error."""
  args = list(argv[1:])
  spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  if spec is None and "--config" in args[:-1]:
    spec = args[args.index("--config") + 1]
  if spec:
    try:
      config = config_lib.load(spec)
      for arg in args:
        if arg.startswith("--config."):
          config_lib.check_override(config, arg)
    except ConfigError as e:
      return str(e)
  return last_line(error)


def check_args(fv: flags.FlagValues, rest: Sequence[str], required: Sequence[str] = ()) -> None:
  """UserError for positional arguments (`rest`, the program name left out) or a `required` flag left unset."""
  if rest:
    raise UserError(f"unexpected arguments {list(rest)}")
  for name in required:
    if fv[name].value in (None, ""):
      raise UserError(f"--{name}: required")


def run(
  argv: Sequence[str], fv: flags.FlagValues, doc: str, body: Callable[[flags.FlagValues, list[str]], None]
) -> int:
  """Parses `argv` (program name first) into `fv` and calls `body(fv, positional arguments)`, which prints the
  results. `--help` prints `doc` and the flags; a bad flag or a UserError prints one `error:` line, a Ctrl-C the
  line `interrupted` (`Interrupts`). Returns the exit status: 0, 2 for bad input, 130 when interrupted."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(doc)
    print(fv.get_help())
    return 0
  interrupts.start(block=False)
  try:
    rest = parse(fv, argv)[1:]
    body(fv, rest)
  except UserError as e:
    errors.say(error_line(e))
    return 2
  except KeyboardInterrupt:
    return interrupts.say()
  finally:
    interrupts.close()
  return 0


CHECKPOINT_FLAGS = ("--checkpoint", "--workdir")


def checkpoint_arg(argv: Sequence[str]) -> str | None:
  """The --checkpoint (or --workdir) value in `argv`, read before the flags exist: its config decides which
  --config.<field> flags there are."""
  for i, arg in enumerate(argv):
    for name in CHECKPOINT_FLAGS:
      if arg.startswith(name + "="):
        return arg[len(name) + 1 :]
      if arg == name and i + 1 < len(argv):
        return argv[i + 1]
  return None


def run_with_config(
  argv: Sequence[str],
  load_config: Callable[[str], Any],
  make_flags: Callable[[Any, Sequence[str]], flags.FlagValues],
  doc: str,
  body: Callable[[flags.FlagValues, list[str]], None],
) -> int:
  """`run` for a tool whose `--config.<field>` overrides apply to the config of its --checkpoint:
  `load_config(path)` reads it, `make_flags(config or None, argv)` defines the flags. A bad checkpoint or an
  override of a field the config lacks prints one `error:` line (status 2)."""
  path = checkpoint_arg(argv[1:])
  try:
    fv = make_flags(load_config(path) if path else None, argv)
  except UserError as e:
    errors.say(error_line(e))
    return 2
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config does not have
    errors.say(f"error: --config: {last_line(e)}")
    return 2
  return run(argv, fv, doc, body)


def ignore_closed_event_loops() -> None:
  """Drops the aftermath of an Orbax save or restore that has failed (a full disk, a deleted chunk), whose error line
  already named the fault: tensorstore's callbacks of the reads and writes still in flight post to the event loop
  Orbax has closed ('Event loop is closed', through sys.unraisablehook), and the sibling reads of the failed one end
  as tasks nobody awaits (asyncio's 'Task exception was never retrieved', through its logger), each a traceback.
  Every other unraisable error and asyncio record goes where it went. Installs once."""
  previous = sys.unraisablehook
  if getattr(previous, "ignores_closed_event_loops", False):
    return

  def hook(unraisable) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.ignores_closed_event_loops = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_not_an_unawaited_tensorstore_error)


def _not_an_unawaited_tensorstore_error(record) -> bool:
  error = record.exc_info[1] if record.exc_info else None
  return not (
    str(record.msg).startswith("Task exception was never retrieved")
    and isinstance(error, ValueError)
    and re.search(r"Error (reading|writing) ", str(error)) is not None
  )
