"""A model on disk is recognised in one module (training/stored.py): no other module of the package joins a
workdir's `checkpoints` folder to a path or lists step folders itself (read from the source with ast, nothing
imported); checkpoint.py holds no params I/O; `Stored` answers for each layout."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

from visionfm_jax.errors import UserError
from visionfm_jax.trained import workdir
from visionfm_jax.training import stored

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "visionfm_jax"
HOME = PACKAGE / "training" / "stored.py"  # where the layouts are recognised
LISTING_RULE = PACKAGE / "training" / "checkpoint.py"  # Orbax's step names, which the Checkpointer shares
LISTINGS = {"iterdir", "listdir", "scandir", "glob", "rglob"}
# Folders of numbered entries that are no checkpoints
NUMBERED_NOT_STEPS = {
  "data/loader/reaping.py": "worker folders tagged with a pid namespace",
  "data/text/pair_corpora.py": "Visual Genome's images, named by their ids",
}


def _is_checkpoints(node: ast.AST) -> bool:
  return isinstance(node, ast.Constant) and node.value == stored.CHECKPOINTS


def _joins_checkpoints(tree: ast.AST) -> list[int]:
  """Lines that join 'checkpoints' to a path: os.path.join(..., 'checkpoints', ...) or path / 'checkpoints'."""
  lines = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("join", "joinpath"):
      if any(_is_checkpoints(a) for a in node.args):
        lines.append(node.lineno)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _is_checkpoints(node.right):
      lines.append(node.lineno)
  return lines


def _names_as_numbers(node: ast.AST) -> bool:
  """Whether `node` reads an entry's name as a step number: int(...), .isdigit() or .isnumeric()."""
  for sub in ast.walk(node):
    if isinstance(sub, ast.Call):
      if isinstance(sub.func, ast.Name) and sub.func.id == "int":
        return True
      if isinstance(sub.func, ast.Attribute) and sub.func.attr in ("isdigit", "isnumeric", "isdecimal"):
        return True
  return False


def _lists_steps(tree: ast.AST) -> list[int]:
  """Lines that list a folder and read its entries' names as numbers: a step listing of its own."""
  lines = []
  for node in ast.walk(tree):
    loops = (
      node.generators
      if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp))
      else ([node] if isinstance(node, ast.For) else [])
    )
    for loop in loops:
      iterated = [c for c in ast.walk(loop.iter) if isinstance(c, ast.Call)]
      if any(isinstance(c.func, ast.Attribute) and c.func.attr in LISTINGS for c in iterated) or any(
        isinstance(c.func, ast.Name) and c.func.id in LISTINGS for c in iterated
      ):
        if _names_as_numbers(node):
          lines.append(node.lineno)
  return lines


def _offences(source: str) -> list[str]:
  if stored.CHECKPOINTS not in source and not any(name in source for name in LISTINGS):
    return []  # nothing to parse for
  tree = ast.parse(source)
  return [f"line {n}: joins 'checkpoints' to a path" for n in _joins_checkpoints(tree)] + [
    f"line {n}: lists step folders" for n in _lists_steps(tree)
  ]


def test_only_stored_recognises_where_a_model_keeps_its_steps():
  found = {}
  for file in sorted(PACKAGE.rglob("*.py")):
    offences = _offences(file.read_text())
    if file == LISTING_RULE:
      offences = [o for o in offences if o.endswith("lists step folders")]  # its own rule, committed_steps
      offences = offences[1:] if offences else []
    if str(file.relative_to(PACKAGE)) in NUMBERED_NOT_STEPS:
      offences = [o for o in offences if not o.endswith("lists step folders")]
    if file != HOME and offences:
      found[str(file.relative_to(PACKAGE))] = offences
  assert not found, f"layouts recognised outside training/stored.py: {found}"


@pytest.mark.parametrize(
  "source",
  [
    'import os\nckpt_dir = os.path.join(workdir, "checkpoints")\n',
    'step_dir = path / "checkpoints" / str(step)\n',
    "steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())\n",
    "import os\nfor name in os.listdir(d):\n  if name.isdigit():\n    steps.append(name)\n",
  ],
)
def test_the_check_sees_a_second_recogniser(source):
  assert _offences(source)


def test_checkpoint_py_holds_no_params_io():
  tree = ast.parse(LISTING_RULE.read_text())
  defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
  assert not {"load_params", "save_params", "_raw_params", "warn_of_damaged_parts"} & defined


def _workdir(root: pathlib.Path, steps=(10, 20)) -> pathlib.Path:
  (root / "checkpoints").mkdir(parents=True)
  for step in steps:
    (root / "checkpoints" / str(step)).mkdir()
  (root / "checkpoints" / "7.unreadable").mkdir()  # set aside: no step
  (root / "config.json").write_text(json.dumps({"task": "classification", "model": {"name": "vit"}}))
  return root


def test_a_workdir_and_its_checkpoints_folder(tmp_path):
  work = stored.Stored.at(str(_workdir(tmp_path / "w")))
  assert (work.kind, work.steps(), work.model_fields()) == (stored.WORKDIR, [10, 20], {"name": "vit"})
  assert work.step_dir(20) == tmp_path / "w" / "checkpoints" / "20"
  folder = stored.Stored.at(str(tmp_path / "w" / "checkpoints"))
  assert (folder.kind, folder.steps(), folder.config_fields()["task"]) == (
    stored.CHECKPOINTS_FOLDER,
    [10, 20],
    "classification",
  )


def test_an_import_folder_a_transformers_folder_and_neither(tmp_path):
  (tmp_path / "imp" / "params").mkdir(parents=True)
  (tmp_path / "imp" / "model.json").write_text(json.dumps({"name": "swinv2"}))
  imported = stored.Stored.at(str(tmp_path / "imp"))
  assert (imported.kind, imported.steps(), imported.model_fields()) == (stored.IMPORT, [], {"name": "swinv2"})
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "clip"}))
  assert stored.kind_of(str(tmp_path / "hf")) == stored.HF
  (tmp_path / "empty").mkdir()
  assert stored.kind_of(str(tmp_path / "empty")) is None and stored.kind_of(str(tmp_path / "none")) is None


def test_a_runs_config_that_does_not_read_is_one_error_naming_why(tmp_path):
  work = _workdir(tmp_path / "w")
  (work / "config.json").write_text("{")
  with pytest.raises(UserError, match=r"config.json: not valid JSON"):
    workdir.load_config(str(work), ("classification",), "a classifier")
  (work / "config.json").unlink()
  with pytest.raises(UserError, match=r"^--checkpoint=.*: cannot read config.json \(No such file or directory\)"):
    workdir.load_config(str(work), ("classification",), "a classifier")
