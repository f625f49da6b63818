"""The old module paths of the CLIs that moved out of tools/ (to datatools/, and bench_input to bench.input) answer
with one `error:` line naming the new module, exit 2, instead of Python's bare 'No module named'; the new modules
exist; another unknown name is Python's own error."""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

from visionfm_jax import tools

from conftest import ROOT


def _run(module, *args):
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
    env=dict(os.environ, PYTHONPATH=ROOT),
    check=False,
  )


def test_every_moved_cli_answers_at_its_old_path_naming_the_new_one():
  assert set(tools.MOVED) >= {"prepare_data", "index_tars", "filter_clip_score", "train_tokenizer", "build_tfds"}
  for name, new in tools.MOVED.items():
    assert importlib.util.find_spec(new) is not None, new
    run = _run(f"visionfm_jax.tools.{name}", "--input=/data")
    assert run.returncode == 2 and not run.stdout, (name, run.stderr)
    assert run.stderr == (f"error: python -m visionfm_jax.tools.{name}: moved to python -m {new} (the same flags)\n"), (
      run.stderr
    )


def test_an_import_of_an_old_path_names_the_new_module():
  with pytest.raises(
    ModuleNotFoundError, match="visionfm_jax.tools.prepare_data moved to visionfm_jax.datatools.prepare_data"
  ):
    importlib.import_module("visionfm_jax.tools.prepare_data")
  run = _run("visionfm_jax.tools.no_such_tool")
  assert run.returncode == 1 and "No module named visionfm_jax.tools.no_such_tool" in run.stderr, run.stderr
