"""Adds up the records sitecustomize.py wrote: `python tests/suite_profile/summarize.py FOLDER`. Prints the
totals, the test workers against the processes they started, and the test files whose processes took most CPU."""

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
  return (f"{name:58.58s} {sums['processes']:5d} {sums['cpu_s']:8.1f} {sums['compile_s']:8.1f} "
          f"{sums['trace_s']:7.1f} {sums['lower_s']:7.1f} {sums['programs']:8d}")


def report(records: list[dict], top: int = 15) -> str:
  workers, started = [r for r in records if r["runner"]], [r for r in records if not r["runner"]]
  by_file = collections.defaultdict(list)
  for r in started:
    by_file[r["test"].split("::")[0] or "(outside a test)"].append(r)
  lines = [f"{'':58s} {'procs':>5s} {'CPU s':>8s} {'compile':>8s} {'trace':>7s} {'lower':>7s} {'programs':>8s}",
           _row("all", _sums(records)), _row("pytest and its workers (the tests' own code)", _sums(workers)),
           _row("processes the tests started", _sums(started))]
  ranked = sorted(by_file.items(), key=lambda item: -_sums(item[1])["cpu_s"])[:top]
  lines += [_row(f"  {name}", _sums(group)) for name, group in ranked]
  return "\n".join(lines)


if __name__ == "__main__":
  print(report(read(sys.argv[1])))
