"""prepare_data's formats for a researcher's own image-text pairs: a folder of images with caption files
(--format=caption_files) and a table of path + caption (--format=caption_table: CSV, JSONL, parquet)."""

import csv
import io
import json
import os
from pathlib import Path
import sys

from PIL import Image
import pytest

from visionfm_jax.data.sources import records
from visionfm_jax.datatools.prepare_data import __main__ as prepare_data
from visionfm_jax.errors import UserError

CAPTIONS = [f"photo {i} of a {colour} kite" for i, colour in enumerate(["red", "green", "blue"] * 4)]


def _jpeg(seed: int) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (12 + seed, 10), (20 * seed, 100, 200 - 10 * seed)).save(buffer, format="JPEG")
  return buffer.getvalue()


@pytest.fixture
def captioned_folder(tmp_path) -> Path:
  """A dozen images with a caption file each (two in a subfolder); one image without a caption file, one with an
  empty one, a caption file without an image."""
  root = tmp_path / "photos"
  for i, caption in enumerate(CAPTIONS):
    folder = root / "trip" if i >= 10 else root
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"img_{i:02d}.jpg").write_bytes(_jpeg(i))
    (folder / f"img_{i:02d}.txt").write_text(caption + "\n")
  (root / "uncaptioned.jpg").write_bytes(_jpeg(20))
  (root / "empty.png").write_bytes(_jpeg(21))
  (root / "empty.txt").write_text("  \n")
  (root / "notes.txt").write_text("no image has this name")
  return root


def _run(*args) -> dict:
  return prepare_data.run(_flags(*args))


def _flags(*args):
  fv = prepare_data.make_flags()
  fv(["prepare_data", "--num_workers=0", *args])
  return fv


def _pairs(output: Path, split: str) -> dict[str, str]:
  """{key: caption} of the split's records, every image decodable."""
  source = records.ArrayRecordSource(str(output / f"{split}-*.array_record"))
  found = {}
  for i in range(len(source)):
    record = source[i]
    Image.open(io.BytesIO(record["image"])).load()
    found[record["key"]] = record["caption"]
  return found


def test_a_folder_of_captioned_images_becomes_pairs_with_a_held_out_split(tmp_path, captioned_folder):
  out = tmp_path / "out"
  metadata = _run(
    "--format=caption_files",
    f"--input={captioned_folder}",
    f"--output={out}",
    "--records_per_shard=4",
    "--holdout_examples=3",
  )
  train, held = _pairs(out, "train"), _pairs(out, "validation")
  assert len(train) == 9 and len(held) == 3 and not set(train) & set(held)
  expected = {(f"trip/img_{i:02d}.jpg" if i >= 10 else f"img_{i:02d}.jpg"): c for i, c in enumerate(CAPTIONS)}
  assert {**train, **held} == expected
  entry = metadata["splits"]["train"]
  assert metadata["kind"] == "pairs" and entry["kind"] == "pairs" and len(entry["shards"]) == 3
  assert entry["skipped"] == 2 and entry["skipped_by"] == {"no_caption": 2}
  assert metadata["splits"]["validation"]["holdout_examples"] == 3
  assert json.loads((out / "dataset.json").read_text()) == metadata
  # the same draw again: every shard kept as written
  assert (
    _run(
      "--format=caption_files",
      f"--input={captioned_folder}",
      f"--output={out}",
      "--records_per_shard=4",
      "--holdout_examples=3",
    )["splits"]
    == metadata["splits"]
  )


def _table_rows(root: Path) -> list[dict]:
  """The folder's pairs as table rows (relative paths, one absolute), a row with a missing image, one without a
  caption."""
  rows = [{"file": f"photos/img_{i:02d}.jpg", "text": c} for i, c in enumerate(CAPTIONS[:10])]
  rows[0]["file"] = str(root / "photos" / "img_00.jpg")
  return rows + [{"file": "photos/gone.jpg", "text": "a missing photo"}, {"file": "photos/img_11.jpg", "text": ""}]


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_a_table_of_paths_and_captions_becomes_pairs(tmp_path, captioned_folder, kind):
  rows = _table_rows(tmp_path)
  table = tmp_path / f"pairs.{kind}"
  if kind == "csv":
    with open(table, "w", newline="") as f:
      writer = csv.DictWriter(f, ["file", "text"])
      writer.writeheader()
      writer.writerows(rows)
  elif kind == "jsonl":
    table.write_text("".join(json.dumps(row) + "\n" for row in rows) + "not json\n")
  else:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    pq.write_table(pa.Table.from_pylist(rows), table)
  out = tmp_path / "out"
  metadata = _run(
    "--format=caption_table", f"--input={table}", f"--output={out}", "--path_column=file", "--caption_column=text"
  )
  pairs = _pairs(out, "train")
  assert sorted(pairs.values()) == sorted(CAPTIONS[:10]) and rows[0]["file"] in pairs
  expected = {"no_image": 1, "no_caption": 1, **({"bad_row": 1} if kind == "jsonl" else {})}
  assert metadata["splits"]["train"]["skipped_by"] == expected


def test_links_are_followed_only_inside_the_input_with_follow_links(tmp_path, captioned_folder):
  outside = tmp_path / "private.jpg"
  outside.write_bytes(_jpeg(30))
  os.symlink(captioned_folder / "img_00.jpg", captioned_folder / "inside_link.jpg")
  os.symlink(outside, captioned_folder / "outside_link.jpg")
  for name in ("inside_link", "outside_link"):
    (captioned_folder / f"{name}.txt").write_text(f"the {name}")
  plain = _run("--format=caption_files", f"--input={captioned_folder}", f"--output={tmp_path / 'plain'}")
  assert plain["splits"]["train"]["skipped_by"]["link"] == 2 and plain["splits"]["train"]["records"] == 12
  followed = _run(
    "--format=caption_files", f"--input={captioned_folder}", f"--output={tmp_path / 'followed'}", "--follow_links"
  )
  assert followed["splits"]["train"]["skipped_by"]["link"] == 1
  assert _pairs(tmp_path / "followed", "train")["inside_link.jpg"] == "the inside_link"


def test_the_summary_line_names_what_was_skipped(tmp_path, captioned_folder):
  metadata = _run("--format=caption_files", f"--input={captioned_folder}", f"--output={tmp_path / 'out'}")
  line = prepare_data.summary_line(metadata, ["train"], "out", 0.1)
  assert line.startswith("prepare_data: train 12 records, 2 skipped (no_caption 2), 1 shards")


def _error(*args) -> str:
  with pytest.raises(UserError) as raised:
    _run(*args)
  assert "\n" not in str(raised.value)
  return str(raised.value)


def test_bad_input_is_one_line_naming_it(tmp_path, captioned_folder):
  out = f"--output={tmp_path / 'out'}"
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "a.jpg").write_bytes(_jpeg(1))
  assert _error("--format=caption_files", f"--input={bare}", out).startswith(f"--input={bare}: no image with a caption")
  table = tmp_path / "t.csv"
  table.write_text("image,caption\nphotos/img_00.jpg,a kite\n")
  assert "no column 'path'" in _error("--format=caption_table", f"--input={table}", out)
  table.write_text("path,caption\nphotos/gone.jpg,a kite\n")
  assert _error("--format=caption_table", f"--input={table}", out).startswith(
    f"--input={table}: none of its 1 captioned images could be read (1 no_image)"
  )
  assert "not a table" in _error("--format=caption_table", f"--input={tmp_path / 't.xlsx'}", out)
  assert "only 12 distinct images (12 usable pairs)" in _error(
    "--format=caption_files", f"--input={captioned_folder}", out, "--holdout_examples=12"
  )
  assert "--unlabelled: not for" in _error("--format=caption_files", f"--input={captioned_folder}", out, "--unlabelled")
  assert "only for --format=caption_table" in _error(
    "--format=caption_files", f"--input={captioned_folder}", out, "--path_column=file"
  )


def test_a_parquet_table_without_pyarrow_is_one_line_naming_the_package(tmp_path, monkeypatch):
  table = tmp_path / "pairs.parquet"
  table.write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # an import of it raises ImportError
  assert "needs the package pyarrow" in _error(
    "--format=caption_table", f"--input={table}", f"--output={tmp_path / 'out'}"
  )


# ---- a tokenizer trained on other text (issue 64: the demos' shapes tokenizer kept for your captions) ----

OWN_CAPTIONS = [
  "an astronaut riding a horse on the moon",
  "a photograph of the old harbour at dusk",
  "two cyclists crossing a bridge in the rain",
]


def _shapes_tokenizer():
  from visionfm_jax.data.text import tokenizer  # pylint: disable=g-import-not-at-top

  return tokenizer.load(tokenizer.shapes_tokenizer_path(), max_len=77)


def test_a_tokenizer_that_spells_out_the_captions_words_gets_a_warning_naming_the_tool():
  from visionfm_jax.tasks import image_text  # pylint: disable=g-import-not-at-top

  shapes_tokenizer = _shapes_tokenizer()
  message = image_text.pieces_per_word_warning(shapes_tokenizer, OWN_CAPTIONS, "")
  assert "datatools.train_tokenizer --records='<your pair shards>'" in message and "shapes demos' tokenizer" in message
  assert not image_text.pieces_per_word_warning(shapes_tokenizer, ["a small red circle in the centre"] * 3, "")


def test_the_check_reads_the_held_out_captions_at_start_up(caplog):
  import ml_collections  # pylint: disable=g-import-not-at-top

  from visionfm_jax.tasks import image_text  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
    {
      "data": {
        "source": "arrayrecord:/d/{split}-*",
        "eval_source": "",
        "mixture": (),
        "tokenizer": "/d/other_tokenizer.model",
        "train_split": "train",
      }
    }
  )
  task = type("Task", (), {"config": config, "tokenizer": _shapes_tokenizer()})()
  held_out = [{"image": b"", "caption": caption} for caption in OWN_CAPTIONS] + [{"image": b""}]
  with caplog.at_level("WARNING"):
    image_text.check_tokenizer_fits_captions(task, held_out)
  assert "'/d/other_tokenizer.model' splits the data's captions" in caplog.text and "on 3 held-out" in caplog.text
  assert "--records='/d/train-*'" in caplog.text
