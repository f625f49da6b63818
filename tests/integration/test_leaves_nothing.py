"""A run leaves nothing behind on its node (data/loader/reaping.py): a trainer killed by SIGKILL takes its grain
workers and multiprocessing's resource tracker with it and leaves nothing in /dev/shm; so does a run that ends on a
SIGTERM or on an error (a data worker killed, /dev/shm full), with no 'leaked' warning from the tracker; what a run
killed together with its tracker left there goes at the next start, with one line, and what a live process holds
stays. A /dev/shm without room for the batches is one error line (data/loader/shm_room.py): before training, or
when it fills up while training (tested on a small tmpfs of its own, in a mount namespace of the test's own)."""

from __future__ import annotations

import json
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

from conftest import ROOT, compilation_cache_env, cpu_env, tiny_vit_config

SHM = "/dev/shm"
RUN_ARGS = [
  "--config=configs/vit_huge.py:demo",
  "--config.model.variant=pico/4",
  "--config.model.image_size=16",
  "--config.data.image_size=16",
  "--config.global_batch_size=16",
  "--config.total_steps=100000",
  "--config.optim.warmup_steps=2",
  "--config.progress_bar=False",
  "--config.data.num_workers=2",
  "--config.log_every=1",
  "--config.checkpoint_every=2",
  "--config.eval_every=100000",
]


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


def _start(tmp_path, compilation_cache) -> subprocess.Popen:
  """The trainer of RUN_ARGS in tmp_path/run, its output in tmp_path/run.log; the module's runs compile once."""
  with open(tmp_path / "run.log", "w") as log:
    return subprocess.Popen(
      [sys.executable, "-m", "visionfm_jax.main", f"--workdir={tmp_path / 'run'}", *RUN_ARGS],
      cwd=ROOT,
      env=cpu_env(1, **compilation_cache_env(compilation_cache)),
      start_new_session=True,
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def _wait_for_steps(trainer, tmp_path, steps: int = 2) -> None:
  """Until the trainer has written `steps` steps' metrics: its data workers run."""
  metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 180
  while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
    assert trainer.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
    time.sleep(0.05)


def _one_error_line(out: str) -> str:
  """The one 'error:' line of a run's output, which holds no traceback and no resource tracker's warning."""
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in out and "leaked" not in out, out[-3000:]
  return errors[0]


def test_a_trainer_killed_mid_save_leaves_no_process_and_nothing_in_dev_shm(tmp_path, compilation_cache):
  workdir, before = str(tmp_path / "run"), set(os.listdir(SHM))
  trainer = _start(tmp_path, compilation_cache)
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
    # the workers unlinked what the run held there: the tracker (which writes to the run's log) found nothing
    assert "leaked" not in (tmp_path / "run.log").read_text(), (tmp_path / "run.log").read_text()[-3000:]
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


def _leave_a_dead_runs_files() -> list[str]:
  dead = subprocess.run(
    [sys.executable, "-c", _DEAD_RUN],
    cwd=ROOT,
    env=cpu_env(1),
    start_new_session=True,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert dead.returncode == -signal.SIGKILL, dead.stderr[-2000:]
  dead_files = dead.stdout.split()
  assert all(os.path.exists(os.path.join(SHM, name)) for name in dead_files), dead_files
  return dead_files


def test_the_next_start_removes_what_a_dead_run_left_with_one_line_and_keeps_a_live_runs(caplog):
  """Any start on the node removes a dead run's files: where another start (the suite's other worker) removes them
  first, with its line, not ours, the scenario runs again."""
  from visionfm_jax.data.loader import pipeline, reaping  # pylint: disable=import-outside-toplevel

  live = shared_memory.SharedMemory(name=f"psm_{reaping.run_tag()}-live", create=True, size=4096)
  untagged = shared_memory.SharedMemory(name=f"psm_{secrets.token_hex(4)}", create=True, size=4096)
  untagged.close()  # another program's: no live process has it open, but nothing says whose it was
  try:
    for _ in range(3):
      dead_files = _leave_a_dead_runs_files()
      caplog.clear()
      with caplog.at_level(logging.INFO):
        pipeline.make_train_loader(tiny_vit_config().data, batch_size=16, seed=0, process_index=0, process_count=1)
      assert not any(os.path.exists(os.path.join(SHM, name)) for name in dead_files)
      assert os.path.exists(os.path.join(SHM, live.name)) and os.path.exists(os.path.join(SHM, untagged.name))
      lines = [r.getMessage() for r in caplog.records if "shared-memory files" in r.getMessage()]
      if lines:
        break
    assert len(lines) == 1, lines
    line = re.fullmatch(
      rf"{SHM}: removed (\d+) shared-memory files \(([\d.]+) MiB\) that runs which died on this "
      rf"node left",
      lines[0],
    )
    assert line and int(line[1]) >= 2 and float(line[2]) >= 1.0, lines[0]  # others' dead runs may add theirs
  finally:
    live.close()
    live.unlink()
    untagged.unlink()


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_leaves_nothing_in_dev_shm_and_no_leak_warning(tmp_path, compilation_cache):
  """A preemption notice ends the run as its last step does. Batches the workers made that the loop never took are
  removed at exit by the trainer itself: multiprocessing's resource tracker would remove them and print 'There
  appear to be N leaked shared_memory objects'."""
  trainer = _start(tmp_path, compilation_cache)
  _wait_for_steps(trainer, tmp_path)
  trainer.send_signal(signal.SIGTERM)
  assert trainer.wait(timeout=120) == 0, (tmp_path / "run.log").read_text()[-3000:]
  assert "leaked" not in (tmp_path / "run.log").read_text(), (tmp_path / "run.log").read_text()[-3000:]
  assert not [name for name in os.listdir(SHM) if f"-{trainer.pid}-" in name]


def test_a_data_worker_killed_ends_the_run_in_one_line_and_leaves_nothing(tmp_path, compilation_cache):
  trainer = _start(tmp_path, compilation_cache)
  try:
    _wait_for_steps(trainer, tmp_path)
    run = _descendants(trainer.pid)
    workers = sorted(pid for pid in run if "multiprocessing.spawn" in _cmdline(pid))
    assert len(workers) == 2, {pid: _cmdline(pid) for pid in run}
    os.kill(workers[0], signal.SIGKILL)
    assert trainer.wait(timeout=120) == 2, (tmp_path / "run.log").read_text()[-3000:]
  finally:
    if trainer.poll() is None:
      trainer.kill()
      trainer.wait()
  line = _one_error_line((tmp_path / "run.log").read_text())
  assert line.startswith("error: a data worker was killed by SIGKILL (the kernel's out-of-memory killer"), line
  assert not [name for name in os.listdir(SHM) if f"-{trainer.pid}-" in name]
  deadline = time.monotonic() + 10
  while any(_running(pid) for pid in run) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not [pid for pid in run if _running(pid)]


def _own_dev_shm_prefix() -> list[str]:
  """The command prefix that runs a command in a mount namespace of its own (as root, or as a root mapped from this
  user), where it may mount a tmpfs on /dev/shm that nothing else sees; skips where the kernel or the container
  refuses one."""
  prefix = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
  try:
    ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
  except FileNotFoundError:
    ok = False
  if not ok:
    pytest.skip("no mount namespace of the test's own here (unshare --mount): the machine's /dev/shm is not filled")
  return prefix


# In the mount namespace: a tmpfs of argv[1] on /dev/shm, then the trainer (argv[4:], its output in argv[3]); where
# argv[2] names a metrics file, /dev/shm is filled once it holds two steps. Prints the trainer's exit status and
# what is left in /dev/shm.
_IN_OWN_DEV_SHM = textwrap.dedent("""
    import json, os, subprocess, sys, time
    size, fill_after, log, *argv = sys.argv[1:]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", "/dev/shm"], check=True)
    with open(log, "w") as out:
      trainer = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while fill_after and trainer.poll() is None and time.monotonic() < deadline:
      if os.path.exists(fill_after) and open(fill_after).read().count("\\n") >= 2:
        try:
          with open("/dev/shm/filler", "wb") as f:
            while True:
              f.write(bytes(4096))
              f.flush()
        except OSError:  # ENOSPC
          break
      time.sleep(0.05)
    try:
      trainer.wait(timeout=120)
    except subprocess.TimeoutExpired:
      trainer.kill()
    print(json.dumps({"rc": trainer.wait(), "left": sorted(os.listdir("/dev/shm"))}))
""")


def _run_in_own_dev_shm(tmp_path, size: str, fill: bool, env: dict) -> tuple[int, list[str], str]:
  """(exit status, what is left in /dev/shm, output) of the trainer of RUN_ARGS on a /dev/shm of `size`."""
  metrics = str(tmp_path / "run" / "metrics.jsonl") if fill else ""
  done = subprocess.run(
    [
      *_own_dev_shm_prefix(),
      sys.executable,
      "-c",
      _IN_OWN_DEV_SHM,
      size,
      metrics,
      str(tmp_path / "run.log"),
      sys.executable,
      "-m",
      "visionfm_jax.main",
      f"--workdir={tmp_path / 'run'}",
      *RUN_ARGS,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.splitlines()[-1])
  return result["rc"], result["left"], (tmp_path / "run.log").read_text()


def test_a_dev_shm_without_room_for_the_batches_stops_the_run_before_training_in_one_line(tmp_path):
  rc, left, out = _run_in_own_dev_shm(tmp_path, "256k", fill=False, env=cpu_env(1))
  assert rc == 2, out[-3000:]
  line = re.fullmatch(
    r"error: /dev/shm has 256 KiB free \(of 256 KiB\) but the input pipeline holds up to (\d+) KiB "
    r"of batches there \(16 batches of (\d+) KiB: config.data.num_workers=2 x 2 x "
    r"\(config.data.prefetch=2 \+ 1\) \+ config.data.device_prefetch=2 \+ 2\); make room there "
    r"or enlarge it \(docker run --shm-size, .*",
    _one_error_line(out),
  )
  # a batch: 16 images of 16 x 16 x 3 bytes, and 16 labels, validity flags and flips, a page each at least
  assert line and int(line[1]) == 16 * int(line[2]) and int(line[2]) >= 12 + 3 * 4, out[-3000:]
  assert not left and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_dev_shm_that_fills_up_while_training_ends_the_run_in_one_line_and_leaves_nothing(
  tmp_path, compilation_cache
):
  """Room at the start, then another program fills /dev/shm: the worker writing the next batch dies of SIGBUS (or
  a semaphore is refused, ENOSPC). The other worker ends with the run; nothing of the run is left there."""
  rc, left, out = _run_in_own_dev_shm(
    tmp_path, "2m", fill=True, env=cpu_env(1, **compilation_cache_env(compilation_cache))
  )
  assert rc == 2, out[-3000:]
  line = _one_error_line(out)
  assert re.fullmatch(
    r"error: (a data worker was killed by SIGBUS writing a batch into /dev/shm|/dev/shm is full) "
    r"\([\d.]+ [KM]iB free of 2\.0 MiB\).*the input pipeline holds up to \d+ KiB of batches "
    r"there.*",
    line,
  ), line
  assert left == ["filler"], left
