"""prepare_data with input someone handed the user, through its CLI: a table or annotations that name files outside
the folder the user named (by '..', an absolute path, a linked folder or a linked file) have none of their bytes
copied (`outside_root`, `link`); a table that repeats its rows holds out no image it trains on; long cells; two runs
into one folder; a one-class tree; warnings that name the user's input. Retrieval benchmarks name no image outside
their folder."""

import csv
import ctypes
import io
import json
import os
from pathlib import Path
import subprocess
import sys

from PIL import Image
import pytest

from visionfm_jax.data import limits
from visionfm_jax.data.sources import records
from visionfm_jax.data.text import caption_sets
from visionfm_jax.datatools.prepare_data import __main__ as prepare_data
from visionfm_jax.errors import DataError


def _jpeg(seed: int, size=(12, 10)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (size[0] + seed, size[1]), (20 * seed % 256, 100, 200 - seed)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _main(capsys, *args) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `prepare_data ARGS` (one process, no workers)."""
  status = prepare_data.main(["prepare_data", "--num_workers=0", *args])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def _one_error_line(err: str) -> bool:
  """Whether `err` ends with its one `error:` line, after the skipped files' warning lines only."""
  lines = err.splitlines()
  return bool(lines) and lines[-1].startswith("error: ") and all(" warning: " in line for line in lines[:-1])


def _error(capsys, *args) -> str:
  status, out, err = _main(capsys, *args)
  assert status == 2 and out == "" and _one_error_line(err), (status, out, err)
  return err.splitlines()[-1] + "\n"


def _write_csv(path: Path, rows) -> Path:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["path", "caption"])
    writer.writerows(rows)
  return path


def _records(output: Path, split: str = "train") -> dict[str, dict]:
  source = records.ArrayRecordSource(str(output / f"{split}-*.array_record"))
  return {record["key"]: record for record in (source[i] for i in range(len(source)))}


def _output_bytes(output: Path) -> bytes:
  """Every file of `output` and every stored image of its shards (ArrayRecord compresses its chunks: a file's bytes
  need not hold the images it stores)."""
  images = [
    record["image"]
    for split in ("train", "validation")
    if list(output.glob(f"{split}-*.array_record"))
    for record in _records(output, split).values()
  ]
  return b"".join([p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()] + images)


@pytest.fixture
def handed(tmp_path) -> dict:
  """A user's private image-shaped key (mode 0600) beside a data folder someone handed them: a photo, a link to
  the private folder, a link to the key, and a table naming the key four ways."""
  private = tmp_path / "private"
  private.mkdir()
  key = private / "id_rsa"
  key.write_bytes(_jpeg(7))  # an image, so that --verify keeps it: only the confinement stops it
  key.chmod(0o600)
  data = tmp_path / "data"
  (data / "photos").mkdir(parents=True)
  (data / "photos" / "a.jpg").write_bytes(_jpeg(1))
  os.symlink(private, data / "linked")
  os.symlink(key, data / "photos" / "key.jpg")
  rows = [
    ("photos/a.jpg", "a photo"),
    ("../private/id_rsa", "a key"),
    (str(key), "a key"),
    ("linked/id_rsa", "a key"),
    ("photos/key.jpg", "a key"),
  ]
  return {"table": _write_csv(data / "pairs.csv", rows), "key": key, "data": data}


def test_a_table_copies_no_byte_from_outside_its_folder(handed, tmp_path, capsys):
  out = tmp_path / "out"
  status, stdout, _ = _main(
    capsys, "--format=caption_table", f"--input={handed['table']}", f"--output={out}", "--verify", "--follow_links"
  )
  assert status == 0
  assert "train 1 records, 4 skipped (link 1, outside_root 3)" in stdout
  assert list(_records(out)) == ["photos/a.jpg"]
  assert handed["key"].read_bytes() not in _output_bytes(out)
  entry = records.read_metadata(str(out))["splits"]["train"]
  assert entry["skipped_by"] == {limits.LINK: 1, limits.OUTSIDE_ROOT: 3}


def test_root_names_the_folder_a_table_may_read_and_one_file_is_one_image(handed, tmp_path, capsys):
  out = tmp_path / "out"
  status, stdout, _ = _main(
    capsys, "--format=caption_table", f"--input={handed['table']}", f"--output={out}", f"--root={tmp_path}"
  )
  assert status == 0
  # the key named three ways (its folder, its absolute path, a linked folder) is one image; its link is a link
  assert "train 2 records, 3 skipped (link 1, duplicate 2)" in stdout
  assert sorted(_records(out)) == ["../private/id_rsa", "photos/a.jpg"]
  assert "--root: only for" in _error(
    capsys, "--format=caption_files", f"--input={handed['data']}", f"--output={out}", f"--root={tmp_path}"
  )


def test_coco_annotations_read_no_file_through_a_link_out_of_the_data_set(tmp_path, capsys):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "private.jpg").write_bytes(_jpeg(9))
  coco = tmp_path / "coco"
  (coco / "train2017").mkdir(parents=True)
  (coco / "train2017" / "1.jpg").write_bytes(_jpeg(1))
  os.symlink(elsewhere / "private.jpg", coco / "train2017" / "2.jpg")
  images = [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}]
  (coco / "annotations").mkdir()
  (coco / "annotations" / "captions_train2017.json").write_text(
    json.dumps({"images": images, "annotations": [{"image_id": i, "caption": f"image {i}"} for i in (1, 2)]})
  )
  out = tmp_path / "out"
  status, stdout, _ = _main(capsys, "--format=coco", f"--input={coco}", f"--output={out}")
  assert status == 0 and "train 1 records, 1 skipped (link 1)" in stdout
  assert (elsewhere / "private.jpg").read_bytes() not in _output_bytes(out)
  linked = tmp_path / "linked"  # the same data set, its image folder a link to the first's
  (linked / "annotations").mkdir(parents=True)
  (linked / "annotations" / "captions_train2017.json").write_bytes(
    (coco / "annotations" / "captions_train2017.json").read_bytes()
  )
  os.symlink(coco / "train2017", linked / "train2017")
  err = _error(capsys, "--format=coco", f"--input={linked}", f"--output={tmp_path / 'out2'}")
  assert "none of its 2 pairs' images could be read (2 outside_root); a folder" in err and "--root=DIR" in err
  status, stdout, _ = _main(
    capsys, "--format=coco", f"--input={linked}", f"--output={tmp_path / 'out3'}", f"--root={coco}"
  )
  assert status == 0 and "train 1 records, 1 skipped (link 1)" in stdout


def test_a_table_that_repeats_its_rows_holds_out_no_image_it_trains_on(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  for i in range(12):
    (data / f"{i:02d}.jpg").write_bytes(_jpeg(i))
  (data / "copy.jpg").write_bytes(_jpeg(0))  # 00.jpg under another name
  rows = [(f"{i:02d}.jpg", f"photo {i}") for i in range(12)] * 2 + [
    ("./00.jpg", "photo 0"),
    ("copy.jpg", "photo 0"),
    ("copy.jpg", "the same photo, other words"),
  ]
  table = _write_csv(data / "pairs.csv", rows)
  out = tmp_path / "out"
  status, stdout, _ = _main(
    capsys, "--format=caption_table", f"--input={table}", f"--output={out}", "--holdout_examples=4", "--seed=3"
  )
  assert status == 0 and "duplicate 14" in stdout
  train, held = _records(out), _records(out, "validation")
  images = lambda split: {split[key]["image"] for key in split}  # noqa: E731
  assert len(images(held)) == 4 and not images(train) & images(held)
  assert sum(len(split) for split in (train, held)) == 13  # twelve photos, and the copy's other caption


def test_a_long_csv_cell_is_read_and_an_overlong_one_skips_its_row(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  for i in range(3):
    (data / f"{i}.jpg").write_bytes(_jpeg(i))
  (data / "injected.jpg").write_bytes(_jpeg(5))
  long_caption = "a long caption " * 14_000  # 210 KB: over csv's 128 KiB field limit, under the project's
  overlong = "too long\ninjected.jpg,a row inside a cell\n" + "x" * limits.MAX_TEXT_BYTES
  table = _write_csv(data / "pairs.csv", [("0.jpg", long_caption), ("1.jpg", overlong), ("2.jpg", "short")])
  out = tmp_path / "out"
  status, stdout, _ = _main(capsys, "--format=caption_table", f"--input={table}", f"--output={out}")
  assert status == 0 and "train 2 records, 1 skipped (too_large 1)" in stdout
  pairs = _records(out)
  assert sorted(pairs) == ["0.jpg", "2.jpg"] and pairs["0.jpg"]["caption"] == long_caption.strip()
  jsonl = data / "pairs.jsonl"
  jsonl.write_text(
    json.dumps({"path": "0.jpg", "caption": "x" * (4 * limits.MAX_TEXT_BYTES)})
    + "\n"
    + json.dumps({"path": "2.jpg", "caption": "short"})
    + "\n"
  )
  status, stdout, _ = _main(capsys, "--format=caption_table", f"--input={jsonl}", f"--output={tmp_path / 'j'}")
  assert status == 0 and "train 1 records, 1 skipped (too_large 1)" in stdout


HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": ""}).encode())
print("held", flush=True)
sys.stdin.read()
"""


def _class_tree(root: Path, classes: list[str]) -> Path:
  for c, name in enumerate(classes):
    (root / name).mkdir(parents=True)
    for i in range(2):
      (root / name / f"{i}.jpg").write_bytes(_jpeg(c * 2 + i))
  return root


def test_a_one_class_tree_is_refused_and_warnings_name_the_users_folder(tmp_path, capsys):
  one = _class_tree(tmp_path / "one", ["cats"])
  err = _error(capsys, "--format=folders", f"--input={one}", f"--output={tmp_path / 'out1'}")
  assert f"--input={one}: images in one class folder only (cats)" in err and "--unlabelled" in err
  two = _class_tree(tmp_path / "two", ["cats", "dogs"])
  status, _, err = _main(capsys, "--format=folders", f"--input={two}", f"--output={tmp_path / 'out2'}", "--min_side=64")
  assert status == 0 and "warning: 4 of the 4 train images have a shorter side below 64 px" in err
  assert str(two) in err and "img2dataset" not in err


def test_a_retrieval_benchmark_names_no_image_outside_its_folder(tmp_path):
  (tmp_path / "coco" / "val2014").mkdir(parents=True)
  (tmp_path / "secret.jpg").write_bytes(_jpeg(3))
  for name in ("../../secret.jpg", "/etc/hostname"):
    images = [{"split": "test", "filepath": "val2014", "filename": name, "sentences": [{"raw": "a cat"}]}]
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images}))
    with pytest.raises(DataError, match="names an image outside"):
      caption_sets.open_caption_set(f"coco_karpathy:{tmp_path / 'coco'}")


RENAME_EXCHANGE, AT_FDCWD = 2, -100  # linux/fs.h, fcntl.h
# Exchanges two names (argv[1], argv[2]) atomically until the file argv[3] exists; prints the exchanges.
SWAPPER = """
import ctypes, os, sys
first, second, stop = (os.fsencode(a) for a in sys.argv[1:])
exchange, swaps = ctypes.CDLL(None, use_errno=True).renameat2, 0
while not os.path.exists(stop):
  if exchange(-100, first, -100, second, 2):  # AT_FDCWD, RENAME_EXCHANGE
    raise OSError(ctypes.get_errno(), "renameat2")
  swaps += 1
print(swaps)
"""


def _exchange(first: Path, second: Path) -> None:
  """Swaps the names `first` and `second` in one step (renameat2's RENAME_EXCHANGE): at no time is either missing."""
  if ctypes.CDLL(None, use_errno=True).renameat2(
    AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE
  ):
    raise OSError(ctypes.get_errno(), "renameat2")


@pytest.fixture
def swappable(tmp_path) -> dict:
  """A table of 40 images in a sub-folder, a link beside it to a private folder of same-named images (0600), and
  the private images' bytes."""
  private, data = tmp_path / "private", tmp_path / "data"
  private.mkdir(mode=0o700)
  (data / "sub").mkdir(parents=True)
  names = [f"{i}.jpg" for i in range(40)]
  for i, name in enumerate(names):
    (data / "sub" / name).write_bytes(_jpeg(i % 8))
    (private / name).write_bytes(_jpeg(100 + i % 8, size=(14, 9)))
    (private / name).chmod(0o600)
  os.symlink(private, data / "link")
  return {
    "table": _write_csv(data / "pairs.csv", [(f"sub/{name}", f"photo {name}") for name in names]),
    "sub": data / "sub",
    "link": data / "link",
    "secrets": [(private / name).read_bytes() for name in names[:8]],
  }


def _convert_without_secrets(capsys, swappable, out: Path) -> None:
  """Converts the table into `out`: exit 0, or one error line when no image could be read; no private byte in it."""
  status, _, err = _main(capsys, "--format=caption_table", f"--input={swappable['table']}", f"--output={out}")
  assert status == 0 or (status == 2 and _one_error_line(err)), err[-3000:]
  written = _output_bytes(out) if out.exists() else b""
  assert not any(secret in written for secret in swappable["secrets"]), f"{out}: a private image in a shard"


def test_a_folder_swapped_for_a_link_after_each_check_reads_no_private_byte(swappable, tmp_path, capsys, monkeypatch):
  """The race at its worst, without a second thread: the sub-folder and the link change places right after each
  resolution of the folder by name. When the folders were checked by name (os.path.realpath) and the file then
  opened by name, every other image was read from the private folder."""
  resolve = os.path.realpath

  def realpath(path, *args, **kwargs):
    resolved = resolve(path, *args, **kwargs)
    if os.fspath(path) == str(swappable["sub"]):
      _exchange(swappable["sub"], swappable["link"])
    return resolved

  monkeypatch.setattr(os.path, "realpath", realpath)
  _convert_without_secrets(capsys, swappable, tmp_path / "out")


def test_a_folder_swapped_for_a_link_while_a_table_is_read_copies_no_private_byte(swappable, tmp_path, capsys):
  """Another process exchanges the sub-folder and the link, over and over, while prepare_data lists and reads, in
  12 conversions: none copies a private image or crashes (os.path.realpath raised EINVAL when a link it had seen
  became a folder)."""
  stop = tmp_path / "stop"
  swapper = subprocess.Popen(
    [sys.executable, "-c", SWAPPER, swappable["sub"], swappable["link"], stop], stdout=subprocess.PIPE, text=True
  )
  try:
    for attempt in range(12):
      _convert_without_secrets(capsys, swappable, tmp_path / f"out{attempt}")
  finally:
    stop.touch()
    swaps, _ = swapper.communicate(timeout=30)
  assert int(swaps) > 0


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_nul_byte_in_a_path_cell_is_a_bad_row(kind, tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  (data / "a.jpg").write_bytes(_jpeg(1))
  (data / "b.jpg").write_bytes(_jpeg(2))
  rows = [("a.jpg", "a photo"), ("b\0.jpg", "a path no file system takes"), ("b.jpg", "another photo")]
  if kind == "csv":
    table = _write_csv(data / "pairs.csv", rows)
  else:
    table = data / "pairs.jsonl"
    table.write_text("".join(json.dumps({"path": path, "caption": caption}) + "\n" for path, caption in rows))
  out = tmp_path / "out"
  status, stdout, err = _main(capsys, "--format=caption_table", f"--input={table}", f"--output={out}")
  assert status == 0 and "Traceback" not in err, err[-3000:]
  assert "train 2 records, 1 skipped (bad_row 1)" in stdout, stdout
  assert sorted(_records(out)) == ["a.jpg", "b.jpg"]
