"""Checkpoint safety: a SIGKILL mid-save keeps the previous checkpoint and the restart uses it; a checkpoint
restores bitwise on another mesh (8 -> 4 devices) and another strategy (zero3 -> ddp); a checkpoint of another
process count restores the state and continues the data stream; an unreadable newest checkpoint gives way to the
newest readable one.

`python tests/integration/test_checkpoint_safety.py DIR` is the process that is killed: it saves step 1, then SIGKILLs
itself while the asynchronous save of step 2 is being written.
"""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from visionfm_jax import parallel, tasks
from visionfm_jax.data.loader import pipeline
from visionfm_jax.training import checkpoint, optim, train
from visionfm_jax.training import step as step_lib

from conftest import ROOT, cpu_env, tiny_vit_config
from test_data import RangeSource

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax writes step S into S.orbax-checkpoint-tmp, renamed to S when complete
SHAPE = (2048, 8192)  # 64 MiB of float32; three of them take a good fraction of a second to write
NAMES = ("w0", "w1", "w2")
KILL_AFTER_BYTES = 8 << 20  # of step 2 on disk: the write has started but is far from done
# The runs resuming `zero3_run` compile the same programs once; the tests of `zero3_run` and `killed_mid_save`
# share them in one xdist worker.
pytestmark = pytest.mark.usefixtures("compilation_cache")
SHARED_RUNS = pytest.mark.xdist_group("checkpoint_safety_runs")


# ------------------------------------------------------------------------------------- the killed process


class _FakeIterator:
  """Stands in for the data iterator: grain's Orbax handler needs get_state, set_state and start_prefetch."""

  def __init__(self, position=0):
    self.position = position

  def get_state(self):
    return json.dumps({"position": self.position}).encode()

  def set_state(self, state):
    self.position = json.loads(state)["position"]

  def start_prefetch(self):
    pass


def _values(step):
  rng = np.random.default_rng(step)
  return {name: rng.random(SHAPE, dtype=np.float32) for name in NAMES}


def _sharding():
  return NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x"))


def _bytes_under(path):
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:  # renamed or removed while we look
        pass
  return total


def save_then_die(directory):
  """Saves step 1 and waits for it; starts the async save of step 2 and SIGKILLs this process while step 2's
  arrays are being written. Exits 3 if step 2 completed before it could be killed."""
  sharding = _sharding()
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(1, jax.device_put(_values(1), sharding), _FakeIterator(1))
  ckpt.wait()
  ckpt.save(2, jax.device_put(_values(2), sharding), _FakeIterator(2))
  in_flight, final = os.path.join(directory, "2" + TMP_SUFFIX), os.path.join(directory, "2")
  while _bytes_under(in_flight) < KILL_AFTER_BYTES:
    if os.path.exists(final):
      sys.exit(3)
    time.sleep(0.001)
  os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def killed_mid_save(tmp_path_factory):
  """A checkpoint directory as `save_then_die` leaves it (read-only: copy it to change it)."""
  directory = tmp_path_factory.mktemp("killed") / "checkpoints"
  env = cpu_env(8)
  env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])  # its conftest
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), str(directory)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
  return directory


def _tiny_config(total_steps, strategy):
  config = tiny_vit_config(total_steps=total_steps, checkpoint_every=2, log_every=1, eval_every=100, strategy=strategy)
  config.data.num_workers = 0
  config.data.eval_examples = 16
  return config


def _continued_config(strategy):
  """The config of a run resuming `zero3_run` (2 steps) for 4 steps in all."""
  config = _tiny_config(4, strategy)
  config.resume.allow_changes = "total_steps"
  return config


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, compilation_cache):
  """A workdir of the tiny ViT trained 2 steps with zero3 on 8 devices (read-only: copy it to change it)."""
  del compilation_cache  # on before the first run compiles
  workdir = tmp_path_factory.mktemp("zero3") / "run"
  train.run(_tiny_config(2, "zero3"), str(workdir))
  return workdir


@SHARED_RUNS
def test_kill_during_async_save_keeps_the_previous_checkpoint(killed_mid_save, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(killed_mid_save, directory)
  assert sorted(os.listdir(directory)) == ["1", "2" + TMP_SUFFIX]
  assert _bytes_under(directory / ("2" + TMP_SUFFIX)) >= KILL_AFTER_BYTES  # killed mid-write

  ckpt = checkpoint.Checkpointer(str(directory))
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  sharding = _sharding()
  abstract = {name: jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=sharding) for name in NAMES}
  iterator = _FakeIterator()
  restored = ckpt.restore(1, abstract, iterator)
  expected = _values(1)
  for name in NAMES:
    assert restored[name].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored[name]), expected[name])
  assert iterator.position == 1
  # Saving step 2 again (the restarted run reaching it) replaces the leftover: opening the directory cleans it.
  ckpt.save(2, jax.device_put(_values(3), sharding), _FakeIterator(3))
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert checkpoint.Checkpointer(str(directory)).latest_step() == 2


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _train_steps(workdir):
  return [r["step"] for r in _read_metrics(workdir) if "train/loss" in r]


@SHARED_RUNS
def test_restart_after_a_kill_mid_save_resumes_from_the_last_complete_step(
  zero3_run, killed_mid_save, tmp_path, caplog
):
  """A tiny run to step 2, then a save killed mid-write (a real kill's leftover planted as step 3's tmp directory,
  as a preemption-time save would leave it): the restart resumes from step 2 (here with another strategy, zero3
  -> ddp), completes, and the leftover, a step never saved again, is gone."""
  workdir = tmp_path / "run"
  shutil.copytree(zero3_run, workdir)
  assert _train_steps(workdir) == [1, 2]
  shutil.copytree(killed_mid_save / ("2" + TMP_SUFFIX), workdir / "checkpoints" / ("3" + TMP_SUFFIX))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3" + TMP_SUFFIX]

  with caplog.at_level(logging.INFO):
    last = train.run(_continued_config("ddp"), str(workdir))
  assert f"resuming from {workdir / 'checkpoints'}/2" in caplog.text
  assert last["step"] == 4 and math.isfinite(last["train/loss"])
  assert _train_steps(workdir) == [1, 2, 3, 4]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def _restore_on(workdir, devices, strategy):
  """The newest checkpoint of `workdir` restored into the state shardings of `strategy` on a mesh of `devices`."""
  config = _tiny_config(2, strategy)
  mesh = parallel.make_mesh(config.mesh, devices)
  task = tasks.build(config, mesh)
  tx = optim.make_optimizer(config.optim, optim.schedule(config.optim, config.total_steps))
  init_fn = step_lib.make_init_fn(task, tx, config)
  with parallel.activation_sharding(mesh):
    abstract, shardings, _ = step_lib.state_shardings(init_fn, mesh, config)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  state = ckpt.restore(ckpt.latest_step(), target)
  ckpt.close()
  return state, shardings


@SHARED_RUNS
def test_checkpoint_restores_bitwise_on_a_smaller_mesh_and_another_strategy(zero3_run):
  reference, _ = _restore_on(zero3_run, jax.devices(), "zero3")
  assert int(reference.step) == 2
  reference_leaves = jax.tree_util.tree_leaves_with_path(reference)
  four = set(jax.devices()[:4])
  for strategy in ("ddp", "zero3"):
    state, shardings = _restore_on(zero3_run, jax.devices()[:4], strategy)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    assert [p for p, _ in leaves] == [p for p, _ in reference_leaves]
    for (path, leaf), (_, want), sharding in zip(leaves, reference_leaves, jax.tree.leaves(shardings)):
      name = jax.tree_util.keystr(path)
      assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), name
      assert set(leaf.sharding.device_set) == four, name
      assert leaf.dtype == want.dtype, name
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want), err_msg=f"{strategy} {name}")
    replicated = [leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state)]
    assert all(replicated) if strategy == "ddp" else not all(replicated)


def _corrupt(step_dir, how):
  """Garbles the state's _METADATA, or truncates every array file of the state to half its size."""
  if how == "garbled_metadata":
    (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": garbled')
  else:
    for path in (step_dir / "state").rglob("ocdbt.process_*/d/*"):
      os.truncate(path, path.stat().st_size // 2)


@SHARED_RUNS
@pytest.mark.parametrize("how", ["garbled_metadata", "truncated_arrays"])
def test_unreadable_newest_checkpoint_resumes_from_the_newest_readable_one(zero3_run, tmp_path, caplog, how):
  """Step 3 (a copy of step 2's files) is unreadable: the run says so and why, resumes from step 2 (with ddp, the
  program of the restart test above), moves step 3 aside (out of the way of the step it saves again) and
  completes."""
  workdir = tmp_path / "run"
  shutil.copytree(zero3_run, workdir)
  shutil.copytree(workdir / "checkpoints" / "2", workdir / "checkpoints" / "3")
  _corrupt(workdir / "checkpoints" / "3", how)
  with caplog.at_level(logging.INFO):
    last = train.run(_continued_config("ddp"), str(workdir))
  assert f"checkpoint {workdir / 'checkpoints'}/3 is unreadable, trying the previous one: cannot restore" in caplog.text
  assert f"resuming from {workdir / 'checkpoints'}/2" in caplog.text
  assert last["step"] == 4 and math.isfinite(last["train/loss"])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3.unreadable", "4"]


@SHARED_RUNS
def test_no_readable_checkpoint_stops_naming_the_directory_and_keeps_the_files(zero3_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(zero3_run, workdir)
  _corrupt(workdir / "checkpoints" / "2", "garbled_metadata")
  with pytest.raises(
    checkpoint.CheckpointError,
    match=f"no checkpoint in {workdir / 'checkpoints'} can be "
    r"restored \(steps 2; the newest: cannot restore",
  ):
    train.run(_continued_config("ddp"), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]  # nothing moved: a rerun must not start afresh


def test_data_position_of_another_process_count_continues_the_stream(tmp_path, caplog):
  """A checkpoint whose data states were written by 2 processes (data/process_{0,1}-of-2.json) restores in 1
  process: the state restores, and the iterator continues the epoch after both processes' positions."""
  config = _tiny_config(2, "ddp")
  config.data.augment.random_resized_crop = False
  source = RangeSource(64)
  seen, states = [], []
  for index in range(2):
    it = iter(
      pipeline.make_train_loader(config.data, batch_size=4, seed=1, process_index=index, process_count=2, source=source)
    )
    seen.extend(int(x) for _ in range(3) for x in next(it)["label"])
    states.append(it.get_state())
  directory = tmp_path / "checkpoints"
  state = {"w": jax.device_put(np.arange(16, dtype=np.float32), _sharding())}
  ckpt = checkpoint.Checkpointer(str(directory))
  ckpt.save(5, state, _FakeIterator(5))
  ckpt.close()
  data_dir = directory / "5" / "data"
  os.remove(data_dir / "process_0-of-1.json")
  for index, saved in enumerate(states):
    (data_dir / f"process_{index}-of-2.json").write_bytes(saved)

  resumed = iter(
    pipeline.make_train_loader(config.data, batch_size=8, seed=1, process_index=0, process_count=1, source=source)
  )
  abstract = {"w": jax.ShapeDtypeStruct((16,), np.float32, sharding=_sharding())}
  with caplog.at_level(logging.INFO):
    restored = checkpoint.Checkpointer(str(directory)).restore(5, abstract, resumed)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(16, dtype=np.float32))
  assert "was saved by 2 processes and 1 run now" in caplog.text
  rest = [int(x) for _ in range(4) for x in next(resumed)["label"]]  # 32 of the 40 records left in the epoch
  assert not set(seen) & set(rest) and len(set(rest)) == 32


if __name__ == "__main__":
  save_then_die(sys.argv[1])


def test_a_save_of_replicated_arrays_compiles_no_program_and_restores_them(tmp_path):
  """Orbax's replica-parallel save compiles a slicing program per replicated array and device (about 100 for a pico
  ViT's first save on 8 devices); within one process nothing is gained, so every array is written whole."""
  replicated = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P())
  values = {"w": np.arange(40 * 24, dtype=np.float32).reshape(40, 24), "b": np.linspace(0, 1, 24, dtype=np.float32)}
  state = jax.device_put(values, replicated)
  compiled = []

  def count(event, duration_secs, **_):
    del duration_secs
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(1, state, _FakeIterator(1))
    ckpt.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert not compiled
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), values)
  restored = ckpt.restore(1, abstract, _FakeIterator())
  ckpt.close()
  for name, value in values.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), value)
