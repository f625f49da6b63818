"""A run leaves nothing behind on its node (data/loader/reaping.py): a trainer killed by SIGKILL takes its grain
workers and multiprocessing's resource tracker with it and leaves nothing in /dev/shm; what a run killed together
with its tracker left there goes at the next start, with one line, and what a live process holds stays."""

from __future__ import annotations

import logging
from multiprocessing import shared_memory
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, cpu_env, tiny_vit_config

SHM = "/dev/shm"
RUN_ARGS = ["--config=configs/vit_huge.py:demo", "--config.model.variant=pico/4", "--config.model.image_size=16",
            "--config.data.image_size=16", "--config.global_batch_size=16", "--config.total_steps=100000",
            "--config.optim.warmup_steps=2", "--config.progress_bar=False", "--config.data.num_workers=2",
            "--config.log_every=1", "--config.checkpoint_every=2", "--config.eval_every=100000"]


def _children() -> dict[int, list[int]]:
  children = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          parent = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError):
        continue
      children.setdefault(parent, []).append(int(entry))
  return children


def _descendants(root: int) -> set[int]:
  children, found, todo = _children(), set(), [root]
  while todo:
    for child in children.get(todo.pop(), []):
      found.add(child)
      todo.append(child)
  return found


def _running(pid: int) -> bool:
  """Alive and not a zombie (an exited process its parent has not reaped holds nothing but its pid)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
  except OSError:
    return False


def _mapped_shm(pids) -> set[str]:
  names = set()
  for pid in pids:
    try:
      with open(f"/proc/{pid}/maps") as f:
        names.update(line.split(f"{SHM}/", 1)[1].split(" (deleted)")[0].strip() for line in f if f" {SHM}/" in line)
    except OSError:
      continue
  return names


def _mid_save(workdir) -> bool:
  """A step's folder is there, being written or written. Not any entry: the trainer's start-up probe of the folder
  (`workdir.check_writable`: `.write_probe.<host>.<pid>`, created and removed) is there for an instant, which a
  loaded machine can stretch under this poll."""
  checkpoints = os.path.join(workdir, "checkpoints")
  return os.path.isdir(checkpoints) and any(name[:1].isdigit() for name in os.listdir(checkpoints))


def test_a_trainer_killed_mid_save_leaves_no_process_and_nothing_in_dev_shm(tmp_path):
  workdir, before = str(tmp_path / "run"), set(os.listdir(SHM))
  with open(tmp_path / "run.log", "w") as log:
    trainer = subprocess.Popen([sys.executable, "-m", "visionfm_jax.main", f"--workdir={workdir}", *RUN_ARGS],
                               cwd=ROOT, env=cpu_env(1), start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
  run, seen_mapped = set(), set()
  try:
    deadline = time.monotonic() + 180
    while not _mid_save(workdir):  # its descendants and what they map in /dev/shm, recorded while it runs
      assert trainer.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
      run |= _descendants(trainer.pid)
      seen_mapped |= _mapped_shm(run | {trainer.pid})
      time.sleep(0.05)
    run |= _descendants(trainer.pid)
    assert len(run) >= 3, run  # two data workers and the resource tracker
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()

    def left():
      alive = sorted(pid for pid in run if _running(pid))
      made_by_run = {n for n in set(os.listdir(SHM)) - before if n in seen_mapped or f"-{trainer.pid}-" in n}
      return alive, sorted(made_by_run)

    deadline = time.monotonic() + 10
    while any(left()) and time.monotonic() < deadline:
      time.sleep(0.05)
    alive, files = left()
    assert not alive and not files, f"alive after the trainer's SIGKILL: {alive}; left in {SHM}: {len(files)}"
  finally:
    if trainer.poll() is None:  # the test failed before its kill: its 100,000 steps would hold a core
      run |= _descendants(trainer.pid)  # workers it started since the last poll
      trainer.kill()
      trainer.wait()
    _end_left_over(run)


def _end_left_over(pids) -> None:
  """Kills the test's own processes that are left, the resource tracker last: it unlinks what they registered once
  the others have gone."""
  trackers = {pid for pid in pids if "resource_tracker" in _cmdline(pid)}
  for pid in pids - trackers:
    if _running(pid):
      os.kill(pid, signal.SIGKILL)
  deadline = time.monotonic() + 10
  while any(_running(pid) for pid in trackers) and time.monotonic() < deadline:
    time.sleep(0.05)
  for pid in trackers:
    if _running(pid):
      os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline") as f:
      return f.read()
  except OSError:
    return ""


# A run's process that dies with its resource tracker (its process group killed, as SLURM ends a job step): one
# segment and one semaphore made as a run's processes make them, left behind; it prints their names first.
_DEAD_RUN = textwrap.dedent("""
    import multiprocessing, os, signal
    from multiprocessing import shared_memory
    from visionfm_jax.data.loader import reaping
    reaping.name_after(reaping.run_tag())
    segment = shared_memory.SharedMemory(create=True, size=1 << 20)
    segment.buf[:] = bytes(1 << 20)
    lock = multiprocessing.get_context("spawn").Lock()
    print(segment.name, "sem." + lock._semlock.name.lstrip("/"), flush=True)
    os.killpg(0, signal.SIGKILL)
""")


def test_the_next_start_removes_what_a_dead_run_left_with_one_line_and_keeps_a_live_runs(caplog):
  from visionfm_jax.data.loader import pipeline, reaping  # pylint: disable=import-outside-toplevel
  dead = subprocess.run([sys.executable, "-c", _DEAD_RUN], cwd=ROOT, env=cpu_env(1), start_new_session=True,
                        capture_output=True, text=True, timeout=60)
  assert dead.returncode == -signal.SIGKILL, dead.stderr[-2000:]
  dead_files = dead.stdout.split()
  assert all(os.path.exists(os.path.join(SHM, name)) for name in dead_files), dead_files
  live = shared_memory.SharedMemory(name=f"psm_{reaping.run_tag()}-live", create=True, size=4096)
  untagged = shared_memory.SharedMemory(name=f"psm_{secrets.token_hex(4)}", create=True, size=4096)
  untagged.close()  # another program's: no live process has it open, but nothing says whose it was
  try:
    with caplog.at_level(logging.INFO):
      pipeline.make_train_loader(tiny_vit_config().data, batch_size=16, seed=0, process_index=0, process_count=1)
    assert not any(os.path.exists(os.path.join(SHM, name)) for name in dead_files)
    assert os.path.exists(os.path.join(SHM, live.name)) and os.path.exists(os.path.join(SHM, untagged.name))
    lines = [r.getMessage() for r in caplog.records if "shared-memory files" in r.getMessage()]
    assert len(lines) == 1, lines
    line = re.fullmatch(rf"{SHM}: removed (\d+) shared-memory files \(([\d.]+) MiB\) that runs which died on this "
                        rf"node left", lines[0])
    assert line and int(line[1]) >= 2 and float(line[2]) >= 1.0, lines[0]  # others' dead runs may add theirs
  finally:
    live.close()
    live.unlink()
    untagged.unlink()


@pytest.mark.slow
def test_a_run_that_ends_leaves_nothing_in_dev_shm_and_no_leak_warning(tmp_path):
  """Batches the workers made that the loop never took are removed at exit by the trainer itself: multiprocessing's
  resource tracker would remove them and print 'There appear to be N leaked shared_memory objects'."""
  args = [a for a in RUN_ARGS if not a.startswith(("--config.total_steps=", "--config.checkpoint_every="))]
  trainer = subprocess.Popen([sys.executable, "-m", "visionfm_jax.main", f"--workdir={tmp_path / 'run'}", *args,
                              "--config.total_steps=3", "--config.checkpoint_every=100"], cwd=ROOT, env=cpu_env(1),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out, _ = trainer.communicate(timeout=300)
  assert trainer.returncode == 0, out[-3000:]
  assert "leaked" not in out, out[-3000:]
  assert not [name for name in os.listdir(SHM) if f"-{trainer.pid}-" in name]
