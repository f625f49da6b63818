"""Trackers (training/infra/trackers.py, config.report_to): W&B (offline) and MLflow (sqlite in the workdir) hold, per
step, metrics.jsonl's values through rewinds, resumes and failures, read back with their own libraries
(tests/tracker_runs.py). The rollback through the loop: test_health; two processes: test_multiprocess."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from visionfm_jax import config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.training.infra import metrics, trackers

from conftest import ROOT, compilation_cache_env
from test_bad_input import run_main_in_process
import test_tensorboard
from tracker_runs import INSTALLED, jsonl_scalars, mlflow_runs, wandb_runs

ALL = "tensorboard,wandb,mlflow"
needs_both = pytest.mark.skipif(INSTALLED != ("wandb", "mlflow"), reason="pip install -e '.[wandb,mlflow]'")
PICTURE = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4


def _config(**fields):
  """The base config reporting to every tracker; `fields`: dotted overrides (optim__lr for optim.lr)."""
  return config_lib.set_paths(
    config_lib.base_config(), {"report_to": ALL, **{k.replace("__", "."): v for k, v in fields.items()}}
  )


def _write(writer, steps, scale):
  for step in steps:
    writer.write(step, {"train/loss": step * scale, "train/lr": 0.5})


@needs_both
def test_histories_equal_metrics_jsonl_through_a_rollback_a_crash_a_failure_and_a_preemption(tmp_path):
  workdir = str(tmp_path / "run")
  # Steps 1-30; a rollback to 20 (its kept row, then the rollback's counts at 20); steps 21-40 trained again.
  writer = metrics.MetricWriter(workdir, 0, _config())
  _write(writer, range(1, 31), 1.0)
  writer.rewind(20, "trained again after a rollback")
  writer.write(20, {"health/rollbacks": 1.0})
  _write(writer, range(21, 41), 2.0)
  writer.panel(40, PICTURE)
  writer.close(final={"eval/val/top1": 0.5})
  assert os.listdir(tmp_path / "run" / "panels") == ["step_40.png"]
  # A crash after step 40 with checkpoint 35 the newest: the rerun resumes at 35 with another lr, then fails.
  writer = metrics.MetricWriter(workdir, 35, _config(optim__lr=0.25))
  assert os.listdir(tmp_path / "run" / "panels") == []  # step 40 is trained again
  _write(writer, range(36, 51), 3.0)
  writer.close(final=None)
  (failed,) = mlflow_runs(workdir).values()
  assert failed["status"] == "FAILED"
  # A preemption saved step 50, the last logged: the rerun continues the runs without a rewind.
  writer = metrics.MetricWriter(workdir, 50, _config())
  _write(writer, range(51, 56), 4.0)
  writer.panel(55, PICTURE)
  writer.close(final={"eval/val/top1": 0.75, "train/loss": 220.0})
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "run" / "panels" / "step_55.png")), PICTURE)
  *_, last_file = test_tensorboard.read_event_files(tmp_path / "run" / "tensorboard")
  np.testing.assert_array_equal(test_tensorboard.images_by_step(last_file)[55]["panel"], PICTURE)

  want = jsonl_scalars(workdir)
  assert sorted(want) == list(range(1, 56))
  assert want[20] == {"train/loss": 20.0, "train/lr": 0.5, "health/rollbacks": 1.0}
  assert want[36]["train/loss"] == 108.0
  ids = json.loads((tmp_path / "run" / trackers.IDS_FILE).read_text())

  ((run_id, run),) = wandb_runs(workdir).items()
  assert run_id == ids["wandb"]["id"]
  assert run["segments"] == 4 and run["rewinds"] == [19, 34]  # the rollback, then the crash (the preemption none)
  assert run["exit_codes"] == [0, 0, 1, 0]
  assert run["history"] == want
  assert run["summary"]["eval/val/top1"] == 0.75
  assert [key for key in run["images"]] == [(55, "panel")] and run["images"][55, "panel"]["width"] == 5

  ((mlflow_id, run),) = mlflow_runs(workdir).items()
  assert mlflow_id == ids["mlflow"]["run_id"]
  assert run["status"] == "FINISHED" and run["experiment"] == "visionfm_jax"
  assert run["history"] == want
  assert run["params"]["optim.lr"] == "0.001" and run["params"]["optim.lr from step 35"] == "0.25"
  assert sorted(run["artifacts"]) == ["panels", "summary.json"]


@needs_both
def test_a_refused_wandb_rewind_continues_the_run_without_sending_its_steps_again(tmp_path, monkeypatch, caplog):
  """A W&B server without run rewind (a preview feature): the run continues under its id, the steps it already
  holds are not sent again (W&B would drop them), and a warning says their values are the abandoned ones."""
  import wandb  # pylint: disable=g-import-not-at-top

  init = wandb.init

  def init_without_rewind(**kwargs):
    if "resume_from" in kwargs:
      raise wandb.errors.CommError("rewind is not enabled for this entity")
    return init(**kwargs)

  monkeypatch.setattr(wandb, "init", init_without_rewind)
  workdir = str(tmp_path / "run")
  writer = metrics.MetricWriter(workdir, 0, _config(report_to="wandb"))
  _write(writer, range(1, 11), 1.0)
  writer.rewind(5, "trained again after a rollback")
  _write(writer, range(6, 13), 2.0)
  writer.close(final={})
  (run,) = wandb_runs(workdir).values()
  # W&B's files, named in a failure
  files = sorted(str(p.relative_to(workdir)) for p in pathlib.Path(workdir, "wandb").rglob("*.wandb"))
  assert run["segments"] == 2 and run["rewinds"] == [], (run["segments"], run["exit_codes"], files)
  assert {step: row["train/loss"] for step, row in run["history"].items()} == {
    **{s: float(s) for s in range(1, 11)},
    11: 22.0,
    12: 24.0,
  }, files
  assert "W&B did not rewind run" in caplog.text and "preview feature" in caplog.text


def test_report_to_none_writes_metrics_jsonl_alone(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path / "run"), 0, _config(report_to="none"))
  _write(writer, range(1, 3), 1.0)
  writer.close(final={})
  assert os.listdir(tmp_path / "run") == ["metrics.jsonl"]


def test_a_tracker_that_is_not_installed_is_one_error_line_naming_its_extra(tmp_path, monkeypatch, capsys):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
  status, _, err = run_main_in_process(
    ["--config=configs/vit_huge.py:demo", "--config.report_to=tensorboard,wandb", f"--workdir={tmp_path / 'run'}"],
    monkeypatch,
    capsys,
  )
  assert status == 2
  assert err.strip() == (
    "error: config.report_to='tensorboard,wandb': wandb is not installed (no module 'wandb'): pip install -e '.[wandb]'"
  )
  assert not (tmp_path / "run").exists()


TINY = [
  "--config=configs/vit_huge.py:demo",
  "--config.model.variant=pico/4",
  "--config.model.image_size=16",
  "--config.data.image_size=16",
  "--config.global_batch_size=16",
  "--config.optim.warmup_steps=2",
  "--config.data.eval_examples=16",
  "--config.data.num_workers=0",
  "--config.progress_bar=False",
  "--config.checkpoint_every=6",
  "--config.log_every=1",
  "--config.eval_every=12",
  "--config.total_steps=24",
  f"--config.report_to={ALL}",
]
# The run of `main` whose process is killed outright (SIGKILL: no cleanup) right after it has logged step KILL_AT.
_KILLED_MAIN = """
import os, signal, sys
from absl import app
from visionfm_jax import main as entry
from visionfm_jax.training.infra import metrics
write = metrics.MetricWriter.write
def write_then_die(self, step, values):
  write(self, step, values)
  if step == int(os.environ["KILL_AT"]) and "train/loss" in values:
    os.kill(os.getpid(), signal.SIGKILL)
metrics.MetricWriter.write = write_then_die
sys.argv = ["visionfm_jax/main.py", *sys.argv[1:]]
app.run(entry.main, flags_parser=entry._parse_flags)
"""


@pytest.mark.slow
@needs_both
def test_a_run_killed_between_checkpoints_and_resumed_through_main_keeps_one_run_per_tracker(
  tmp_path, compilation_cache, warm_python
):
  """Killed after logging step 17 (checkpoint 12 the newest, 5 steps for its save to commit), rerun to 24: one W&B
  run, which the kill left without what W&B had not yet written, rewound to its start and given metrics.jsonl's rows
  1-12 again, then 13-24; one MLflow run, FINISHED; both hold metrics.jsonl's values, and the console names both."""
  workdir = tmp_path / "run"
  env = dict(os.environ, KILL_AT="17", **compilation_cache_env(compilation_cache))
  args = [*TINY, f"--workdir={workdir}"]
  killed = subprocess.run(
    [sys.executable, "-c", _KILLED_MAIN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["6", "12"]
  rerun = subprocess.run(
    [warm_python.python, "-m", "visionfm_jax.main", *args],
    cwd=ROOT,
    env=warm_python.env(env),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert "could not start" not in rerun.stderr and "no more metrics go to it" not in rerun.stderr, rerun.stderr[-4000:]

  want = jsonl_scalars(workdir)
  assert sorted(want) == list(range(1, 25))
  ids = json.loads((workdir / trackers.IDS_FILE).read_text())
  ((run_id, run),) = wandb_runs(workdir).items()
  assert run_id == ids["wandb"]["id"] and run["rewinds"] == [0] and ids["wandb"]["closed"]
  assert run["history"] == want
  assert run["exit_codes"][-1] == 0
  assert run["summary"]["eval/val/top1"] == want[24]["eval/val/top1"]
  assert f"W&B run {run_id}: {workdir / 'wandb'}/offline-run-" in rerun.stderr

  ((mlflow_id, run),) = mlflow_runs(workdir).items()
  assert mlflow_id == ids["mlflow"]["run_id"] and run["status"] == "FINISHED"
  assert run["history"] == want
  assert sorted(run["artifacts"]) == ["config.json", "panels", "summary.json"]
  assert sorted(wandb_runs(workdir)[run_id]["images"]) == [(12, "panel"), (24, "panel")]  # step 12's sent again
  assert run["params"]["model.variant"] == "pico/4"
  assert f"MLflow run {mlflow_id} in sqlite:///{workdir}/mlflow.db" in rerun.stderr


@pytest.mark.parametrize("value", ["none,wandb", "", "tensorboard,,comet"])
def test_report_to_names_are_checked(value):
  config = _config(report_to=value)
  with pytest.raises(ConfigError, match="config.report_to"):
    config_lib.report_to(config)
