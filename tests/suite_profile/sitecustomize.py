"""Where a test run's CPU time goes, per Python process: with this folder on PYTHONPATH and VISIONFM_SUITE_PROFILE
set to a folder, every Python process of the run (test workers, and the training jobs, tools and launchers they
start) writes `<pid>.json` there at exit: its CPU seconds, and the seconds JAX spent tracing, lowering to MLIR and
compiling (JAX's own monitoring events), in all and by program (JAX's name for the jitted function) and the test
file it ran for, with the test that was running at exit. `summarize.py` adds them up.

The listeners are registered when JAX's monitoring module is first imported, not here: importing JAX at start-up
would read its environment (JAX_DISABLE_MOST_OPTIMIZATIONS, set by tests/conftest.py) before the tests set it."""

import os

if os.environ.get("VISIONFM_SUITE_PROFILE"):
  import atexit
  import importlib.abc
  import importlib.machinery
  import json
  import resource
  import sys

  _EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
  }
  _totals = dict.fromkeys(_EVENTS.values(), 0.0) | {"programs": 0}
  # {test file: {program: {"trace_s", "lower_s", "compile_s", "programs"}}}; a started process inherits the
  # PYTEST_CURRENT_TEST of the test that started it.
  _by_program = {}

  def _program(fun_name: str) -> str:
    """JAX names a trace `f` and the lowering and compile of its program `jit(f)`: one name for the three."""
    return fun_name[4:-1] if fun_name.startswith("jit(") and fun_name.endswith(")") else fun_name

  def _duration(event, seconds, fun_name="?", **_):
    column = _EVENTS.get(event)
    if column is None:
      return
    test_file = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
    sums = _by_program.setdefault(test_file, {}).setdefault(
      _program(str(fun_name)), dict.fromkeys(_EVENTS.values(), 0.0) | {"programs": 0}
    )
    for target in (_totals, sums):
      target[column] += seconds
      target["programs"] += column == "compile_s"

  class _ListenOnImport(importlib.abc.MetaPathFinder):
    """Registers the listeners as jax._src.monitoring finishes loading."""

    def find_spec(self, name, path, target=None):
      if name != "jax._src.monitoring":
        return None
      sys.meta_path.remove(self)
      spec = importlib.machinery.PathFinder.find_spec(name, path)
      load = spec.loader.exec_module

      def exec_module(module):
        load(module)
        module.register_event_duration_secs_listener(_duration)

      spec.loader.exec_module = exec_module
      return spec

  def write_record():
    """Writes this process's record (again: a later call writes the fuller one). At exit, and from a test
    worker's pytest_unconfigure (tests/conftest.py): xdist may kill a worker slow to exit before its atexit runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = dict(
      _totals,
      by_program=_by_program,
      cpu_s=usage.ru_utime + usage.ru_stime,
      argv=sys.argv[:4],
      test=os.environ.get("PYTEST_CURRENT_TEST", ""),
    )
    record["runner"] = not record["test"] and "_pytest" in sys.modules  # pytest or a worker, not a test's child
    folder = os.environ["VISIONFM_SUITE_PROFILE"]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:  # a process killed mid-write keeps its earlier record
      json.dump(record, f)
    os.replace(path + ".tmp", path)

  sys.meta_path.insert(0, _ListenOnImport())
  atexit.register(write_record)
