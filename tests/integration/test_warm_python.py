"""tests/warm_python.py: a command run warm gives what the same command gives in a fresh interpreter (output, exit
status, environment, JAX options, devices, process group), its caller's signals reach it, and it ends with its
caller; what the server cannot serve runs in the real interpreter."""

import json
import os
import signal
import subprocess

import pytest
import warm_python

from conftest import cpu_env
from test_multiprocess import _wait_gone

PROBE = """
import json, os, sys, time
preloaded = "jax" in sys.modules
import jax
mode = sys.argv[1]
if mode == "exit3":
  sys.exit(3)
if mode == "raise":
  raise ValueError("the probe raised")
print(json.dumps(dict(preloaded=preloaded, argv=sys.argv[1:], cwd=os.getcwd(), probe=os.environ.get("PROBE"),
                      precision=jax.config.jax_default_matmul_precision, devices=jax.device_count(),
                      stdin=sys.stdin.read(), group=os.getpgrp(), pid=os.getpid())), flush=True)
if mode == "sleep":
  time.sleep(120)
"""


pytestmark = pytest.mark.xdist_group("warm_python")  # one worker starts the module's server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(a server of the `warm_probe` module, the probe's folder)."""
  folder = tmp_path_factory.mktemp("probe")
  (folder / "warm_probe.py").write_text(PROBE)
  with warm_python.Server(
    dict(os.environ), prefixes=("warm_probe",), folder=str(tmp_path_factory.mktemp("server"))
  ) as server:
    yield server, folder


def _env(server, **extra):
  env = cpu_env(2, PROBE="seen", JAX_DEFAULT_MATMUL_PRECISION="bfloat16", **extra)
  return env if server is None else server.env(env)


def _run(server, folder, mode, **extra):
  return subprocess.run(
    ["python", "-m", "warm_probe", mode, "--flag=1"],
    input="from stdin",
    capture_output=True,
    text=True,
    cwd=folder,
    env=_env(server, **extra),
    timeout=120,
    check=False,
  )


def test_a_command_run_warm_gives_what_a_fresh_interpreter_gives(served):
  server, folder = served
  cold, warm = (_run(s, folder, "print") for s in (None, server))
  assert cold.returncode == warm.returncode == 0, (cold.stderr, warm.stderr)
  cold_out, warm_out = json.loads(cold.stdout), json.loads(warm.stdout)
  assert not cold_out.pop("preloaded") and warm_out.pop("preloaded")  # the warm one found JAX imported
  assert cold_out.pop("pid") != warm_out.pop("pid")
  assert (
    cold_out
    == warm_out
    == dict(
      argv=["print", "--flag=1"],
      cwd=str(folder),
      probe="seen",
      precision="bfloat16",
      devices=2,
      stdin="from stdin",
      group=os.getpgrp(),
    )
  )


def test_exit_statuses_pass_through(served):
  server, folder = served
  for s in (None, server):
    assert _run(s, folder, "exit3").returncode == 3
    raised = _run(s, folder, "raise")
    assert raised.returncode == 1 and raised.stderr.rstrip().endswith("ValueError: the probe raised")


def _sleeping(server, folder):
  caller = subprocess.Popen(
    ["python", "-m", "warm_probe", "sleep"],
    stdin=subprocess.DEVNULL,
    stdout=subprocess.PIPE,
    text=True,
    cwd=folder,
    env=_env(server),
  )
  return caller, json.loads(caller.stdout.readline())["pid"]


def test_a_signal_to_the_caller_reaches_the_command_and_a_killed_caller_ends_it(served):
  server, folder = served
  caller, command = _sleeping(server, folder)
  assert command != caller.pid
  caller.send_signal(signal.SIGTERM)
  assert caller.wait(timeout=30) == -signal.SIGTERM  # died of the signal, as the caller reports
  assert _wait_gone(command, 30) is not None

  caller, command = _sleeping(server, folder)
  caller.kill()
  caller.wait(timeout=30)
  assert _wait_gone(command, 30) is not None, "the command outlived its SIGKILLed caller"


def test_what_the_server_cannot_serve_runs_in_the_real_interpreter(served, tmp_path):
  server, folder = served
  (tmp_path / "other_probe.py").write_text(PROBE)
  other = subprocess.run(
    ["python", "-m", "other_probe", "print"],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=_env(server),
    timeout=120,
    check=True,
  )
  assert not json.loads(other.stdout)["preloaded"]  # a module it does not serve
  moved = _run(server, folder, "print", PYTHONPATH=str(tmp_path))
  assert moved.returncode == 0 and not json.loads(moved.stdout)["preloaded"]  # another PYTHONPATH than the server's
  script = subprocess.run(
    ["python", "-c", "import sys; print('jax' in sys.modules)"],
    capture_output=True,
    text=True,
    env=_env(server),
    timeout=120,
    check=True,
  )
  assert script.stdout == "False\n"
