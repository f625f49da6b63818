"""The run plan: a run checks the user's config once and never writes into it; what it derives (model fields an
init_from checkpoint implies, the schedule's anchor after a resume that changed its length) lives in the plan,
written as plan.json beside config.json, which holds what the command line asked."""

import copy
import json

from visionfm_jax import config_lib
from visionfm_jax.tools import workdir as workdir_lib
from visionfm_jax.training import checkpoint, init_from, plan, train

from test_bad_input import TINY, run_main_in_process


def _launch(workdir, monkeypatch, capsys, *overrides):
  """Runs main in this process; returns (its config as parsed, that config after the run, the number of times
  each field's domain was checked)."""
  parsed, checked = {}, []
  real_run, real_check = train.run, config_lib.check

  def run(config, *args, **kwargs):
    parsed["before"] = copy.deepcopy(config)
    try:
      return real_run(config, *args, **kwargs)
    finally:
      parsed["after"] = config

  def check(config):
    checked.append(1)
    return real_check(config)

  monkeypatch.setattr(train, "run", run)
  monkeypatch.setattr(config_lib, "check", check)
  status, _, err = run_main_in_process([*TINY, f"--workdir={workdir}", *overrides], monkeypatch, capsys)
  assert status == 0, err
  return parsed["before"], parsed["after"], len(checked)


def test_config_json_is_the_command_line_and_the_resume_anchor_is_in_plan_json(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  before, after, checks = _launch(workdir, monkeypatch, capsys, "--config.checkpoint_every=2")
  assert checks == 1  # validated once: main, before the devices; the run checks only the mesh against them
  assert after.to_json_best_effort() == before.to_json_best_effort()
  assert json.loads((workdir / "config.json").read_text()) == json.loads(before.to_json_best_effort())
  assert json.loads((workdir / "plan.json").read_text())["schedule_anchor"] is None

  before, after, checks = _launch(workdir, monkeypatch, capsys, "--config.checkpoint_every=2",
                                  "--config.total_steps=6", "--config.resume.allow_changes=total_steps")
  assert checks == 1 and after.to_json_best_effort() == before.to_json_best_effort()
  assert json.loads((workdir / "config.json").read_text()) == json.loads(before.to_json_best_effort())
  assert json.loads((workdir / "config.4.json").read_text()) == json.loads(before.to_json_best_effort())
  written = json.loads((workdir / "plan.json").read_text())
  assert written["schedule_anchor"]["step"] == 4 and written["resume_changes"] == ["config.total_steps 4 -> 6"]
  assert written["devices"] == 8 and written["mesh"]["fsdp"] * written["mesh"]["data"] == 8
  # the checkpoint carries the config it trained with and the anchor, which a later resume carries on
  saved = checkpoint.saved_config(str(workdir / "checkpoints"), 6)
  assert saved["total_steps"] == 6 and checkpoint.saved_schedule_anchor(str(workdir / "checkpoints"), 6)["step"] == 4


def test_fields_init_from_implies_go_to_the_plan_not_the_config(tmp_path):
  """A SwinV2 started from a checkpoint of smaller windows normalises its position bias by them: the plan's
  config carries them (and the checkpoint it writes), the user's keeps its ()."""
  meta = {"name": "swinv2", "depths": [2, 2], "patch": 2, "image_size": 16, "window_size": 4,
          "pretrained_window_sizes": []}
  (tmp_path / "model.json").write_text(json.dumps(meta))
  config = config_lib.base_config("swinv2")
  config.model.update(dict(variant="pico", patch_size=2, image_size=32, window_size=8))
  config.init_from = str(tmp_path)
  asked = config.to_json_best_effort()
  made = plan.make(config, str(tmp_path / "checkpoints"), num_devices=1, num_processes=1)
  assert made.derived == {"model.pretrained_window_sizes": (4, 4)}
  assert tuple(made.trains_with.model.pretrained_window_sizes) == (4, 4)
  assert made.trained_config()["model"]["pretrained_window_sizes"] == [4, 4]
  assert made.anchor is None and made.resume_changes == ()
  assert config.to_json_best_effort() == asked
  # What rebuilds the run's model from its workdir reads the plan too: a later init_from, and the tools.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort())
  assert init_from.source_model_fields(str(workdir))["pretrained_window_sizes"] == []
  made.write(str(workdir))
  assert init_from.source_model_fields(str(workdir))["pretrained_window_sizes"] == [4, 4]
  loaded = workdir_lib.load_config(str(workdir), (config.task,), "a SwinV2")
  assert tuple(loaded.model.pretrained_window_sizes) == (4, 4)
