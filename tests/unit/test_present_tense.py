"""The product speaks of itself in the present: no tracked file narrates who did what in which working session
(history is git's). Binary files and git's own are not read."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
NARRATION = re.compile(r"\b[Ss]ession \d")


def tracked_files() -> list[pathlib.Path]:
  listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
  if listed.returncode == 0:
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]
  return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]  # an exported tree


def test_no_tracked_file_narrates_sessions():
  found = []
  for path in tracked_files():
    try:
      text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    found += [
      f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
      for m in NARRATION.finditer(text)
    ]
  assert not found, "narration of sessions (history belongs to git):\n" + "\n".join(found)


def test_the_check_sees_narration():
  word = "ession"  # split, so that this file does not narrate
  assert NARRATION.search(f"measured in S{word} 12") and NARRATION.search(f"s{word} 3 moved it")
  assert not NARRATION.search("a TensorFlow session object") and not NARRATION.search("sessions")
