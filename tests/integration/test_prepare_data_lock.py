"""`prepare_data` into a folder that another running prepare_data holds (its lock held by a second process, as
lockf is per process): one error line naming the holder, and the folder written once it is let go."""

import subprocess
import sys

from test_untrusted_tables import HOLDER, _error, _jpeg, _main, _write_csv


def test_a_second_run_into_a_folder_being_written_is_one_line_naming_the_holder(tmp_path, capsys):
  (tmp_path / "photos").mkdir()
  for i in range(2):
    (tmp_path / "photos" / f"{i}.jpg").write_bytes(_jpeg(i))
  table = _write_csv(tmp_path / "pairs.csv", [("photos/0.jpg", "a"), ("photos/1.jpg", "b")])
  out = tmp_path / "out"
  out.mkdir()
  # Holds the folder's lock as a running prepare_data does (lockf is per process: this one could not refuse itself).
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(out / ".prepare_data.lock")],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline() == "held\n"
    err = _error(capsys, "--format=caption_table", f"--input={table}", f"--output={out}")
    assert f"--output={out}: another prepare_data is writing into it (host " in err
    assert f"pid {holder.pid}" in err
  finally:
    holder.communicate("")
  status, stdout, _ = _main(capsys, "--format=caption_table", f"--input={table}", f"--output={out}")
  assert status == 0 and "train 2 records" in stdout
  assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
