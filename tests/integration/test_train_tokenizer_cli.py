"""`python -m visionfm_jax.datatools.train_tokenizer` in a process of its own as a user runs it: from a text corpus and
from pair records, the same model file as the API's, and one `error:` line for bad input."""

from pathlib import Path
import subprocess

import numpy as np
import pytest

from visionfm_jax.data.sources import records
from visionfm_jax.data.text import tokenizer
from visionfm_jax.datatools import train_tokenizer as tool

from test_tokenizer import CORPUS, ROOT


def _train_tokenizer(warm, *args, **kwargs) -> subprocess.CompletedProcess:
  """`python -m visionfm_jax.datatools.train_tokenizer ARGS`, run by the warm interpreter `warm`."""
  return subprocess.run([warm.python, "-m", "visionfm_jax.datatools.train_tokenizer", *args], env=warm.env(), **kwargs)


def test_cli(tmp_path, warm_python):
  corpus = tmp_path / "captions.txt"
  corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
  result = _train_tokenizer(
    warm_python,
    f"--input={corpus}",
    "--vocab_size=64",
    f"--out={tmp_path / 'cli.model'}",
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert f"wrote {tmp_path / 'cli.model'}" in result.stdout
  with open(tmp_path / "cli.model", "rb") as f:
    assert (
      f.read()
      == Path(
        tokenizer.train_tokenizer(CORPUS, 64, str(tmp_path / "api"), num_threads=tool.DEFAULT_NUM_THREADS)
      ).read_bytes()
    )


def test_records_input_trains_on_the_captions_of_pair_records(tmp_path, warm_python):
  """--records reads the caption field of ArrayRecord shards (files in name order), skipping image-only records."""
  image = np.zeros((4, 4, 3), np.uint8)
  half = len(CORPUS) // 2
  shard = lambda lines: [{"image": image, "caption": line} for line in lines] + [{"image": image}]
  records.write_records(tmp_path / "train-00001-of-00002.array_record", shard(CORPUS[half:]))
  records.write_records(tmp_path / "train-00000-of-00002.array_record", shard(CORPUS[:half]))
  pattern = str(tmp_path / "train-*.array_record")
  assert tool.read_record_captions(pattern) == CORPUS
  tok = tool.run(None, 0, 64, str(tmp_path / "records.model"), records=pattern)
  assert (
    Path(tok.model_file).read_bytes()
    == Path(
      tokenizer.train_tokenizer(CORPUS, 64, str(tmp_path / "api"), num_threads=tool.DEFAULT_NUM_THREADS)
    ).read_bytes()
  )
  result = _train_tokenizer(
    warm_python,
    f"--records={pattern}",
    "--vocab_size=64",
    f"--out={tmp_path / 'cli'}",
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "cli.model").read_bytes() == Path(tok.model_file).read_bytes()
  # a comma-separated list of globs reads the union of their files, in name order
  first, second = (str(tmp_path / f"train-0000{i}-of-00002.array_record") for i in (0, 1))
  assert tool.read_record_captions(f"{second},{first},{pattern}") == CORPUS
  records.write_records(tmp_path / "images.array_record", [{"image": image}])
  for bad, message in [
    (str(tmp_path / "nothing-*.array_record"), "no files match"),
    (f"{pattern},{tmp_path / 'nothing-*'}", "no files match"),
    (str(tmp_path / "images.array_record"), "no captions"),
  ]:
    with pytest.raises(tool.UserError, match=message) as info:
      tool.run(None, 0, 64, str(tmp_path / "x"), records=bad)
    assert str(info.value).startswith("--records") and bad.split(",")[-1] in str(info.value)  # the glob at fault
  with pytest.raises(tool.UserError, match="exactly one of"):
    tool.run(None, 10, 64, str(tmp_path / "x"), records=pattern)


def test_cli_error_is_one_line(tmp_path, warm_python):
  result = _train_tokenizer(
    warm_python,
    f"--input={tmp_path / 'missing.txt'}",
    "--vocab_size=64",
    f"--out={tmp_path / 'x'}",
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and "missing.txt" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_tars_and_sampled_records_through_the_cli(tmp_path, warm_python):
  """--tars reads the .txt members of img2dataset tars (image members skipped), --max_sentences keeps that many
  captions: the seeded reservoir's, whether they come from tars or from records."""
  import io  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top

  lines = [f"{c} {s} number {i}" for i, (c, s) in enumerate(zip(CORPUS * 3, reversed(CORPUS * 3)))]
  image = records.encode_jpeg(np.zeros((4, 4, 3), np.uint8))
  for shard in range(2):
    with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as archive:
      for i in range(shard * len(lines) // 2, (shard + 1) * len(lines) // 2):
        for suffix, data in ((".jpg", image), (".txt", lines[i].encode()), (".json", b"{}")):
          info = tarfile.TarInfo(f"{i:09d}{suffix}")
          info.size = len(data)
          archive.addfile(info, io.BytesIO(data))
  assert list(tool.stream_tar_captions(str(tmp_path / "*.tar"))) == lines
  records.write_records(
    tmp_path / "train-00000-of-00001.array_record",
    [{"image": image, "caption": line} for line in lines] + [{"image": image}],
  )
  k = len(lines) // 3
  expected, _ = tokenizer.reservoir_sample(iter(lines), k, 5)
  reference = tokenizer.train_tokenizer(expected, 64, str(tmp_path / "api"), num_threads=2)
  for flag in (f"--tars={tmp_path / '*.tar'}", f"--records={tmp_path / 'train-*.array_record'}"):
    result = _train_tokenizer(
      warm_python,
      flag,
      "--vocab_size=64",
      f"--max_sentences={k}",
      "--seed=5",
      "--num_threads=2",
      f"--out={tmp_path / 'cli'}",
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"sampled {k} of {len(lines)} captions" in result.stdout
    assert (tmp_path / "cli.model").read_bytes() == Path(reference).read_bytes()
  (tmp_path / "bad.tar").write_bytes(b"not a tar")
  with pytest.raises(tool.UserError, match="--tars: cannot read .*bad.tar"):
    tool.run(None, 0, 64, str(tmp_path / "x"), tars=str(tmp_path / "bad.tar"))
