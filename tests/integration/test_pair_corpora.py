"""COCO captions and Visual Genome region descriptions, in their released layouts, prepared as pair records by
`python -m visionfm_jax.datatools.prepare_data --format=coco|visual_genome` and read back (CPU, no network)."""

import json
from pathlib import Path
import subprocess

import numpy as np
import pytest

from visionfm_jax.data.sources import records
from visionfm_jax.data.text import pair_corpora
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.datatools.prepare_data import __main__ as prepare_data
from visionfm_jax.datatools.prepare_data.captioned import list_pairs
from visionfm_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _jpeg(path: Path, width: int, height: int, colour=(200, 30, 30)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[:] = colour
  path.write_bytes(records.encode_jpeg(pixels))


def _write_json(path: Path, data) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data), encoding="utf-8")


def _karpathy(path: Path, test_ids, train_ids) -> str:
  images = [{"cocoid": i, "split": "test", "filename": f"COCO_val2014_{i:012d}.jpg"} for i in test_ids]
  images += [{"cocoid": i, "split": "train", "filename": f"COCO_train2014_{i:012d}.jpg"} for i in train_ids]
  _write_json(path, {"images": images, "dataset": "coco"})
  return str(path)


def _prepare(warm, *args) -> subprocess.CompletedProcess:
  """`python -m visionfm_jax.datatools.prepare_data ARGS`, run by the warm interpreter `warm`."""
  return subprocess.run(
    [warm.python, "-m", "visionfm_jax.datatools.prepare_data", *args],
    cwd=ROOT,
    env=warm.env(),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def _read_back(output: Path) -> list[dict]:
  source = records.ArrayRecordSource(str(output / "train-*.array_record"))
  return [source[i] for i in range(len(source))]


@pytest.fixture
def coco_root(tmp_path):
  root = tmp_path / "coco"
  images = [
    {"id": 9, "file_name": "000000000009.jpg", "height": 20, "width": 30, "license": 1},
    {"id": 3, "file_name": "000000000003.jpg", "height": 20, "width": 30, "license": 1},
    {"id": 5, "file_name": "000000000005.jpg", "height": 20, "width": 30, "license": 1},
    {"id": 7, "file_name": "000000000007.jpg", "height": 20, "width": 30, "license": 1},
  ]
  captions = {
    3: ["A cat on a mat.", "a cat ", "The cat sits.", "Cat.", "A small cat."],
    9: ["Two dogs.", "dogs play", "Dogs on grass.", "A dog pair.", "Dogs running."],
    5: ["A held-out image."] * 5,
    7: ["No file for this one."],
  }
  annotations = [
    {"image_id": i, "caption": c, "id": 100 * i + n} for i in (9, 5, 3, 7) for n, c in enumerate(captions[i])
  ]
  _write_json(
    root / "annotations" / "captions_train2017.json",
    {"info": {}, "licenses": [], "images": images, "annotations": annotations},
  )
  for i in (3, 5, 9):
    _jpeg(root / "train2017" / f"{i:012d}.jpg", 30, 20)
  return root, captions


def test_coco_captions_become_one_pair_per_caption(tmp_path, coco_root, warm_python):
  root, captions = coco_root
  karpathy = _karpathy(tmp_path / "dataset_coco.json", test_ids=[5], train_ids=[3, 9])
  output = tmp_path / "coco_pairs"
  result = _prepare(
    warm_python,
    "--format=coco",
    f"--input={root}",
    f"--output={output}",
    "--records_per_shard=4",
    f"--exclude_karpathy={karpathy}",
    "--num_workers=0",
  )
  assert result.returncode == 0, result.stderr
  got = _read_back(output)
  expected = [(c.strip(), f"{i:012d}.jpg#{n}") for i in (3, 9) for n, c in enumerate(captions[i])]
  assert [(r["caption"], r["key"]) for r in got] == expected  # images in id order, every caption, in file order
  file_bytes = (root / "train2017" / "000000000003.jpg").read_bytes()
  assert all(r["image"] == file_bytes for r in got[:5])  # stored as they are
  split = json.loads((output / "dataset.json").read_text())["splits"]["train"]
  assert (split["records"], split["kind"], len(split["shards"])) == (10, "pairs", 3)
  assert (split["images"], split["excluded_images"], split["missing_images"], split["uncaptioned"]) == (2, 1, 1, 0)
  # without the exclusion the Karpathy test image's five captions are pairs too; resume keeps finished shards
  pairs, counts = pair_corpora.coco_pairs(root)
  assert len(pairs) == 15 and counts["excluded_images"] == 0
  again = _prepare(
    warm_python,
    "--format=coco",
    f"--input={root}",
    f"--output={output}",
    "--records_per_shard=4",
    f"--exclude_karpathy={karpathy}",
    "--num_workers=0",
  )
  assert again.returncode == 0 and "train 10 records" in again.stdout


def test_coco_file_names_outside_its_folder_are_skipped_as_outside_root_not_missing(tmp_path, coco_root, warm_python):
  """As docs/data_preparation.md's table says: an annotation's '../' or absolute path is `outside_root`, and no byte
  of the file it names reaches a shard."""
  root, _ = coco_root
  secret = tmp_path / "secret.jpg"
  _jpeg(secret, 30, 20, colour=(1, 2, 3))
  annotations_file = root / "annotations" / "captions_train2017.json"
  listing = json.loads(annotations_file.read_text())
  for image_id, name in ((11, "../../secret.jpg"), (13, str(secret))):
    listing["images"].append({"id": image_id, "file_name": name, "height": 20, "width": 30, "license": 1})
    listing["annotations"].append({"image_id": image_id, "caption": "a private photo", "id": 100 * image_id})
  annotations_file.write_text(json.dumps(listing))
  output = tmp_path / "coco_pairs"
  result = _prepare(warm_python, "--format=coco", f"--input={root}", f"--output={output}", "--num_workers=0")
  assert result.returncode == 0, result.stderr
  split = json.loads((output / "dataset.json").read_text())["splits"]["train"]
  assert split["skipped_by"] == {"outside_root": 2} and split["missing_images"] == 1, split
  assert split["records"] == 15 and all(r["image"] != secret.read_bytes() for r in _read_back(output))


def test_visual_genome_regions_become_crops_or_whole_images(tmp_path, warm_python):
  root = tmp_path / "vg"
  _jpeg(root / "VG_100K" / "1.jpg", 80, 60, colour=(20, 200, 20))
  _jpeg(root / "VG_100K_2" / "2.jpg", 50, 40, colour=(20, 20, 200))
  _jpeg(root / "VG_100K" / "3.jpg", 50, 40)
  (root / "VG_100K_2" / "5.jpg").write_bytes(b"not a jpeg")
  _write_json(
    root / "image_data.json",
    [
      {
        "image_id": 1,
        "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg",
        "width": 80,
        "height": 60,
        "coco_id": None,
        "flickr_id": 111,
      },
      {
        "id": 2,
        "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg",
        "width": 50,
        "height": 40,
        "coco_id": 41,
        "flickr_id": None,
      },
      {"image_id": 3, "url": "x", "width": 50, "height": 40, "coco_id": 77, "flickr_id": None},
      {"image_id": 4, "url": "x", "width": 50, "height": 40, "coco_id": None, "flickr_id": None},
      {"image_id": 5, "url": "x", "width": 50, "height": 40, "coco_id": None, "flickr_id": None},
    ],
  )
  region = lambda image, rid, phrase, x, y, w, h: {
    "region_id": rid,
    "image_id": image,
    "phrase": phrase,
    "x": x,
    "y": y,
    "width": w,
    "height": h,
  }
  _write_json(
    root / "region_descriptions.json",
    [
      {
        "id": 1,
        "regions": [
          region(1, 10, "a green field", 5, 10, 40, 30),
          region(1, 11, "a tiny dot", 0, 0, 3, 3),
          region(1, 12, "  ", 0, 0, 50, 50),
          region(1, 13, "the right edge", 60, 20, 50, 30),
        ],
      },
      {"id": 2, "regions": [region(2, 20, "blue sky", 0, 0, 50, 20)]},
      {"id": 3, "regions": [region(3, 30, "a COCO test image", 0, 0, 50, 40)]},
      {"id": 4, "regions": [region(4, 40, "no file", 0, 0, 50, 40)]},
      {"id": 5, "regions": [region(5, 50, "undecodable", 0, 0, 50, 40), region(5, 51, "also", 0, 0, 40, 40)]},
    ],
  )
  karpathy = _karpathy(tmp_path / "dataset_coco.json", test_ids=[77], train_ids=[41])
  output = tmp_path / "vg_crops"
  result = _prepare(
    warm_python,
    "--format=visual_genome",
    f"--input={root}",
    f"--output={output}",
    "--min_region_size=8",
    f"--exclude_karpathy={karpathy}",
    "--num_workers=0",
  )
  assert result.returncode == 0, result.stderr
  got = _read_back(output)
  assert [(r["caption"], r["key"]) for r in got] == [
    ("a green field", "1#10"),
    ("the right edge", "1#13"),
    ("blue sky", "2#20"),
  ]
  shapes = [transforms.decode_image(r["image"]).shape for r in got]
  assert shapes == [(30, 40, 3), (30, 20, 3), (20, 50, 3)]  # the boxes, the second clipped at x = 80
  assert np.abs(transforms.decode_image(got[2]["image"]).mean((0, 1)) - (20, 20, 200)).max() < 8
  split = json.loads((output / "dataset.json").read_text())["splits"]["train"]
  assert {
    k: split[k]
    for k in ("records", "images", "excluded_images", "missing_images", "small_regions", "empty_phrases", "skipped")
  } == dict(records=3, images=3, excluded_images=1, missing_images=1, small_regions=1, empty_phrases=1, skipped=2)
  assert split["vg_regions"] == "crop"

  whole = tmp_path / "vg_images"
  result = _prepare(
    warm_python,
    "--format=visual_genome",
    f"--input={root}",
    f"--output={whole}",
    "--vg_regions=image",
    "--resize_shorter=20",
    "--num_workers=0",
  )
  assert result.returncode == 0, result.stderr
  got = _read_back(whole)
  assert [r["key"] for r in got] == ["1#10", "1#11", "1#13", "2#20", "3#30"]  # 5's two undecodable: skipped
  assert [transforms.decode_image(r["image"]).shape[:2] for r in got] == [(20, 27)] * 3 + [(20, 25)] * 2


def test_bad_layouts_are_one_line_errors(tmp_path, coco_root, capsys):
  """The tool's main in this process (the subprocess path of `error:` lines is
  tests/integration/test_bad_input.py's)."""
  root, _ = coco_root
  (tmp_path / "vg").mkdir()
  for args, message in [
    (["--format=coco", f"--input={root}", "--coco_folder=val2017"], "captions_val2017.json"),
    (["--format=visual_genome", f"--input={tmp_path / 'vg'}"], "region_descriptions.json"),
    (["--format=coco", f"--input={root}", "--holdout_examples=5"], "--holdout_examples"),
    (["--format=coco", f"--input={root}", "--vg_regions=image"], "--vg_regions: not for --format=coco"),
    (["--format=webdataset", f"--input={root}/*.tar", "--vg_regions=image"], "--vg_regions"),
    (["--format=coco", f"--input={root}", f"--exclude_karpathy={tmp_path / 'none.json'}"], "--exclude_karpathy"),
  ]:
    status = prepare_data.main(["prepare_data", *args, f"--output={tmp_path / 'out'}", "--num_workers=0"])
    stderr = capsys.readouterr().err
    assert status == 2, (args, stderr)
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
  _write_json(root / "annotations" / "captions_broken.json", {"images": [{"id": 1}], "annotations": []})
  (root / "broken").mkdir()
  with pytest.raises(UserError, match="file_name"):
    list_pairs("coco", str(root), coco_folder="broken")
