"""The package's layering contract, read from the source (ast, nothing imported): imports run one way, from the
entry points down to the leaves, and the folders form no cycle.

LAYERS lists the top-level folders and modules of visionfm_jax from the top down. A module imports from the layers
below its own only: never from a layer above, nor from another unit of its own layer (the units of a layer know
nothing of each other: models no data, data no model). And neither the folders' import graph nor the files' has a
cycle. Every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
import collections
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "visionfm_jax"

LAYERS = (
  ("__init__",),  # the package root, its face: `visionfm_jax.load` (trained/model.py), imported on first use
  ("main", "bench"),  # entry points: the training CLI, the benchmarks and planners
  ("tools", "datatools"),  # the small CLIs: of trained models; of data preparation (shards, indexes, tokenizer)
  ("trained",),  # trained models from a path (workdir, import_hf, transformers) and the `load` API behind them
  ("convert",),  # Hugging Face weights to and from the models, for tools and bench (over models and the leaves)
  ("training",),  # the one loop: checkpoints, optimiser, init_from
  ("tasks",),  # what differs per objective: model, loss, loaders, evaluators
  ("losses",),  # the training objectives as functions of arrays, and detection's boxes and matching
  ("evaluate",),  # metrics, over models and data
  ("models", "data"),  # the networks; the input pipeline
  ("parallel",),  # mesh, sharding rules, distributed start-up
  # the shared main of main, bench and the CLIs: help, flag parsing, one `error:` line (over config_lib); the folder
  # a CLI writes whole (over atomic)
  ("cli", "output_folder"),
  # leaves but for errors (param_rules: over param paths); protowire: Protocol Buffers' wire format
  ("config_lib", "token_ids", "atomic", "param_rules", "protowire"),
  ("errors",),
)

# Imports known to run upward while work moves them; empty now, and it may only shrink (the test fails on an
# entry that no longer occurs).
KNOWN_UPWARD: set[tuple[str, str]] = set()

RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str | None:
  """The top-level folder or module of visionfm_jax that a dotted module name lies in; None outside the package."""
  parts = module.split(".")
  return (
    parts[1] if parts[0] == "visionfm_jax" and len(parts) > 1 else ("__init__" if parts == ["visionfm_jax"] else None)
  )


def _imported(node: ast.AST, file: pathlib.Path) -> list[str]:
  """The dotted names an import statement brings in (`from visionfm_jax import data` -> visionfm_jax.data)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if not isinstance(node, ast.ImportFrom):
    return []
  if node.level:  # relative: resolved against the file's package
    package = list(file.relative_to(ROOT).with_suffix("").parts[:-1])
    base = package[: len(package) - node.level + 1]
    module = ".".join(base + ([node.module] if node.module else []))
  else:
    module = node.module or ""
  return [f"{module}.{alias.name}" for alias in node.names]


@functools.cache
def import_edges() -> dict[tuple[str, str], list[str]]:
  """{(importing unit, imported unit): ['path:line name', ...]} over every .py file of the package."""
  edges = {}
  for file in sorted(PACKAGE.rglob("*.py")):
    source = _unit(".".join(file.relative_to(ROOT).with_suffix("").parts))
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
      for name in _imported(node, file):
        target = _unit(name)
        if target is not None and target != source:
          edges.setdefault((source, target), []).append(f"{file.relative_to(ROOT)}:{node.lineno} imports {name}")
  return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one unit (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_every_folder_and_module_of_the_package_has_a_layer():
  units = {_unit(".".join(f.relative_to(ROOT).with_suffix("").parts)) for f in PACKAGE.rglob("*.py")}
  assert not units - set(RANK), f"add to LAYERS: {sorted(units - set(RANK))}"
  assert not set(RANK) - units, f"LAYERS names what the package lacks: {sorted(set(RANK) - units)}"


def test_the_package_root_imports_only_inside_functions():
  """The root sits on top (`visionfm_jax.load` is trained/model.py's), so no module below imports it, and it
  imports what it hands out on first use only: importing the package stays cheap (no JAX)."""
  assert ("__init__", "trained") in import_edges()  # the lazy import of `load`, seen and downward
  tree = ast.parse((PACKAGE / "__init__.py").read_text())
  assert not [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_no_import_runs_upward():
  edges = import_edges()
  upward = {edge: where for edge, where in edges.items() if RANK[edge[1]] <= RANK[edge[0]]}
  violations = [line for edge, where in sorted(upward.items()) if edge not in KNOWN_UPWARD for line in where]
  assert not violations, "imports upward or within a layer (LAYERS):\n" + "\n".join(violations)
  stale = sorted(KNOWN_UPWARD - set(upward))
  assert not stale, f"KNOWN_UPWARD lists imports that no longer occur: {stale}; remove them"


def test_the_folders_form_no_cycle():
  graph = collections.defaultdict(set)
  for source, target in import_edges():
    if (source, target) not in KNOWN_UPWARD:
      graph[source].add(target)
  cycles = _cycles(graph)
  edges = import_edges()
  report = [
    f"{' <-> '.join(c)}:\n  "
    + "\n  ".join(line for (s, t), where in sorted(edges.items()) if s in c and t in c for line in where)
    for c in cycles
  ]
  assert not cycles, "import cycles among the package's folders:\n" + "\n".join(report)


def _module_of(name: str, modules: set[str]) -> str | None:
  """The module of the package a dotted import name lands in: the longest prefix that is a file or a folder's
  __init__ ('visionfm_jax.data.embedded.shapes.SEED' -> 'visionfm_jax.data.embedded.shapes')."""
  parts = name.split(".")
  while parts and ".".join(parts) not in modules:
    parts.pop()
  return ".".join(parts) or None


@functools.cache
def file_edges() -> dict[tuple[str, str], list[str]]:
  """{(importing module, imported module): ['path:line', ...]} over the package's files; a module's import of a
  folder that holds it (its own package's __init__) is left out, as Python runs that first anyway."""
  files = {
    ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in PACKAGE.rglob("*.py")
  }
  edges = {}
  for module, file in sorted(files.items()):
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
      for name in _imported(node, file):
        target = _module_of(name, set(files))
        if target and target != module and not module.startswith(target + "."):
          edges.setdefault((module, target), []).append(f"{file.relative_to(ROOT)}:{node.lineno}")
  return edges


def test_the_files_form_no_cycle():
  """No file imports, through any chain, a file that imports it: a lazy import inside a function that closes a
  loop counts too (a constant of one file read by another, moved where both can import it)."""
  graph = collections.defaultdict(set)
  for source, target in file_edges():
    graph[source].add(target)
  cycles = _cycles(graph)
  report = [
    f"{' <-> '.join(c)}:\n  "
    + "\n  ".join(
      f"{s} -> {t}: {', '.join(where)}" for (s, t), where in sorted(file_edges().items()) if s in c and t in c
    )
    for c in cycles
  ]
  assert not cycles, "import cycles among the package's files:\n" + "\n".join(report)
  assert ("visionfm_jax.data.sources.embedded_sets", "visionfm_jax.data.embedded.shapes") in file_edges()  # sees files


def test_no_file_imports_a_package_that_holds_it():
  """`file_edges` leaves out a file's import of its own package's __init__ (Python runs that first): made inside a
  function, such an import closes a loop the cycle test cannot see (the registry in models/__init__ importing
  clip, clip importing the registry), so none is made anywhere (the package root's bare __init__ aside)."""
  files = {
    ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in PACKAGE.rglob("*.py")
  }
  upward = []
  for module, file in sorted(files.items()):
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
      for name in _imported(node, file):
        target = _module_of(name, set(files))
        if target and target != "visionfm_jax" and target != module and module.startswith(target + "."):
          upward.append(f"{file.relative_to(ROOT)}:{node.lineno} imports {target}")
  assert not upward, "files importing a package that holds them:\n" + "\n".join(upward)


# The folders of data/ (and its own modules) from the top down, as LAYERS for the package: a module of data/ imports
# from its own folder or from one below it, never from one above. The captions' side sits on top (caption_sets
# builds its eval batches with the loader), the readers under the loader, the transforms and the limits under the
# readers. data/__init__ re-exports the loaders and the source registry.
DATA_LAYERS = ("__init__", "text", "loader", "sources", "embedded", "transforms", "limits")
DATA_RANK = {name: rank for rank, name in enumerate(DATA_LAYERS)}


def _data_unit(module: str) -> str | None:
  """The folder or module of visionfm_jax/data that a module lies in ('__init__' for the package itself)."""
  parts = module.split(".")
  if parts[:2] != ["visionfm_jax", "data"]:
    return None
  return parts[2] if len(parts) > 2 else "__init__"


def test_every_folder_and_module_of_data_has_a_layer():
  units = {_data_unit(".".join(f.relative_to(ROOT).with_suffix("").parts)) for f in (PACKAGE / "data").rglob("*.py")}
  assert units == set(DATA_RANK), (
    f"DATA_LAYERS lacks {sorted(units - set(DATA_RANK))}, names what data/ lacks: {sorted(set(DATA_RANK) - units)}"
  )


def test_no_import_in_data_runs_upward():
  upward = [
    f"{source} -> {target}: {', '.join(where)}"
    for (source, target), where in sorted(file_edges().items())
    if _data_unit(source)
    and _data_unit(target)
    and _data_unit(source) != _data_unit(target)
    and DATA_RANK[_data_unit(target)] < DATA_RANK[_data_unit(source)]
  ]
  assert not upward, "imports upward among data/'s folders (DATA_LAYERS):\n" + "\n".join(upward)
  assert ("visionfm_jax.data.text.caption_sets", "visionfm_jax.data.loader.pipeline") in file_edges()


# What the entry points, tools, loop and evaluators may import of models/: the registry (`visionfm_jax.models`)
# and the model-independent modules. A concrete model (vit, swinv2, clip, ...) is for its task and its converter.
MODEL_GENERIC = ("backbone", "layers", "kernels", "fp8", "generate")
ASKS_NOT_IMPORTS = ("main", "bench", "tools", "datatools", "trained", "training", "evaluate")


def _is_concrete_model(name: str) -> bool:
  """Whether a dotted import names a module of models/ (or a name in one) other than MODEL_GENERIC's."""
  parts = name.split(".")
  return parts[:2] == ["visionfm_jax", "models"] and len(parts) > 2 and parts[2] not in MODEL_GENERIC


def concrete_model_imports() -> list[str]:
  """'path:line imports name' for each import of a concrete model module by a unit of ASKS_NOT_IMPORTS."""
  found = []
  for file in sorted(PACKAGE.rglob("*.py")):
    if _unit(".".join(file.relative_to(ROOT).with_suffix("").parts)) not in ASKS_NOT_IMPORTS:
      continue
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
      for name in _imported(node, file):
        if _is_concrete_model(name):
          found.append(f"{file.relative_to(ROOT)}:{node.lineno} imports {name}")
  return found


def test_tools_the_loop_and_evaluators_ask_a_model_and_import_no_concrete_one():
  found = concrete_model_imports()
  assert not found, "a concrete model imported where only the registry or a model's methods belong:\n" + "\n".join(
    found
  )


# Flax's Linen API is the models' own; parallel/sharding.py names what the rest take of it (the param boxes with
# their logical axes, `Partitioned`, and `unbox`), so no other module imports flax.linen.
LINEN_HOMES = ("visionfm_jax/models/", "visionfm_jax/parallel/sharding.py")


def _is_linen(name: str) -> bool:
  return name == "flax.linen" or name.startswith("flax.linen.")


def linen_imports() -> list[str]:
  """'path:line imports name' for each import of flax.linen outside LINEN_HOMES."""
  found = []
  for file in sorted(PACKAGE.rglob("*.py")):
    where = str(file.relative_to(ROOT))
    if where.startswith(LINEN_HOMES):
      continue
    for node in ast.walk(ast.parse(file.read_text(), where)):
      found += [f"{where}:{node.lineno} imports {name}" for name in _imported(node, file) if _is_linen(name)]
  return found


def test_only_the_models_and_the_sharding_rules_import_flax_linen():
  found = linen_imports()
  assert not found, (
    "flax.linen imported outside models/ and parallel/sharding.py (take `Partitioned` and `unbox` "
    "from parallel/sharding.py):\n" + "\n".join(found)
  )


def test_the_checks_see_what_they_should():
  """The graph catches a nested, a `from package import folder` and a relative import, and the cycle search
  finds a loop through three units."""
  edges = import_edges()
  assert any("main.py" in line and "training" in line for line in edges[("main", "training")])  # inside run()
  assert ("tasks", "models") in edges and ("training", "tasks") in edges
  tree = ast.parse("from ..data.text import tokenizer\nfrom . import layers\n")
  names = [n for node in tree.body for n in _imported(node, PACKAGE / "models" / "text.py")]
  assert names == ["visionfm_jax.data.text.tokenizer", "visionfm_jax.models.layers"]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  tree = ast.parse("from visionfm_jax.models import clip, backbone\n")
  names = [n for node in tree.body for n in _imported(node, PACKAGE / "tools" / "x.py")]
  assert [n for n in names if _is_concrete_model(n)] == ["visionfm_jax.models.clip"]
  tree = ast.parse(
    "import flax.linen as nn\nfrom flax import linen\nfrom flax.linen import partitioning\n"
    "from flax.core import meta\nimport flax\n"
  )
  names = [n for node in tree.body for n in _imported(node, PACKAGE / "tools" / "x.py")]
  assert [n for n in names if _is_linen(n)] == ["flax.linen", "flax.linen", "flax.linen.partitioning"]
