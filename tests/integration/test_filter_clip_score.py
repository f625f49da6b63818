"""datatools/filter_clip_score: keeps exactly the pairs scoring >= the threshold (the scores checked against the
model's embeddings of one pair at a time), counts corrupt records and undecodable images, splits the files over
processes, resumes, and its CLI. The models: the tiny CLIP (and Aurora) of conftest with random params."""

import copy
import functools
import io
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

from visionfm_jax import tasks
from visionfm_jax.data import limits
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.sources import records
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.datatools import filter_clip_score as fcs
from visionfm_jax.training import checkpoint

from conftest import ROOT, tiny_aurora_config, tiny_clip_config
import hostile

STEP = 3
BATCH = 8  # one row per simulated device
FILE_SIZES = (11, 6, 9)  # pairs per input file: each file's last batch is padded
# The records file 0 adds: none scored, all counted. "bomb": a PNG of 400 megapixels (tests/hostile.py), "long":
# a caption over data/limits.py's MAX_TEXT_BYTES; both are refused before any decoding or tokenizing.
BAD = ("corrupt", "bad-image", "bomb", "long", "no-caption")
UNDECODABLE, UNCAPTIONED = 4, 1  # of BAD
# The reference embeddings compile quickly (XLA CPU without its expensive optimisations): they run in ms.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _random_params(task, seed=0):
  """Random numpy params in the model's shapes (from jax.eval_shape: compiling its init would take longer than
  this whole module): kernels N(0, 1 / first dim), norm scales 1, everything else N(0, 0.02^2)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    std = leaf.shape[0] ** -0.5 if name == "kernel" else 0.02
    return rng.normal(0.0, std, leaf.shape).astype(leaf.dtype)

  shapes_only = jax.eval_shape(lambda: nn.unbox(task.init_variables(jax.random.key(0))["params"]))
  return jax.tree_util.tree_map_with_path(draw, shapes_only)


def _workdir(directory, config):
  """(workdir, task, params): a training workdir of `config` in `directory` whose checkpoint STEP holds random
  params."""
  task = tasks.build(config)
  params = _random_params(task)
  ckpt = checkpoint.Checkpointer(str(directory / "checkpoints"), async_save=False)
  ckpt.save(STEP, {"params": params})
  ckpt.close()
  (directory / "config.json").write_text(config.to_json_best_effort(indent=2))
  return str(directory), task, params


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  return _workdir(tmp_path_factory.mktemp("clip"), tiny_clip_config())


def _encode_png(image) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """(directory, {key: record dict}) of three train shards of 24 px shapes pairs (JPEG and PNG, half of them
  with another record's caption), file 0 with the BAD records too, and their dataset.json."""
  directory = tmp_path_factory.mktemp("pairs")
  source = shapes.ShapesSource("validation", sum(FILE_SIZES), 24, caption_style="short")
  rng = np.random.default_rng(0)
  pairs, index = {}, 0
  for f, size in enumerate(FILE_SIZES):
    with records.RecordWriter(directory / records.shard_name("train", f, len(FILE_SIZES))) as writer:
      for j in range(size):
        example = source[index]
        other = source[int(rng.integers(sum(FILE_SIZES)))]["caption"]
        image = records.encode_jpeg(example["image"]) if j % 2 else _encode_png(example["image"])
        record = {
          "image": image,
          "caption": example["caption"] if rng.random() < 0.5 else other,
          "key": f"{f}/{j}",
          "meta": json.dumps({"index": index}),
        }
        pairs[record["key"]] = record
        writer.write(records.pack_record(**record))
        index += 1
      if f == 0:
        writer.write(b"\x93not a record")
        writer.write(records.pack_record(b"not an image", caption="a small red circle", key="bad-image"))
        writer.write(records.pack_record(hostile.png_bomb(20_000, 20_000), caption="a circle", key="bomb"))
        writer.write(
          records.pack_record(
            records.encode_jpeg(source[0]["image"]), key="long", caption="a circle " * (limits.MAX_TEXT_BYTES // 9 + 1)
          )
        )
        writer.write(records.pack_record(source[0]["image"], key="no-caption"))
  names = [records.shard_name("train", f, len(FILE_SIZES)) for f in range(len(FILE_SIZES))]
  records.write_metadata(
    directory, kind="pairs", splits={"train": {"records": index + len(BAD), "shards": names, "source": "shapes"}}
  )
  return str(directory), pairs


def _reference_scores(task, params, pairs) -> dict[str, float]:
  """Cosine similarity of each pair, one pair at a time: decode, the config's central crop, embed, normalise in
  numpy."""
  size, preprocess = task.config.data.image_size, task.config.data.eval_preprocess

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def embed(params, image, tokens):
    images = task.normalize(image[None])
    return (
      task.model.apply({"params": params}, images, method="embed_images")[0],
      task.model.apply({"params": params}, tokens[None], method="embed_texts")[0],
    )

  scores = {}
  for key, record in pairs.items():
    image = transforms.EvalTransform(size, preprocess).map({"image": transforms.decode_image(record["image"])})["image"]
    i, t = (np.asarray(e, np.float64) for e in embed(params, image, task.tokenizer.encode(record["caption"])))
    scores[key] = float(i @ t / np.linalg.norm(i) / np.linalg.norm(t))
  return scores


def _read(path) -> list[dict]:
  source = records.ArrayRecordSource(str(path))
  return [source[i] for i in range(len(source))]


def _outputs(directory) -> dict[str, list[dict]]:
  return {
    name: _read(os.path.join(directory, name))
    for name in sorted(os.listdir(directory))
    if name.endswith(".array_record")
  }


def _filter(scorer, files, output, threshold):
  """One process filtering every file of `files` into `output`, then the summary."""
  fcs.filter_files(scorer, files, str(output), threshold)
  fcs.write_summary(str(output), files, threshold)


@pytest.fixture(scope="module")
def scorer(clip):
  workdir, _, _ = clip
  return fcs.load_scorer(workdir, None, BATCH)


@pytest.fixture(scope="module")
def files(inputs):
  directory, _ = inputs
  return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".array_record"))


@pytest.fixture(scope="module")
def scores(scorer, files, tmp_path_factory):
  """{key: score} the tool stores when it keeps everything (threshold -1)."""
  output = tmp_path_factory.mktemp("all")
  _filter(scorer, files, output, -1.0)
  return {r["key"]: r["score"] for rs in _outputs(output).values() for r in rs}


@pytest.fixture(scope="module")
def reference(clip, inputs):
  """{key: score} of every pair by _reference_scores."""
  _, task, params = clip
  return _reference_scores(task, params, inputs[1])


@pytest.fixture(scope="module")
def threshold(scores):
  """The median score: a pair scores exactly the threshold, and both sides are non-empty."""
  return sorted(scores.values())[len(scores) // 2]


@pytest.fixture(scope="module")
def single(scorer, files, threshold, tmp_path_factory):
  """The output directory of one process filtering every file at `threshold`."""
  output = tmp_path_factory.mktemp("single")
  _filter(scorer, files, output, threshold)
  return str(output)


def test_scores_are_the_cosine_similarities_of_the_embeddings(inputs, scores, reference, scorer):
  _, pairs = inputs
  assert scorer.step == STEP and scorer.batch_size == BATCH
  assert sorted(scores) == sorted(pairs)  # every pair scored and kept at -1, none of the BAD records
  np.testing.assert_allclose([scores[k] for k in pairs], [reference[k] for k in pairs], atol=1e-5, rtol=0)
  assert np.ptp(list(scores.values())) > 1e-3  # distinct scores: the threshold splits them


def test_keeps_exactly_the_pairs_at_or_above_the_threshold(inputs, scores, reference, threshold, single):
  directory, pairs = inputs
  outputs = _outputs(single)
  assert sorted(outputs) == sorted(n for n in os.listdir(directory) if n.endswith(".array_record"))
  kept = {r["key"]: r for rs in outputs.values() for r in rs}
  want = {k for k, s in scores.items() if s >= threshold}
  assert set(kept) == want and 0 < len(want) < len(scores)
  assert any(scores[k] == threshold for k in kept)  # the pair at the threshold is kept
  clear = {k for k, s in reference.items() if abs(s - threshold) > 1e-5}  # the reference decides these alike
  assert {k for k in clear if reference[k] >= threshold} == want & clear and len(clear) >= len(pairs) - 2
  for key, record in kept.items():  # every field as read, plus the score
    assert record == {**pairs[key], "score": scores[key]}
  for name, rs in outputs.items():  # each output holds the kept pairs of its input, in order
    f = int(name.split("-")[1])
    assert [r["key"] for r in rs] == [f"{f}/{j}" for j in range(FILE_SIZES[f]) if f"{f}/{j}" in want]

  summary = json.loads(open(os.path.join(single, fcs.HISTOGRAM_JSON), encoding="utf-8").read())
  assert summary["total"] == sum(summary["counts"]) == len(pairs)
  assert summary["kept"] == len(want) and summary["undecodable"] == UNDECODABLE
  assert summary["uncaptioned"] == UNCAPTIONED
  assert summary["threshold"] == threshold and summary["step"] == STEP
  assert len(summary["bin_edges"]) == len(summary["counts"]) + 1 == fcs.BINS + 1
  assert summary["bin_edges"][0] == -1.0 and summary["bin_edges"][-1] == 1.0
  expected = np.zeros(fcs.BINS, int)
  for score in scores.values():  # bins 0.01 wide from -1
    expected[min(int((score + 1.0) * fcs.BINS / 2), fcs.BINS - 1)] += 1
  np.testing.assert_array_equal(summary["counts"], expected)
  text = open(os.path.join(single, fcs.HISTOGRAM_TXT), encoding="utf-8").read()
  assert f"kept {len(want)}" in text and "<- threshold" in text and "0.5: " in text

  metadata = records.read_metadata(single)
  assert metadata["kind"] == "pairs" and metadata["clip_filter"]["kept"] == len(want)
  assert metadata["clip_filter"]["uncaptioned"] == UNCAPTIONED
  assert metadata["splits"] == {"train": {"records": len(want), "shards": sorted(outputs), "source": "shapes"}}


def test_undecodable_and_uncaptioned_records_are_counted_per_file(files, single):
  stats = {p: json.loads(open(fcs.output_paths(single, p)[1], encoding="utf-8").read()) for p in files}
  assert [s["undecodable"] for s in stats.values()] == [UNDECODABLE, 0, 0]
  assert [s["uncaptioned"] for s in stats.values()] == [UNCAPTIONED, 0, 0]
  assert [s["total"] for s in stats.values()] == list(FILE_SIZES)
  assert all(sum(s["histogram"]) == s["total"] for s in stats.values())


def test_processes_write_disjoint_shares_that_make_the_single_process_result(
  scorer, files, threshold, single, tmp_path
):
  results = fcs.filter_files(scorer, files, str(tmp_path), threshold, process_index=1, process_count=2)
  assert list(results) == [files[1]]
  assert sorted(_outputs(tmp_path)) == [os.path.basename(files[1])]
  results = fcs.filter_files(scorer, files, str(tmp_path), threshold, process_index=0, process_count=2)
  assert list(results) == [files[0], files[2]]
  summary = fcs.write_summary(str(tmp_path), files, threshold)
  assert _outputs(tmp_path) == _outputs(single)
  assert summary == json.loads(open(os.path.join(single, fcs.HISTOGRAM_JSON), encoding="utf-8").read())
  assert records.read_metadata(tmp_path) == records.read_metadata(single)


def test_aurora_workdirs_score_by_their_contrastive_embeddings(inputs, files, tmp_path):
  workdir, task, params = _workdir(tmp_path / "aurora", tiny_aurora_config())
  scorer = fcs.load_scorer(workdir, STEP, BATCH)
  _filter(scorer, files[1:2], tmp_path / "out", -1.0)
  scores = {r["key"]: r["score"] for r in _read(fcs.output_paths(str(tmp_path / "out"), files[1])[0])}
  reference = _reference_scores(task, params, {k: v for k, v in inputs[1].items() if k.startswith("1/")})
  assert sorted(scores) == sorted(reference)
  np.testing.assert_allclose([scores[k] for k in reference], list(reference.values()), atol=1e-5, rtol=0)


class _CountingScorer:
  """A scorer that counts the batches it scores."""

  def __init__(self, scorer):
    self.scorer, self.batches = scorer, 0

  def __getattr__(self, name):
    return getattr(self.scorer, name)

  def __call__(self, batch):
    self.batches += 1
    return self.scorer(batch)


def test_rerun_skips_finished_files_and_redoes_unfinished_ones(scorer, files, threshold, single, tmp_path):
  fcs.filter_files(scorer, files, str(tmp_path), threshold)
  # As if interrupted writing file 1: its stats were written, its records file not renamed into place yet.
  out_path, _ = fcs.output_paths(str(tmp_path), files[1])
  os.replace(out_path, out_path + ".tmp")
  counting = _CountingScorer(scorer)
  lines = []
  results = fcs.filter_files(counting, files, str(tmp_path), threshold, progress=lines.append)
  assert counting.batches == -(-FILE_SIZES[1] // BATCH)  # file 1 only
  assert "finished earlier" in lines[0] and "finished earlier" not in lines[1] and "finished earlier" in lines[2]
  assert [r["kept"] for r in results.values()] == [len(rs) for rs in _outputs(single).values()]
  fcs.write_summary(str(tmp_path), files, threshold)
  assert _outputs(tmp_path) == _outputs(single) and not os.path.exists(out_path + ".tmp")
  fcs.filter_files(counting, files, str(tmp_path), threshold)
  assert counting.batches == -(-FILE_SIZES[1] // BATCH)
  with pytest.raises(fcs.UserError, match="filtered at threshold"):  # resuming with other settings
    fcs.filter_files(scorer, files, str(tmp_path), threshold + 0.01)
  drafted = copy.copy(scorer)
  drafted.draft_decode = True
  with pytest.raises(fcs.UserError, match="with full decoding, not at .* with draft decoding"):
    fcs.filter_files(drafted, files, str(tmp_path), threshold)


def test_cli(clip, inputs, scorer, threshold, single, tmp_path, capsys, monkeypatch):
  workdir, _, _ = clip
  directory, _ = inputs
  asked = []

  def compiled_scorer(path, step, batch_size, draft_decode):  # the compiled one, decoding as --draft_decode says
    asked.append(draft_decode)
    return scorer

  monkeypatch.setattr(fcs, "load_scorer", compiled_scorer)
  args = [
    f"--checkpoint={workdir}",
    f"--input={directory}/train-*",
    f"--output={tmp_path / 'out'}",
    f"--threshold={threshold!r}",
    f"--batch_size={BATCH}",
  ]
  assert fcs.main(["filter_clip_score", *args]) == 0
  lines = capsys.readouterr().out.splitlines()
  summary = json.loads(open(os.path.join(single, fcs.HISTOGRAM_JSON), encoding="utf-8").read())
  assert len(lines) == len(FILE_SIZES) + 1, lines  # a line per file, then the summary
  assert lines[-1].startswith(f"kept {summary['kept']} of {len(inputs[1])} pairs (")
  assert f"at threshold {threshold:g}; {UNDECODABLE} undecodable; {UNCAPTIONED} uncaptioned;" in lines[-1]
  assert _outputs(tmp_path / "out") == _outputs(single)
  assert fcs.main(["filter_clip_score", *args, f"--output={tmp_path / 'drafted'}", "--draft_decode"]) == 0
  assert asked == [False, True]


def test_cli_errors(clip, inputs, tmp_path, capsys):
  workdir, _, _ = clip
  directory, _ = inputs

  def error(**flags):
    args = {
      "checkpoint": workdir,
      "input": f"{directory}/train-*",
      "output": str(tmp_path / "out"),
      "threshold": "0.2",
      **flags,
    }
    assert fcs.main(["filter_clip_score", *(f"--{k}={v}" for k, v in args.items() if v is not None)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]

  assert "no such directory" in error(checkpoint=tmp_path / "missing")
  classifier = tmp_path / "classifier"
  classifier.mkdir()
  (classifier / "config.json").write_text('{"task": "classification"}')
  assert "config.task='classification' is not a CLIP model" in error(checkpoint=classifier)
  aurora = tmp_path / "aurora"  # accepted (it embeds images and texts too): this one has no checkpoints
  aurora.mkdir()
  (aurora / "config.json").write_text(tiny_aurora_config().to_json_best_effort())
  assert "no checkpoints" in error(checkpoint=aurora)
  assert "--step=7" in error(step=7)
  assert f"--input={tmp_path}/none-*: no files match" in error(input=f"{tmp_path}/none-*")
  assert "--threshold=1.5: must be within [-1, 1]" in error(threshold=1.5)
  assert "--threshold: required" in error(threshold=None)
  assert "holds input files" in error(output=directory)
  assert not os.path.exists(tmp_path / "out")
  theirs = tmp_path / "theirs"  # a folder of the user's: nothing in it is replaced
  theirs.mkdir()
  (theirs / "dataset.json").write_text("mine")
  assert "--output=" + str(theirs) + ": holds dataset.json, which filter_clip_score did not write" in error(
    output=theirs
  )
  assert os.listdir(theirs) == ["dataset.json"] and (theirs / "dataset.json").read_text() == "mine"
  # As a program: a missing workdir is one line on stderr and status 2.
  missing = tmp_path / "no_such_workdir"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "visionfm_jax.datatools.filter_clip_score",
      f"--checkpoint={missing}",
      f"--input={directory}/*",
      f"--output={tmp_path / 'out'}",
      "--threshold=0.3",
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: --checkpoint={missing}: no such directory")
