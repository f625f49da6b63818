"""The console: our lines pass, other libraries' INFO lines only with --verbose, warnings always; the plain
progress line (stderr not a terminal) is rate-limited."""

import logging as py_logging
import os
import sys

from absl import logging
import orbax.checkpoint
import pytest

import visionfm_jax
from visionfm_jax.training.infra import console


def _record(pathname: str, level: int = py_logging.INFO) -> py_logging.LogRecord:
  return py_logging.LogRecord("absl", level, pathname, 1, "hello %s", ("there",), None)


# every module of the package is ours, wherever it sits: the entry point and a model as well as the loop
PACKAGE = os.path.dirname(visionfm_jax.__file__)
OURS = os.path.join(PACKAGE, "training", "train.py")
OURS_ELSEWHERE = [os.path.join(PACKAGE, "main.py"), os.path.join(PACKAGE, "models", "vit.py")]
THEIRS = "/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py"


@pytest.fixture
def console_handler():
  handler = logging.get_absl_handler()
  filters, formatter = list(handler.filters), handler._current_handler.formatter  # pylint: disable=protected-access
  yield handler
  handler.filters[:] = filters
  handler.setFormatter(formatter)


@pytest.mark.parametrize("verbose", [False, True])
def test_filter_keeps_ours_and_warnings_and_theirs_only_when_verbose(console_handler, verbose):
  console.configure(verbose=verbose)
  console.configure(verbose=verbose)  # idempotent: one filter
  assert sum(isinstance(f, console._ConsoleFilter) for f in console_handler.filters) == 1
  assert console_handler.filter(_record(OURS))
  assert all(console_handler.filter(_record(path)) for path in OURS_ELSEWHERE)
  assert console_handler.filter(_record(THEIRS, py_logging.WARNING))
  assert bool(console_handler.filter(_record(THEIRS))) == verbose


def test_format_is_clock_then_message_with_origin_for_theirs(console_handler):
  console.configure()
  assert console_handler.format(_record(OURS))[8:] == " hello there"
  assert console_handler.format(_record(THEIRS, py_logging.WARNING))[8:] == (
    " warning: [checkpoint_manager] hello there"
  )


@pytest.mark.parametrize("verbose", [False, True])
def test_their_tracebacks_show_only_when_verbose(console_handler, verbose):
  console.configure(verbose=verbose)
  try:
    raise OSError(28, "No space left on device")
  except OSError:
    record = _record(THEIRS, py_logging.ERROR)
    record.exc_info = sys.exc_info()
  text = console_handler.format(record)
  assert text[8:].startswith(" error: [checkpoint_manager] hello there")
  assert ("Traceback" in text) == verbose


def test_plain_progress_lines_are_rate_limited(caplog):
  now = [0.0]
  progress = console.Progress(100, 0, tty=False, clock=lambda: now[0])
  with caplog.at_level(py_logging.INFO):
    for step, t in [(10, 1.0), (20, 10.0), (30, 31.5), (40, 40.0), (100, 41.0)]:
      now[0] = t
      progress.update(step, 1.5, 100.0)
  shown = [r.getMessage() for r in caplog.records]
  assert [m.split("] ")[1].split(" ")[0] for m in shown] == ["10/100", "30/100", "100/100"], shown


def test_progress_is_silent_off_process_zero(caplog):
  progress = console.Progress(10, 0, tty=False, process_index=1)
  with caplog.at_level(py_logging.INFO):
    progress.update(10, 1.0, 1.0)
  assert not caplog.records


def test_format_metrics_drops_the_prefix():
  assert (
    console.format_metrics(
      {
        "eval/val/top1": 0.95213,
        "eval/val/top5": 1.0,
        "eval/val/count": 50000.0,
        "eval/val/loss": 2.5e-5,
        "train/loss": 2.0,
      },
      "eval/val/",
    )
    == "top1 0.9521, top5 1.000, count 50,000, loss 2.500e-05"
  )


def test_a_tool_run_in_process_leaves_absls_logger_level_as_it_was(tmp_path):
  """import_hf quiets Orbax's INFO lines during its save; called in-process (tests, notebooks) it must not leave
  them off: before absl's flags are parsed the logger is NOTSET, which get_verbosity() reports as WARNING."""
  from visionfm_jax.tools import import_hf  # pylint: disable=g-import-not-at-top

  before = logging.get_absl_logger().level
  assert import_hf.main(["import_hf", f"--src={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}"]) == 2
  assert logging.get_absl_logger().level == before


def _orbax_error(message: str) -> py_logging.LogRecord:
  return py_logging.LogRecord(
    "absl",
    py_logging.ERROR,
    os.path.join(os.path.dirname(orbax.checkpoint.__file__), "future.py"),
    1,
    message,
    None,
    None,
  )


def test_orbax_error_lines_are_held_back_for_the_runs_own_error_line(capsys):
  """A failed save makes Orbax log an error from each of its threads before our line names the fault: the console
  holds them back and the run's error line counts them; verbose shows them as they come; any the run went on
  after are said at exit."""
  quiet, verbose = console._ConsoleFilter(False), console._ConsoleFilter(True)
  assert not quiet.filter(_orbax_error("[Errno 28] No space left on device\ntraceback"))
  assert not quiet.filter(_orbax_error("again"))
  assert console.held_back_note() == " (Orbax logged 2 error lines about it; --verbose shows them)"
  assert console.held_back_note() == ""
  assert verbose.filter(_orbax_error("shown")) and console.held_back_note() == ""
  assert quiet.filter(py_logging.LogRecord("absl", py_logging.ERROR, "/elsewhere/lib.py", 1, "kept", None, None))
  quiet.filter(_orbax_error("[Errno 5] Input/output error\ndetail"))
  console._say_held_back()
  assert capsys.readouterr().err == (
    "warning: Orbax logged 1 error that the run went on after, the first: [Errno 5] "
    "Input/output error (--verbose shows them as they come)\n"
  )


def test_a_run_starts_without_the_orbax_lines_an_earlier_run_in_the_process_held_back():
  """main in a test's or a notebook's process: its error line counts the Orbax lines of its own run only."""
  console._ConsoleFilter(False).filter(_orbax_error("an earlier run's failed restore"))
  handler = logging.get_absl_handler()
  before = (list(handler.filters), handler.formatter)
  try:
    console.configure()
    assert console.held_back_note() == ""
  finally:
    for added in [f for f in handler.filters if f not in before[0]]:
      handler.removeFilter(added)
    for kept in before[0]:
      if kept not in handler.filters:
        handler.addFilter(kept)
    handler.setFormatter(before[1])


def test_the_progress_line_times_the_steps_from_the_end_of_the_compile(caplog):
  """A 40 s compile, then 2 s a step: the line says 2 s a step and the ETA of the steps left at that pace."""
  now = [0.0]
  progress = console.Progress(100, 10, tty=False, clock=lambda: now[0])
  now[0] = 40.0
  with caplog.at_level(py_logging.INFO):
    progress.compiled(40.0, 10)
    now[0] = 48.0  # steps 11-14
    progress.update(14, 1.5, 64.0)
  compiled, line = (r.getMessage() for r in caplog.records)
  assert compiled == "compiled the train step in 40s; step 11 runs", compiled
  assert line.endswith("] 14/100 loss 1.5000 64 img/s 2s/step eta 2m52s"), line
