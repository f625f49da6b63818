"""Multi-process training, its faults and its launch environment.

launch/local.sh runs 2 processes x 2 CPU devices joined by jax.distributed (gloo collectives): the tiny ViT
trains with zero3 (state sharded across the processes), checkpoints, and matches one process fed the same global
batches; a process killed outright ends the job with a line naming it, and a preemption notice to one or both
processes saves one agreed step, along one chain of reruns that ends bitwise; a stalled process ends the whole job; a
held workdir stops both processes of a second job. Also: the jax.distributed.initialize arguments taken from the
environment, and the launch scripts' syntax.
"""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from visionfm_jax import parallel, tasks
from visionfm_jax.errors import UserError
from visionfm_jax.parallel import distributed
from visionfm_jax.training import checkpoint, optim
from visionfm_jax.training import step as step_lib
from visionfm_jax.training.infra import faults

from conftest import FAST_COMPILE_FLAGS, ROOT, kill_session, tiny_vit_config
from test_workdir import held_by_another_process
import tracker_runs

PROCESSES, DEVICES_PER_PROCESS = 2, 2
# Long enough that a preemption notice sent at the first checkpoint (step 10), and the second one its rerun gets a
# step after resuming, are acted on well before the end, with a checkpoint after the second to kill a save of: JAX's
# notifier polls for SIGTERM once a second, and the tiny job runs ~10 steps a second (~3 on a busy machine), so each
# notice is acted on up to ~15 steps after it is sent.
TOTAL_STEPS = 60
# The tiny ViT (conftest.tiny_vit_config) as flags; global batch 16 = 8 rows on each process.
FLAGS = [
  "--config=configs/vit_huge.py:demo",
  "--config.model.variant=pico/4",
  "--config.model.image_size=16",
  "--config.data.image_size=16",
  "--config.global_batch_size=16",
  "--config.optim.warmup_steps=2",
  "--config.data.eval_examples=16",
  "--config.data.num_workers=0",
  "--config.progress_bar=False",
  "--config.strategy=zero3",
  "--config.checkpoint_every=10",
  "--config.log_every=1",
  "--config.eval_every=1000",
  f"--config.total_steps={TOTAL_STEPS}",
]
# The same run with ddp, for the tests whose claim is not about ZeRO: a ddp step joins its peers in 2 collectives
# where zero3's does in 45 (34 all-gathers), and on the CPU each is a round of gloo's polling, most of a step's time.
DDP_FLAGS = [flag for flag in FLAGS if not flag.startswith("--config.strategy=")] + ["--config.strategy=ddp"]
LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "SLURM_NTASKS")


# ------------------------------------------------------------------------------------- initialize kwargs


@pytest.fixture
def initialize_calls(monkeypatch):
  """Records jax.distributed.initialize calls (but the heartbeat and join timeouts, tested below) instead of joining
  anything; a clean launch environment."""
  for name in LAUNCH_ENV:
    monkeypatch.delenv(name, raising=False)
  calls = []
  timeouts = ("heartbeat_timeout_seconds", "initialization_timeout")
  record = lambda **kwargs: calls.append({k: v for k, v in kwargs.items() if k not in timeouts})
  monkeypatch.setattr(jax.distributed, "initialize", record)
  return calls


def test_jax_heartbeat_outlasts_the_peer_watch(monkeypatch):
  """JAX's heartbeat timeout (which aborts with no name) is at least 3x config.peer_timeout_s and never under its
  default 100 s, so PeerWatch names a dead peer first."""
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12345")
  timeouts = []
  record = lambda **kwargs: timeouts.append(kwargs["heartbeat_timeout_seconds"])
  monkeypatch.setattr(jax.distributed, "initialize", record)
  distributed.initialize("auto", peer_timeout_s=30)
  distributed.initialize("auto", peer_timeout_s=60)
  distributed.initialize("auto")
  assert timeouts == [100, 180, 100]


def test_the_join_waits_visionfm_join_timeout_s(monkeypatch):
  """jax's client aborts a join that waits past its initialization_timeout; VISIONFM_JOIN_TIMEOUT_S sets it."""
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12345")
  timeouts = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: timeouts.append(kwargs["initialization_timeout"]))
  distributed.initialize("auto")
  monkeypatch.setenv(distributed.JOIN_TIMEOUT_ENV, "20")
  distributed.initialize("auto")
  assert timeouts == [distributed.DEFAULT_JOIN_TIMEOUT_S, 20]
  monkeypatch.setenv(distributed.JOIN_TIMEOUT_ENV, "0")
  with pytest.raises(UserError, match=f"{distributed.JOIN_TIMEOUT_ENV}='0': expected an integer >= 1"):
    distributed.initialize("auto")


def test_initialize_is_skipped_without_a_launch_environment(initialize_calls):
  distributed.initialize("auto")
  distributed.initialize("off")
  assert not initialize_calls
  distributed.initialize("on")  # asked for: jax auto-detects (and fails outside a cluster)
  assert initialize_calls == [{}]
  with pytest.raises(ValueError, match="mode"):
    distributed.initialize("yes")


def test_initialize_passes_explicit_process_count_and_id(initialize_calls, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12345")  # jax reads it itself
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  distributed.initialize("auto")
  assert initialize_calls == [{"num_processes": 2, "process_id": 1}]


def test_initialize_leaves_slurm_to_auto_detection(initialize_calls, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "1")
  distributed.initialize("auto")
  assert not initialize_calls  # one task: nothing to join
  monkeypatch.setenv("SLURM_NTASKS", "2")
  distributed.initialize("auto")
  assert initialize_calls == [{}]


def test_initialize_passes_local_device_ids(initialize_calls, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "2")
  monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1,2,3")
  distributed.initialize("auto")
  assert initialize_calls == [{"local_device_ids": [0, 1, 2, 3]}]
  monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "")
  assert distributed.initialize_kwargs() == {}
  monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,gpu1")
  with pytest.raises(UserError, match="JAX_LOCAL_DEVICE_IDS='0,gpu1'"):
    distributed.initialize("auto")


@pytest.mark.parametrize(
  "env, match",
  [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES='2' is set but JAX_PROCESS_ID is not"),
    ({"JAX_PROCESS_ID": "0"}, "JAX_PROCESS_ID='0' is set but JAX_NUM_PROCESSES is not"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two': expected an integer >= 1"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2: expected below JAX_NUM_PROCESSES=2"),
    ({"SLURM_NTASKS": "x"}, "SLURM_NTASKS='x': expected an integer >= 1"),
  ],
)
def test_a_malformed_launch_environment_is_a_user_error_naming_the_variable(initialize_calls, monkeypatch, env, match):
  """main prints a UserError as one line; these were a bare KeyError or ValueError with a traceback."""
  if "SLURM_NTASKS" not in env:
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12345")
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(UserError, match=match):
    distributed.initialize("auto")
  assert not initialize_calls


# ---------------------------------------------------------------------------------------- launch scripts


@pytest.mark.parametrize(
  "script",
  [
    "launch/local.sh",
    "launch/slurm.sbatch",
    "launch/tool.sbatch",
    "launch/xla_flags_h100.sh",
    "launch/xla_flags_a100.sh",
    "launch/gpu_check.sh",
    "launch/bench_gpu.sh",
  ],
)
def test_launch_script_syntax(script):
  proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr


def test_slurm_script_gives_each_task_all_gpus_of_its_node():
  with open(os.path.join(ROOT, "launch/slurm.sbatch"), encoding="utf-8") as f:
    lines = [line for line in f if line.startswith(("gpus=", "export JAX_LOCAL_DEVICE_IDS="))]
  assert len(lines) == 2, lines
  env = {"PATH": os.environ["PATH"], "SLURM_GPUS_ON_NODE": "4"}
  proc = subprocess.run(
    ["bash", "-c", "".join(lines) + 'echo "$JAX_LOCAL_DEVICE_IDS"'], env=env, capture_output=True, text=True, timeout=30
  )
  assert proc.stdout.strip() == "0,1,2,3", proc.stderr


def _launch_xla_flags() -> list[str]:
  """Every XLA flag that launch/ sets: xla_flags_h100.sh's, and the ones bench_gpu.sh's leads add to them."""
  flags = []
  for script in ("launch/xla_flags_h100.sh", "launch/bench_gpu.sh"):
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
      flags += re.findall(r"(?<![\w$])--xla_[a-z0-9_]+=[^\s\"')]*", f.read())
  return flags


def test_launch_scripts_set_only_xla_flags_this_xla_knows():
  """XLA aborts a process at its first use of a backend when XLA_FLAGS names a flag it does not know (flags are
  renamed and dropped between releases), so a GPU job would die at start-up; the GPU flags parse on any backend."""
  flags = _launch_xla_flags()
  assert len(flags) >= 8 and any(f.startswith("--xla_gpu_enable_command_buffer=") for f in flags), flags
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
  proc = subprocess.run(
    [sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  env["XLA_FLAGS"] = "--xla_gpu_no_such_flag_for_the_test=true"  # the check above can fail
  proc = subprocess.run(
    [sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode != 0 and "no_such_flag" in proc.stderr, proc.stderr[-2000:]


# -------------------------------------------------------------------------------------- 2 processes, gloo


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


_RUNNING_JOBS = []


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test():
  """A test that fails before its job ends would leave the job training (some run 100,000 steps), holding the
  cores for the rest of the suite: its session is killed at the test's end."""
  yield
  while _RUNNING_JOBS:
    job = _RUNNING_JOBS.pop()
    if job.proc.poll() is None:
      kill_session(job.proc.pid)
      job.proc.communicate()


class _Job:
  """launch/local.sh 2 (`devices` CPU devices each) in a session of its own, with its two trainer processes' pids;
  `base`: the config flags before `flags` (the tiny ViT's); `warm`: a warm interpreter (tests/warm_python.py) that
  runs the trainers, where the test does not look at their own pids or stop them."""

  def __init__(self, workdir, *flags, base=tuple(FLAGS), devices=DEVICES_PER_PROCESS, warm=None):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(
      DEVICES_PER_PROCESS=str(devices),
      PORT=str(_free_port()),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=FAST_COMPILE_FLAGS,  # not conftest's 8 devices: local.sh adds DEVICES_PER_PROCESS
      # every program in the compile cache, as conftest's compilation_cache does: the tiny ViT's compile
      # in well under JAX's default threshold of 1 s, so a rerun would load 2 of its 13 programs
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    env = warm.env(env) if warm else env
    self.workdir = workdir
    self.proc = subprocess.Popen(
      ["bash", "launch/local.sh", str(PROCESSES), f"--workdir={workdir}", *base, *flags],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )
    _RUNNING_JOBS.append(self)

  def trainers(self) -> list[int]:
    """The pids of the two `python -m visionfm_jax.main` processes (local.sh's children), in launch order."""
    with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children", encoding="utf-8") as f:
      children = [int(p) for p in f.read().split()]
    pids = [pid for pid in children if _is_trainer(pid)]  # not the launcher's `sleep 1` between its polls
    assert len(pids) == PROCESSES, children
    return pids

  def wait_for_checkpoint(self, step):
    """Blocks until the job has committed checkpoint `step` (while the job runs)."""
    path, deadline = self.workdir / "checkpoints" / str(step), time.monotonic() + 300
    while not path.exists() and self.proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    assert path.exists(), self.finish()[1][-6000:]

  def wait_for_a_step_after(self, step):
    """Blocks until the job has logged a train step after `step` (it has resumed and trains); returns that step."""
    path, deadline = self.workdir / "metrics.jsonl", time.monotonic() + 300
    while self.proc.poll() is None and time.monotonic() < deadline:
      text = path.read_text() if path.exists() else ""  # process 0 makes it once the run has started
      rows = [json.loads(line) for line in text.splitlines() if line.endswith("}")]
      logged = [r["step"] for r in rows if "train/loss" in r and r["step"] > step]
      if logged:
        return logged[-1]
      time.sleep(0.05)
    pytest.fail(f"no train step after {step} was logged:\n{self.finish()[1][-6000:]}")

  def finish(self, timeout=480):
    """(exit code of local.sh, output of both processes)."""
    try:
      out, _ = self.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
      out, _ = self.proc.communicate()
      pytest.fail(f"launch/local.sh timed out:\n{out[-6000:]}")
    return self.proc.returncode, out


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _final(workdir):
  state = checkpoint.restore_on_host(workdir / "checkpoints" / str(TOTAL_STEPS) / "state")
  return jax.tree.leaves({"params": state["params"], "opt_state": state["opt_state"]})


def _final_eval(workdir):
  return [r["eval/val/top1"] for r in _read_metrics(workdir) if "eval/val/top1" in r][-1]


# The tests that use it run in one pytest-xdist worker (--dist loadgroup), so that it runs once.
MULTIPROCESS = pytest.mark.xdist_group("two_process_reference_run")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, warm_python):
  """(workdir, output, compile cache flag) of the 2-process job trained to TOTAL_STEPS without interruption. Its
  compile cache is a folder of its own (config.compile_cache), which the killed and preempted jobs of the same
  config share: they load its programs instead of compiling them again."""
  root = tmp_path_factory.mktemp("mp")
  cache = f"--config.compile_cache={root / 'compile_cache'}"
  code, out = _Job(root / "reference", cache, f"--config.report_to={tracker_runs.REPORT_TO}", warm=warm_python).finish()
  assert code == 0, out[-6000:]
  return root / "reference", out, cache


@pytest.mark.slow
@MULTIPROCESS
def test_two_processes_train_and_checkpoint(reference_run):
  workdir, out, _ = reference_run
  devices = PROCESSES * DEVICES_PER_PROCESS
  assert f"{PROCESSES} processes, {devices} devices (cpu)" in out
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}, strategy zero3, 2 processes" in out
  assert "resuming from" not in out

  rows = _read_metrics(workdir)  # written by process 0 only: each step once
  tracker_runs.check_trackers(workdir, wandb_exit_codes=[0])  # one tracker run each, process 0's
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, TOTAL_STEPS + 1))
  for r in train_rows:
    assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"])
    assert r["data/skipped"] == 0 and r["data/skipped_fraction"] == 0
  assert [r["step"] for r in rows if "eval/val/top1" in r] == [TOTAL_STEPS]

  kept = [TOTAL_STEPS - 20, TOTAL_STEPS - 10, TOTAL_STEPS]  # checkpoint_every 10, keep_checkpoints 3
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == kept
  for step in kept:
    data_dir = workdir / "checkpoints" / str(step) / "data"
    names = [f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)]
    assert sorted(n for n in os.listdir(data_dir) if n.endswith(".json")) == names
    for name in names:  # each process read its own 8 rows a step
      state = json.loads((data_dir / name).read_text())
      assert state["read"] == 8 * step and state["skipped"] == 0
    state_dir = os.listdir(workdir / "checkpoints" / str(step) / "state")
    assert {f"ocdbt.process_{i}" for i in range(PROCESSES)} <= set(state_dir)  # both wrote their shards


@pytest.mark.slow
@MULTIPROCESS
def test_two_processes_match_one_process_fed_the_same_global_batches(reference_run):
  """One process on 4 devices restores the 2-process checkpoint of step 50 (state and both processes' iterator
  states) and trains steps 51-52 on the rows that process 0 and process 1 read (their shares of the data
  stream, in that order): the metrics match. So a 2-process run differs from a 1-process one only in which
  examples form a global batch (each process reads its own share), not in what a step computes."""
  workdir, _, _ = reference_run
  start = TOTAL_STEPS - 10
  config = tiny_vit_config(strategy="zero3", total_steps=TOTAL_STEPS)
  config.data.num_workers = 0
  mesh = parallel.make_mesh(config.mesh, jax.devices()[: PROCESSES * DEVICES_PER_PROCESS])
  task = tasks.build(config, mesh)
  lr_schedule = optim.schedule(config.optim, config.total_steps)
  tx = optim.make_optimizer(config.optim, lr_schedule)
  init_fn = step_lib.make_init_fn(task, tx, config)
  batch_sharding = parallel.batch_sharding(mesh)
  with parallel.activation_sharding(mesh):
    abstract, shardings, _ = step_lib.state_shardings(init_fn, mesh, config)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    state = ckpt.restore(start, target)
    ckpt.close()
    loaders = []
    for i in range(PROCESSES):
      loader = iter(
        task.train_loader(
          batch_size=config.global_batch_size // PROCESSES, seed=config.seed, process_index=i, process_count=PROCESSES
        )
      )
      state_file = workdir / "checkpoints" / str(start) / "data" / f"process_{i}-of-{PROCESSES}.json"
      loader.set_state(state_file.read_bytes())
      loaders.append(loader)
    step = step_lib.jit_train_step(task, tx, config, mesh, init_fn, shardings, lr_schedule)
    for want in [r for r in _read_metrics(workdir) if "train/loss" in r and start < r["step"] <= start + 2]:
      parts = [next(loader) for loader in loaders]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      state, got = step(state, parallel.host_to_global(batch, batch_sharding))
      for key in ("train/loss", "train/grad_norm", "train/top1", "train/lr"):
        # Equal up to the order of float reductions (gloo across processes vs within one).
        assert float(got[key]) == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)
    assert int(state.step) == start + 2


def _preempt(job, signalled):
  """SIGTERM to the job's first process only, or to both 0.5 s apart."""
  first, second = job.trainers()
  os.kill(first, signal.SIGTERM)
  if signalled == "both_0.5s_apart":
    time.sleep(0.5)  # the stagger under test
    os.kill(second, signal.SIGTERM)


def _step_saved_on_notice(job, after):
  """The one step both processes of `job` (preempted after step `after`) agreed on, saved and named, once they
  have exited 0."""
  code, out = job.finish()
  assert code == 0, out[-6000:]
  named = re.findall(r"preemption notice: saved step (\d+) \((.*?)\)", out)
  assert len(named) == PROCESSES and len(set(named)) == 1, out[-6000:]
  step, where = int(named[0][0]), named[0][1]
  assert after < step < TOTAL_STEPS and where == str(job.workdir / "checkpoints" / str(step)), (after, named)
  assert sorted(os.listdir(job.workdir / "checkpoints" / str(step) / "data"))[-PROCESSES:] == [
    f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)
  ]
  return step, out


def _wait_gone(pid, timeout):
  """Seconds until process `pid` (not a child of ours) exited, or None after `timeout`."""
  start = time.monotonic()
  while time.monotonic() - start < timeout:
    try:
      with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        if f.read().split(")")[-1].split()[0] == "Z":
          return time.monotonic() - start
    except FileNotFoundError:
      return time.monotonic() - start
    time.sleep(0.05)
  return None


@pytest.mark.slow
def test_a_held_workdir_stops_both_processes_of_a_second_job_at_once(tmp_path, warm_python):
  """Process 0 finds the workdir's lock held (as a running job holds it): both processes exit 2 without
  waiting on each other, process 0 naming the holder, process 1 pointing at process 0's line; nothing written."""
  workdir = tmp_path / "run"
  with held_by_another_process(workdir) as holder:
    code, out = _Job(workdir, warm=warm_python).finish(timeout=300)
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert code == 2, out[-6000:]
  # the output's tail on a failure: a line that is not there may have gone anywhere in it
  assert any(f"is in use by another run (host {socket.gethostname()}, pid {holder};" in e for e in errors), out[-6000:]
  assert any("process 0 could not take the lock" in e for e in errors), out[-6000:]
  assert not (workdir / "checkpoints").exists()


def _is_trainer(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return b"visionfm_jax.main" in f.read()
  except FileNotFoundError:
    return False


def _wait_for(condition, job, what, timeout=300, poll=0.005):
  """Blocks until `condition()` holds while the job runs; fails naming `what` otherwise."""
  deadline = time.monotonic() + timeout
  while not condition() and job.proc.poll() is None and time.monotonic() < deadline:
    time.sleep(poll)
  assert condition(), f"{what} never happened:\n{job.finish()[1][-6000:]}"


def _trained_a_step(workdir) -> bool:
  path = workdir / "metrics.jsonl"
  return path.exists() and '"train/loss"' in path.read_text()


def _saving(workdir, step) -> bool:
  """Whether checkpoint `step` is being written (orbax's temporary folder), not yet committed."""
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(n.startswith(f"{step}.") and "tmp" in n for n in os.listdir(folder))


def _killed(job, which: int, timeout_s: int) -> tuple[str, int]:
  """SIGKILLs trainer `which` of the job; asserts the other one is gone within the bound, the job failed and
  launch/local.sh named the killed one; returns the output and the killed pid."""
  pids = job.trainers()
  os.kill(pids[which], signal.SIGKILL)
  waited = _wait_gone(pids[1 - which], timeout=90)
  code, out = job.finish(timeout=60)
  assert waited is not None and waited < timeout_s + 15, (waited, out[-6000:])
  assert code != 0, out[-6000:]
  assert f"error: process {which} of 2 (pid {pids[which]}) ended first, by signal KILL (status 137)" in out, out[-6000:]
  return out, pids[which]


@pytest.mark.slow
@MULTIPROCESS
def test_sigkills_and_preemption_notices_along_one_chain_of_reruns_that_ends_bitwise(
  reference_run, tmp_path, warm_python
):
  """Five jobs in one workdir, each the rerun of the one before: two kills, two preemption notices, and the last
  rerun, which ends bitwise where the uninterrupted job does (params, optimizer state, eval metric). (One chain
  serves every fault: a rerun to the end costs a job and up to TOTAL_STEPS steps.)

  Kills outright (SIGKILL: no chance to save or to say anything, as the OOM killer or a lost node does) end the job
  within config.peer_timeout_s and a beat or two with a line naming the lost process: (1) process 1 after its first
  train step, before any checkpoint (nothing to resume: the rerun starts over); (4) the coordinator, process 0,
  while the checkpoint after the second notice's is being written (the newest complete one, the notice's, stays the
  one the rerun resumes from). JAX's coordination service lives in local.sh's own process
  (parallel/coordination.py), so the coordinator's survivor is not aborted by JAX's client but names it and exits
  75 like any other.

  Preemption notices: SIGTERM reaches (2) only one process, after the first checkpoint; (3) both, 0.5 s apart, once
  the rerun has resumed and trained a step. Each time both agree on one step after the notice, save it, log it once
  it has committed and exit 0; the rerun resumes from it."""
  reference, _, cache = reference_run
  workdir, timeout_s = tmp_path / "run", 5
  killing = (cache, f"--config.peer_timeout_s={timeout_s}")

  job = _Job(workdir, *killing)  # (1)
  _wait_for(lambda: _trained_a_step(workdir), job, "a train step", poll=0.05)
  assert checkpoint.newest_committed_step(workdir / "checkpoints") is None
  out, killed = _killed(job, 1, timeout_s)
  # process 0, waiting on it, names it in one line and exits 75 (requeue), not after JAX's own heartbeat timeout
  # (100 s) with pages of C++ logs
  assert re.search(
    rf"error: process 1 of 2 \(last seen: host \S+, pid {killed}\) has sent no heartbeat for \d+s "
    rf"\(config.peer_timeout_s={timeout_s}\): it died, or its node did. Process 0 exits with code "
    rf"{faults.HUNG_EXIT_CODE}",
    out,
  ), out[-6000:]
  assert "Terminating process because the JAX distributed service" not in out
  assert checkpoint.newest_committed_step(workdir / "checkpoints") is None

  job = _Job(workdir, cache, warm=warm_python)  # (2); the kills, (1) and (4), name the killed process's own pid
  job.wait_for_checkpoint(10)
  _preempt(job, "one_only")
  step, out = _step_saved_on_notice(job, after=10)
  assert "resuming from" not in out

  job = _Job(workdir, cache, warm=warm_python)  # (3)
  after = job.wait_for_a_step_after(step)
  _preempt(job, "both_0.5s_apart")
  resumed = step
  step, out = _step_saved_on_notice(job, after=after)
  assert out.count(f"resuming from {workdir}/checkpoints/{resumed}") == PROCESSES

  job = _Job(workdir, *killing)  # (4)
  saving = (step // 10 + 1) * 10  # checkpoint_every 10; at most TOTAL_STEPS
  _wait_for(lambda: _saving(workdir, saving), job, f"the save of checkpoint {saving}")
  out, killed = _killed(job, 0, timeout_s)
  assert re.search(
    rf"error: process 0 of 2 \(last seen: host \S+, pid {killed}\) has sent no heartbeat for \d+s "
    rf"\(config.peer_timeout_s={timeout_s}\): it died, or its node did. Process 1 exits with code "
    rf"{faults.HUNG_EXIT_CODE}",
    out,
  ), out[-6000:]
  assert "Terminating process because the JAX distributed service" not in out
  assert out.count(f"resuming from {workdir}/checkpoints/{step}") == PROCESSES
  assert checkpoint.newest_committed_step(workdir / "checkpoints") == step

  code, out = _Job(workdir, cache, warm=warm_python).finish()  # (5)
  assert code == 0, out[-6000:]
  assert out.count(f"resuming from {workdir}/checkpoints/{step}") == PROCESSES
  for got, want in zip(_final(workdir), _final(reference)):
    np.testing.assert_array_equal(got, want)
  assert _final_eval(workdir) == _final_eval(reference)


@pytest.mark.slow
def test_a_stalled_process_ends_the_whole_job(tmp_path):
  """Process 1 stops (SIGSTOP, as a wedged host would): process 0, waiting on it in a collective, dumps its
  stacks, names the step and phase and exits 75 within config.step_timeout_s; process 1, once it runs again,
  finds its own step overdue and exits too, so nothing is left waiting."""
  timeout_s = 5  # over 10x a train step's time, and below config.peer_timeout_s (30 s), whose line would differ
  job = _Job(tmp_path / "run", "--config.total_steps=100000", f"--config.step_timeout_s={timeout_s}")
  # Step 2 logged: both processes are past their first step (whose call compiles, unwatched) and its periodic
  # actions (collectives, as unwatched), so from here on every wait of the loop is watched.
  job.wait_for_a_step_after(1)
  first, second = job.trainers()
  os.kill(second, signal.SIGSTOP)
  waited = _wait_gone(first, timeout=timeout_s + 60)
  os.kill(second, signal.SIGCONT)
  assert waited is not None and waited < timeout_s + 30, waited
  assert _wait_gone(second, timeout=60) is not None
  code, out = job.finish(timeout=60)
  assert code == faults.HUNG_EXIT_CODE, out[-6000:]
  assert re.search(
    rf"process 0 of 2 has waited \d+s in a (train step|checkpoint save) at step \d+ "
    rf"\(config.step_timeout_s={timeout_s}\)",
    out,
  ), out[-6000:]
  assert "most recent call first" in out  # faulthandler's stack dump
