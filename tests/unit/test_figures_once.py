"""Each measured or predicted figure is said once, in a ledger: BENCHMARKS.md (the current figures, at most 300 lines:
what a newer run supersedes is git's history), docs/tried_and_dropped.md (the options measured and not adopted) or
BUILD.md's "Tested" (the test suite's runs). README.md, the other docs/**/*.md and the module docstrings and
comments of configs/*.py point at a ledger's section instead of restating its figure, so that a re-plan edits one
file.

A figure, narrowly (so that no plain number is one):
- a number with a decimal point or a thousands separator followed by a unit: ms, s, GiB, GB, MiB, MB, TB, img/s
  (images/s), days (day) or %: `8.83 s`, `64.0 GiB`, `1,369 MB`, `37.4 days`; or such a number after `MFU`: `MFU 0.31`;
- in a ledger's table, such a number in a cell of a column whose header ends in one of those units or is
  `MFU` (`step ms`, `plan GiB`, `predicted days`): `| 838.7 |` under `step ms` is the figure `838.7 ms`.
Numbers compare by value (`0.310` is `0.31`, `1,369` is `1369`); `images/s` is `img/s`.

Allowed elsewhere: a figure no ledger holds (a demo's expected output, the paper's own result), and in a recipe
docstring the `predicts N days` citation that tests/unit/test_recipes.py requires and checks against BENCHMARKS.md's
table.
"""

import ast
import decimal
import pathlib
import re
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "BENCHMARKS.md"
LEDGERS = (BENCHMARKS, ROOT / "docs" / "tried_and_dropped.md", ROOT / "BUILD.md")
BENCHMARKS_MAX_LINES = 300

UNITS = r"ms|s|GiB|GB|MiB|MB|TB|img/s|images/s|days?|%"
NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+"
FIGURE = re.compile(rf"(?<![\w.,/-])(?:MFU\s+(?P<mfu>\d+\.\d+)|(?P<num>{NUMBER})\s?(?P<unit>{UNITS}))(?![\w/])")
HEADER_UNIT = re.compile(rf"(?:^|\s)({UNITS}|MFU)$")
CELL_NUMBER = re.compile(rf"^\**({NUMBER})\**$")
# tests/unit/test_recipes.py requires a recipe's docstring to cite BENCHMARKS.md's predicted days in these words
RECIPE_DAYS_CITATION = re.compile(r"predicts (\d+\.\d+) days")


def _key(number: str, unit: str) -> tuple[str, str]:
  value = decimal.Decimal(number.replace(",", "")).normalize()
  return format(value, "f"), {"images/s": "img/s", "day": "days"}.get(unit, unit)


def figures_of(text: str, first_line: int = 1) -> list[tuple[int, tuple[str, str], str]]:
  """(line number, (value, unit), as written) for every figure in prose `text`."""
  found = []
  for number, line in enumerate(text.splitlines(), first_line):
    for m in FIGURE.finditer(line):
      key = _key(m["mfu"], "MFU") if m["mfu"] else _key(m["num"], m["unit"])
      found.append((number, key, m.group(0)))
  return found


def _cells(line: str) -> list[str]:
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_figures(text: str) -> set[tuple[str, str]]:
  """The figures of `text`'s tables: numeric cells under a column whose header names a unit."""
  found, units = set(), None
  for line in text.splitlines():
    if not line.lstrip().startswith("|"):
      units = None
      continue
    cells = _cells(line)
    if units is None:
      units = [m.group(1) if (m := HEADER_UNIT.search(cell)) else None for cell in cells]
      continue
    for unit, cell in zip(units, cells):
      if unit and (m := CELL_NUMBER.match(cell)):
        found.add(_key(m.group(1), unit))
  return found


def ledger_figures() -> dict[tuple[str, str], list[str]]:
  """{figure: the ledgers that hold it}."""
  held = {}
  for ledger in LEDGERS:
    text = ledger.read_text(encoding="utf-8")
    for key in {key for _, key, _ in figures_of(text)} | table_figures(text):
      held.setdefault(key, []).append(ledger.relative_to(ROOT).as_posix())
  return held


def docstring_of(path: pathlib.Path) -> tuple[str, int]:
  """A module's docstring and the line it starts on."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  node = tree.body[0] if tree.body else None
  if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
    return "", 1
  return node.value.value, node.lineno


def comments_of(path: pathlib.Path) -> list[tuple[str, int]]:
  """Each `# ...` comment of a module and its line."""
  with tokenize.open(path) as source:
    return [
      (token.string, token.start[0])
      for token in tokenize.generate_tokens(source.readline)
      if token.type == tokenize.COMMENT
    ]


def documents() -> list[tuple[pathlib.Path, str, int, bool]]:
  """(path, text, first line, is a recipe docstring) for every place that points at a ledger."""
  found = [
    (path, path.read_text(encoding="utf-8"), 1, False)
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    if path not in LEDGERS
  ]
  for path in sorted((ROOT / "configs").glob("*.py")):
    text, line = docstring_of(path)
    found.append((path, text, line, True))
    found.extend((path, comment, line, False) for comment, line in comments_of(path))
  return found


def restatements(held: dict[tuple[str, str], list[str]]) -> list[str]:
  found = []
  for path, text, first_line, is_config in documents():
    lines = text.splitlines()
    for number, key, written in figures_of(text, first_line):
      if key not in held:
        continue
      line = lines[number - first_line]
      if (
        is_config
        and key[1] == "days"
        and any(m.group(1) == written.split()[0] for m in RECIPE_DAYS_CITATION.finditer(line))
      ):
        continue
      found.append(f"{path.relative_to(ROOT)}:{number}: {written} (held by {', '.join(held[key])})")
  return found


def test_no_figure_of_a_ledger_is_restated():
  found = restatements(ledger_figures())
  assert not found, "figures a ledger holds, restated (cite its section by heading instead):\n" + "\n".join(found)


def test_benchmarks_holds_current_figures_only():
  lines = BENCHMARKS.read_text(encoding="utf-8").splitlines()
  assert len(lines) <= BENCHMARKS_MAX_LINES, (
    f"BENCHMARKS.md has {len(lines)} lines, over {BENCHMARKS_MAX_LINES}: drop what a newer figure supersedes (git "
    "keeps it), and move an option measured and not adopted to docs/tried_and_dropped.md"
  )


def test_the_definition_sees_figures_and_only_figures():
  found = figures_of("8.83 s a step, 64.0 GiB, MFU 0.310, 1,369 MB, 37.4 days, 62.9 images/s")
  assert [key for _, key, _ in found] == [
    ("8.83", "s"),
    ("64", "GiB"),
    ("0.31", "MFU"),
    ("1369", "MB"),
    ("37.4", "days"),
    ("62.9", "img/s"),
  ]
  # plain numbers, versions, ratios, sizes and bare integers with a unit are not figures
  assert not figures_of("jax 0.10.2, 8 GPUs, 30 s, 1.2x, lr 5e-4, 0.125 chance, v1.5s, 16 MiB, 3.3.2 s, 0.5sec")
  table = (
    "| model | step ms | img/s | MFU | predicted days | wall |\n| --- | ---: | ---: | ---: | ---: | ---: |\n"
    "| ViT | 838.7 | 305.2 | **0.310** | 1.1 | 17.5 |\n"
  )
  assert table_figures(table) == {("838.7", "ms"), ("305.2", "img/s"), ("0.31", "MFU"), ("1.1", "days")}


BUILD_MAX_LINE = 300


def test_build_md_keeps_its_lines_short():
  """BUILD.md's "Tested" holds the newest run of each row (older ones are git's), in cells short enough to read."""
  long = [
    f"BUILD.md:{n}: {len(line)} characters"
    for n, line in enumerate((ROOT / "BUILD.md").read_text(encoding="utf-8").splitlines(), 1)
    if len(line) >= BUILD_MAX_LINE
  ]
  assert not long, (
    f"lines of {BUILD_MAX_LINE} characters or more (keep a row's newest run, split a long cell into "
    "rows):\n" + "\n".join(long)
  )
