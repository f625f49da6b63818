"""A resume compares its config with the checkpoint's: another model, precision or data is refused naming each
field old -> new (not called an unreadable checkpoint, nothing moved); a changed schedule needs
config.resume.allow_changes, and then runs (logged with the lr before and after); total_steps at or below the
checkpoint's step is an error; every launch's config is kept."""

import json
import logging
import os
import shutil

import pytest

from conftest import tiny_vit_config
from visionfm_jax import config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.training import train


def _tiny_config(**overrides):
  config = tiny_vit_config(**{"total_steps": 4, "checkpoint_every": 2, "eval_every": 100, "log_every": 1,
                              **overrides})
  config.data.num_workers = 0
  config.data.eval_examples = 16
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir of the tiny ViT trained 4 steps (checkpoints 2 and 4; read-only: copy it to change it)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  train.run(_tiny_config(), str(workdir))
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "run")
  return tmp_path / "run"


def test_another_model_or_precision_is_refused_naming_each_field(workdir):
  config = _tiny_config(**{"model.pool": "cls", "precision.compute_dtype": "bfloat16", "total_steps": 6})
  with pytest.raises(ConfigError) as refused:
    train.run(config, str(workdir))
  message = str(refused.value)
  assert message.startswith(f"cannot resume {workdir}/checkpoints/4: it was trained with another model")
  assert "config.model.pool 'gap' -> 'cls'" in message
  assert "config.precision.compute_dtype 'float32' -> 'bfloat16'" in message
  assert "total_steps" not in message and "unreadable" not in message
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_a_schedule_change_needs_allow_changes_and_then_continues_logged(workdir, caplog):
  config = _tiny_config(**{"total_steps": 6, "optim.lr": 2e-3})
  with pytest.raises(ConfigError, match=r"config.optim.lr 0.001 -> 0.002, config.total_steps 4 -> 6; to continue "
                                        r"with these, pass --config.resume.allow_changes=optim.lr,total_steps$"):
    train.run(config, str(workdir))
  config.resume.allow_changes = "optim.lr,total_steps"
  with caplog.at_level(logging.INFO):
    last = train.run(config, str(workdir))
  assert last["step"] == 6
  assert (f"resuming {workdir}/checkpoints/4 with config.optim.lr 0.001 -> 0.002, config.total_steps 4 -> 6 "
          f"(config.resume.allow_changes); train/lr at step 4: ") in caplog.text
  launches = {name: json.loads((workdir / name).read_text()) for name in ("config.0.json", "config.4.json")}
  assert launches["config.0.json"]["total_steps"] == 4 and launches["config.4.json"]["total_steps"] == 6


def test_total_steps_at_or_below_the_checkpoint_is_an_error(workdir):
  config = _tiny_config(**{"total_steps": 3, "resume.allow_changes": "total_steps"})
  with pytest.raises(ConfigError, match=rf"config.total_steps=3 is at or below the step of {workdir}/checkpoints/4"):
    train.run(config, str(workdir))


def test_a_finished_run_rerun_unchanged_trains_nothing_and_keeps_both_launch_configs(workdir):
  assert train.run(_tiny_config(), str(workdir))["step"] == 4
  assert sorted(n for n in os.listdir(workdir) if n.startswith("config.")) == [
      "config.0.json", "config.4.json", "config.json"]
  assert train.run(_tiny_config(), str(workdir))["step"] == 4
  assert (workdir / "config.4.1.json").exists()  # never overwritten


def test_resume_rules_classify_fields():
  assert [config_lib.resume_kind(p) for p in ("model.variant", "data.source", "task", "optim.freeze")] == [
      config_lib.REFUSED] * 4
  assert [config_lib.resume_kind(p) for p in ("total_steps", "optim.lr", "global_batch_size", "seed")] == [
      config_lib.OPT_IN] * 4
  assert [config_lib.resume_kind(p) for p in ("log_every", "strategy", "mesh.fsdp", "data.num_workers")] == [
      config_lib.FREE] * 4


def test_allow_changes_names_fields():
  config = _tiny_config(**{"resume.allow_changes": "total_step"})
  with pytest.raises(ConfigError, match=r"config.resume.allow_changes='total_step': 'total_step' is no field; did "
                                        r"you mean total_steps"):
    config_lib.validate(config)
