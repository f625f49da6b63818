"""Ctrl-C through `python -m visionfm_jax.main` (cli.Interrupts, faults.Interrupt), as a terminal sends it: SIGINT to
the trainer's whole process group, its grain workers and multiprocessing's resource tracker included. In the loop
and during the first compile, the run ends within 10 s with one line naming its step and newest checkpoint, exit
status 130, no traceback, no process or /dev/shm file left; a worker's own SIGINT changes nothing; the rerun resumes
from the newest checkpoint, which is intact. A two-process job's processes, each sent it, end each with its line.
(The tools' Ctrl-C, a second Ctrl-C: tests/integration/test_ctrl_c_tools.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cpu_env
from test_frozen_coordinator import ABORT_SIGNS, _start_trainers, _wait_for_a_train_step
from test_leaves_nothing import RUN_ARGS, SHM, _cmdline, _descendants, _running
from test_multiprocess import DDP_FLAGS, LAUNCH_ENV

LINE = re.compile(r"interrupted at step (\d+); the newest checkpoint is step (\d+)")


def _start(workdir: str, log: str) -> subprocess.Popen:
  """The trainer of RUN_ARGS (2 data workers) without a compile cache: each run compiles its step."""
  with open(log, "w") as out:
    return subprocess.Popen(
      [sys.executable, "-m", "visionfm_jax.main", f"--workdir={workdir}", *RUN_ARGS, "--config.compile_cache=off"],
      cwd=ROOT,
      env=cpu_env(1),
      start_new_session=True,
      stdout=out,
      stderr=subprocess.STDOUT,
    )


def _wait_for(trainer, log: str, ready, what: str) -> None:
  deadline = time.monotonic() + 180
  while not ready():
    assert trainer.poll() is None and time.monotonic() < deadline, f"no {what}: {open(log).read()[-3000:]}"
    time.sleep(0.05)


def _last_step(workdir: str) -> int:
  """The step of the last line of metrics.jsonl, 0 before the first."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  lines = open(metrics).read().splitlines() if os.path.exists(metrics) else []
  return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _ctrl_c(trainer, log: str) -> tuple[int, int]:
  """SIGINT to the trainer's process group, as a terminal's Ctrl-C: (step, newest checkpoint) of its one line, after
  checking that it ended within 10 s, exit 130, without a traceback, leaving no process or /dev/shm file."""
  run = _descendants(trainer.pid)
  os.killpg(trainer.pid, signal.SIGINT)
  start = time.monotonic()
  try:
    status = trainer.wait(timeout=10)
  finally:
    if trainer.poll() is None:
      os.killpg(trainer.pid, signal.SIGKILL)
      trainer.wait()
  took, out = time.monotonic() - start, open(log).read()
  assert status == 130 and took < 10, (status, took, out[-3000:])
  lines = [line for line in out.splitlines() if "interrupted" in line]
  assert len(lines) == 1 and "Traceback" not in out and "KeyboardInterrupt" not in out and "leaked" not in out, out[
    -3000:
  ]
  said = LINE.fullmatch(lines[0])
  assert said, lines[0]
  deadline = time.monotonic() + 5
  while any(_running(pid) for pid in run) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not [pid for pid in run if _running(pid)], {pid: _cmdline(pid) for pid in run if _running(pid)}
  assert not [name for name in os.listdir(SHM) if f"-{trainer.pid}-" in name]
  return int(said[1]), int(said[2])


def _newest_on_disk(workdir: str) -> int:
  return max(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


@pytest.mark.slow
def test_ctrl_c_in_the_loop_and_in_the_first_compile_stops_the_run_and_the_rerun_resumes(tmp_path):
  workdir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
  trainer = _start(workdir, log)
  _wait_for(trainer, log, lambda: _last_step(workdir) >= 3, "steps")
  workers = [pid for pid in _descendants(trainer.pid) if "multiprocessing.spawn" in _cmdline(pid)]
  assert len(workers) == 2, workers
  os.kill(workers[0], signal.SIGINT)  # a worker's own SIGINT: the run goes on
  logged = _last_step(workdir)
  _wait_for(trainer, log, lambda: _last_step(workdir) >= logged + 2, "steps after a worker's SIGINT")
  step, newest = _ctrl_c(trainer, log)
  assert newest == _newest_on_disk(workdir) and newest <= step, (step, newest, os.listdir(workdir + "/checkpoints"))

  # during the first compile: the rerun resumes from the newest checkpoint and is stopped before its first step
  trainer = _start(workdir, log)
  resumed = f"resuming from {workdir}/checkpoints/{newest}"
  _wait_for(trainer, log, lambda: resumed in open(log).read(), "resume")
  step, said_newest = _ctrl_c(trainer, log)
  # the grace ends a compile still running 5 s after the Ctrl-C; one that finishes sooner runs its step, then stops
  assert said_newest == newest and step in (newest, newest + 1), (step, said_newest, newest)

  # the checkpoints are intact: the next rerun resumes from the same one and trains on (and finds the lock released)
  trainer = _start(workdir, log)
  _wait_for(trainer, log, lambda: _last_step(workdir) >= newest + 2, "steps after the resume")
  assert resumed in open(log).read() and "stale lock" not in open(log).read(), open(log).read()[-3000:]
  step, _ = _ctrl_c(trainer, log)
  assert step > newest


@pytest.mark.slow
def test_ctrl_c_to_a_two_process_job_ends_each_process_with_its_line(tmp_path):
  """A terminal's Ctrl-C (or srun's) reaches every process of the job: each ends within 10 s with its one line and
  exit 130, without a traceback or JAX's abort; the checkpoints it names are committed."""
  trainers = _start_trainers(tmp_path, "--config.total_steps=100000", "--config.checkpoint_every=2")
  try:
    _wait_for_a_train_step(trainers, tmp_path)
    _wait_for(trainers[0], str(tmp_path / "err0"), lambda: _last_step(str(tmp_path / "run")) >= 3, "steps")
    for trainer in trainers:
      trainer.send_signal(signal.SIGINT)
    start = time.monotonic()
    statuses = [trainer.wait(timeout=20) for trainer in trainers]
    took = time.monotonic() - start
  finally:
    for trainer in trainers:
      trainer.kill()
  errs = [(tmp_path / f"err{i}").read_text() for i in range(len(trainers))]
  assert statuses == [130, 130] and took < 10, (statuses, took, errs)
  for err in errs:
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and not [sign for sign in ABORT_SIGNS if sign in err], err[-3000:]
    newest = int(LINE.fullmatch(lines[0])[2])
    assert (tmp_path / "run" / "checkpoints" / str(newest)).is_dir(), err[-3000:]


@pytest.mark.slow
def test_ctrl_c_to_launch_local_ends_the_job_with_each_processs_line_and_130(tmp_path):
  """launch/local.sh 2 in a terminal: Ctrl-C (SIGINT to its foreground process group: the launcher, the service, the
  trainers and their workers) ends each trainer with its one line, the launcher with 130 within 10 s, nothing left
  running; the service serves until the trainers have ended (no exit 75, no JAX abort)."""
  env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
    job = subprocess.Popen(
      [
        "bash",
        "launch/local.sh",
        "2",
        f"--workdir={tmp_path / 'run'}",
        *DDP_FLAGS,
        "--config.total_steps=100000",
        "--config.checkpoint_every=2",
      ],
      cwd=ROOT,
      env=env,
      start_new_session=True,
      stdout=out,
      stderr=err,
    )
  try:
    _wait_for(job, str(tmp_path / "err"), lambda: _last_step(str(tmp_path / "run")) >= 3, "steps")
    run = _descendants(job.pid)
    os.killpg(job.pid, signal.SIGINT)
    start = time.monotonic()
    status = job.wait(timeout=30)
    took = time.monotonic() - start
  finally:
    if job.poll() is None:
      os.killpg(job.pid, signal.SIGKILL)
      job.wait()
  err = (tmp_path / "err").read_text()
  assert status == 130 and took < 10, (status, took, err[-3000:])
  lines = [line for line in err.splitlines() if LINE.search(line)]
  assert len(lines) == 2 and not [sign for sign in ABORT_SIGNS if sign in err], err[-3000:]
  assert "error:" not in err and "Traceback" not in err, err[-3000:]
  for line in lines:
    assert (tmp_path / "run" / "checkpoints" / LINE.search(line)[2]).is_dir(), err[-3000:]
  deadline = time.monotonic() + 5
  while [pid for pid in run if _running(pid)] and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not [_cmdline(pid) for pid in run if _running(pid)]
