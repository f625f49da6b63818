"""Hostile data through the real readers: decompression bombs, a caption of 200 MB, tar members with absolute or
'..' names, links, a FIFO, zero-byte and truncated images, an EXIF-rotated JPEG, a CMYK JPEG, palette and RGBA
PNGs with transparency (tests/hostile.py writes them). Each is decoded as `transformers` decodes it, or left out
and counted under its data/limits.py reason, in bounded memory and time, and nothing is written outside the
output folder; the counts reach dataset.json, the indexes and the console."""

import collections
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image
import pytest
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

from visionfm_jax.data import limits
from visionfm_jax.data.sources import records, wds
from visionfm_jax.data.text import tokenizer
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.datatools import index_tars, train_tokenizer

from conftest import ROOT, cpu_env
import hostile

REFUSED_TEXT = "too_large 1, unsafe_name 2, link 2, not_a_file 1"  # limits.REASONS order


@pytest.fixture(scope="module")
def tar(tmp_path_factory):
  """(the hostile tar's folder, what hostile.hostile_tar says of it)."""
  folder = tmp_path_factory.mktemp("hostile")
  return folder, hostile.hostile_tar(folder / "00000.tar")


def reference_pixels(data: bytes, tmp_path) -> np.ndarray:
  """What `transformers` decodes `data` to: its load_image (EXIF orientation applied), then the image processors'
  convert_to_rgb (transparency composited onto white) on the upright image."""
  path = tmp_path / "image"
  path.write_bytes(data)
  with Image.open(path) as image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      return convert_to_rgb(image, return_numpy=True)
  return np.asarray(load_image(str(path)))


@pytest.mark.parametrize("key", list(hostile.DECODABLE))
def test_images_decode_as_transformers_decodes_them(key, tmp_path):
  data = hostile.DECODABLE[key]()
  np.testing.assert_array_equal(transforms.decode_image(data), reference_pixels(data, tmp_path))


def test_the_decoded_images_are_upright_and_of_the_right_colours():
  rotated = transforms.decode_image(hostile.exif_rotated_jpeg())
  assert rotated.shape == (40, 24, 3)  # stored 40 wide, 24 high; EXIF 6: turn 90 degrees clockwise
  assert np.abs(rotated.astype(int) - np.rot90(hostile.gradient(), k=-1)).mean() < 3
  inks = transforms.decode_image(hostile.cmyk_jpeg())[8, 4::8]  # cyan, magenta, yellow, black
  np.testing.assert_allclose(inks, [[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0]], atol=3)
  palette = transforms.decode_image(hostile.palette_png_with_alpha())[0, ::4]
  np.testing.assert_array_equal(palette, [[255, 255, 255], [255, 0, 0], [0, 0, 255]])  # transparent -> white
  rgba = transforms.decode_image(hostile.rgba_png())[0, ::3]
  np.testing.assert_array_equal(rgba, [[255, 255, 255], [127, 227, 127], [0, 200, 0]])


@pytest.mark.parametrize("size", [(10_000, 10_000), (20_000, 20_000)])
def test_a_decompression_bomb_is_refused_from_its_header(size):
  data = hostile.png_bomb(*size)
  assert len(data) < 400_000  # a few hundred KB that would decode to 300 MB (1.2 GB) of RGB
  start = time.monotonic()
  with pytest.raises(transforms.DECODE_ERRORS) as refused:
    transforms.decode_image(data)
  assert time.monotonic() - start < 1.0
  assert transforms.failure_reason(refused.value) == limits.TOO_MANY_PIXELS


def test_tar_listing_leaves_out_each_hostile_member_by_its_reason(tar):
  folder, made = tar
  with tarfile.open(folder / "00000.tar") as archive:
    samples, refused = wds.tar_listing(archive)
  assert list(samples) == made["kept"]
  assert refused == made["refused"]
  assert wds.reasons_text(refused) == REFUSED_TEXT


# Runs `python -m ARGV...` from a small process and reports the peak memory of that run alone. Measured from the
# test process itself, the figure would include the test process's own memory: Linux counts the image a child is
# forked from (up to its exec) in the child's ru_maxrss.
MEASURED = (
  "import os, sys\n"
  "pid = os.posix_spawn(sys.executable, [sys.executable, '-m', *sys.argv[1:]], os.environ)\n"
  "_, status, usage = os.wait4(pid, 0)\n"
  "print(f'peak_kb={usage.ru_maxrss}', file=sys.stderr)\n"
  "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_tool(argv, cwd) -> tuple[subprocess.CompletedProcess, float, float]:
  """(the finished tool, its wall seconds, its peak resident memory in MB): `python -m <argv>` as a user runs it."""
  start = time.monotonic()
  result = subprocess.run(
    [sys.executable, "-c", MEASURED, *argv],
    cwd=cwd,
    env=cpu_env(1),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  peak_kb = int(result.stderr.rsplit("peak_kb=", 1)[1].split()[0])
  return result, time.monotonic() - start, peak_kb / 1024


def files_outside(root: pathlib.Path, inside: pathlib.Path) -> set[str]:
  return {str(p.relative_to(root)) for p in root.rglob("*") if inside not in p.parents and p != inside}


def test_prepare_data_converts_the_hostile_tar_in_bounded_memory_counting_what_it_leaves_out(tar, tmp_path):
  folder, made = tar
  before = files_outside(folder.parent, tmp_path)
  plain = tmp_path / "plain"
  plain.mkdir()
  hostile.plain_tar(plain / "00000.tar")
  baseline, _, baseline_mb = run_tool(
    [
      "visionfm_jax.datatools.prepare_data",
      "--format=webdataset",
      "--verify",
      f"--input={plain}/*.tar",
      f"--output={tmp_path / 'plain_out'}",
    ],
    ROOT,
  )
  assert baseline.returncode == 0, baseline.stderr[-2000:]
  output = tmp_path / "out"
  result, seconds, peak_mb = run_tool(
    [
      "visionfm_jax.datatools.prepare_data",
      "--format=webdataset",
      "--verify",
      f"--input={folder}/*.tar",
      f"--output={output}",
    ],
    ROOT,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  decodable, skipped = len(hostile.DECODABLE), {**made["undecodable"], **made["refused"]}
  assert (
    f"train {decodable} records, {sum(skipped.values())} skipped (undecodable 2, too_many_pixels 2, {REFUSED_TEXT})"
  ) in result.stdout
  entry = json.loads((output / "dataset.json").read_text())["splits"]["train"]
  assert entry["records"] == decodable and entry["skipped_by"] == {
    r: skipped[r] for r in limits.REASONS if r in skipped
  }
  # Bounded: no 200 MB caption read, no 300 MB decode; a plain tar's conversion is the yardstick.
  assert peak_mb < baseline_mb + 100 and peak_mb < 1000, (peak_mb, baseline_mb)
  assert seconds < 60
  assert files_outside(folder.parent, tmp_path) == before  # nothing outside the output (and this test's) folder
  source = records.ArrayRecordSource(str(output / "train-*.array_record"))
  stored = {record["key"]: record["image"] for record in (source[i] for i in range(len(source)))}
  for key in hostile.DECODABLE:
    np.testing.assert_array_equal(transforms.decode_image(stored[key]), reference_pixels(made["images"][key], tmp_path))


def test_the_wds_source_serves_only_what_the_index_keeps_and_the_decoder_counts_the_bombs(tar, capsys):
  folder, made = tar
  assert index_tars.main(["prog", f"--input={folder}/*.tar", "--num_workers=0"]) == 0
  assert f"6 refused: {REFUSED_TEXT})" in capsys.readouterr().out
  source = wds.WdsSource(f"{folder}/*.tar")
  assert len(source) == len(made["kept"]) and source.left_out == made["refused"]
  decoded = [transforms.Decode().map(source[i]) for i in range(len(source))]
  failed = [made["kept"][i] for i, record in enumerate(decoded) if record["image"] is None]
  assert failed == ["empty", "truncated", "bomb_warned", "bomb_refused"]


def test_train_tokenizer_leaves_out_the_hostile_samples_and_long_lines(tar, tmp_path):
  folder, made = tar
  plain = tmp_path / "plain"
  plain.mkdir()
  hostile.plain_tar(plain / "00000.tar")
  runs = {
    name: run_tool(
      [
        "visionfm_jax.datatools.train_tokenizer",
        f"--tars={tars}/*.tar",
        "--vocab_size=40",
        f"--out={tmp_path / name}",
        "--num_threads=1",
      ],
      ROOT,
    )
    for name, tars in (("plain", plain), ("hostile", folder))
  }
  assert all(result.returncode == 0 for result, _, _ in runs.values()), runs
  result, seconds, peak_mb = runs["hostile"]
  assert f"sampled {len(made['kept'])} of {len(made['kept'])} captions; left out 6 ({REFUSED_TEXT})" in result.stdout
  assert peak_mb < runs["plain"][2] + 100 and seconds < 60, (peak_mb, runs["plain"][2])  # the 200 MB caption unread
  text = tmp_path / "captions.txt"
  with open(text, "w", encoding="utf-8") as f:
    f.write("a red circle\n" + "x" * (limits.MAX_TEXT_BYTES * 3 + 5) + "\na blue square\n")
  left_out = collections.Counter()
  assert list(train_tokenizer.stream_lines(str(text), left_out)) == ["a red circle\n", "a blue square\n"]
  assert left_out == {limits.TOO_LARGE: 1}


def test_a_record_with_a_caption_over_the_limit_is_refused_before_tokenizing(tmp_path):
  tok = tokenizer.load(tokenizer.shapes_tokenizer_path(), max_len=16)
  select = transforms.SelectPair(tok, with_label=False)
  image = np.zeros((4, 4, 3), np.uint8)
  kept = select.map({"image": image, "caption": "a red circle"})
  refused = select.map({"image": image, "caption": "a red circle " * (limits.MAX_TEXT_BYTES // 13 + 1)})
  assert kept.get("valid", True) and not refused["valid"] and not refused["has_text"]


def test_prepare_data_reads_only_regular_files_of_a_class_tree(tmp_path):
  tree = tmp_path / "tree"
  for name in ("cat", "dog"):
    (tree / name).mkdir(parents=True)
    (tree / name / "plain.jpg").write_bytes(hostile.jpeg(hostile.gradient()))
  elsewhere = tmp_path / "elsewhere.jpg"
  elsewhere.write_bytes(hostile.exif_rotated_jpeg())
  (tree / "cat" / "linked.jpg").symlink_to(elsewhere)  # a link out of the tree: refused (link)
  (tree / "cat" / "zeros.jpg").symlink_to("/dev/zero")  # endless: never read (link)
  os.mkfifo(tree / "dog" / "fifo.jpg")  # opening it for reading would wait for a writer
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "visionfm_jax.datatools.prepare_data",
      "--format=folders",
      f"--input={tree}",
      f"--output={tmp_path / 'out'}",
      "--records_per_shard=10",
    ],
    cwd=ROOT,
    env=cpu_env(1),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train 2 records, 3 skipped (link 2, not_a_file 1), " in result.stdout
  entry = json.loads((tmp_path / "out" / "dataset.json").read_text())["splits"]["train"]
  assert entry["skipped_by"] == {limits.LINK: 2, limits.NOT_A_FILE: 1} and entry["class_counts"] == [1, 1]
