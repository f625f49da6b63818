"""A resume compares its config with the checkpoint's: another model, precision or data is refused naming each
field old -> new (not called an unreadable checkpoint, nothing moved); a changed schedule needs
config.resume.allow_changes, and then runs (logged with the lr before and after): a longer run continues the
rate it had reached, a new lr jumps as asked; total_steps at or below the checkpoint's step is an error; every
launch's config is kept."""

import json
import logging
import math
import os
import shutil

import pytest

from visionfm_jax import config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.training import checkpoint, train

from conftest import tiny_vit_config

# one worker trains the module's run (xdist would give each worker its own); resumes of one config compile once
pytestmark = [pytest.mark.usefixtures("compilation_cache"), pytest.mark.xdist_group("resume_changes")]


def _tiny_config(**overrides):
  config = tiny_vit_config(**{"total_steps": 6, "checkpoint_every": 2, "eval_every": 100, "log_every": 1, **overrides})
  config.data.num_workers = 0
  config.data.eval_examples = 16
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir of the tiny ViT trained 6 steps (checkpoints 2, 4 and 6; read-only: copy it to change it)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  train.run(_tiny_config(), str(workdir))
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "run")
  return tmp_path / "run"


def test_another_model_or_precision_is_refused_naming_each_field(workdir):
  config = _tiny_config(**{"model.pool": "cls", "precision.compute_dtype": "bfloat16", "total_steps": 8})
  with pytest.raises(ConfigError) as refused:
    train.run(config, str(workdir))
  message = str(refused.value)
  assert message.startswith(f"cannot resume {workdir}/checkpoints/6: it was trained with another model")
  assert "config.model.pool 'gap' -> 'cls'" in message
  assert "config.precision.compute_dtype 'float32' -> 'bfloat16'" in message
  assert "total_steps" not in message and "unreadable" not in message
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


def _train_lr(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}


def test_fp8_gemms_and_the_stack_form_switch_at_a_resume(workdir):
  """precision.gemm and model.scan_unroll change how the step computes, not its params or state: a resume may turn
  FP8 on and unroll the stack without allow_changes, and the run goes on from the checkpoint's step."""
  config = _tiny_config(
    **{"total_steps": 8, "resume.allow_changes": "total_steps", "precision.gemm": "fp8", "model.scan_unroll": 0}
  )
  last = train.run(config, str(workdir))
  assert last["step"] == 8 and math.isfinite(last["train/loss"])
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r][-2:] == [7, 8]


def test_the_optimizer_state_moves_over_data_at_a_resume(workdir):
  """A ddp run's checkpoint resumes as zero3 on a data 2 x fsdp 4 mesh with the optimizer state over both
  (config.optimizer_over_data) and the patch embedding kept whole (config.sharding.overrides): the restore lays
  the params and moments out anew, without allow_changes, and the next checkpoint's config records the layout."""
  overrides = (("^patch_embed/kernel$", "replicated"),)
  config = _tiny_config(
    **{
      "total_steps": 8,
      "resume.allow_changes": "total_steps",
      "optimizer_over_data": True,
      "strategy": "zero3",
      "mesh.data": 2,
      "mesh.fsdp": 4,
      "sharding.overrides": overrides,
    }
  )
  last = train.run(config, str(workdir))
  assert last["step"] == 8 and math.isfinite(last["train/loss"])
  assert checkpoint.saved_config(str(workdir / "checkpoints"), 8)["sharding"]["overrides"] == [
    ["^patch_embed/kernel$", "replicated"]
  ]


def test_a_new_lr_needs_allow_changes_and_then_takes_the_new_schedule(workdir, caplog):
  config = _tiny_config(**{"total_steps": 8, "optim.lr": 2e-3})
  with pytest.raises(
    ConfigError,
    match=r"config.optim.lr 0.001 -> 0.002, config.total_steps 6 -> 8; to continue "
    r"with these, pass --config.resume.allow_changes=optim.lr,total_steps$",
  ):
    train.run(config, str(workdir))
  config.resume.allow_changes = "optim.lr,total_steps"
  with caplog.at_level(logging.INFO):
    last = train.run(config, str(workdir))
  assert last["step"] == 8
  assert (
    f"resuming {workdir}/checkpoints/6 with config.optim.lr 0.001 -> 0.002, config.total_steps 6 -> 8 "
    f"(config.resume.allow_changes); train/lr at step 6: 0 -> 0.0005"
  ) in caplog.text  # the jump asked for
  launches = {name: json.loads((workdir / name).read_text()) for name in ("config.0.json", "config.6.json")}
  assert launches["config.0.json"]["total_steps"] == 6 and launches["config.6.json"]["total_steps"] == 8


def test_a_longer_run_continues_the_rate_it_had_reached(workdir, caplog):
  """Resumed at step 4 of 6 with total_steps 10: the rate of step 5 is the one the 6-step run had (no jump to
  the 10-step cosine's), then decays to 0 over the 6 steps left; a further resume keeps that anchor."""
  before = _train_lr(workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  config = _tiny_config(**{"total_steps": 10, "resume.allow_changes": "total_steps"})
  with caplog.at_level(logging.INFO):
    train.run(config, str(workdir))
  after = _train_lr(workdir)
  assert "train/lr at step 4: 0.0005 -> 0.0005" in caplog.text
  assert after[5] == pytest.approx(before[5])  # the rate at step 4 (row 5 logs the rate its step applied)
  assert after[5] > after[6] > after[8] > after[10] > 0 and after[6] > before[6]
  assert json.loads((workdir / "plan.json").read_text())["schedule_anchor"] == {"step": 4, "lr": pytest.approx(5e-4)}
  assert json.loads((workdir / "config.4.json").read_text()) == json.loads(config.to_json_best_effort())

  shutil.rmtree(workdir / "checkpoints" / "10")  # resumed again at 8, unchanged: the same rates
  train.run(_tiny_config(**{"total_steps": 10}), str(workdir))
  assert _train_lr(workdir) == pytest.approx(after)


def test_total_steps_at_or_below_the_checkpoint_is_an_error(workdir):
  config = _tiny_config(**{"total_steps": 5, "resume.allow_changes": "total_steps"})
  with pytest.raises(ConfigError, match=rf"config.total_steps=5 is at or below the step of {workdir}/checkpoints/6"):
    train.run(config, str(workdir))


def test_a_finished_run_rerun_unchanged_trains_nothing_and_keeps_both_launch_configs(workdir):
  assert train.run(_tiny_config(), str(workdir))["step"] == 6
  assert sorted(n for n in os.listdir(workdir) if n.startswith("config.")) == [
    "config.0.json",
    "config.6.json",
    "config.json",
  ]
  assert train.run(_tiny_config(), str(workdir))["step"] == 6
  assert (workdir / "config.6.1.json").exists()  # never overwritten


def test_resume_rules_classify_fields():
  for path in (
    "model.attention",
    "model.text.attention",
    "model.image.remat_policy",
    "model.scan_unroll",
    "precision.gemm",
  ):
    assert config_lib.resume_kind(path) == config_lib.FREE, path
  assert config_lib.resume_kind("model.text.variant") == config_lib.REFUSED
  assert [config_lib.resume_kind(p) for p in ("model.variant", "data.source", "task", "optim.freeze")] == [
    config_lib.REFUSED
  ] * 4
  assert [config_lib.resume_kind(p) for p in ("total_steps", "optim.lr", "global_batch_size", "seed")] == [
    config_lib.OPT_IN
  ] * 4
  free = (
    "log_every",
    "strategy",
    "optimizer_over_data",
    "mesh.fsdp",
    "sharding.overrides",
    "data.num_workers",
    "health.window",
  )
  assert [config_lib.resume_kind(p) for p in free] == [config_lib.FREE] * 7


def test_allow_changes_names_fields():
  config = _tiny_config(**{"resume.allow_changes": "total_step"})
  with pytest.raises(
    ConfigError,
    match=r"config.resume.allow_changes='total_step': 'total_step' is no field; did "
    r"you mean total_steps",
  ):
    config_lib.check(config)
