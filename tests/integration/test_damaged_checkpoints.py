"""`visionfm_jax.load` and tools.evaluate on a workdir whose newest checkpoint is damaged (a deleted chunk, a missing
_METADATA, params whose bytes fail their digests) take the newest checkpoint whose params are intact, as a resume
takes the newest it can restore, with one warning naming the damaged part and the step taken; a damaged step asked
for by number is one error naming the argument and the part; errors name the caller's own arguments (`load`'s
path, step, ema; the tool's flags), never init_from; a failed read prints no asyncio tracebacks after its error."""

import json
import logging
import os
import re
import shutil
import subprocess

import pytest

import visionfm_jax
from visionfm_jax import tasks
from visionfm_jax.errors import CheckpointError, UserError
from visionfm_jax.training import checkpoint, checkpoint_digests

from conftest import ROOT, random_params, tiny_vit_config


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A tiny ViT's workdir with checkpoints 1 and 2 of random params (read-only: copy it)."""
  workdir = tmp_path_factory.mktemp("damaged") / "run"
  config = tiny_vit_config()
  params = random_params(tasks.build(config))
  saver = checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  for step in (1, 2):
    saver.save(step, {"params": params})
  saver.close()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  return workdir


def _copy(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / "run")
  return tmp_path / "run"


def _delete_a_chunk(workdir) -> str:
  """Deletes the largest data file of step 2's params; returns the step's folder."""
  step_dir = workdir / "checkpoints" / "2"
  os.remove(max(step_dir.glob("state/ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size))
  return str(step_dir)


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_load_takes_the_newest_step_whose_params_are_intact_naming_the_damaged_one(two_steps, tmp_path, caplog):
  workdir = _copy(two_steps, tmp_path)
  os.remove(workdir / "checkpoints" / "2" / "state" / "_METADATA")
  with caplog.at_level(logging.WARNING):
    model = visionfm_jax.load(str(workdir))
  assert model.step == 1
  assert _warnings(caplog) == [
    f"checkpoint {workdir}/checkpoints/2: cannot read its params: state/_METADATA is "
    f"missing or unreadable; taking step 1, the newest checkpoint whose params are intact"
  ]


def test_load_of_a_damaged_step_by_number_is_one_error_naming_the_part(two_steps, tmp_path):
  workdir = _copy(two_steps, tmp_path)
  digests_file = workdir / "checkpoints" / "2" / checkpoint_digests.ITEM / "process_0-of-1.json"
  saved = json.loads(digests_file.read_text())
  name = next(n for n in saved["arrays"] if n.startswith("params/"))
  bounds = next(iter(saved["arrays"][name]["slices"]))
  saved["arrays"][name]["slices"][bounds] = "0" * 32
  digests_file.write_text(json.dumps(saved))
  with pytest.raises(CheckpointError) as caught:
    visionfm_jax.load(str(workdir), step=2)
  message = str(caught.value)
  assert message.startswith(
    f"step=2: checkpoint {workdir}/checkpoints/2 is corrupt: the bytes of {name}[{bounds}] differ"
  ), message
  assert "init_from" not in message and message.endswith("steps there: [1, 2]")
  assert visionfm_jax.load(str(workdir)).step == 1


def test_loads_errors_name_its_own_arguments(two_steps, tmp_path):
  with pytest.raises(UserError, match=r"^step=7: no such checkpoint"):
    visionfm_jax.load(str(two_steps), step=7)
  with pytest.raises(UserError, match=r"^ema: .*holds no EMA of the params"):
    visionfm_jax.load(str(two_steps), ema=True)
  with pytest.raises(UserError, match=rf"^path={re.escape(str(tmp_path))}/nowhere: no such directory"):
    visionfm_jax.load(str(tmp_path / "nowhere"))
  workdir = _copy(two_steps, tmp_path)
  for step in (1, 2):
    os.remove(workdir / "checkpoints" / str(step) / "state" / "_METADATA")
  with pytest.raises(
    CheckpointError,
    match=rf"^path={re.escape(str(workdir))}: no checkpoint whose params are "
    r"intact: .*/2: cannot read its params: state/_METADATA is missing or unreadable; .*/1: ",
  ):
    visionfm_jax.load(str(workdir))


def test_evaluate_after_a_deleted_chunk_takes_the_intact_step_with_one_warning_and_no_asyncio_noise(
  two_steps, tmp_path, warm_python
):
  workdir = _copy(two_steps, tmp_path)
  step_dir = _delete_a_chunk(workdir)
  run = subprocess.run(
    [warm_python.python, "-m", "visionfm_jax.tools.evaluate", f"--checkpoint={workdir}", "--batch_size=8"],
    env=warm_python.env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert json.loads(run.stdout.splitlines()[-1])["step"] == 1
  warnings = [line for line in run.stderr.splitlines() if "WARNING" in line or line.startswith("W")]
  assert len(warnings) == 1, run.stderr
  assert re.search(
    rf"checkpoint {re.escape(step_dir)}: cannot read its params: .*Error reading \"params\.[\w.]+/"
    r".*; taking step 1, the newest checkpoint whose params are intact$",
    warnings[0],
  ), warnings
  assert "Event loop is closed" not in run.stderr and "Traceback" not in run.stderr, run.stderr
  run = subprocess.run(
    [warm_python.python, "-m", "visionfm_jax.tools.evaluate", f"--checkpoint={workdir}", "--step=2"],
    env=warm_python.env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert run.returncode == 2, run.stderr[-3000:]
  assert run.stderr.startswith(f"error: --step=2: checkpoint {step_dir}: cannot read its params: "), run.stderr
  assert len(run.stderr.splitlines()) == 1 and "init_from" not in run.stderr, run.stderr


def test_export_hf_takes_the_newest_step_whose_params_are_intact(two_steps, tmp_path, caplog):
  """tools.export_hf (and tools.probe, through the same `workdir.intact_params`) choose a step as `load` does."""
  from visionfm_jax.tools import export_hf  # pylint: disable=g-import-not-at-top

  workdir = _copy(two_steps, tmp_path)
  os.remove(workdir / "checkpoints" / "2" / "state" / "_METADATA")
  with caplog.at_level(logging.WARNING):
    source = export_hf.load(str(workdir))
  assert source.origin == f"step 1 of {workdir}"
  assert _warnings(caplog) == [
    f"checkpoint {workdir}/checkpoints/2: cannot read its params: state/_METADATA is "
    f"missing or unreadable; taking step 1, the newest checkpoint whose params are intact"
  ]
  with pytest.raises(CheckpointError, match=r"^--step=2: checkpoint .*/2: cannot read its params"):
    export_hf.load(str(workdir), step=2)
