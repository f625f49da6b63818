"""The model CLIs: summary, import_hf, export_hf, caption, probe, evaluate.

The CLIs that moved out of tools/ (`MOVED`) still answer at their old module path, which scripts and older docs
name: `python -m visionfm_jax.tools.<name>` prints one `error:` line naming the new module and exits 2, and an
import of it is a ModuleNotFoundError saying the same; nothing of the new module is imported here."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

MOVED = {
  name: f"visionfm_jax.datatools.{name}"
  for name in ("prepare_data", "index_tars", "filter_clip_score", "train_tokenizer", "build_tfds", "cluster_task")
} | {"bench_input": "visionfm_jax.bench.input"}


def moved_text(old: str) -> str:
  """What the old module path `old` (visionfm_jax.tools.<name>) answers."""
  return f"python -m {old}: moved to python -m {MOVED[old.rpartition('.')[2]]} (the same flags)"


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds the old paths of MOVED; `python -m` runs `get_code`'s program (runpy asks for it), an import
  `exec_module`."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    package, _, name = fullname.rpartition(".")
    if package != __name__ or name not in MOVED:
      return None
    return importlib.util.spec_from_loader(fullname, self)

  def create_module(self, spec):
    return None

  def exec_module(self, module):
    new = MOVED[module.__name__.rpartition(".")[2]]
    raise ModuleNotFoundError(f"{module.__name__} moved to {new}", name=module.__name__)

  def get_code(self, fullname):
    return compile(
      f"from visionfm_jax import errors\nerrors.say('error: ' + {moved_text(fullname)!r})\nraise SystemExit(2)\n",
      f"<{fullname}>",
      "exec",
    )


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
  sys.meta_path.append(_MovedModules())
