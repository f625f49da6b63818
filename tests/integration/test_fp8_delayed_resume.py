"""Delayed FP8 scaling's amax histories (config.precision.gemm=fp8_delayed, training/fp8_history.py): a part of the
train state, created whole on every device and updated by the train step; through `python -m visionfm_jax.main`,
checkpointed with the state; a resume that turns the recipe off drops them and goes on, one that turns it back on
starts them empty and goes on, each logged."""

import json
import math
import subprocess

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from visionfm_jax import parallel, tasks
from visionfm_jax.models import fp8
from visionfm_jax.training import checkpoint, optim
from visionfm_jax.training import step as step_lib

from conftest import ROOT, compilation_cache_env, cpu_env, tiny_vit_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]


def _main(workdir, cache, warm, gemm: str, total_steps: int) -> str:
  """The tiny ViT demo on 2 CPU devices, to `total_steps`, a checkpoint every 2 steps, in `gemm`."""
  flags = [
    "--config=configs/vit_huge.py:demo",
    "--config.model.variant=pico/4",
    "--config.model.image_size=16",
    "--config.data.image_size=16",
    "--config.global_batch_size=16",
    "--config.optim.warmup_steps=2",
    "--config.data.eval_examples=16",
    "--config.progress_bar=False",
    f"--config.total_steps={total_steps}",
    "--config.checkpoint_every=2",
    "--config.eval_every=100",
    "--config.log_every=1",
    "--config.resume.allow_changes=total_steps",
    f"--config.precision.gemm={gemm}",
  ]
  done = subprocess.run(
    [warm.python, "-m", "visionfm_jax.main", f"--workdir={workdir}", *flags],
    cwd=ROOT,
    env=warm.env(cpu_env(2, **compilation_cache_env(cache))),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout[-3000:]
  return done.stdout


def _histories(workdir, step):
  return checkpoint.restore_on_host(workdir / "checkpoints" / str(step) / "state", "fp8_history")


def _losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_resume_turns_delayed_scaling_off_and_on_and_the_run_goes_on(tmp_path, compilation_cache, warm_python):
  workdir = tmp_path / "run"
  _main(workdir, compilation_cache, warm_python, "fp8_delayed", 4)
  fc1 = _histories(workdir, 4)["blocks"]["mlp"]["fc1"]["amax_history_input"]
  assert fc1.shape == (2, 16) and np.all(fc1[:, :4] > 0) and not np.any(fc1[:, 4:])  # one amax a step

  log = _main(workdir, compilation_cache, warm_python, "compute_dtype", 6)
  assert "has FP8 amax histories and config.precision.gemm=compute_dtype: this run drops them" in log
  assert _histories(workdir, 6) is None

  log = _main(workdir, compilation_cache, warm_python, "fp8_delayed", 8)
  assert "has no FP8 amax histories: config.precision.gemm=fp8_delayed starts them empty" in log
  fc1 = _histories(workdir, 8)["blocks"]["mlp"]["fc1"]["amax_history_input"]
  assert np.all(fc1[:, :2] > 0) and not np.any(fc1[:, 2:])  # started afresh at step 6
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())


def test_the_history_part_is_created_whole_on_every_device_and_the_step_updates_it():
  """The state of an fp8_delayed run holds each layer's empty histories, replicated; each step records its amaxes
  in front and the loss stays close to the compute dtype's. The gradients reach the blocks from the third step (the
  head starts at 0, the lr at 0); a gradient's first scale, an empty history's 1, leaves its values below e5m2's
  smallest (2^-16) at 0, so fc1's, which fc2's input gradient gives, is recorded from the fourth."""
  losses, states = {}, {}
  for recipe in ("compute_dtype", fp8.DELAYED):
    config = tiny_vit_config(**{"precision.gemm": recipe})
    mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    task = tasks.build(config, mesh)
    tx, schedule = optim.fresh_optimizer(config, task.model)
    init_fn = step_lib.make_init_fn(task, tx, config)
    with parallel.activation_sharding(mesh):
      _, shardings, specs = step_lib.state_shardings(init_fn, mesh, config)
      state = step_lib.init_state(init_fn, shardings, jax.random.key(0))
      if recipe == "compute_dtype":
        assert state.fp8_history is None
      else:
        assert all(s == P() for s in jax.tree.leaves(specs.fp8_history, is_leaf=lambda s: isinstance(s, P)))
        assert not any(np.any(np.asarray(h)) for h in jax.tree.leaves(state.fp8_history))
      step = step_lib.jit_train_step(task, tx, config, mesh, init_fn, shardings, schedule)
      rows = jnp.linspace(0, 1, 16)[:, None, None, None]
      batch = {"image": jnp.ones((16, 16, 16, 3)) * rows, "label": jnp.arange(16, dtype=jnp.int32) % 2}
      for _ in range(4):
        state, metrics = step(state, batch)  # the state donated
      states[recipe] = state
    losses[recipe] = float(metrics["train/loss"])
  fc1 = states[fp8.DELAYED].fp8_history["blocks"]["mlp"]["fc1"]
  inputs, grads = np.asarray(fc1[fp8.INPUT_HISTORY]), np.asarray(fc1[fp8.GRAD_HISTORY])
  assert np.all(inputs[:, :4] > 0) and not np.any(inputs[:, 4:])
  assert np.all(grads[:, 0] > 0) and not np.any(grads[:, 1:])
  fc2 = np.asarray(states[fp8.DELAYED].fp8_history["blocks"]["mlp"]["fc2"][fp8.GRAD_HISTORY])
  assert np.all(fc2[:, :2] > 0) and not np.any(fc2[:, 2:])
  assert losses[fp8.DELAYED] == pytest.approx(losses["compute_dtype"], rel=0.02)
