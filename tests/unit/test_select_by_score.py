"""Choosing how many LAION pairs to keep: `index_tars --keep` reads the indexes' similarity column and prints the
--min_similarity that keeps at most that many samples; prepare_data given the printed flags keeps exactly the
printed count (tiny img2dataset-style tars, CPU)."""

import io
import json
import math
import tarfile

import numpy as np
from PIL import Image
import pytest

from visionfm_jax.data.sources import wds
from visionfm_jax.datatools import index_tars
from visionfm_jax.datatools.prepare_data import __main__ as prepare_data

TARS, PER_TAR = 3, 40


def _jpeg() -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (8, 8), (200, 40, 90)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _samples(t: int, rng: np.random.Generator) -> list[tuple[str, dict | None, bool]]:
  """(key, .json dict or None, has an image): LAION-like float32 similarities written as float64 text, ties
  (every 7th repeats an earlier score), samples without a similarity, a .json or an image."""
  samples, earlier = [], []
  for k in range(PER_TAR):
    similarity = float(np.float32(rng.normal(0.3, 0.03)))
    if k % 7 == 6:
      similarity = earlier[k // 2]
    earlier.append(similarity)
    meta = {"similarity": similarity, "punsafe": float(np.float32(rng.uniform()))}
    if k % 11 == 5:
      meta["similarity"] = None
    samples.append((f"{t:03d}{k:04d}", None if k % 13 == 4 else meta, k % 17 != 9))
  return samples


def write_tars(directory) -> list[dict]:
  """The tars 000.tar ... under `directory`; returns the .json dict ({} for none) of every sample with an image."""
  directory.mkdir(parents=True, exist_ok=True)
  rng, metas, image = np.random.default_rng(0), [], _jpeg()
  for t in range(TARS):
    with tarfile.open(directory / f"{t:03d}.tar", "w") as archive:
      for key, meta, has_image in _samples(t, rng):
        members = {"txt": f"a photo {key}".encode()}
        if has_image:
          members["jpg"] = image
          metas.append(meta or {})
        if meta is not None:
          members["json"] = json.dumps(meta).encode()
        for extension, data in members.items():
          info = tarfile.TarInfo(f"{key}.{extension}")
          info.size = len(data)
          archive.addfile(info, io.BytesIO(data))
  return metas


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
  """(the tars' glob, the .json dicts of their samples with an image), indexed."""
  directory = tmp_path_factory.mktemp("laion")
  metas = write_tars(directory)
  pattern = str(directory / "*.tar")
  assert index_tars.main(["prog", f"--input={pattern}", "--num_workers=0"]) == 0
  return pattern, metas


def _passing(metas, min_similarity, max_punsafe=None) -> int:
  """Brute force: the samples with a similarity >= min_similarity (and punsafe <= max_punsafe)."""
  return sum(
    m.get("similarity") is not None
    and m["similarity"] >= min_similarity
    and (max_punsafe is None or m["punsafe"] <= max_punsafe)
    for m in metas
  )


def _expected_kept(values, keep: int) -> int:
  """The most samples that some threshold keeps without exceeding `keep` (ties go together)."""
  values = np.asarray(values, np.float64)
  counts = [int(np.sum(values >= v)) for v in np.unique(values)]
  return max([c for c in counts if c <= keep], default=0)


def test_printed_flags_keep_the_printed_count_in_prepare_data(laion, tmp_path, capsys):
  pattern, metas = laion
  out = tmp_path / "selection.json"
  assert (
    index_tars.main(["prog", f"--input={pattern}", "--keep=25", "--max_punsafe=0.5", f"--selection_out={out}"]) == 0
  )
  line = capsys.readouterr().out.strip()
  selection = json.loads(out.read_text())
  threshold = selection["min_similarity"]
  eligible = [m["similarity"] for m in metas if m.get("similarity") is not None and m["punsafe"] <= 0.5]
  kept = _passing(metas, threshold, 0.5)
  assert (selection["kept"], selection["samples"], selection["keep"]) == (kept, len(metas), 25)
  # the 25th and 26th highest scores tie: both are left out, as are all ties at the boundary
  assert kept == _expected_kept(eligible, 25) == 24
  # the smallest such threshold: the next score below it would keep more than 25
  assert _passing(metas, max(s for s in eligible if s < threshold), 0.5) > 25
  assert line.startswith(f"keep: {selection['flags']} keeps {kept:,} of {len(metas):,} samples")
  assert selection["flags"] == f"--min_similarity={threshold!r} --max_punsafe=0.5"
  assert len(repr(threshold)) < len(repr(min(s for s in eligible if s >= threshold)))  # printed short

  assert (
    prepare_data.main(
      [
        "prog",
        "--format=webdataset",
        f"--input={pattern}",
        f"--output={tmp_path / 'kept'}",
        "--num_workers=0",
        *selection["flags"].split(),
      ]
    )
    == 0
  )
  written = json.loads((tmp_path / "kept" / "dataset.json").read_text())["splits"]["train"]
  assert written["records"] == kept
  assert sum(written["filtered"].values()) == len(metas) - kept
  # --selection=FILE reads the same thresholds from the JSON
  assert (
    prepare_data.main(
      [
        "prog",
        "--format=webdataset",
        f"--input={pattern}",
        f"--output={tmp_path / 'read'}",
        "--num_workers=0",
        f"--selection={out}",
      ]
    )
    == 0
  )
  assert json.loads((tmp_path / "read" / "dataset.json").read_text())["splits"]["train"] == written
  for flags_, message in [
    ([f"--selection={out}", "--max_punsafe=0.5"], "give one or the other"),
    ([f"--selection={tmp_path / 'none.json'}"], "cannot read"),
    ([f"--selection={tmp_path / 'kept' / 'dataset.json'}"], "not a selection"),
  ]:
    assert (
      prepare_data.main(["prog", "--format=webdataset", f"--input={pattern}", f"--output={tmp_path / 'x'}", *flags_])
      == 2
    )
    assert message in capsys.readouterr().err


def test_keep_as_a_fraction_and_above_every_eligible_sample(laion, capsys):
  pattern, metas = laion
  selection = index_tars.select(pattern, 0.25)
  values = [m["similarity"] for m in metas if m.get("similarity") is not None]
  assert selection.keep == math.floor(0.25 * len(metas))
  assert selection.kept == _passing(metas, float(selection.threshold)) == _expected_kept(values, selection.keep)
  # a count between the samples with a similarity and all samples keeps every one with a similarity
  assert index_tars.main(["prog", f"--input={pattern}", f"--keep={len(metas)}"]) == 0
  line = capsys.readouterr().out
  assert f"keeps {len(values):,} of {len(metas):,} samples" in line and f"only {len(values):,} have a" in line


def test_a_partial_download_is_a_warning_naming_the_share_kept(laion, capsys):
  """--expect_samples: the count the --keep value was chosen for; fewer indexed samples keep a larger share."""
  pattern, metas = laion
  samples = len(metas)
  assert index_tars.main(["prog", f"--input={pattern}", "--keep=20", f"--expect_samples={samples}"]) == 0
  assert capsys.readouterr().err == ""
  assert index_tars.main(["prog", f"--input={pattern}", "--keep=20", f"--expect_samples={4 * samples}"]) == 0
  out, err = capsys.readouterr()
  kept = int(out.split(" keeps ")[1].split()[0])
  assert err == (
    f"warning: {samples:,} samples indexed, fewer than the {4 * samples:,} of --expect_samples (a partial "
    f"download?): --keep=20 keeps {kept / samples:.2%} of them, not {20 / (4 * samples):.2%}\n"
  )
  assert index_tars.main(["prog", f"--input={pattern}", "--keep=0.5", f"--expect_samples={2 * samples}"]) == 0
  out, err = capsys.readouterr()
  kept = int(out.split(" keeps ")[1].split()[0])
  assert err.endswith(f"--keep=0.5 keeps {kept:,} samples, not {samples:,}\n"), err
  for expect in ("0", "2.5", "inf"):
    assert index_tars.main(["prog", f"--input={pattern}", "--keep=20", f"--expect_samples={expect}"]) == 2
    assert f"--expect_samples={expect}: expected a whole count" in capsys.readouterr().err
  assert index_tars.main(["prog", f"--input={pattern}", "--expect_samples=10"]) == 2
  assert "--expect_samples: only with --keep" in capsys.readouterr().err


def test_selection_is_exact_at_every_refinement_level(tmp_path):
  """Scores a few ulps apart, negative ones, -0.0 == 0.0 and ties; collect_limit=1 makes the selection split
  bins down to single 64-bit keys."""
  base = [0.3, -0.25, 0.0, -0.0, 1e-300, 0.7]
  values = []
  for value in base:
    values += [value, np.nextafter(value, 1.0), np.nextafter(np.nextafter(value, 1.0), 1.0), value]
  tar = tmp_path / "scores.tar"
  with tarfile.open(tar, "w") as archive:
    for i, value in enumerate(values):
      for extension, data in (("jpg", b"x"), ("json", json.dumps({"similarity": float(value)}).encode())):
        info = tarfile.TarInfo(f"{i:04d}.{extension}")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
  wds.write_index(str(tar))
  scores = np.asarray(values, np.float64)
  for keep in (2, 3, 5, 8, 13, 17, len(values) - 1):
    selection = index_tars.select(str(tar), keep, collect_limit=1)
    assert selection.kept == int(np.sum(scores >= float(selection.threshold))) == _expected_kept(scores, keep), keep
    assert selection.passes > 3, selection.passes  # bins split more than once


def test_ordered_keys_and_shortest_decimal():
  rng = np.random.default_rng(1)
  values = np.concatenate([rng.normal(0, 1, 500), [-np.inf, -1e-300, -0.0, 0.0, 5e-324, np.inf]])
  order = np.argsort(values, kind="stable")
  keys = index_tars.ordered_keys(values)
  assert np.all(np.diff(keys[order].astype(object)) >= 0)
  assert all(index_tars.key_value(k) == v for k, v in zip(keys, values))
  pairs = np.sort(rng.uniform(-1, 1, (200, 2)), axis=1)
  pairs[:50, 1] = np.nextafter(pairs[:50, 0], 2.0)  # one float apart: needs all 17 digits
  for low, high in pairs:
    text = index_tars.shortest_decimal(low, high)
    assert low < float(text) <= high and len(text.lstrip("-0.")) <= 17
  assert index_tars.shortest_decimal(0.31272, 0.31279999) == "0.31279"
  assert index_tars.shortest_decimal(-math.inf, 0.2812) == "0.2"
  assert index_tars.shortest_decimal(0.5, math.inf) == "0.6"


def test_bad_input_is_one_error_line(laion, tmp_path, capsys):
  pattern, metas = laion

  def error(*flags):
    assert index_tars.main(["prog", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]

  empty = str(tmp_path / "none" / "*.tar")
  assert f"--input={empty}: " in error(f"--input={empty}", "--keep=10")
  (tmp_path / "raw").mkdir()
  (tmp_path / "raw" / "a.tar").write_bytes(b"\0" * 1024)
  unindexed = str(tmp_path / "raw" / "*.tar")
  assert f"--input={unindexed}: 1 of 1 tars have no current index" in error(f"--input={unindexed}", "--keep=10")
  for keep in ("0", "-3", "inf"):
    assert f"--keep={keep}: expected a positive count" in error(f"--input={pattern}", f"--keep={keep}")
  assert "--keep=2.5: a count above 1 must be whole" in error(f"--input={pattern}", "--keep=2.5")
  assert f"more than the {len(metas)} indexed samples" in error(f"--input={pattern}", f"--keep={len(metas) + 1}")
  assert "--max_punsafe: only with --keep" in error(f"--input={pattern}", "--max_punsafe=0.5")
  assert "--selection_out=/no/such/dir/s.json: cannot write" in error(
    f"--input={pattern}", "--keep=10", "--selection_out=/no/such/dir/s.json"
  )
  assert "--task_index: not with --keep" in error(f"--input={pattern}", "--keep=10", "--task_index=0")
