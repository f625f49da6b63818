"""tools.export_hf's --out (output_folder.py) in an unfriendly folder: a `.visionfm_jax.json` marker that is a FIFO
or a link to /dev/zero is no marker (one error line naming it, no hang, no MemoryError), and the temporary folder
of an export killed mid-write is removed by the next export into that target, named in one warning line."""

import glob
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from visionfm_jax import output_folder, tasks
from visionfm_jax.tools import export_hf
from visionfm_jax.training import checkpoint

from conftest import ROOT, random_params, tiny_vit_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny ViT classifier's workdir, one checkpoint of random params."""
  path = tmp_path_factory.mktemp("export_faults") / "run"
  config = tiny_vit_config(**{"model.pool": "cls"})
  saver = checkpoint.Checkpointer(str(path / "checkpoints"), async_save=False)
  saver.save(1, {"params": random_params(tasks.build(config))})
  saver.close()
  (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  return path


def _export_cli(*args) -> subprocess.CompletedProcess:
  """The tool in a fresh interpreter of at most 6 GiB of address space: a marker read without end fails fast (a
  MemoryError) instead of filling the host."""
  command = " ".join(
    [
      "ulimit -v 6291456 && exec",
      shlex.quote(sys.executable),
      "-m visionfm_jax.tools.export_hf",
      *map(shlex.quote, args),
    ]
  )
  return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("kind", ["fifo", "link_to_dev_zero"])
def test_a_marker_that_is_no_regular_file_is_named_not_read(workdir, tmp_path, kind):
  out = tmp_path / "hf"
  out.mkdir()
  if kind == "fifo":
    os.mkfifo(out / output_folder.MARKER)
  else:
    os.symlink("/dev/zero", out / output_folder.MARKER)
  try:
    run = _export_cli(f"--checkpoint={workdir}", f"--out={out}")
  except subprocess.TimeoutExpired:
    pytest.fail(f"export_hf hung on a {kind} marker")
  assert run.returncode == 2, run.stderr[-2000:]
  assert run.stderr.splitlines() == [
    f"error: --out={out}: holds {output_folder.MARKER}, which export_hf did not "
    "write; choose a new or empty folder, or give --overwrite to replace the folder "
    "and everything in it"
  ], run.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_a_marker_larger_than_its_bound_is_no_marker(tmp_path):
  (tmp_path / output_folder.MARKER).write_text('{"tool": "export_hf", "files": []}' + " " * output_folder.MARKER_BYTES)
  with pytest.raises(output_folder.UserError, match=f"holds {output_folder.MARKER}, which export_hf did not write"):
    output_folder.check(str(tmp_path), "export_hf")
  (tmp_path / output_folder.MARKER).write_text('{"tool": "export_hf", "files": []}')
  output_folder.check(str(tmp_path), "export_hf")


def test_the_temporary_folder_of_an_export_killed_mid_write_goes_with_the_next_export(
  workdir, tmp_path, capsys, caplog
):
  out = tmp_path / "hf"
  writer = subprocess.Popen(
    [sys.executable, "-m", "visionfm_jax.tools.export_hf", f"--checkpoint={workdir}", f"--out={out}"],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  try:
    deadline = time.monotonic() + 120
    while not glob.glob(str(tmp_path / ".hf.*.tmp")) and writer.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    os.kill(writer.pid, signal.SIGKILL)  # mid-write: the folder is claimed, the model not yet written whole
  finally:
    writer.wait(timeout=60)
  left = glob.glob(str(tmp_path / ".hf.*.tmp"))
  assert len(left) == 1 and not out.exists(), os.listdir(tmp_path)
  with caplog.at_level(logging.WARNING):
    assert export_hf.main(["export_hf", f"--checkpoint={workdir}", f"--out={out}"]) == 0, capsys.readouterr().err
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert warnings == [f"removed {left[0]}: left by export_hf, whose process is gone (killed while writing {out})"], (
    warnings
  )
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_a_live_writers_temporary_folder_stays(tmp_path):
  """Only a writer whose process is gone is stale: this process's own temporary folder (alive) is kept."""
  out = str(tmp_path / "hf")
  with output_folder.claim(out, "export_hf") as first:
    with output_folder.claim(out, "export_hf") as second:
      assert os.path.isdir(first) and os.path.isdir(second)
    assert os.path.isdir(first)
