"""Adds up the records sitecustomize.py wrote: `python tests/suite_profile/summarize.py FOLDER`. Prints the
totals, the test workers against the processes they started, the test files whose processes took most CPU, and the
programs (by JAX's name for the jitted function) whose tracing, lowering and compiling took most, with the test
files that made them."""

import collections
import json
import pathlib
import sys

COLUMNS = ("cpu_s", "compile_s", "trace_s", "lower_s", "programs")


def read(folder: str) -> list[dict]:
  records = []
  for path in sorted(pathlib.Path(folder).glob("*.json")):
    try:
      records.append(json.loads(path.read_text()))
    except (OSError, ValueError):  # a process killed while writing its record
      continue
  return records


def _sums(records) -> dict:
  return {c: sum(r[c] for r in records) for c in COLUMNS} | {"processes": len(records)}


def _row(name: str, sums: dict) -> str:
  return (
    f"{name:58.58s} {sums['processes']:5d} {sums['cpu_s']:8.1f} {sums['compile_s']:8.1f} "
    f"{sums['trace_s']:7.1f} {sums['lower_s']:7.1f} {sums['programs']:8d}"
  )


def report(records: list[dict], top: int = 15) -> str:
  workers, started = [r for r in records if r["runner"]], [r for r in records if not r["runner"]]
  by_file = collections.defaultdict(list)
  for r in started:
    by_file[r["test"].split("::")[0] or "(outside a test)"].append(r)
  lines = [
    f"{'':58s} {'procs':>5s} {'CPU s':>8s} {'compile':>8s} {'trace':>7s} {'lower':>7s} {'programs':>8s}",
    _row("all", _sums(records)),
    _row("pytest and its workers (the tests' own code)", _sums(workers)),
    _row("processes the tests started", _sums(started)),
  ]
  ranked = sorted(by_file.items(), key=lambda item: -_sums(item[1])["cpu_s"])[:top]
  lines += [_row(f"  {name}", _sums(group)) for name, group in ranked]
  return "\n".join(lines + ["", *programs_report(records, top)])


def _program_sums(records) -> tuple[dict[str, collections.Counter], dict[str, collections.Counter]]:
  """({program: its seconds and compiles in all}, {program: {test file: its seconds}})."""
  sums, files = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
  for record in records:
    for test_file, programs in record.get("by_program", {}).items():
      for name, seconds in programs.items():
        sums[name].update(seconds)
        files[name][test_file or "(outside a test)"] += _jax_seconds(seconds)
  return sums, files


def _jax_seconds(sums) -> float:
  return sums["trace_s"] + sums["lower_s"] + sums["compile_s"]


def programs_report(records: list[dict], top: int = 15) -> list[str]:
  sums, files = _program_sums(records)
  ranked = sorted(sums.items(), key=lambda item: -_jax_seconds(item[1]))[:top]
  lines = [
    f"{'program':30s} {'seconds':>8s} {'compiles':>8s} {'trace':>7s} {'lower':>7s} {'compile':>8s}  "
    "test files (seconds)"
  ]
  for name, program in ranked:
    where = ", ".join(f"{path.rsplit('/', 1)[-1]} {seconds:.1f}" for path, seconds in files[name].most_common(3))
    lines.append(
      f"{name:30.30s} {_jax_seconds(program):8.1f} {program['programs']:8d} {program['trace_s']:7.1f} "
      f"{program['lower_s']:7.1f} {program['compile_s']:8.1f}  {where}"
    )
  return lines


if __name__ == "__main__":
  print(report(read(sys.argv[1])))
