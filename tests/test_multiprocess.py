"""Multi-process training and its launch environment.

launch/local.sh runs 2 processes x 2 CPU devices joined by jax.distributed (gloo collectives): the tiny ViT
trains with zero3 (state sharded across the processes), checkpoints, resumes, and matches one process fed the
same global batches. Also: the jax.distributed.initialize arguments taken from the environment, and the launch
scripts' syntax.
"""

import json
import math
import os
import signal
import socket
import subprocess

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from conftest import ROOT, tiny_vit_config
from visionfm_jax import checkpoint, optim, parallel, tasks, train
from visionfm_jax.parallel import distributed
from visionfm_jax.tasks.base import host_to_global

PROCESSES, DEVICES_PER_PROCESS = 2, 2
# The tiny ViT (conftest.tiny_vit_config) as flags; global batch 16 = 8 rows on each process.
FLAGS = ["--config=configs/vit_huge.py:demo", "--config.model.variant=pico/4", "--config.model.image_size=16",
         "--config.data.image_size=16", "--config.global_batch_size=16", "--config.optim.warmup_steps=2",
         "--config.data.eval_examples=16", "--config.data.num_workers=0", "--config.progress_bar=False",
         "--config.strategy=zero3", "--config.checkpoint_every=2", "--config.log_every=1", "--config.eval_every=100"]
LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "SLURM_NTASKS")


# ------------------------------------------------------------------------------------- initialize kwargs

@pytest.fixture
def initialize_calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of joining anything; a clean launch environment."""
  for name in LAUNCH_ENV:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  return calls


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
  with pytest.raises(ValueError, match="JAX_LOCAL_DEVICE_IDS"):
    distributed.initialize("auto")


# ---------------------------------------------------------------------------------------- launch scripts

@pytest.mark.parametrize("script", ["launch/local.sh", "launch/slurm.sbatch", "launch/xla_flags_h100.sh"])
def test_launch_script_syntax(script):
  proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr


def test_slurm_script_gives_each_task_all_gpus_of_its_node():
  with open(os.path.join(ROOT, "launch/slurm.sbatch"), encoding="utf-8") as f:
    lines = [line for line in f if line.startswith(("gpus=", "export JAX_LOCAL_DEVICE_IDS="))]
  assert len(lines) == 2, lines
  env = {"PATH": os.environ["PATH"], "SLURM_GPUS_ON_NODE": "4"}
  proc = subprocess.run(["bash", "-c", "".join(lines) + 'echo "$JAX_LOCAL_DEVICE_IDS"'], env=env,
                        capture_output=True, text=True, timeout=30)
  assert proc.stdout.strip() == "0,1,2,3", proc.stderr


# -------------------------------------------------------------------------------------- 2 processes, gloo

def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, total_steps):
  """launch/local.sh 2 (2 CPU devices each) -> (exit code, output of both processes)."""
  env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and k != "XLA_FLAGS"}  # not conftest's 8
  env.update(DEVICES_PER_PROCESS=str(DEVICES_PER_PROCESS), PORT=str(_free_port()), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(["bash", "launch/local.sh", str(PROCESSES), f"--workdir={workdir}", *FLAGS,
                           f"--config.total_steps={total_steps}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=480)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"launch/local.sh timed out:\n{out[-6000:]}")
  return proc.returncode, out


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Trains 2 steps (checkpoint at 2), then the same command with total_steps=4 resumes and trains 2 more."""
  workdir = tmp_path_factory.mktemp("mp") / "run"
  first_code, first = _launch(workdir, 2)
  assert first_code == 0, first[-6000:]
  second_code, second = _launch(workdir, 4)
  assert second_code == 0, second[-6000:]
  return workdir, first, second


def test_two_processes_train_checkpoint_and_resume(two_process_run):
  workdir, first, second = two_process_run
  devices = PROCESSES * DEVICES_PER_PROCESS
  assert f"{PROCESSES} processes, {devices} devices (cpu)" in first
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}, strategy zero3, 2 processes" in first
  assert "resuming from" not in first
  assert second.count(f"resuming from {workdir}/checkpoints/2") == PROCESSES  # each process restores

  rows = _read_metrics(workdir)  # written by process 0 only: each step once
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  for r in train_rows:
    assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"])
    assert r["data/skipped"] == 0 and r["data/skipped_fraction"] == 0
  assert [r["step"] for r in rows if "eval/val/top1" in r] == [2, 4]

  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  for step in (2, 4):
    data_dir = workdir / "checkpoints" / str(step) / "data"
    names = [f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)]
    assert sorted(n for n in os.listdir(data_dir) if n.endswith(".json")) == names
    for name in names:  # each process read its own 8 rows a step
      state = json.loads((data_dir / name).read_text())
      assert state["read"] == 8 * step and state["skipped"] == 0
    state_dir = os.listdir(workdir / "checkpoints" / str(step) / "state")
    assert {f"ocdbt.process_{i}" for i in range(PROCESSES)} <= set(state_dir)  # both wrote their shards


def test_two_processes_match_one_process_fed_the_same_global_batches(two_process_run):
  """One process on 4 devices restores the 2-process checkpoint of step 2 (state and both processes' iterator
  states) and trains steps 3-4 on the rows that process 0 and process 1 read (their disjoint shares of the data,
  in that order): the metrics match. So a 2-process run differs from a 1-process one only in which examples form
  a global batch (each process reads its own share), not in what a step computes."""
  workdir, _, _ = two_process_run
  config = tiny_vit_config(strategy="zero3", total_steps=4)
  config.data.num_workers = 0
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:PROCESSES * DEVICES_PER_PROCESS])
  task = tasks.build(config, mesh)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  init_fn = train.make_init_fn(task, tx, config)
  batch_sharding = NamedSharding(mesh, train.BATCH_SPEC)
  with mesh, parallel.activation_sharding(mesh):
    abstract, shardings, _ = train.state_shardings(init_fn, mesh, config)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    state = ckpt.restore(2, target)
    ckpt.close()
    loaders = []
    for i in range(PROCESSES):
      loader = iter(task.train_loader(batch_size=config.global_batch_size // PROCESSES, seed=config.seed,
                                      process_index=i, process_count=PROCESSES))
      loader.set_state((workdir / "checkpoints" / "2" / "data" / f"process_{i}-of-{PROCESSES}.json").read_bytes())
      loaders.append(loader)
    step = train.jit_train_step(task, tx, config, mesh, init_fn, shardings)
    for want in [r for r in _read_metrics(workdir) if "train/loss" in r and r["step"] > 2]:
      parts = [next(loader) for loader in loaders]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      state, got = step(state, host_to_global(batch, batch_sharding))
      for key in ("train/loss", "train/grad_norm", "train/top1", "train/lr"):
        # Equal up to the order of float reductions (gloo across processes vs within one).
        assert float(got[key]) == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)
    assert int(state.step) == 4
