"""The EMA of the params (config.optim.ema_decay, training/ema.py) and the checkpoint history
(config.checkpoint_keep_period): the EMA follows a numpy recurrence over the applied updates and stands still on
a skipped step, is sharded as the optimizer state, evaluates as eval/ema/..., resumes bitwise, starts from the
params on a resume of a checkpoint without one, and is read by tools.export_hf, tools.probe and init_from;
the history keeps exactly the newest K and the multiples of P through `python -m visionfm_jax.main`."""

import json
import os
import shutil
import subprocess

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from visionfm_jax import config_lib
from visionfm_jax.errors import CheckpointError, ConfigError
from visionfm_jax.tools import export_hf
from visionfm_jax.tools import probe as probe_tool
from visionfm_jax.training import checks, train

from conftest import ROOT, compilation_cache_env, cpu_env, stop_after_writing, tiny_vit_config
from test_train_step import OverflowingTask, _batches_poisoned_at, _setup

DECAY = 0.5  # large steps of the average, so that it stands well apart from the params in a few steps


def _state(workdir, step):
  """The `state` item of checkpoint `step` as host numpy arrays."""
  state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree.map(np.asarray, state)


def _recurrence(ema, params, decay=DECAY):
  """One step of the EMA in numpy, float32 as the state holds it."""
  d = np.float32(decay)
  return jax.tree.map(
    lambda e, p: np.asarray(e, np.float32) * d + np.asarray(p, np.float32) * (np.float32(1) - d), ema, params
  )


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_ema_follows_the_recurrence_and_stands_still_on_a_skipped_fp16_step():
  """zero2: the params replicated, the EMA sharded over fsdp as the Adam moments are; the middle step overflows."""
  config = tiny_vit_config(
    **{
      "precision.compute_dtype": "float16",
      "precision.loss_scale_init": 2.0**10,
      "strategy": "zero2",
      "optim.ema_decay": DECAY,
    }
  )
  batches = _batches_poisoned_at(config, 3, 1)
  state, step, specs = _setup(config, OverflowingTask(config))
  assert "fsdp" in tuple(specs.ema_params["blocks"]["mlp"]["fc1"]["kernel"])
  assert "fsdp" not in tuple(specs.params["blocks"]["mlp"]["fc1"]["kernel"])
  leaf = state.ema_params["blocks"]["mlp"]["fc1"]["kernel"]
  assert leaf.addressable_shards[0].data.size * 8 == leaf.size
  chex.assert_trees_all_equal(jax.device_get(state.ema_params), jax.device_get(state.params))  # ema_0 = params_0

  expected = jax.device_get(state.ema_params)
  for i, batch in enumerate(batches):
    state, m = step(state, batch)
    if i == 1:
      assert m["train/skipped_steps"] == 1
    else:
      expected = _recurrence(expected, jax.device_get(state.params))
    chex.assert_trees_all_close(jax.device_get(state.ema_params), expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(expected["head"]["kernel"], jax.device_get(state.params)["head"]["kernel"])


def _main(workdir, cache, warm):
  """`python -m visionfm_jax.main` (run by the warm interpreter `warm`) on 2 CPU devices: 8 steps, a checkpoint
  every 2, the newest 1 kept plus every multiple of 4, an EMA with decay 0.5, evaluations at 4 and 8; the
  compilation cache in `cache` (the resumed run loads the programs the first one compiled)."""
  flags = [
    "--config=configs/vit_huge.py:demo",
    "--config.model.variant=pico/4",
    "--config.model.image_size=16",
    "--config.data.image_size=16",
    "--config.global_batch_size=16",
    "--config.optim.warmup_steps=2",
    "--config.data.eval_examples=64",
    "--config.progress_bar=False",
    "--config.total_steps=8",
    "--config.checkpoint_every=2",
    "--config.keep_checkpoints=1",
    "--config.checkpoint_keep_period=4",
    "--config.eval_every=4",
    "--config.log_every=2",
    "--config.model.pool=cls",
    f"--config.optim.ema_decay={DECAY}",
  ]
  env = cpu_env(2, **compilation_cache_env(cache))
  done = subprocess.run(
    [warm.python, "-m", "visionfm_jax.main", f"--workdir={workdir}", *flags],
    cwd=ROOT,
    env=warm.env(env),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout[-3000:]
  return done.stdout


# The module's runs share their compiled programs; the tests of `ema_run` share it in one xdist worker.
pytestmark = pytest.mark.usefixtures("compilation_cache")
EMA_RUN = pytest.mark.xdist_group("ema_run")


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, compilation_cache, warm_python):
  workdir = tmp_path_factory.mktemp("ema") / "run"
  _main(workdir, compilation_cache, warm_python)
  return workdir


@EMA_RUN
def test_keep_period_keeps_the_newest_and_the_multiples_through_main(ema_run):
  # saved 2, 4, 6, 8; kept: the newest (8) and the multiples of 4
  assert sorted(p for p in os.listdir(ema_run / "checkpoints") if p.isdigit()) == ["4", "8"]


@EMA_RUN
def test_ema_is_evaluated_beside_the_params_and_checkpointed(ema_run):
  evals = [r for r in _metrics(ema_run) if "eval/val/top1" in r]
  assert [r["step"] for r in evals] == [4, 8]
  for row in evals:
    raw = {k for k in row if k.startswith("eval/") and not k.startswith("eval/ema/")}
    assert {k for k in row if k.startswith("eval/ema/")} == {k.replace("eval/", "eval/ema/", 1) for k in raw}
    assert 0.0 <= row["eval/ema/val/top1"] <= 1.0
  state = _state(ema_run, 8)
  assert jax.tree.structure(state["ema_params"]) == jax.tree.structure(state["params"])
  assert not np.allclose(state["ema_params"]["head"]["kernel"], state["params"]["head"]["kernel"])


@EMA_RUN
def test_resume_keeps_the_ema_bitwise(ema_run, tmp_path, compilation_cache, warm_python):
  """The run resumed from its step 4 ends with the uninterrupted run's params and EMA, bitwise."""
  resumed = tmp_path / "resumed"
  shutil.copytree(ema_run, resumed)
  shutil.rmtree(resumed / "checkpoints" / "8")
  assert "resuming from" in _main(resumed, compilation_cache, warm_python)
  got, want = _state(resumed, 8), _state(ema_run, 8)
  chex.assert_trees_all_equal(got["ema_params"], want["ema_params"])
  chex.assert_trees_all_equal(got["params"], want["params"])


@EMA_RUN
def test_tools_export_and_probe_the_ema_weights(ema_run, tmp_path, capsys):
  ema_params = _state(ema_run, 8)["ema_params"]
  status = export_hf.main(["export_hf", f"--checkpoint={ema_run}", f"--out={tmp_path / 'hf'}", "--ema"])
  out = capsys.readouterr()
  assert status == 0, out.err
  assert "the EMA of the params of step 8 of" in out.out
  from visionfm_jax import convert  # pylint: disable=g-import-not-at-top

  _, variables = convert.from_hf(str(tmp_path / "hf"), scan=True)
  chex.assert_trees_all_equal(jax.device_get(variables["params"]), ema_params)

  args = [
    "probe",
    f"--checkpoint={ema_run}",
    "--batch_size=32",
    "--config.probe.train_examples=64",
    "--config.probe.eval_examples=32",
  ]
  assert probe_tool.main(args + ["--ema"]) == 0
  with_ema = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert probe_tool.main(args) == 0
  raw = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert with_ema["step"] == raw["step"] == 8
  assert with_ema["linear_probe/train_objective"] != raw["linear_probe/train_objective"]


@EMA_RUN
def test_init_from_the_ema_weights(ema_run, tmp_path):
  """A fresh run with init_from_ema starts from the source's EMA: its own EMA (decay 0.5) after one step is the
  mean of its step-0 and step-1 params, so its step-0 params are 2 * ema_1 - params_1."""
  source = _state(ema_run, 8)
  config = tiny_vit_config(
    **{
      "total_steps": 1,
      "optim.warmup_steps": 1,
      "checkpoint_every": 1,
      "eval_every": 1,
      "model.pool": "cls",
      "data.eval_examples": 16,
      "optim.ema_decay": DECAY,
      "init_from": str(ema_run),
      "init_from_ema": True,
    }
  )
  train.run(config, str(tmp_path / "fine"))
  state = _state(tmp_path / "fine", 1)
  start = jax.tree.map(lambda e, p: 2 * e - p, state["ema_params"], state["params"])
  chex.assert_trees_all_close(start, source["ema_params"], atol=1e-6)
  apart = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), start, source["params"])
  assert max(jax.tree.leaves(apart)) > 1e-4  # the raw params lie 100x further away than the tolerance


@pytest.mark.slow
def test_ema_turned_on_at_a_resume_starts_from_the_params_turned_off_drops_it_and_a_missing_one_is_an_error(
  tmp_path, capsys
):
  """One 5-step config, stopped (SIGTERM) after steps 2 and 4: without an EMA to step 2, with one to step 4,
  without one to the end (the program of the first part again)."""
  workdir = tmp_path / "run"
  config = tiny_vit_config(
    **{
      "total_steps": 5,
      "checkpoint_every": 1,
      "log_every": 1,
      "eval_every": 5,
      "keep_checkpoints": 10,
      "data.eval_examples": 16,
    }
  )
  with pytest.MonkeyPatch.context() as patch:
    stop_after_writing(patch, 1)
    assert train.run(config, str(workdir))["step"] == 2
  assert _state(workdir, 2)["ema_params"] is None

  # The tools and init_from name the missing EMA in one line.
  assert export_hf.main(["export_hf", f"--checkpoint={workdir}", f"--out={tmp_path / 'hf'}", "--ema"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --ema: ") and "holds no EMA of the params" in err and "\n" not in err
  fresh = tiny_vit_config(
    **{"total_steps": 1, "optim.warmup_steps": 1, "init_from": str(workdir), "init_from_ema": True}
  )
  with pytest.raises(CheckpointError, match="holds no EMA of the params .*ema_decay=0"):
    train.run(fresh, str(tmp_path / "fresh"))

  # Resumed with an EMA: it starts from the params of step 2.
  config.optim.ema_decay = DECAY
  with pytest.MonkeyPatch.context() as patch:
    stop_after_writing(patch, 3)
    assert train.run(config, str(workdir))["step"] == 4
  ema = _state(workdir, 2)["params"]
  for step in (3, 4):
    ema = _recurrence(ema, _state(workdir, step)["params"])
    chex.assert_trees_all_close(_state(workdir, step)["ema_params"], ema, rtol=1e-6, atol=1e-7)

  # Resumed with ema_decay 0: the saved EMA is read and dropped.
  config.optim.ema_decay = 0.0
  assert train.run(config, str(workdir))["step"] == 5
  assert _state(workdir, 5)["ema_params"] is None


def test_keep_period_must_be_a_multiple_of_the_checkpoint_interval():
  config = tiny_vit_config(**{"checkpoint_every": 3, "checkpoint_keep_period": 10})
  with pytest.raises(
    ConfigError, match="config.checkpoint_keep_period=10 is not a multiple of config.checkpoint_every=3"
  ):
    checks.validate(config)
  with pytest.raises(ConfigError, match=r"config.optim.ema_decay=1.0: must be a number in \[0, 1\)"):
    checks.validate(tiny_vit_config(**{"optim.ema_decay": 1.0}))
  assert config_lib.resume_kind("checkpoint_keep_period") == config_lib.OPT_IN
  assert config_lib.resume_kind("optim.ema_decay") == config_lib.FREE


def test_a_checkpoint_saved_before_the_ema_field_restores(tmp_path):
  """A state saved by a version whose TrainState had no ema_params field restores into today's TrainState."""
  from visionfm_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from visionfm_jax.training import state as state_lib

  params = {"w": np.arange(3, dtype=np.float32)}
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(5, {"step": np.int32(5), "params": params, "opt_state": {"mu": params}, "loss_scale": None})
  ckpt.close()
  leaf = jax.ShapeDtypeStruct((3,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  target = state_lib.TrainState(
    step=jax.ShapeDtypeStruct((), np.int32), params={"w": leaf}, opt_state={"mu": {"w": leaf}}
  )
  restored = checkpoint.Checkpointer(str(tmp_path)).restore(5, target)
  assert isinstance(restored, state_lib.TrainState) and restored.ema_params is None and int(restored.step) == 5
  np.testing.assert_array_equal(restored.params["w"], params["w"])
