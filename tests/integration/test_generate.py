"""Caption generation (generate.py): cached decoding equals teacher forcing, greedy decoding equals argmax by
recomputation, beam search (K = 1 is greedy; scores are the teacher-forced log-probs of its rows), and a small
Aurora trained on the shapes pairs whose captions of held-out images name the right colour or shape; the
caption CLI (tools/caption.py) on it."""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from visionfm_jax import tasks
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.text import tokenizer as tokenizer_lib
from visionfm_jax.models import generate
from visionfm_jax.tools import caption

from conftest import ROOT, cpu_env, random_params, tiny_aurora_config

# One xdist worker runs the module: the tests on the trained model share one training run (a module fixture is
# per worker), and a worker that ran only the other tests would start the training for nothing.
pytestmark = pytest.mark.xdist_group("generate")

BATCH, MAX_LEN = 8, 10
BOS, EOS, PAD = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID, tokenizer_lib.PAD_ID


def _random_params(overrides=None, seed=0):
  """(model, params) of the tiny Aurora with random params by shape (conftest.random_params: no init compile;
  logits that vary with the tokens and the memory, unlike all-equal scales); drawn once per config and seed."""
  return _drawn(tuple(sorted((overrides or {}).items())), seed)


@functools.lru_cache(maxsize=None)
def _drawn(overrides, seed):
  task = tasks.build(tiny_aurora_config(**dict(overrides)))
  return task.model, random_params(task, seed)


def _memory(model, seed=1):
  shape = (BATCH, model.caption_queries, model.text.width)
  return jnp.asarray(np.random.default_rng(seed).normal(0.0, 1.0, shape), jnp.float32)


def _with_eos_like(params, token: int):
  """Params whose EOS logit is 1.001 x that of `token`: EOS wins wherever `token` would, so rows finish."""
  kernel = params["decoder"]["vocab_proj"]["kernel"]
  kernel = kernel.at[:, EOS].set(1.001 * kernel[:, token])
  return {**params, "decoder": {**params["decoder"], "vocab_proj": {"kernel": kernel}}}


@jax.jit
def _log_softmax(logits):
  return jax.nn.log_softmax(logits, axis=-1)


@pytest.fixture(scope="module")
def scanned():
  """(model, params, params whose rows hit EOS, memory) of the tiny Aurora (scanned layout: faster compiles)."""
  model, params = _random_params({"model.scan": True})
  memory = _memory(model)
  first = np.asarray(generate.greedy(model, params, memory, max_len=MAX_LEN))
  # Of row 0's tokens, the one fewest other rows generate: row 0 then finishes, some others run to max_len.
  token = min(first[0, 1:], key=lambda t: (sum(t in row for row in first), t))
  return model, params, _with_eos_like(params, int(token)), memory


# The references compile quickly (XLA CPU without its expensive optimisations): these tiny programs run in ms.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_teacher_forced = jax.jit(
  lambda model, params, tokens, memory: model.apply({"params": params}, tokens, memory, method="caption_logits"),
  static_argnums=0,
  compiler_options=FAST_COMPILE,
)
_decode_step = jax.jit(
  lambda model, params, tokens, cache, index, memory: model.apply(
    {"params": params}, tokens, cache, index, memory, method="decode_step"
  ),
  static_argnums=0,
  compiler_options=FAST_COMPILE,
)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_cached_decoding_equals_teacher_forcing(scan):
  model, params = _random_params({"model.scan": scan})
  memory = _memory(model)
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(
    np.concatenate([np.full((BATCH, 1), BOS), rng.integers(4, model.text.vocab_size, (BATCH, MAX_LEN - 1))], 1),
    jnp.int32,
  )
  expected = _teacher_forced(model, params, tokens, memory)
  cache = model.init_cache(BATCH, MAX_LEN)
  got = []
  for i in range(MAX_LEN):
    logits, cache = _decode_step(model, params, tokens[:, i : i + 1], cache, i, memory if i == 0 else None)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=1e-4, rtol=0)
  # The caches carry the layer axis first and the batch second (what beam search reorders).
  for leaf in jax.tree.leaves(cache):
    assert leaf.shape[:2] == (2, BATCH)


def _reference_greedy(model, params, memory, max_len):
  """Greedy decoding by recomputation: each step runs the teacher-forced decoder on the whole prefix (padded
  to max_len; causal, so the padding does not change the prefix's logits) and takes the argmax."""
  tokens = np.full((BATCH, max_len), PAD, np.int32)
  tokens[:, 0] = BOS
  done = np.zeros(BATCH, bool)
  for t in range(max_len - 1):
    logits = np.asarray(_teacher_forced(model, params, jnp.asarray(tokens), memory))
    token = np.where(done, PAD, logits[:, t].argmax(-1))
    tokens[:, t + 1] = token
    done |= token == EOS
  return tokens


def test_greedy_equals_argmax_by_recomputation(scanned):
  model, params, eos_params, memory = scanned
  for p in (params, eos_params):
    got = np.asarray(generate.greedy(model, p, memory, max_len=MAX_LEN))
    np.testing.assert_array_equal(got, _reference_greedy(model, p, memory, MAX_LEN))
  # With the EOS-boosted params some rows finish (then PAD) and others run to max_len.
  finished = (got == EOS).any(1)
  assert finished[0] and finished.any() and not finished.all(), got
  for row in got[finished]:
    end = list(row).index(EOS)
    assert (row[end + 1 :] == PAD).all()
  assert generate.greedy(model, params, memory, max_len=1).tolist() == [[BOS]] * BATCH


def _teacher_forced_logprob(model, params, memory, tokens):
  """Sum of log p(token) over each row's tokens after BOS up to its first EOS (included), in numpy."""
  logp = np.asarray(_log_softmax(_teacher_forced(model, params, jnp.asarray(tokens), memory)))
  total = np.zeros(len(tokens))
  for b, row in enumerate(np.asarray(tokens)):
    for t in range(1, len(row)):
      total[b] += logp[b, t - 1, row[t]]
      if row[t] == EOS:
        break
  return total


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logprob(model, params, memory, tokens):
  """(B,) teacher-forced log-prob of rows as `greedy` returns them: the tokens after BOS up to the first EOS
  (included), or to the end of a row without EOS."""
  logits = model.apply({"params": params}, tokens, memory, method="caption_logits")
  token_logp = jnp.take_along_axis(
    jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1), tokens[:, 1:, None], axis=-1
  )[..., 0]
  targets = tokens[:, 1:]
  up_to_eos = jnp.arange(targets.shape[1]) <= tokenizer_lib.eos_positions(targets)[:, None]
  return jnp.sum(jnp.where(up_to_eos, token_logp, 0.0), axis=1)


def test_captions_hold_only_the_tokenizers_pieces(scanned):
  """A decoder sized for more ids than its tokenizer has (a 32k model with a smaller tokenizer) never emits one."""
  model, params, _, memory = scanned
  free = np.asarray(generate.greedy(model, params, memory, max_len=MAX_LEN))
  pieces = int(np.median(free[:, 1:]))  # below some of the tokens the unrestricted decoder picks
  assert free.max() >= pieces
  for tokens in (
    generate.greedy(model, params, memory, max_len=MAX_LEN, pieces=pieces),
    generate.beam_search(model, params, memory, beam_size=3, max_len=MAX_LEN, pieces=pieces)[0],
  ):
    assert np.asarray(tokens).max() < pieces
  with pytest.raises(ValueError, match="pieces"):
    generate.greedy(model, params, memory, max_len=MAX_LEN, pieces=model.decoder.vocab_size + 1)


def test_beam_size_one_is_greedy(scanned):
  model, params, eos_params, memory = scanned
  for p in (params, eos_params):
    greedy = generate.greedy(model, p, memory, max_len=MAX_LEN)
    tokens, scores = generate.beam_search(model, p, memory, beam_size=1, max_len=MAX_LEN)
    np.testing.assert_array_equal(tokens, greedy)
    np.testing.assert_allclose(scores, _teacher_forced_logprob(model, p, memory, greedy), atol=1e-4)
    np.testing.assert_allclose(_sequence_logprob(model, p, memory, greedy), scores, atol=1e-4)


def _reference_beam_search(model, params, memory, k, max_len, alpha):
  """Beam search by recomputation (teacher-forced logits of every beam's whole row each step), in numpy:
  top-k of the k * V extensions by normalised score, finished beams extend only by PAD at log-prob 0."""
  batch, vocab = memory.shape[0], model.decoder.vocab_size
  memory = jnp.repeat(memory, k, axis=0)
  tokens = np.full((batch, k, max_len), PAD, np.int32)
  tokens[:, :, 0] = BOS
  logp = np.where(np.arange(k) == 0, 0.0, -np.inf)[None].repeat(batch, 0)
  lengths, finished = np.zeros((batch, k), int), np.zeros((batch, k), bool)
  for t in range(max_len - 1):
    logits = _teacher_forced(model, params, jnp.asarray(tokens.reshape(batch * k, max_len)), memory)
    token_logp = np.asarray(_log_softmax(logits[:, t]), np.float64).reshape(batch, k, vocab)
    token_logp[finished] = -np.inf
    token_logp[finished, PAD] = 0.0
    cand = (logp[..., None] + token_logp).reshape(batch, k * vocab)
    cand_len = np.repeat(lengths + ~finished, vocab, axis=1)
    best = np.argsort(-(cand / ((5.0 + cand_len) / 6.0) ** alpha), axis=1, kind="stable")[:, :k]
    parent, token = best // vocab, best % vocab
    tokens = np.take_along_axis(tokens, parent[..., None], axis=1)
    tokens[:, :, t + 1] = token
    logp, lengths = np.take_along_axis(cand, best, 1), np.take_along_axis(cand_len, best, 1)
    finished = np.take_along_axis(finished, parent, 1) | (token == EOS)
  scores = logp / ((5.0 + lengths) / 6.0) ** alpha
  top = scores.argmax(1)
  return tokens[np.arange(batch), top], scores[np.arange(batch), top]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_equals_reference_and_mostly_beats_greedy(scanned, alpha):
  model, params, eos_params, memory = scanned
  for p in (params, eos_params):
    tokens, scores = generate.beam_search(model, p, memory, beam_size=4, max_len=MAX_LEN, length_penalty=alpha)
    ref_tokens, ref_scores = _reference_beam_search(model, p, memory, 4, MAX_LEN, alpha)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    # The score is the teacher-forced log-prob of the returned row over GNMT's length penalty.
    tokens = np.asarray(tokens)
    lengths = np.array([list(r).index(EOS) if EOS in r else MAX_LEN - 1 for r in tokens])
    expected = _teacher_forced_logprob(model, p, memory, tokens) / ((5.0 + lengths) / 6.0) ** alpha
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    for row in tokens:  # finished beams carry PAD after their EOS
      if EOS in row:
        assert (row[list(row).index(EOS) + 1 :] == PAD).all()
    if alpha == 0:
      # Beam search is not guaranteed to beat greedy decoding (greedy's prefix can be pruned in favour of beams
      # that later fare worse: one row of eos_params here), but with 4 beams it does on most rows.
      greedy = _teacher_forced_logprob(model, p, memory, generate.greedy(model, p, memory, max_len=MAX_LEN))
      assert np.mean(np.asarray(scores) >= greedy - 1e-4) >= 0.75, (scores, greedy)
  with pytest.raises(ValueError, match="max_len"):
    generate.greedy(model, params, memory, max_len=model.text.max_len + 1)


def test_tokens_to_text():
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.shapes_tokenizer_path(), max_len=12)
  rows = tok.encode_batch(["a small red circle", "a large blue star"])
  rows[1, list(rows[1]).index(EOS) + 1 :] = 7  # anything after the EOS is dropped
  assert generate.tokens_to_text(tok, rows) == ["a small red circle", "a large blue star"]
  assert generate.tokens_to_text(tok, rows[0]) == ["a small red circle"]


# ------------------------------------------------------------------------------------- trained on shapes

TRAIN_STEPS = 150
HELD_OUT = 100
# The demo shrunk to a femto SwinV2 (pico's first stage alone) and a one-layer text encoder of pico's width
# (32x1x128x2) with a 1-layer decoder on 16 px images: the run takes ~70% of the CPU it takes with the pico towers
# (which name the colour of ~90%); 150 steps of 32 short captions ('a small red circle') name the colour of ~70%
# of held-out images (and the shape of few).
TRAIN_FLAGS = [
  "--config=configs/aurora_xl.py:demo",
  "--config.model.image_size=16",
  "--config.data.image_size=16",
  "--config.model.encoder.variant=femto",
  "--config.model.encoder.window_size=2",
  "--config.model.text.variant=32x1x128x2",
  "--config.model.embed_dim=16",
  "--config.model.caption_queries=4",
  "--config.model.decoder_depth=1",
  "--config.model.mim_view=shared",  # one encoder pass per step: ~1.5x the steps per second
  "--config.data.mim.mask_patch_size=4",
  "--config.global_batch_size=32",
  "--config.grad_accum_steps=1",
  "--config.data.mixture=()",
  "--config.data.source=shapes",  # captioned pairs only: every step names colours
  f"--config.total_steps={TRAIN_STEPS}",
  f"--config.optim.warmup_steps={TRAIN_STEPS // 10}",
  f"--config.log_every={TRAIN_STEPS}",
  f"--config.eval_every={TRAIN_STEPS}",
  f"--config.checkpoint_every={TRAIN_STEPS}",
  "--config.data.eval_examples=32",
  "--config.eval.retrieval=False",
  "--config.progress_bar=False",
]


def _fast_cpu_env():
  """One CPU device (and conftest's quick compilation): the tiny model's run time is compiling, not computing."""
  return cpu_env(1)


@pytest.fixture(scope="module", autouse=True)
def _training(request, tmp_path_factory, warm_python):
  """Starts training the shrunk demo (train.run through visionfm_jax.main, in a subprocess with one device and
  fast compilation) as the module starts when a selected test needs it: it runs beside the tests above."""
  if not any("trained" in item.fixturenames for item in request.session.items):
    yield None
    return
  workdir = tmp_path_factory.mktemp("aurora_shapes")
  log = open(workdir.parent / "aurora_shapes.log", "w+", encoding="utf-8")  # pylint: disable=consider-using-with
  process = subprocess.Popen(
    [warm_python.python, "-m", "visionfm_jax.main", f"--workdir={workdir}", *TRAIN_FLAGS],
    cwd=ROOT,
    env=warm_python.env(_fast_cpu_env()),
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  yield process, workdir, log
  if process.poll() is None:
    process.kill()
    process.wait()
  log.close()


@pytest.fixture(scope="module")
def trained(_training):
  """The workdir of the shrunk demo trained for TRAIN_STEPS steps."""
  process, workdir, log = _training
  process.wait(timeout=600)
  log.seek(0)
  assert process.returncode == 0, log.read()[-3000:]
  assert os.listdir(workdir / "checkpoints") == [str(TRAIN_STEPS)]
  return str(workdir)


@pytest.mark.slow
def test_captions_of_held_out_images_name_the_shape_or_colour(trained):
  lines = caption.run(trained, [f"shapes:0-{HELD_OUT - 1}"], batch_size=5)
  source = shapes.ShapesSource("validation", HELD_OUT, 16, caption_style="short")
  shape_hits, colour_hits = np.zeros(HELD_OUT, bool), np.zeros(HELD_OUT, bool)
  for i, (name, text) in enumerate(lines):
    record, words = source[i], text.split()
    assert name == f"shapes:{i}"
    shape_hits[i] = shapes.SHAPE_NAMES[record["label"]] in words
    colour_hits[i] = shapes.COLOUR_NAMES[record["colour"]] in words
  shape_hits, colour_hits, either = shape_hits.sum(), colour_hits.sum(), (shape_hits | colour_hits).sum()
  # A caption naming a random shape and a random colour names the right one of either with this probability.
  chance = 1 - (1 - 1 / len(shapes.SHAPE_NAMES)) * (1 - 1 / len(shapes.COLOUR_NAMES))
  report = f"shape {shape_hits}, colour {colour_hits}, either {either} of {HELD_OUT}; chance {chance:.3f}: {lines[:4]}"
  assert either / HELD_OUT > 2 * chance, report
  assert colour_hits / HELD_OUT > 3 / len(shapes.COLOUR_NAMES), report


@pytest.mark.slow
def test_caption_cli(trained, tmp_path, capsys):
  png = tmp_path / "shape.png"
  Image.fromarray(shapes.ShapesSource("validation", 200, 40)[150]["image"]).save(png)  # resized to 16 px
  assert caption.main(["caption", f"--checkpoint={trained}", f"--images=shapes:0-3,{png}", "--batch_size=5"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split("\t")[0] for line in lines] == ["shapes:0", "shapes:1", "shapes:2", "shapes:3", str(png)]
  assert all(len(line.split("\t")) == 2 and line.split("\t")[1].startswith("a ") for line in lines), lines
  # Beam search, --step naming the (only) checkpoint, and a shorter caption limit: at most 5 tokens after BOS.
  assert (
    caption.main(
      [
        "caption",
        f"--checkpoint={trained}",
        "--images=shapes:0-4",
        "--beam_size=3",
        "--max_len=6",
        f"--step={TRAIN_STEPS}",
      ]
    )
    == 0
  )
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 5 and all(len(line.split("\t")[1].split()) <= 5 for line in lines), lines


@pytest.mark.slow
def test_caption_cli_errors(trained, tmp_path, capsys):
  def error(*args):
    assert caption.main(["caption", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]

  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  assert str(bad) in error(f"--checkpoint={trained}", f"--images={bad}")
  assert "missing.png" in error(f"--checkpoint={trained}", f"--images={tmp_path / 'missing.png'}")
  assert "--step=7" in error(f"--checkpoint={trained}", "--images=shapes:0", "--step=7")
  assert "shapes:x" in error(f"--checkpoint={trained}", "--images=shapes:x")
  other = tmp_path / "classifier"
  other.mkdir()
  (other / "config.json").write_text('{"task": "classification"}')
  assert "not an Aurora model" in error(f"--checkpoint={other}", "--images=shapes:0")
  # As a program: a missing checkpoint directory is one line on stderr and status 2.
  missing = tmp_path / "no_such_workdir"
  result = subprocess.run(
    [sys.executable, "-m", "visionfm_jax.tools.caption", f"--checkpoint={missing}", "--images=shapes:0-3"],
    cwd=ROOT,
    env=_fast_cpu_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().splitlines()[-1] == f"error: --checkpoint={missing}: no such directory"


def test_length_penalty_factor():
  assert math.isclose(float(generate.length_penalty_factor(jnp.int32(7), 0.6)), 2.0**0.6, rel_tol=1e-6)
  assert float(generate.length_penalty_factor(jnp.int32(7), 0.0)) == 1.0


def test_caption_images_take_the_runs_evaluation_view(tmp_path):
  """An image file is cropped as the run's evaluation crops (config.data.eval_preprocess: Aurora's is CLIP's)."""
  from visionfm_jax.data.transforms import host as transforms  # pylint: disable=g-import-not-at-top

  image = np.random.default_rng(0).integers(0, 256, (30, 47, 3), dtype=np.uint8)
  png = tmp_path / "wide.png"
  Image.fromarray(image).save(png)
  views = {}
  for preprocess in ("inception", "clip"):
    config = tiny_aurora_config(**{"data.eval_preprocess": preprocess})
    _, [views[preprocess]] = caption.load_images([str(png)], config)
    want = transforms.EvalTransform(16, preprocess).map({"image": image})["image"]
    np.testing.assert_array_equal(views[preprocess], want)
  assert not np.array_equal(views["inception"], views["clip"])


def test_caption_names_an_image_it_cannot_decode_apart_from_one_it_cannot_read(tmp_path):
  """Pillow's UnidentifiedImageError is an OSError: it is a decode failure, not a read failure."""
  from visionfm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from visionfm_jax.tools import caption  # pylint: disable=g-import-not-at-top

  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"not an image at all")
  with pytest.raises(UserError, match=rf"--images: cannot decode {garbage}: "):
    caption.read_image(str(garbage), 16)
  with pytest.raises(UserError, match=rf"--images: cannot read {tmp_path / 'missing.jpg'}: No such file"):
    caption.read_image(str(tmp_path / "missing.jpg"), 16)
