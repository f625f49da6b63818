"""atomic.write / write_json: the whole new content replaces the old file, no '.tmp' is left behind."""

import json
import os

from visionfm_jax import atomic


def test_text_bytes_and_json_replace_the_file_and_leave_no_temporary(tmp_path):
  path = str(tmp_path / "f.json")
  atomic.write(path, "old")
  atomic.write_json(path, {"b": 1, "a": [2]}, indent=1)
  with open(path, encoding="utf-8") as f:
    assert f.read() == json.dumps({"b": 1, "a": [2]}, indent=1)
  atomic.write(path, b"\x00\xff")
  with open(path, "rb") as f:
    assert f.read() == b"\x00\xff"
  assert os.listdir(tmp_path) == ["f.json"]
