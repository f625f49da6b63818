"""What guards a resume cannot be lost or misread silently, through `python -m visionfm_jax.main`: a checkpoint
whose saved config is deleted or emptied is refused (one `error:` line naming the file and
`--config.resume.allow_changes=missing_config`, which resumes it unchecked), and a step's folder renamed to another
number is refused naming the step its state holds, whether it is the newest or the one a resume falls back on."""

import shutil

import pytest

from test_bad_input import TINY, run_main_in_process, write_tiny_workdir


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir of TINY's model with one checkpoint, step 2 (zeros, its data iterator and config), and its data's
  record, written without training (read-only: copy it)."""
  workdir = tmp_path_factory.mktemp("saved") / "run"
  write_tiny_workdir(workdir)
  return workdir


def _main(workdir, monkeypatch, capsys, *args) -> tuple[int, list[str], str]:
  """(exit status, the `error:` lines, stderr) of main resuming `workdir` with TINY (total_steps 2 -> 4)."""
  status, _, err = run_main_in_process([*TINY, f"--workdir={workdir}", *args], monkeypatch, capsys)
  return status, [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.mark.parametrize("emptied", [None, "{}", ""], ids=["deleted", "braces", "zero_bytes"])
def test_a_checkpoint_without_its_config_is_refused_naming_the_file_and_the_override(
  saved, tmp_path, emptied, monkeypatch, capsys, caplog
):
  workdir = shutil.copytree(saved, tmp_path / "run")
  config_file = workdir / "checkpoints" / "2" / "config" / "config.json"
  if emptied is None:
    config_file.unlink()
  else:
    config_file.write_text(emptied)
  status, errors, err = _main(workdir, monkeypatch, capsys, "--config.optim.lr=0.002")
  why = "is missing" if emptied is None else f"holds no config ({emptied!r})"
  assert status == 2 and errors == [
    f"error: cannot resume {workdir}/checkpoints/2: {config_file} {why}, so this run's config cannot be compared "
    f"with the one it trained with; restore that file, or pass --config.resume.allow_changes=missing_config to "
    f"resume it unchecked"
  ], err[-3000:]
  if emptied is None:  # accepted when named: the dry run checks the resume as a run does
    status, errors, err = _main(
      workdir,
      monkeypatch,
      capsys,
      "--config.optim.lr=0.002",
      "--dry_run",
      "--config.resume.allow_changes=missing_config",
    )
    assert status == 0 and not errors, err[-3000:]
    assert (
      f"resuming {workdir}/checkpoints/2, which carries no config ({config_file} is missing), unchecked" in caplog.text
    )


def test_a_step_folder_renamed_to_another_number_is_refused_naming_the_saved_step(saved, tmp_path, monkeypatch, capsys):
  workdir = shutil.copytree(saved, tmp_path / "run")
  checkpoints = workdir / "checkpoints"
  (checkpoints / "2").rename(checkpoints / "3")
  status, errors, err = _main(workdir, monkeypatch, capsys, "--config.resume.allow_changes=total_steps")
  assert status == 2 and errors == [
    f"error: checkpoint {checkpoints}/3 holds step 2 (the step saved in its state), not 3: a step's folder renamed "
    f"or copied in under another number; rename it to its step (mv -T {checkpoints}/3 {checkpoints}/2) or move it "
    f"out of {checkpoints}"
  ], err[-3000:]


def test_a_misnamed_step_behind_an_unreadable_newest_is_refused_and_nothing_is_moved(
  saved, tmp_path, monkeypatch, capsys
):
  """The newest (4) unreadable, the resume falls back on a folder 3 that holds step 2 beside the real step 2."""
  workdir = shutil.copytree(saved, tmp_path / "run")
  checkpoints = workdir / "checkpoints"
  shutil.copytree(checkpoints / "2", checkpoints / "3")
  shutil.copytree(checkpoints / "2", checkpoints / "4")
  (checkpoints / "4" / "state" / "_METADATA").write_text("{garbled")
  status, errors, err = _main(
    workdir, monkeypatch, capsys, "--config.resume.allow_changes=total_steps", "--config.total_steps=6"
  )
  assert status == 2 and errors == [
    f"error: checkpoint {checkpoints}/3 holds step 2 (the step saved in its state), not 3: a step's folder renamed "
    f"or copied in under another number; move it out of {checkpoints} ({checkpoints}/2 is there already)"
  ], err[-3000:]
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "3", "4"]
