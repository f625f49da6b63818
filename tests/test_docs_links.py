"""Every link in the front door and the docs resolves inside the repository, anchors included."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
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
  assert github_anchor("Converting image folders and WebDataset shards: `tools.prepare_data`") == (
      "converting-image-folders-and-webdataset-shards-toolsprepare_data")


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
