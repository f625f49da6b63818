"""What a person sees while a run trains: our own log lines, a progress bar, one line per evaluation.

`configure(verbose)` sets up the stderr handler once per program: every line is `HH:MM:SS message`
(`HH:MM:SS warning: message` from WARNING up). Lines logged by this package pass; the INFO lines of the
libraries underneath (Orbax's handler registries and option dumps, JAX's backend probing) are dropped unless
`verbose` (`--verbose`), when they pass too, tagged with their module. Warnings and errors always pass (their
tracebacks only when `verbose`).
Only the console is filtered: `logging` handlers added by others (pytest's caplog, a log file) see everything.

`Progress` is the bar: redrawn in place on a terminal; when stderr is not a terminal (SLURM logs, pipes) it
becomes a plain line at the first logged step, then at most every `PLAIN_LINE_EVERY_S` seconds, and at the end.
It says how long the first step took to compile, and times the steps, their seconds each and the ETA, from the end
of that compile: the loop draws it first `FIRST_LINE_AFTER` steps after it, whatever config.log_every says.
"""

from __future__ import annotations

import atexit
import logging as py_logging
import math
import os
import sys
import time
from typing import Callable, Mapping

from absl import logging

PLAIN_LINE_EVERY_S = 30.0
FIRST_LINE_AFTER = 3  # steps after the first (compiled) one
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # visionfm_jax/
_bar_on_screen = False  # a terminal progress bar is drawn without a newline; the next log line clears it


def is_ours(record: py_logging.LogRecord) -> bool:
  return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep)


def _is_orbax_error(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname


class _ConsoleFilter(py_logging.Filter):
  """Passes our records and every warning; other libraries' INFO only when verbose. Orbax's error records are
  held back unless verbose: a failed save logs one from each of its threads before our own line names the fault,
  and that line carries them (`held_back_note`)."""

  def __init__(self, verbose: bool):
    super().__init__()
    self.verbose = verbose

  def filter(self, record: py_logging.LogRecord) -> bool:
    if not self.verbose and _is_orbax_error(record):
      _held_back.append(record.getMessage().partition("\n")[0])
      return False
    keep = self.verbose or record.levelno >= py_logging.WARNING or is_ours(record)
    if keep:
      _clear_bar()
    return keep


_held_back: list[str] = []  # Orbax's error lines, not yet said


def held_back_note() -> str:
  """' (Orbax logged N error lines about it; --verbose shows them)' for the error line that ends a run, or ''.
  Said once: the note empties the list."""
  count = len(_held_back)
  _held_back.clear()
  if not count:
    return ""
  return (
    f" (Orbax logged {count} error line{'s' if count > 1 else ''} about it; "
    f"--verbose shows {'them' if count > 1 else 'it'})"
  )


def _say_held_back() -> None:
  """At exit: Orbax's errors that no error line carried (a run that went on after them), the first in full."""
  if _held_back:
    count, first = len(_held_back), _held_back[0]
    _held_back.clear()
    print(
      f"warning: Orbax logged {count} error{'s' if count > 1 else ''} that the run went on after, the first: "
      f"{first} (--verbose shows them as they come)",
      file=sys.stderr,
      flush=True,
    )


class _ConsoleFormatter(py_logging.Formatter):
  """Other libraries' tracebacks only when verbose: a failed save makes Orbax log the same one from each of its
  threads, and our own error line names the fault."""

  def __init__(self, verbose: bool = False):
    super().__init__()
    self.verbose = verbose

  def format(self, record: py_logging.LogRecord) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = f"{record.levelname.lower()}: " if record.levelno >= py_logging.WARNING else ""
    origin = "" if is_ours(record) else f"[{record.module}] "
    text = f"{clock} {level}{origin}{record.getMessage()}"
    if record.exc_info and (self.verbose or is_ours(record)):
      text += "\n" + self.formatException(record.exc_info)
    return text


def configure(verbose: bool = False) -> None:
  """Installs the console filter and format on absl's stderr handler (idempotent) at a program's start: the Orbax
  error lines held back from an earlier run in this process (a test's, a notebook's) are not this run's."""
  _held_back.clear()
  handler = logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, _ConsoleFilter)]:
    handler.removeFilter(old)
  handler.addFilter(_ConsoleFilter(verbose))
  handler.setFormatter(_ConsoleFormatter(verbose))
  atexit.unregister(_say_held_back)
  atexit.register(_say_held_back)


def _clear_bar() -> None:
  global _bar_on_screen
  if _bar_on_screen:
    sys.stderr.write("\r\033[K")
    _bar_on_screen = False


def duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def seconds_text(seconds: float) -> str:
  """'0.042s', '3.51s', '12.3s', '95s': three significant digits below 100 s."""
  return f"{seconds:.3g}s" if seconds < 100 else f"{seconds:.0f}s"


def format_metrics(values: Mapping[str, float], prefix: str = "") -> str:
  """'top1 0.9521, top5 1.000, count 50,000' for the keys under `prefix` (which is dropped from the names): four
  significant digits with the point kept, so a perfect score reads as a score; counts as whole numbers."""
  return ", ".join(f"{k[len(prefix) :]} {_metric(k, v)}" for k, v in values.items() if k.startswith(prefix))


def _metric(name: str, value: float) -> str:
  if name.rpartition("/")[2] == "count" and float(value).is_integer():
    return f"{int(value):,}"
  return f"{value:#.4g}"


class Progress:
  """A progress line: step, loss, img/s, seconds a step and ETA (`enabled`: config.progress_bar), and the compile's
  line. Process 0 only."""

  def __init__(
    self,
    total_steps: int,
    start_step: int,
    enabled: bool = True,
    *,
    process_index: int = 0,
    tty: bool | None = None,
    clock: Callable[[], float] = time.perf_counter,
  ):
    self.total = total_steps
    self.enabled = enabled and process_index == 0
    self.says = process_index == 0  # the compile's line, bar or not
    self.tty = sys.stderr.isatty() if tty is None else tty
    self._clock = clock
    self._t0 = clock()
    self._start = start_step
    self._last_plain: float | None = None

  def compiled(self, seconds: float, start_step: int) -> None:
    """The first step's call returned after `seconds` of tracing and compiling (or loading the compiled program):
    says so, and times the steps from `start_step` on from now (the first step runs after its compile)."""
    if self.says:
      logging.info("compiled the train step in %s; step %d runs", seconds_text(seconds), start_step + 1)
    self._t0, self._start = self._clock(), start_step

  def seconds_per_step(self, step: int) -> float:
    return (self._clock() - self._t0) / max(step - self._start, 1)

  def line(self, step: int, loss: float, img_per_sec: float) -> str:
    per_step = self.seconds_per_step(step)
    eta = (self.total - step) * per_step
    width = 24
    filled = int(width * step / self.total)
    return (
      f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4f} "
      f"{img_per_sec:,.0f} img/s {seconds_text(per_step)}/step eta {duration(eta)}"
    )

  def update(self, step: int, loss: float, img_per_sec: float) -> None:
    global _bar_on_screen
    if not self.enabled:
      return
    if self.tty:
      sys.stderr.write("\r\033[K" + self.line(step, loss, img_per_sec))
      sys.stderr.flush()
      _bar_on_screen = True
      return
    now = self._clock()
    due = self._last_plain is None or now - self._last_plain >= PLAIN_LINE_EVERY_S or step >= self.total
    if due:
      self._last_plain = now
      logging.info(self.line(step, loss, img_per_sec))

  def close(self) -> None:
    """Leaves the last bar on screen, ended by a newline."""
    global _bar_on_screen
    if _bar_on_screen:
      sys.stderr.write("\n")
      _bar_on_screen = False
