"""Delayed FP8 scaling's amax histories (config.precision.gemm=fp8_delayed, training/fp8_history.py) through
`python -m visionfm_jax.main`: checkpointed with the state; a resume that turns the recipe off drops them and goes
on, one that turns it back on starts them empty and goes on, each logged."""

import json
import math
import subprocess

import numpy as np
import pytest

from visionfm_jax.training import checkpoint

from conftest import ROOT, compilation_cache_env, cpu_env

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
