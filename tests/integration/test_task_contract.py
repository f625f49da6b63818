"""The task contract (tasks/base.py): what the loop and the benchmarks call on a task is declared there, and the
image-text tasks share code through helpers (tasks/image_text.py), not inheritance."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from visionfm_jax import tasks
from visionfm_jax.tasks import base

ROOT = pathlib.Path(__file__).resolve().parents[2]
INSTANCE_FIELDS = {"config", "mesh", "dtype", "model"}  # set by Task.__init__


def _task_members_used(folder: str) -> dict[str, str]:
  """{member: 'path:line'} of every `task.member` / `self.task.member` read in the modules of `folder`."""
  used = {}
  for file in sorted((ROOT / "visionfm_jax" / folder).glob("*.py")):
    for node in ast.walk(ast.parse(file.read_text())):
      if isinstance(node, ast.Attribute) and (
        (isinstance(node.value, ast.Name) and node.value.id == "task")
        or (isinstance(node.value, ast.Attribute) and node.value.attr == "task")
      ):
        used.setdefault(node.attr, f"{file.relative_to(ROOT)}:{node.lineno}")
  return used


@pytest.mark.parametrize("folder", ["training", "bench"])
def test_what_the_loop_and_the_benchmarks_call_on_a_task_is_declared(folder):
  used = _task_members_used(folder)
  assert used  # the scan sees the loop's calls
  undeclared = {
    m: where
    for m, where in used.items()
    if m not in INSTANCE_FIELDS and not hasattr(base.Task, m) and not hasattr(base.SplitLossTask, m)
  }
  assert not undeclared, undeclared


def test_the_contract_is_abstract_and_every_task_fulfils_it():
  assert base.Task.__abstractmethods__ == {"loss", "train_loader", "evaluators"}
  assert base.SplitLossTask.__abstractmethods__ == {
    "train_loader",
    "evaluators",
    "whole_batch",
    "local_loss",
    "batch_features",
    "global_loss",
  }

  class Partial(base.Task):
    def loss(self, params, batch, rng):
      return 0.0, {}

  with pytest.raises(TypeError, match="abstract"):
    Partial(None)
  for name, cls in tasks.TASKS.items():
    assert issubclass(cls, base.Task) and not cls.__abstractmethods__, name
    assert cls.splits_loss == cls.couples_examples == issubclass(cls, base.SplitLossTask), name
  assert {n for n, cls in tasks.TASKS.items() if cls.splits_loss} == {"contrastive", "aurora"}


def test_aurora_and_clip_share_helpers_not_a_class():
  assert not issubclass(tasks.AuroraTask, tasks.ContrastiveTask)
  assert not issubclass(tasks.ContrastiveTask, tasks.AuroraTask)
  for gone in ("mim_masks", "contrastive_weight", "split_loss"):
    assert not hasattr(tasks.ContrastiveTask, gone) and not hasattr(tasks.AuroraTask, gone), gone


def test_a_model_module_imports_no_data_pipeline():
  """Token ids live in visionfm_jax/token_ids.py: importing the text tower or the decoder pulls in neither the
  input pipeline nor its libraries."""
  code = (
    "import sys; import visionfm_jax.models.text, visionfm_jax.models.generate; "
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grain', 'array_record', 'PIL', "
    "'sentencepiece', 'tokenizers') or m.startswith('visionfm_jax.data')))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": str(ROOT)},
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
