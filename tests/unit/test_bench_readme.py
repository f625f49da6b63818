"""visionfm_jax/bench/README.md names every file of the folder in its group (the planner, the benchmarks, the soak
harness), and nothing that is not there."""

import pathlib
import re

BENCH = pathlib.Path(__file__).resolve().parents[2] / "visionfm_jax" / "bench"


def test_the_bench_readme_names_each_file_once():
  named = re.findall(r"^\| `([^`]+)` \|", (BENCH / "README.md").read_text(), re.M)
  present = {p.name + ("/" if p.is_dir() else "") for p in BENCH.iterdir() if p.name != "__pycache__"}
  assert sorted(named) == sorted(set(named)), "a file named twice"
  assert set(named) == present, f"unnamed: {sorted(present - set(named))}; gone: {sorted(set(named) - present)}"
