"""Tests of visionfm_jax.data.text.tokenizer and datatools.train_tokenizer (CPU, no network)."""

import os
from pathlib import Path
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from visionfm_jax.data.text import tokenizer
from visionfm_jax.datatools import train_tokenizer as tool
from visionfm_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
CORPUS = [
  f"{size} {colour} {shape} on the {side}"
  for size in ("a small", "a large", "one tiny")
  for colour in ("red", "green", "blue", "yellow")
  for shape in ("circle", "square", "star")
  for side in ("left", "right", "top", "bottom")
]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
  return tokenizer.train_tokenizer(CORPUS, 64, str(tmp_path_factory.mktemp("tok") / "small"))


def test_round_trip(model_file):
  tok = tokenizer.Tokenizer(model_file, max_len=16)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3) and 20 < tok.vocab_size <= 64
  texts = ["a small red circle on the left", "one tiny blue star on the top", "a large green square"]
  tokens = tok.encode_batch(texts)
  assert tokens.shape == (3, 16) and tokens.dtype == np.int32
  assert tok.decode(tokens) == texts and tok.decode(tokens[1]) == texts[1]
  assert (tokens != tokenizer.UNK_ID).all()
  np.testing.assert_array_equal(tok.encode(texts[2]), tokens[2])
  np.testing.assert_array_equal(tok.encode_batch(texts[:1]), tokens[:1])  # the one-text path
  np.testing.assert_array_equal(tok.encode_batch(texts, num_threads=1), tokens)
  assert tokenizer.UNK_ID in tok.encode("a zebra circle")  # no 'z' in the corpus
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode_batch(texts), tokens)
  assert clone.max_len == 16 and "small.model" in repr(clone)


def test_layout_and_truncation(model_file):
  long = " ".join(CORPUS[:4])
  tok = tokenizer.Tokenizer(model_file, max_len=8)
  pieces = len(tokenizer.Tokenizer(model_file, max_len=200).pieces(long))
  assert pieces > 6
  tokens = tok.encode_batch(["a red star", long, ""])
  row = tokens[0]
  n = len(tok.pieces("a red star"))
  assert row[0] == tokenizer.BOS_ID and row[n + 1] == tokenizer.EOS_ID and (row[n + 2 :] == 0).all()
  assert (row[1 : n + 1] > 3).all()
  assert tokens[1, 0] == tokenizer.BOS_ID and tokens[1, -1] == tokenizer.EOS_ID and (tokens[1, 1:-1] > 3).all()
  np.testing.assert_array_equal(tokens[2], [2, 3, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(tokenizer.eos_positions(tokens), [n + 1, 7, 1])
  np.testing.assert_array_equal(tokenizer.eos_positions(tokens[None]), [[n + 1, 7, 1]])
  assert tok.encode_batch([]).shape == (0, 8)
  assert tokenizer.Tokenizer(model_file, max_len=2).encode("a red star").tolist() == [2, 3]


def test_eos_positions_of_a_row_without_eos_is_its_last_position():
  """The one contract (the text tower pools there): the first EOS of a row, L - 1 for a row without one, on numpy
  and jax arrays, jitted or not, for any leading shape."""
  import jax  # pylint: disable=g-import-not-at-top

  rows = np.array([[2, 5, 3, 0, 3], [2, 5, 6, 7, 8], [3, 0, 0, 0, 0]], np.int32)
  np.testing.assert_array_equal(tokenizer.eos_positions(rows), [2, 4, 0])
  np.testing.assert_array_equal(jax.jit(tokenizer.eos_positions)(rows), [2, 4, 0])
  np.testing.assert_array_equal(tokenizer.eos_positions(rows[None]), [[2, 4, 0]])
  np.testing.assert_array_equal(tokenizer.eos_positions(rows, eos_id=5), [1, 1, 4])


def test_training_is_deterministic(tmp_path):
  a = tokenizer.train_tokenizer(CORPUS, 48, str(tmp_path / "a"))
  b = tokenizer.train_tokenizer(iter(CORPUS), 48, str(tmp_path / "sub" / "b"))
  assert Path(a).read_bytes() == Path(b).read_bytes()
  c = tokenizer.train_tokenizer(CORPUS, 48, str(tmp_path / "c"), model_type="unigram")
  unigram = tokenizer.Tokenizer(c, 64)
  assert unigram.decode(unigram.encode(CORPUS[5])) == CORPUS[5]
  with pytest.raises(DataError, match="model_type"):
    tokenizer.train_tokenizer(CORPUS, 48, str(tmp_path / "d"), model_type="wordpiece")
  with pytest.raises(DataError, match="no non-empty lines"):
    tokenizer.train_tokenizer(["", "  "], 48, str(tmp_path / "e"))


def test_bad_model_files(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(DataError, match=str(missing)):
    tokenizer.Tokenizer(str(missing), 8)
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"this is not a model")
  with pytest.raises(DataError, match=str(garbage)):
    tokenizer.Tokenizer(str(garbage), 8)
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_prefix=str(tmp_path / "default_ids"),
    vocab_size=30,
    hard_vocab_limit=False,
    minloglevel=2,
  )  # unk 0, bos 1, eos 2, no pad
  with pytest.raises(DataError, match="default_ids.model.*ids"):
    tokenizer.Tokenizer(str(tmp_path / "default_ids.model"), 8)
  with pytest.raises(DataError, match="max_len"):
    tokenizer.Tokenizer(str(garbage), 1)


def test_shipped_shapes_tokenizer_rebuilds_identically(tmp_path):
  shipped = tokenizer.shapes_tokenizer_path()
  assert shipped.endswith(os.path.join("data", "text", "assets", "shapes_tokenizer.model"))
  rebuilt = tool.run(
    None,
    tokenizer.SHAPES_RECORDS,
    tokenizer.SHAPES_VOCAB_SIZE,
    str(tmp_path / "shapes.model"),
    normalization=tokenizer.SHAPES_NORMALIZATION,
    num_threads=1,
  )
  assert rebuilt.model_file == str(tmp_path / "shapes.model")
  assert Path(rebuilt.model_file).read_bytes() == Path(shipped).read_bytes()


def test_shipped_tokenizer_covers_fresh_captions():
  from visionfm_jax.data.embedded.shapes import ShapesSource  # pylint: disable=g-import-not-at-top

  tok = tokenizer.Tokenizer(tokenizer.shapes_tokenizer_path(), max_len=32)
  source = ShapesSource("validation", 1000, 48)
  captions = [source[i]["caption"] for i in range(1000)]
  tokens = tok.encode_batch(captions)
  assert not (tokens == tokenizer.UNK_ID).any()
  assert tok.decode(tokens) == captions
  assert tokenizer.eos_positions(tokens).max() < 20  # captions fit in 20 tokens: a demo max_len of 24 truncates nothing


def test_a_vocabulary_smaller_than_asked_says_why(tmp_path, capsys):
  """The 144 captions hold 18 distinct words: SentencePiece runs out of pieces to learn long before 8000."""
  corpus = tmp_path / "captions.txt"
  corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
  argv = ["train_tokenizer", f"--input={corpus}", f"--out={tmp_path / 'tok'}", "--num_threads=1"]
  assert tool.main([*argv, "--vocab_size=8000"]) == 0
  out = capsys.readouterr().out.splitlines()
  pieces = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model")).get_piece_size()
  assert pieces < 1000 and out[-1] == (
    f"warning: {pieces} pieces, fewer than the 8000 asked: the 144 captions hold 18 distinct words, and a piece "
    "never spans two words, so the words were whole before the vocabulary filled; more varied captions give more "
    "pieces"
  )
  assert tool.main([*argv, f"--vocab_size={pieces}"]) == 0
  assert "warning" not in capsys.readouterr().out


def test_tool_argument_errors(tmp_path):
  corpus = tmp_path / "captions.txt"
  corpus.write_bytes(b"\xff\xfe not utf-8")
  for args in [(str(corpus), 5), (None, 0), (str(corpus), 0)]:
    with pytest.raises(Exception, match="--input|--shapes_records") as info:
      tool.run(args[0], args[1], 64, str(tmp_path / "x"))
    assert isinstance(info.value, tool.UserError)


def test_reservoir_sample_is_a_uniform_subset_of_the_stream():
  """Algorithm L's invariant, checked against the law of a uniform k-subset of N: every item is kept with
  probability k/N and every pair with k(k-1)/(N(N-1)), over many seeds; a short stream is kept whole, in order."""
  n, k, seeds = 40, 8, 3000
  single, pair = np.zeros(n), np.zeros((n, n))
  for seed in range(seeds):
    sample, count = tokenizer.reservoir_sample(iter(range(n)), k, seed)
    assert count == n and len(sample) == k == len(set(sample)) and set(sample) <= set(range(n))
    kept = np.zeros(n)
    kept[sample] = 1
    single += kept
    pair += np.outer(kept, kept)
  p1, p2 = k / n, k * (k - 1) / (n * (n - 1))
  assert np.abs(single - seeds * p1).max() < 5 * np.sqrt(seeds * p1 * (1 - p1))
  off = pair[~np.eye(n, dtype=bool)]
  assert np.abs(off - seeds * p2).max() < 5 * np.sqrt(seeds * p2 * (1 - p2))
  # late items are kept as often as early ones (a biased sampler favours one end)
  assert abs(single[: n // 2].sum() - single[n // 2 :].sum()) < 5 * np.sqrt(seeds * k / 2)
  assert tokenizer.reservoir_sample(iter(range(n)), k, 7) == tokenizer.reservoir_sample(iter(range(n)), k, 7)
  assert tokenizer.reservoir_sample(iter(range(n)), k, 7) != tokenizer.reservoir_sample(iter(range(n)), k, 8)
  assert tokenizer.reservoir_sample(iter(range(5)), k, 0) == (list(range(5)), 5)


def test_sampling_memory_does_not_grow_with_the_corpus():
  """The captions held while streaming are the sample's: the peak of Python allocations is the same for a
  corpus 10x and 100x the sample."""
  import tracemalloc  # pylint: disable=g-import-not-at-top

  def peak(count):
    captions = (f"caption number {i} of a long stream, with some words" for i in range(count))
    tracemalloc.start()
    sample, seen = tool.sample_captions(captions, 1000, seed=0)
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (len(sample), seen) == (1000, count)
    return top

  small, large = peak(10_000), peak(100_000)
  assert large < 1.2 * small
  assert small < 1000 * 400  # 1000 captions of ~60 characters and the list: well under 400 bytes each
