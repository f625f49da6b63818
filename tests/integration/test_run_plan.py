"""The run plan: a run checks the user's config once and never writes into it; what it derives (the schedule's
anchor after a resume that changed its length, the mesh) lives in the plan, written as plan.json beside
config.json, which holds what the command line asked and alone rebuilds the model."""

import copy
import json

from configs import swinv2_cls
from visionfm_jax import config_lib, tasks
from visionfm_jax.parallel import distributed
from visionfm_jax.trained import workdir as workdir_lib
from visionfm_jax.training import checkpoint, checks, plan, train

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
  before, after, validations = _launch(workdir, monkeypatch, capsys, "--config.checkpoint_every=2")
  assert validations == 1  # validated once: main, before the devices; the run checks only the mesh against them
  assert after.to_json_best_effort() == before.to_json_best_effort()
  assert json.loads((workdir / "config.json").read_text()) == json.loads(before.to_json_best_effort())
  assert json.loads((workdir / "plan.json").read_text())["schedule_anchor"] is None

  before, after, validations = _launch(
    workdir,
    monkeypatch,
    capsys,
    "--config.checkpoint_every=2",
    "--config.total_steps=6",
    "--config.resume.allow_changes=total_steps",
  )
  assert validations == 1 and after.to_json_best_effort() == before.to_json_best_effort()
  assert json.loads((workdir / "config.json").read_text()) == json.loads(before.to_json_best_effort())
  assert json.loads((workdir / "config.4.json").read_text()) == json.loads(before.to_json_best_effort())
  written = json.loads((workdir / "plan.json").read_text())
  assert written["schedule_anchor"]["step"] == 4 and written["resume_changes"] == ["config.total_steps 4 -> 6"]
  assert written["devices"] == 8 and written["mesh"]["fsdp"] * written["mesh"]["data"] == 8
  # the checkpoint carries the config it trained with and the anchor, which a later resume carries on
  saved = checkpoint.saved_config(str(workdir / "checkpoints"), 6)
  assert saved["total_steps"] == 6 and checkpoint.saved_schedule_anchor(str(workdir / "checkpoints"), 6)["step"] == 4


def test_init_from_a_checkpoint_of_other_windows_is_one_error_line_naming_the_flag(tmp_path, monkeypatch, capsys):
  """The SwinV2 demo at twice its size from a checkpoint of the demo's windows (a tools.import_hf model.json): left
  at (), its pretrained windows are refused before any device is set up, naming the flag and the value; stated,
  the config.json the plan writes rebuilds the model as configured, pretrained windows included."""
  (tmp_path / "w4").mkdir()
  (tmp_path / "w4" / "model.json").write_text(
    json.dumps({"name": "swinv2", "depths": [2, 2, 2], "patch": 4, "image_size": 32, "window_size": 4})
  )
  args = [
    "--config=configs/swinv2_cls.py:demo",
    "--config.model.image_size=64",
    "--config.data.image_size=64",
    "--config.model.window_size=8",
    f"--config.init_from={tmp_path / 'w4'}",
    f"--workdir={tmp_path / 'run'}",
  ]
  joined = []
  monkeypatch.setattr(distributed, "initialize", lambda *args: joined.append(args))
  status, _, err = run_main_in_process(args, monkeypatch, capsys)
  assert status == 2 and err.strip().splitlines()[-1] == (
    "error: config.model.pretrained_window_sizes=() but the init_from checkpoint trained with (4, 4, 2): "
    'set --config.model.pretrained_window_sizes="(4, 4, 2)"'
  ), err[-4000:]
  assert not joined

  config = config_lib.set_paths(
    swinv2_cls.get_config("demo"),
    {
      "model.image_size": 64,
      "data.image_size": 64,
      "model.window_size": 8,
      "init_from": str(tmp_path / "w4"),
      "model.pretrained_window_sizes": (4, 4, 2),
    },
  )
  checks.validate(config, num_devices=1)
  run = tmp_path / "run"
  run.mkdir(exist_ok=True)
  plan.make(config, str(run / "checkpoints"), num_devices=1, num_processes=1).write(str(run), start_step=0)
  loaded = workdir_lib.load_config(str(run), (config.task,), "a SwinV2")
  rebuilt = tasks.build(loaded).model
  assert rebuilt == tasks.build(config).model and rebuilt.pretrained_window_sizes == (4, 4, 2)
