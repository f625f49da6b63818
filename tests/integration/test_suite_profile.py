"""tests/suite_profile: each Python process of a run writes its CPU and JAX compile seconds, and summarize.py adds
them up by the test that started the process."""

import json
import os
import subprocess
import sys

from conftest import ROOT, cpu_env

PROFILE_PATH = os.path.join(ROOT, "tests", "suite_profile")
COMPILE_TWO_PROGRAMS = "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(3)); jax.jit(jnp.sin)(1.0)"


def test_each_process_records_its_compiles_and_the_summary_adds_them_by_test(tmp_path):
  folder = tmp_path / "profile"
  folder.mkdir()
  env = cpu_env(
    1,
    PYTHONPATH=PROFILE_PATH,
    VISIONFM_SUITE_PROFILE=str(folder),
    PYTEST_CURRENT_TEST="tests/unit/test_x.py::test_y (call)",
  )
  for code in (COMPILE_TWO_PROGRAMS, "pass"):
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)

  records = sorted((json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda r: -r["programs"])
  assert len(records) == 2
  compiled, idle = records
  assert compiled["programs"] >= 2 and compiled["compile_s"] > 0 and compiled["trace_s"] > 0
  assert compiled["cpu_s"] > compiled["compile_s"] and not compiled["runner"]
  programs = compiled["by_program"]["tests/unit/test_x.py"]
  assert programs["<lambda>"]["programs"] == programs["sin"]["programs"] == 1  # traced `f`, compiled `jit(f)`: one
  assert programs["<lambda>"]["trace_s"] > 0 and programs["sin"]["compile_s"] > 0
  assert sum(p["programs"] for p in programs.values()) == compiled["programs"]
  assert idle["programs"] == 0 and idle["compile_s"] == 0 and idle["test"] == "tests/unit/test_x.py::test_y (call)"

  summary = subprocess.run(
    [sys.executable, os.path.join(PROFILE_PATH, "summarize.py"), str(folder)],
    capture_output=True,
    text=True,
    check=True,
    timeout=60,
  ).stdout.splitlines()
  blank = summary.index("")
  by_name = {line[:58].strip(): line[58:].split() for line in summary[1:blank]}
  assert by_name["all"][0] == "2" and int(by_name["all"][-1]) == compiled["programs"]
  assert by_name["pytest and its workers (the tests' own code)"][0] == "0"
  assert by_name["tests/unit/test_x.py"][0] == "2"
  by_program = {line[:30].strip(): line[30:].split() for line in summary[blank + 2 :]}
  assert by_program["sin"][1] == "1" and by_program["sin"][-2:] == ["test_x.py", by_program["sin"][0]]
