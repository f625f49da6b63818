"""Every link in the front door and the docs resolves inside the repository, anchors included."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "BUILD.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)


def github_anchor(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*]", "", heading.strip().lower())
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors_of(path: pathlib.Path) -> set[str]:
  text = FENCE.sub("", path.read_text())
  return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def links_of(path: pathlib.Path) -> list[str]:
  return LINK.findall(FENCE.sub("", path.read_text()))


def test_github_anchor_matches_githubs_rule():
  assert github_anchor("Preparing data") == "preparing-data"
  assert github_anchor("Converting image folders and WebDataset shards: `datatools.prepare_data`") == (
    "converting-image-folders-and-webdataset-shards-datatoolsprepare_data"
  )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(doc):
  assert doc.exists(), doc
  broken = []
  for link in links_of(doc):
    if re.match(r"[a-z]+://", link):
      continue  # external pages are the reader's to follow; the docs' own links must resolve here
    target, _, anchor = link.partition("#")
    path = (doc.parent / target).resolve() if target else doc
    if not path.is_relative_to(ROOT) or not path.exists():
      broken.append(f"{link}: no such file in the repository")
    elif anchor and path.suffix == ".md" and anchor not in anchors_of(path):
      broken.append(f"{link}: no heading with anchor #{anchor} in {path.relative_to(ROOT)}")
  assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_readme_is_a_front_door():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= 140, f"README.md has {len(lines)} lines; the detail belongs in docs/"
  linked = {link.partition("#")[0] for link in links_of(ROOT / "README.md")}
  for doc in (ROOT / "docs").glob("*.md"):
    assert f"docs/{doc.name}" in linked, f"README.md does not link docs/{doc.name}"


BENCHMARKS = ROOT / "BENCHMARKS.md"
# A citation of a section: BENCHMARKS.md, then a comma, a space or an opening parenthesis, then the heading in
# double or single quotes.
CITATION = re.compile(
  r"BENCHMARKS(?:\.md)?(?:,\s*|\s+\(?|\s*\()"
  r"(?:\"([^\"\n]{1,120})\"|'([^'\n]{1,120}?)'(?=[\s),.;:]))"
)


def _heading_key(text: str) -> str:
  return " ".join(re.sub(r"[`*]", "", text).split()).lower()


def cited_headings() -> list[tuple[str, str]]:
  """(file, heading) for every quoted BENCHMARKS.md section citation in a tracked text file; a citation broken over
  lines (a docstring, or comment lines whose `#` or `//` markers are dropped) is read joined."""
  import subprocess

  listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
  if listed.returncode != 0:
    pytest.skip("not a git checkout")
  found = []
  for name in filter(None, listed.stdout.decode().split("\0")):
    path = ROOT / name
    if name == "BENCHMARKS.md" or not path.is_file():
      continue
    try:
      text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    if "BENCHMARKS" not in text:
      continue
    joined = re.sub(r"\s*\n\s*(?:#+|//)?\s*", " ", text)
    found += [(name, m.group(1) or m.group(2)) for m in CITATION.finditer(joined)]
  return found


def test_every_cited_benchmarks_heading_exists():
  headings = {_heading_key(m.group(1)) for m in re.finditer(r"^#+ (.+)$", FENCE.sub("", BENCHMARKS.read_text()), re.M)}
  cited = cited_headings()
  assert cited, "no BENCHMARKS.md citation found: the pattern has drifted from how the code cites it"
  missing = sorted({f'{name}: "{heading}"' for name, heading in cited if _heading_key(heading) not in headings})
  assert not missing, "BENCHMARKS.md has no such heading:\n" + "\n".join(missing)


def test_benchmarks_lists_every_lead_of_bench_gpu():
  """The next GPU call runs `launch/bench_gpu.sh leads`: BENCHMARKS.md's table of leads names every row it runs."""
  leads = re.findall(r"^\s*(?:\w+=\S+\s+)*lead (\w+)", (ROOT / "launch" / "bench_gpu.sh").read_text(), re.M)
  assert leads
  listed = set(re.findall(r"^\s*\| `(\w+)` \|", BENCHMARKS.read_text(), re.M))
  assert not [lead for lead in leads if lead not in listed], sorted(set(leads) - listed)
