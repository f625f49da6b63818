"""A workdir belongs to one run: a second run is refused naming the holder (the first finishes unharmed), a
requeue waits a bounded time for its predecessor, a stale lock is taken over. Storage faults stop the run in
seconds with a WorkdirError naming the path and errno: no room at start-up, a save that fails with ENOSPC
(the committed checkpoints stay, the rerun resumes, and metrics.jsonl has each step once)."""

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from visionfm_jax.bench import lock_race
from visionfm_jax.errors import WorkdirError
from visionfm_jax.training import train
from visionfm_jax.training.infra import workdir

from conftest import ROOT, tiny_vit_config

TINY_FLAGS = [
  "--config=configs/vit_huge.py:demo",
  "--config.model.variant=pico/4",
  "--config.model.image_size=16",
  "--config.data.image_size=16",
  "--config.global_batch_size=16",
  "--config.optim.warmup_steps=2",
  "--config.data.eval_examples=16",
  "--config.progress_bar=False",
  "--config.data.num_workers=0",
  "--config.total_steps=4",
  "--config.checkpoint_every=2",
  "--config.eval_every=100",
  "--config.log_every=1",
]

# A process that holds the lock of the file argv[1] until its stdin closes, as a run records itself.
HOLDER = r"""
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", "")}
os.pwrite(fd, json.dumps(holder).encode(), 0)
print("held", flush=True)
sys.stdin.read()
"""


def _tiny_config(total_steps=4):
  config = tiny_vit_config(total_steps=total_steps, checkpoint_every=2, eval_every=100, log_every=1)
  config.data.num_workers = 0
  config.data.eval_examples = 16
  return config


@contextlib.contextmanager
def held_by_another_process(directory, job=""):
  directory.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, SLURM_JOB_ID=job)
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(directory / workdir.LOCK_FILE)],
    env=env,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert proc.stdout.readline().strip() == "held"
    yield proc.pid
  finally:
    proc.stdin.close()
    proc.wait(timeout=30)


def _final_state(run_dir, step):
  state = ocp.PyTreeCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
  return jax.tree.leaves({"params": state["params"], "opt_state": state["opt_state"]})


def _wait_for_holder(lock_path, pid, proc):
  """Polls the lock file until it names `pid` (the run has started)."""
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and proc.poll() is None:
    try:
      if json.loads(lock_path.read_text() or "{}").get("pid") == pid:
        return
    except (OSError, ValueError):  # not created, or not written yet
      pass
    time.sleep(0.02)
  raise AssertionError(f"the first run never held {lock_path} (exit {proc.poll()})")


def test_a_second_run_is_refused_naming_the_holder_and_the_first_ends_as_if_alone(tmp_path):
  run_dir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.Popen(
    [sys.executable, "-m", "visionfm_jax.main", f"--workdir={run_dir}", *TINY_FLAGS],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    _wait_for_holder(run_dir / workdir.LOCK_FILE, first.pid, first)
    os.kill(first.pid, signal.SIGSTOP)  # holds the lock while the second run tries
    try:
      with pytest.raises(
        WorkdirError,
        match=rf"--workdir {run_dir} is in use by another run \(host "
        rf"{socket.gethostname()}, pid {first.pid};",
      ):
        train.run(_tiny_config(), str(run_dir))
    finally:
      os.kill(first.pid, signal.SIGCONT)
    output, _ = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, output[-4000:]
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]
  alone = tmp_path / "alone"
  train.run(_tiny_config(), str(alone))
  for got, want in zip(_final_state(run_dir, 4), _final_state(alone, 4)):
    np.testing.assert_array_equal(got, want)
  assert (run_dir / workdir.LOCK_FILE).read_text() == ""  # released: no stale holder left behind


def _refused_while_job_77_holds_it(tmp_path, monkeypatch, our_job, wait_s):
  """(holder pid, error message, seconds until refused) of a lock attempt while job 77 holds the lock."""
  monkeypatch.setenv("SLURM_JOB_ID", our_job)
  with held_by_another_process(tmp_path, job="77") as pid:
    start = time.monotonic()
    with pytest.raises(WorkdirError) as refused:
      workdir.WorkdirLock(tmp_path).acquire(wait_s=wait_s)
    return pid, str(refused.value), time.monotonic() - start


def test_a_requeue_waits_for_its_predecessor_a_bounded_time(tmp_path, monkeypatch):
  pid, message, seconds = _refused_while_job_77_holds_it(tmp_path, monkeypatch, "77", 0.5)
  assert f"pid {pid}, SLURM job 77; lock file {tmp_path}/lock) (waited 0.5 s, config.lock_wait_s)" in message
  assert seconds >= 0.5


def test_another_jobs_run_is_refused_without_waiting(tmp_path, monkeypatch):
  pid, message, seconds = _refused_while_job_77_holds_it(tmp_path, monkeypatch, "78", 60)
  assert f"pid {pid}, SLURM job 77; lock file {tmp_path}/lock): wait for it to end" in message
  assert seconds < 30


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_empty(tmp_path, caplog):
  ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  stale = {"host": socket.gethostname(), "pid": int(ended.stdout), "job": "5"}
  (tmp_path / workdir.LOCK_FILE).write_text(json.dumps(stale))
  lock = workdir.WorkdirLock(tmp_path)
  with caplog.at_level(logging.WARNING):
    lock.acquire(wait_s=0)
  assert f"taking over the stale lock {tmp_path}/lock of host {socket.gethostname()}, pid {stale['pid']}" in caplog.text
  assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  assert (tmp_path / workdir.LOCK_FILE).read_text() == ""


def test_two_processes_taking_one_stale_lock_never_both_hold_it(tmp_path, capsys):
  """The race benchmark (bench/lock_race.py) through its CLI: two processes at once on a lock file holding a dead
  run's record, its writes slowed as on NFS. Both held it in every round when the loser read the stale record
  (the winner not yet written), unlinked the file and locked a fresh one."""
  rounds = 24
  assert lock_race.main(["lock_race", f"--rounds={rounds}", "--write_delay_s=0.005", f"--dir={tmp_path / 'race'}"]) == 0
  result = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert result == {**result, "rounds": rounds, "double_holds": 0, "none_held": 0, "taken_over": rounds}
  assert os.listdir(tmp_path / "race") == []


def test_a_lock_held_for_a_gone_process_is_taken_over_on_a_fresh_file(tmp_path, caplog):
  """A lock that a lost NFS client keeps for a process gone from this host: no live run can take that file's lock,
  so the taker replaces the file (under the guard, which every taker holds while it looks)."""
  path = tmp_path / workdir.LOCK_FILE
  path.write_text(json.dumps({**workdir.this_holder(), "pid": lock_race.dead_pid()}))
  keeper = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
      "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
      path,
    ],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert keeper.stdout.readline() == "locked\n"
    kept = os.stat(path).st_ino
    lock = workdir.WorkdirLock(tmp_path)
    with caplog.at_level(logging.WARNING):
      lock.acquire(wait_s=0)
    assert "which is gone: taking it over" in caplog.text
    assert os.stat(path).st_ino != kept and json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
  finally:
    keeper.communicate("", timeout=30)


def test_a_holder_counts_as_gone_only_when_its_pid_is_gone_from_this_hosts_numbering():
  ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  gone = {**workdir.this_holder(), "pid": int(ended.stdout)}
  assert workdir._gone_from_this_host(gone)
  assert not workdir._gone_from_this_host({**gone, "pid_namespace": "pid:[1]"})  # another container's pids
  assert not workdir._gone_from_this_host({**gone, "host": "elsewhere"})
  assert not workdir._gone_from_this_host(workdir.this_holder())  # alive


def test_no_room_for_a_checkpoint_stops_before_training(tmp_path, monkeypatch):
  real_statvfs = os.statvfs

  def nearly_full(path):
    stats = real_statvfs(path)
    return os.statvfs_result((stats.f_bsize, stats.f_frsize, stats.f_blocks, 10, 10, *stats[5:]))

  monkeypatch.setattr(workdir.os, "statvfs", nearly_full)
  run_dir = tmp_path / "run"
  with pytest.raises(
    WorkdirError,
    match=rf"no room for a checkpoint in {run_dir}/checkpoints: .* free, one "
    r"checkpoint needs about .*\(errno ENOSPC\)",
  ):
    train.run(_tiny_config(), str(run_dir))
  assert os.listdir(run_dir / "checkpoints") == [] and not (run_dir / "metrics.jsonl").exists()


# visionfm_jax.main, with the save of step 4 failing with ENOSPC inside Orbax (grain's handler writing the data
# iterator's file), as a disk that fills during a save makes it fail.
MAIN_WITH_DISK_FULL_AT_STEP_4 = r"""
import errno, os, runpy, sys
import grain
save = grain.checkpoint.CheckpointHandler.save
def full_at_step_4(self, directory, *args, **kwargs):
  if "4.orbax-checkpoint-tmp" in str(directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "process_0-of-1.json"))
  return save(self, directory, *args, **kwargs)
grain.checkpoint.CheckpointHandler.save = full_at_step_4
runpy.run_module("visionfm_jax.main", run_name="__main__")
"""


def test_a_save_that_fills_the_disk_ends_in_one_line_and_the_rerun_resumes_without_losing_a_step(tmp_path):
  """The run stops at the failed save with one error line naming the directory and errno (exit 2, no
  traceback), step 2 stays committed; the rerun (space freed) resumes from it, and metrics.jsonl holds each
  step once."""
  run_dir = tmp_path / "run"
  start = time.monotonic()
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      MAIN_WITH_DISK_FULL_AT_STEP_4,
      f"--workdir={run_dir}",
      *TINY_FLAGS,
      "--config.total_steps=6",
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert time.monotonic() - start < 120
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
  assert [line for line in lines if "error:" in line] == lines[-1:], proc.stderr[-4000:]  # Orbax's lines folded
  assert lines[-1].startswith(
    f"error: cannot save a checkpoint to {run_dir}/checkpoints: No space left on device "
    f"(errno ENOSPC, writing {run_dir}/checkpoints/4.orbax-checkpoint-tmp"
  ), lines[-1]
  assert re.search(r"\(Orbax logged \d+ error lines? about it; --verbose shows (it|them)\)$", lines[-1]), lines[-1]
  assert [name for name in os.listdir(run_dir / "checkpoints") if name.isdigit()] == ["2"]

  last = train.run(_tiny_config(6), str(run_dir))
  assert last["step"] == 6
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_metrics_the_disk_refuses_stop_the_run_at_the_next_step_and_the_rerun_resumes(tmp_path, monkeypatch):
  """Process 0's metric write fails (ENOSPC) at step 3: the run does not raise there, alone (the other
  processes would wait in the next step), but at step 4's agreed point, before its save, naming the workdir and
  errno; step 2 stays committed and the rerun fills in metrics.jsonl and TensorBoard from step 3."""
  from visionfm_jax.training.infra import tensorboard  # pylint: disable=g-import-not-at-top

  scalars = tensorboard.EventFile.scalars

  def full_at_step_3(self, step, values):
    if step == 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    scalars(self, step, values)

  monkeypatch.setattr(tensorboard.EventFile, "scalars", full_at_step_3)
  run_dir = tmp_path / "run"
  with pytest.raises(
    WorkdirError,
    match=rf"^cannot write metrics to {run_dir}: No space left on device "
    r"\(errno ENOSPC\)$",
  ):
    train.run(_tiny_config(6), str(run_dir))
  assert sorted(name for name in os.listdir(run_dir / "checkpoints") if name.isdigit()) == ["2"]
  monkeypatch.setattr(tensorboard.EventFile, "scalars", scalars)
  assert train.run(_tiny_config(6), str(run_dir))["step"] == 6
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
