"""What lies in checkpoints/ besides the run's steps: a renamed step (`4.bad`), a foreign folder (`best`) and a
file under a step's name are named in one warning and ignored, a save moves whatever holds its step's name
aside, a requeue completes; a step copied in from a run of another model is refused naming it and the field; and
a stop line calls good only a checkpoint this run saved or read."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from visionfm_jax.errors import ConfigError
from visionfm_jax.training import checkpoint, train

from conftest import tiny_vit_config

# one worker builds the module's run (xdist would give each worker its own)
pytestmark = [pytest.mark.usefixtures("compilation_cache"), pytest.mark.xdist_group("step_folders")]


def _config(**overrides):
  return tiny_vit_config(
    **{"total_steps": 4, "checkpoint_every": 1, "log_every": 2, "eval_every": 4, "data.num_workers": 0, **overrides}
  )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A run to step 4 that kept checkpoints 2, 3 and 4."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  train.run(_config(), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3", "4"]
  return workdir


def _copy(run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  return workdir, workdir / "checkpoints"


def test_a_renamed_step_and_a_foreign_folder_are_named_ignored_and_a_requeue_completes(finished_run, tmp_path, caplog):
  workdir, checkpoints = _copy(finished_run, tmp_path)
  (checkpoints / "4").rename(checkpoints / "4.bad")
  (checkpoints / "best").mkdir()
  (checkpoints / "best" / "notes.txt").write_text("the best eval so far")
  ignored = f"{checkpoints} holds 2 entries that no resume reads, ignored: 4.bad, best"
  with caplog.at_level(logging.INFO):
    last = train.run(_config(), str(workdir))
  assert ignored in caplog.text and f"mv -T {checkpoints}/4.bad {checkpoints}/<step>" in caplog.text
  assert f"resuming from {checkpoints}/3" in caplog.text
  assert last["step"] == 4 and np.isfinite(last["train/loss"])
  assert sorted(os.listdir(checkpoints)) == ["2", "3", "4", "4.bad", "best"]
  caplog.clear()
  with caplog.at_level(logging.INFO):
    again = train.run(_config(), str(workdir))  # the requeue of a finished run
  assert ignored in caplog.text and f"resuming from {checkpoints}/4" in caplog.text
  assert again["step"] == 4
  assert sorted(os.listdir(checkpoints)) == ["2", "3", "4", "4.bad", "best"]


def test_a_file_under_a_steps_name_is_moved_aside_before_that_step_is_saved(finished_run, tmp_path, caplog):
  workdir, checkpoints = _copy(finished_run, tmp_path)
  (checkpoints / "4").rename(checkpoints / "4.bad")
  (checkpoints / "4").write_text("not a checkpoint")
  with caplog.at_level(logging.INFO):
    last = train.run(_config(), str(workdir))
  assert "ignored: 4, 4.bad (" in caplog.text
  assert "carries no config" not in caplog.text  # the file is no step: the resume compares step 3's config
  assert (
    f"moved the replaced checkpoint {checkpoints}/4 to {checkpoints}/4.replaced; this run saves step 4 again"
    in caplog.text
  )
  assert last["step"] == 4
  assert (checkpoints / "4.replaced").read_text() == "not a checkpoint"
  assert checkpoint.newest_committed_step(checkpoints) == 4 and checkpoint.saved_config(checkpoints, 4) is not None


def _small_state(value: float):
  return {"w": jax.numpy.full((8,), value, np.float32)}


def test_a_save_of_a_step_orbax_lists_moves_it_aside_instead_of_failing(tmp_path):
  """Orbax refuses to save a step it lists (StepAlreadyExistsError); the run's save moves the old one aside."""
  saver = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  saver.save(1, _small_state(1.0))
  saver.save(1, _small_state(2.0))
  saver.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "1.replaced"]
  reader = checkpoint.Checkpointer(str(tmp_path / "."), async_save=False)
  assert float(reader.restore(1, _small_state(0.0))["w"][0]) == 2.0
  reader.close()


def test_a_step_from_a_run_of_another_model_at_the_newest_position_is_refused(finished_run, tmp_path):
  other = tmp_path / "other"
  train.run(_config(total_steps=5, checkpoint_every=5, eval_every=5, **{"model.variant": "mu/4"}), str(other))
  workdir, checkpoints = _copy(finished_run, tmp_path)
  shutil.copytree(other / "checkpoints" / "5", checkpoints / "5")
  with pytest.raises(ConfigError) as refusal:
    train.run(_config(total_steps=6), str(workdir))
  assert str(refusal.value) == (
    f"cannot resume {checkpoints}/5: another run saved it, with another model, task, precision or data than this "
    f"run and {checkpoints}/4 before it: config.model.variant 'mu/4' -> 'pico/4'; move it aside (mv -T "
    f"{checkpoints}/5 {checkpoints}/5.foreign) to resume from {checkpoints}/4"
  )
  (checkpoints / "5").rename(checkpoints / "5.foreign")  # as the line says: the run resumes, warning of nothing
  assert checkpoint.newest_committed_step(checkpoints) == 4 and not checkpoint._strays(checkpoints)


def test_a_stop_line_calls_good_only_a_checkpoint_this_run_verified(tmp_path):
  first = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  for step in (1, 2):
    first.save(step, _small_state(step))
  first.close()
  restart = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  assert restart.vouched_steps() == set()
  restart.restore(2, _small_state(0.0))
  restart.save(3, _small_state(3.0))
  assert restart.vouched_steps() == {2, 3}
  assert checkpoint.last_good_text(tmp_path, restart.all_steps(), restart.vouched_steps()) == f"{tmp_path}/3"
  # health's candidates before a trigger: step 1 was never read by this run, so it is not called good
  assert (
    checkpoint.last_good_text(tmp_path, [1], restart.vouched_steps())
    == f"none verified (the newest committed, unverified: {tmp_path}/1)"
  )
  assert checkpoint.last_good_text(tmp_path, [1, 2, 4], {2}) == f"{tmp_path}/2 (a newer one, unverified: {tmp_path}/4)"
  assert checkpoint.last_good_text(tmp_path, [], set()) == "none"
  restart.close()
  unchecked = checkpoint.Checkpointer(str(tmp_path), async_save=False, with_digests=False)
  unchecked.restore(3, _small_state(0.0))  # whatever bytes are there: read, not verified
  unchecked.save(4, _small_state(4.0))
  assert unchecked.vouched_steps() == set()
  unchecked.close()
