"""img2dataset tars at scale: preparation shared by cluster tasks, LAION-score filters, and the `wds:` source that
trains from indexed tars in place (tars written by the webdataset library; small fixtures, CPU)."""

import errno
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import webdataset

from visionfm_jax import config_lib
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.sources import wds
from visionfm_jax.data.text import tokenizer
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.datatools import cluster_task, index_tars
from visionfm_jax.datatools.prepare_data import __main__ as prepare_data
from visionfm_jax.datatools.prepare_data.webdataset import convert_webdataset
from visionfm_jax.errors import DataError, UserError

from conftest import ROOT, TINY_CLIP_TOWERS, cpu_env

DATA_CFG = ml_collections.ConfigDict({"train_split": "train", "eval_split": "validation"})
SHAPES = ("circle", "square", "triangle")


def jpeg(seed: int, size: int = 32) -> bytes:
  rng = np.random.default_rng(seed)
  pixels = np.clip(rng.normal(128, 40, (size, size, 3)) + np.linspace(0, 60, size)[:, None, None], 0, 255)
  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def similarity_of(t: int, k: int) -> float:
  return round(0.2 + 0.02 * ((t * 7 + k * 3) % 10), 2)  # 0.20 ... 0.38


def write_tars(
  directory, tars: int = 6, per_tar: int = 5, *, bad: tuple = (), uncaptioned: tuple = (), image_size: int = 32
) -> dict:
  """img2dataset-style tars written by webdataset.TarWriter: per sample .jpg, .txt, .json (url, similarity,
  pwatermark, punsafe; sample k == 1 of each tar has no pwatermark). `bad`: (tar, sample) pairs whose .jpg is
  not a JPEG; `uncaptioned`: ones without a .txt. Returns {key: its .json dict}."""
  os.makedirs(directory, exist_ok=True)
  metas = {}
  for t in range(tars):
    with webdataset.TarWriter(os.path.join(directory, f"{t:05d}.tar")) as sink:
      for k in range(per_tar):
        key = f"{t:05d}{k:04d}"
        meta = {"url": f"http://x/{key}.jpg", "similarity": similarity_of(t, k), "punsafe": 0.1 * (k % 4)}
        if k != 1:
          meta["pwatermark"] = 0.25 * (t % 4)
        sample = {"__key__": key, "json": json.dumps(meta).encode()}
        sample["jpg"] = b"not a jpeg at all" if (t, k) in bad else jpeg(t * 100 + k, image_size)
        if (t, k) not in uncaptioned:
          sample["txt"] = f"a {SHAPES[(t + k) % 3]} number {key}".encode()
        sink.write(sample)
        metas[key] = meta
  return metas


def read_split(directory, split="train") -> list[dict]:
  source = sources.build_source(f"arrayrecord:{directory}/{{split}}-*.array_record", split, DATA_CFG)
  return [source[i] for i in range(len(source))]


def shards_and_sidecars(directory) -> dict[str, bytes]:
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "*.array_record*"))):
    with open(path, "rb") as f:
      out[os.path.basename(path)] = f.read()
  return out


def test_task_from_flags_and_slurm_environment():
  fv = prepare_data.make_flags()
  fv(["prog"])
  assert cluster_task.from_flags(fv, {}) == cluster_task.Task(0, 1)
  slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
  assert cluster_task.from_flags(fv, slurm) == cluster_task.Task(2, 4)
  fv = prepare_data.make_flags()
  fv(["prog", "--task_index=1", "--task_count=3"])
  assert cluster_task.from_flags(fv, slurm) == cluster_task.Task(1, 3)  # the flags win
  assert cluster_task.Task(1, 3).share(list(range(8))) == [1, 4, 7]
  fv = prepare_data.make_flags()
  fv(["prog", "--task_index=3", "--task_count=3"])
  with pytest.raises(UserError, match="--task_index=3, --task_count=3"):
    cluster_task.from_flags(fv, {})


def test_three_tasks_prepare_what_one_task_prepares(tmp_path, capsys, monkeypatch):
  write_tars(tmp_path / "in", bad={(2, 3)}, uncaptioned={(4, 0)})
  pattern = str(tmp_path / "in" / "*.tar")
  common = [f"--input={pattern}", "--format=webdataset", "--resize_shorter=16", "--num_workers=0"]
  assert prepare_data.main(["prog", *common, f"--output={tmp_path / 'one'}"]) == 0
  one = json.loads((tmp_path / "one" / "dataset.json").read_text())
  entry = one["splits"]["train"]
  assert (entry["records"], entry["skipped"], entry["uncaptioned"]) == (29, 1, 1)

  many = tmp_path / "many"
  for index in (2, 0):
    assert prepare_data.main(["prog", *common, f"--output={many}", f"--task_index={index}", "--task_count=3"]) == 0
    assert f"task {index} of 3 done" in capsys.readouterr().out
  assert not (many / "dataset.json").exists()
  assert sorted(shards_and_sidecars(many)) == [
    f"train-0000{i}-of-00006.array_record{end}" for i in (0, 2, 3, 5) for end in ("", ".json")
  ]  # tasks 0 and 2: tars 0, 3 and 2, 5
  written = shards_and_sidecars(many)
  # Task 2 run again resumes its share (nothing rewritten) and touches no other task's files.
  assert prepare_data.main(["prog", *common, f"--output={many}", "--task_index=2", "--task_count=3"]) == 0
  assert shards_and_sidecars(many) == written
  assert prepare_data.main(["prog", *common, f"--output={many}", "--finalize"]) == 2
  assert "2 of 6 shards are not written yet" in capsys.readouterr().err
  # SLURM's task 11 of an array 10-12 is task 1, the last to finish: it writes dataset.json.
  for name, value in {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"}.items():
    monkeypatch.setenv(name, value)
  assert prepare_data.main(["prog", *common, f"--output={many}"]) == 0
  assert "train 29 records, 1 skipped (undecodable 1), 6 shards" in capsys.readouterr().out
  assert (many / "dataset.json").read_text() == (tmp_path / "one" / "dataset.json").read_text()
  assert shards_and_sidecars(many) == shards_and_sidecars(tmp_path / "one")
  assert read_split(many) == read_split(tmp_path / "one")
  # A final step from the sidecars writes the same dataset.json again.
  os.remove(many / "dataset.json")
  assert prepare_data.main(["prog", *common, f"--output={many}", "--finalize"]) == 0
  assert (many / "dataset.json").read_text() == (tmp_path / "one" / "dataset.json").read_text()


def expected_keys(metas: dict, min_similarity=None, max_pwatermark=None, max_punsafe=None) -> tuple[set, dict]:
  """The keys a filter keeps and its counts per reason, computed here from the written .json values."""
  kept, reasons = set(), {"similarity": 0, "pwatermark": 0, "punsafe": 0}
  for key, meta in metas.items():
    if min_similarity is not None and not meta["similarity"] >= min_similarity:
      reasons["similarity"] += 1
    elif max_pwatermark is not None and not meta.get("pwatermark", 2.0) <= max_pwatermark:
      reasons["pwatermark"] += 1
    elif max_punsafe is not None and not meta["punsafe"] <= max_punsafe:
      reasons["punsafe"] += 1
    else:
      kept.add(key)
  used = {"similarity": min_similarity, "pwatermark": max_pwatermark, "punsafe": max_punsafe}
  return kept, {reason: n for reason, n in reasons.items() if used[reason] is not None}


@pytest.mark.parametrize(
  "limits", [dict(min_similarity=0.28), dict(min_similarity=0.3, max_pwatermark=0.5, max_punsafe=0.2)]
)
def test_score_filters_keep_exactly_the_expected_keys(tmp_path, capsys, limits):
  metas = write_tars(tmp_path / "in", tars=4, per_tar=6)
  kept, filtered = expected_keys(metas, **limits)
  assert 0 < len(kept) < len(metas) and all(filtered.values())
  pattern = str(tmp_path / "in" / "*.tar")
  flags = [f"--{name}={value}" for name, value in limits.items()]
  assert (
    prepare_data.main(
      ["prog", "--format=webdataset", f"--input={pattern}", f"--output={tmp_path / 'out'}", "--num_workers=0", *flags]
    )
    == 0
  )
  assert f"{sum(filtered.values())} filtered (" in capsys.readouterr().out
  entry = json.loads((tmp_path / "out" / "dataset.json").read_text())["splits"]["train"]
  assert entry["filtered"] == filtered and entry["records"] == len(kept)
  sidecars = [json.loads((tmp_path / "out" / (shard + ".json")).read_text()) for shard in entry["shards"]]
  assert all(
    set(c) == {"records", "skipped", "skipped_by", "uncaptioned", "filtered", "fingerprint", "bytes", "postscript"}
    for c in sidecars
  )
  assert {r: sum(c["filtered"][r] for c in sidecars) for r in filtered} == filtered
  assert {r["key"] for r in read_split(tmp_path / "out")} == kept

  assert index_tars.main(["prog", f"--input={pattern}", "--num_workers=0"]) == 0
  spec = "wds:" + ";".join([pattern, *(f"{name}={value}" for name, value in limits.items())])
  source = sources.build_source(spec, "train", DATA_CFG)
  assert {source[i]["key"] for i in range(len(source))} == kept
  assert dict(source.filtered) == filtered


def test_wds_source_serves_the_prepared_records(tmp_path):
  write_tars(tmp_path / "in", tars=3, per_tar=4, bad={(1, 2)}, uncaptioned={(0, 1)})
  pattern = str(tmp_path / "in" / "*.tar")
  with pytest.raises(DataError, match=r"3 of 3 tars have no current index .*datatools.index_tars"):
    sources.build_source(f"wds:{pattern}", "train", DATA_CFG)
  summary = index_tars.index_tars(pattern, task=cluster_task.Task(1, 2))
  assert (summary["tars"], summary["indexed"], summary["samples"]) == (1, 1, 4)  # task 1 of 2: the second tar
  assert index_tars.index_tars(pattern)["indexed"] == 2  # the rest; the indexed one is kept
  assert index_tars.index_tars(pattern)["indexed"] == 0
  convert_webdataset(pattern, str(tmp_path / "out"), num_workers=0)
  source = sources.build_source(f"wds:{pattern}", "train", DATA_CFG)
  assert [source[i] for i in range(len(source))] == read_split(tmp_path / "out")
  assert "caption" not in source[1] and source[1]["key"] == "000000001"
  assert list(wds.tar_captions(sorted(glob.glob(pattern))[0]))[:2] == [
    ("000000000", "a circle number 000000000"),
    ("000000002", "a triangle number 000000002"),
  ]
  # A tar rewritten after indexing (another size) is refused, not misread.
  with open(sorted(glob.glob(pattern))[2], "ab") as f:
    f.write(b"\0" * 1024)
  with pytest.raises(DataError, match="1 of 3 tars have no current index"):
    sources.build_source(f"wds:{pattern}", "train", DATA_CFG)
  with pytest.raises(DataError, match="unknown or repeated wds option 'min_sim'"):
    sources.build_source(f"wds:{pattern};min_sim=0.3", "train", DATA_CFG)


def _index_files(folder) -> list[str]:
  return sorted(glob.glob(os.path.join(folder, "**", "*.index.npz*"), recursive=True))


def test_index_dir_reads_a_read_only_corpus_in_place(tmp_path, capsys):
  """--index_dir: the indexes go under another folder at each tar's absolute path (tars of the same name in two
  folders keep apart), nothing is written next to the tars; the `wds:` source and --keep read them there."""
  corpus = tmp_path / "corpus"
  for folder in ("a", "b"):
    metas = write_tars(corpus / folder, tars=2, per_tar=5)  # a/00000.tar and b/00000.tar, ...: the same samples
  pattern, index_dir = str(corpus / "*" / "*.tar"), tmp_path / "index"
  for folder in (corpus / "a", corpus / "b", corpus):
    os.chmod(folder, 0o555)  # read-only (where this test does not run as root, which writes regardless)
  try:
    assert index_tars.main(["prog", f"--input={pattern}", f"--index_dir={index_dir}", "--num_workers=0"]) == 0
  finally:
    for folder in (corpus, corpus / "a", corpus / "b"):
      os.chmod(folder, 0o755)
  assert "4 of its 4 tars indexed now (20 samples" in capsys.readouterr().out
  assert not _index_files(corpus)
  assert _index_files(index_dir) == sorted(
    f"{index_dir}{corpus}/{folder}/0000{t}.tar.index.npz" for folder in "ab" for t in (0, 1)
  )
  source = sources.build_source(f"wds:{pattern};min_similarity=0.3;index_dir={index_dir}", "train", DATA_CFG)
  kept = [key for key, meta in metas.items() if meta["similarity"] >= 0.3]
  assert sorted(source[i]["key"] for i in range(len(source))) == sorted(kept * 2)
  with pytest.raises(DataError, match=f"4 of 4 tars have no current index .*looked for {corpus}/a/00000.tar"):
    sources.build_source(f"wds:{pattern}", "train", DATA_CFG)
  with pytest.raises(DataError, match=f"looked for {index_dir / 'elsewhere'}{corpus}/a/00000.tar.index.npz"):
    sources.build_source(f"wds:{pattern};index_dir={index_dir / 'elsewhere'}", "train", DATA_CFG)
  assert index_tars.main(["prog", f"--input={pattern}", f"--index_dir={index_dir}", "--keep=10"]) == 0
  assert "of 20 samples" in capsys.readouterr().out
  assert index_tars.main(["prog", f"--input={pattern}", "--keep=10"]) == 2
  assert f"looked for {corpus}/a/00000.tar.index.npz" in capsys.readouterr().err


def _one_error_line(capsys, argv) -> str:
  assert index_tars.main(argv) == 2
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and not out, (out, err)
  return lines[0]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_an_index_that_cannot_be_written_is_one_error_line(tmp_path, capsys, monkeypatch, code):
  write_tars(tmp_path / "in", tars=2, per_tar=2)
  pattern = str(tmp_path / "in" / "*.tar")

  def failing(file, **arrays):
    file.write(b"part of an index")
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(wds.np, "savez", failing)
  line = _one_error_line(capsys, ["prog", f"--input={pattern}", "--num_workers=0"])
  assert line == (
    f"error: cannot write the index {tmp_path}/in/00000.tar.index.npz ({os.strerror(code)}); write the "
    f"indexes to a writable folder with --index_dir=DIR (then train with 'wds:GLOB;index_dir=DIR')"
  )
  assert not _index_files(tmp_path / "in")  # the partial file is removed
  line = _one_error_line(capsys, ["prog", f"--input={pattern}", f"--index_dir={tmp_path / 'index'}", "--num_workers=0"])
  assert line.endswith(f"({os.strerror(code)}); write the indexes to another folder with --index_dir")
  assert not _index_files(tmp_path / "index")


def test_an_index_dir_that_is_not_a_folder_is_one_error_line(tmp_path, capsys):
  write_tars(tmp_path / "in", tars=2, per_tar=2)
  (tmp_path / "file").write_bytes(b"")
  line = _one_error_line(
    capsys, ["prog", f"--input={tmp_path / 'in' / '*.tar'}", f"--index_dir={tmp_path / 'file'}", "--num_workers=2"]
  )  # a worker process's error, too
  assert re.fullmatch(
    rf"error: cannot write the index {tmp_path}/file{tmp_path}/in/0000[01].tar.index.npz \(.+\); "
    r"write the indexes to another folder with --index_dir",
    line,
  ), line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_corpus_without_index_dir_is_one_error_line(tmp_path, capsys):
  write_tars(tmp_path / "in", tars=1, per_tar=2)
  os.chmod(tmp_path / "in", 0o555)
  try:
    line = _one_error_line(capsys, ["prog", f"--input={tmp_path / 'in' / '*.tar'}", "--num_workers=0"])
  finally:
    os.chmod(tmp_path / "in", 0o755)
  assert line.startswith(f"error: cannot write the index {tmp_path}/in/00000.tar.index.npz (Permission denied)")


def test_wds_source_in_a_mixture_counts_a_bad_jpeg(tmp_path):
  write_tars(tmp_path / "in", tars=2, per_tar=8, bad={(0, 3)}, uncaptioned={(1, 0), (1, 5)}, image_size=16)
  pattern = str(tmp_path / "in" / "*.tar")
  index_tars.index_tars(pattern)
  cfg = config_lib.base_config().data
  cfg.image_size, cfg.num_workers, cfg.shapes_train_size, cfg.source = 16, 0, 64, ""
  cfg.mixture = (("shapes", 1.0), (f"wds:{pattern}", 1.0))
  tok = tokenizer.Tokenizer(tokenizer.shapes_tokenizer_path(), 12)
  before = transforms.decode_failures()
  loader = iter(pipeline.make_pair_train_loader(cfg, tok, batch_size=8, seed=0, process_index=0, process_count=1))
  batches = [next(loader) for _ in range(6)]  # 48 positions: both epochs of the 16 tar samples at least once
  assert transforms.decode_failures() > before
  assert any((~b["has_text"]).any() for b in batches)
  for b in batches:
    assert (b["text"][~b["has_text"]] == tokenizer.PAD_ID).all()


# The demo's towers shrunk as conftest.tiny_clip_config shrinks them: the test is of the data path and the resume.
TINY_CLIP = [f"--config.{field}={value}" for field, value in TINY_CLIP_TOWERS.items()]


def _main(workdir, *flags, compilation_cache=None):
  """`python -m visionfm_jax.main` on the CLIP demo, 2 CPU devices; runs given one `compilation_cache` folder
  share JAX's persistent cache of compiled programs (a rerun loads the first run's instead of compiling them:
  the same programs, so the same numbers)."""
  env = cpu_env(2, PYTHONPATH=ROOT)
  if compilation_cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "visionfm_jax.main",
      "--config=configs/swinv2_g_clip.py:demo",
      f"--workdir={workdir}",
      *flags,
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=600,
  )


def _params(workdir, step):
  state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree.leaves({"params": state["params"], "opt_state": state["opt_state"]})


@pytest.mark.slow
def test_clip_demo_trains_from_tars_in_place_and_resumes_bitwise(tmp_path):
  write_tars(tmp_path / "in", tars=3, per_tar=12, bad={(1, 4)}, uncaptioned={(2, 7)}, image_size=40)
  pattern = str(tmp_path / "in" / "*.tar")
  assert index_tars.main(["prog", f"--input={pattern}", "--num_workers=0"]) == 0
  flags = [
    f"--config.data.source=wds:{pattern}",
    "--config.eval.zeroshot_classes=",
    "--config.eval.retrieval=false",
    "--config.total_steps=4",
    "--config.checkpoint_every=2",
    "--config.log_every=1",
    "--config.global_batch_size=8",
    "--config.optim.warmup_steps=2",
    "--config.progress_bar=False",
    *TINY_CLIP,
  ]
  run = _main(tmp_path / "run", *flags, compilation_cache=tmp_path / "xla_cache")
  assert run.returncode == 0, run.stdout
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert max(r.get("data/skipped", 0) for r in rows) >= 1  # the bad JPEG, read in 4 batches of 8 from 36
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]
  reference = _params(tmp_path / "run", 4)
  # Lose the last checkpoint: the rerun resumes from step 2, and must reach the same step 4 bitwise.
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
  resumed = _main(tmp_path / "run", *flags, compilation_cache=tmp_path / "xla_cache")
  assert resumed.returncode == 0, resumed.stdout
  assert f"resuming from {tmp_path / 'run' / 'checkpoints'}/2" in resumed.stdout
  for got, want in zip(_params(tmp_path / "run", 4), reference):
    np.testing.assert_array_equal(got, want)
