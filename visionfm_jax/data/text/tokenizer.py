"""Text tokenisation: fixed-length int32 token rows for the text towers, and tokenizer training.

This project's own tokenizers are SentencePiece models with pad=0, unk=1, bos=2, eos=3 (`train_tokenizer` sets
them, `Tokenizer` checks them). A published checkpoint brings its own BPE as a Hugging Face `tokenizer.json`,
read with the `tokenizers` library (`HFTokenizer`; ids as that file says). `load(path, max_len)` picks by the
file. Either way a row is [BOS] + pieces + [EOS] + padding; truncation drops pieces, never the EOS, so the text
tower can pool at `eos_positions(tokens)`.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
import random
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers

from visionfm_jax import atomic
from visionfm_jax.data.embedded import shapes
from visionfm_jax.errors import DataError
from visionfm_jax.token_ids import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, UNK_ID, eos_positions  # noqa: F401

MODEL_TYPES = ("bpe", "unigram")

# The demo tokenizer shipped as package data: BPE on the captions of the first SHAPES_RECORDS shapes train
# records at SHAPES_IMAGE_SIZE px (the position words depend slightly on the size). Identity normalisation
# (no case folding): the captions are lower-case ASCII, and it keeps the file at ~3 KB instead of ~250 KB.
# Rebuild: python -m visionfm_jax.datatools.train_tokenizer --shapes_records=20000 --vocab_size=256 \
#   --normalization=identity --num_threads=1 --out=visionfm_jax/data/text/assets/shapes_tokenizer
SHAPES_RECORDS, SHAPES_IMAGE_SIZE, SHAPES_VOCAB_SIZE, SHAPES_NORMALIZATION = 20_000, 32, 256, "identity"


def shapes_tokenizer_path() -> str:
  """The demo tokenizer for the shapes captions (package data `data/text/assets/shapes_tokenizer.model`)."""
  return str(Path(__file__).parent / "assets" / "shapes_tokenizer.model")


def shapes_captions(num_records: int = SHAPES_RECORDS, image_size: int = SHAPES_IMAGE_SIZE) -> list[str]:
  """The captions of the first `num_records` shapes train records: the demo tokenizer's corpus."""
  source = shapes.ShapesSource("train", num_records, image_size, seed=shapes.SEED)
  return [source[i]["caption"] for i in range(num_records)]


class Tokenizer:
  """A SentencePiece model that encodes texts into fixed-length int32 rows (see module docstring).

  Picklable (grain worker processes get a copy): the state is the serialized model, not the file path.
  """

  def __init__(self, model_file: str, max_len: int):
    if int(max_len) < 2:
      raise DataError(f"tokenizer {model_file}: max_len={max_len} leaves no room for BOS and EOS")
    try:
      proto = Path(model_file).read_bytes()
    except OSError as e:
      raise DataError(f"tokenizer model {model_file} cannot be read: {e.strerror or e}") from e
    self._setup(str(model_file), proto, int(max_len))

  def _setup(self, model_file: str, proto: bytes, max_len: int) -> None:
    self.model_file, self._proto, self.max_len = model_file, proto, max_len
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
      raise DataError(f"tokenizer model {model_file} is not a SentencePiece model: {e}") from e
    ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if ids != SPECIAL_IDS:
      raise DataError(
        f"tokenizer model {model_file} has (pad, unk, bos, eos) ids {ids}; expected "
        f"{SPECIAL_IDS} (train it with visionfm_jax.datatools.train_tokenizer)"
      )

  def __getstate__(self):
    return {"model_file": self.model_file, "proto": self._proto, "max_len": self.max_len}

  def __setstate__(self, state):
    self._setup(state["model_file"], state["proto"], state["max_len"])

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.model_file!r}, max_len={self.max_len}, vocab_size={self.vocab_size})"

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> np.ndarray:
    """int32 (len(texts), max_len): [BOS] + pieces (truncated) + [EOS], then PAD.

    One SentencePiece batch call (C++, `num_threads` threads; -1: one per core), then a vectorised fill.
    A single text skips the batch call, whose thread pool costs more than encoding one caption.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(texts) == 1:
      pieces = [self._sp.encode(texts[0], out_type=int)]
    else:
      pieces = self._sp.encode(texts, out_type=int, num_threads=num_threads) if texts else []
    keep = self.max_len - 2
    lengths = np.fromiter((min(len(p), keep) for p in pieces), np.int64, len(pieces))
    out = np.zeros((len(pieces), self.max_len), np.int32)
    out[:, 0] = BOS_ID
    body = np.arange(1, self.max_len - 1) <= lengths[:, None]  # (B, max_len - 2): row b, columns 1..len
    out[:, 1:-1][body] = np.fromiter((t for p in pieces for t in p[:keep]), np.int32, int(lengths.sum()))
    out[np.arange(len(pieces)), lengths + 1] = EOS_ID
    return out

  def encode(self, text: str) -> np.ndarray:
    """int32 (max_len,): one text."""
    return self.encode_batch([text])[0]

  def decode(self, ids) -> str | list[str]:
    """Text of one row (1-D) or of each row (2-D); stops at the first EOS, drops PAD and BOS."""
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    ids = ids.tolist()
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self._decode_ids([i for i in ids if i not in (self.pad_id, self.bos_id)])

  def _decode_ids(self, ids: list[int]) -> str:
    return self._sp.decode(ids)

  def pieces(self, text: str) -> list[str]:
    """The SentencePiece pieces of `text` (no BOS/EOS, no truncation), for inspection."""
    return self._sp.encode(text, out_type=str)


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (a published CLIP's BPE) encoding texts into fixed-length int32 rows, as
  `Tokenizer` does: the file's own BOS and EOS (what its post-processor adds around a text), pieces truncated to
  fit, then padding with the EOS id (OpenAI's CLIP pads with its end-of-text token; the text tower pools the
  first EOS, so the padding is never read). Picklable: the state is the file's bytes."""

  def _setup(self, model_file: str, proto: bytes, max_len: int) -> None:
    self.model_file, self._proto, self.max_len = model_file, proto, max_len
    try:
      self._tok = tokenizers.Tokenizer.from_str(proto.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
      raise DataError(f"tokenizer {model_file} is not a Hugging Face tokenizer.json: {e}") from e
    self._tok.no_padding()
    self._tok.no_truncation()
    around = self._tok.encode("").ids  # what the post-processor adds: [BOS, EOS]
    if len(around) != 2:
      raise DataError(
        f"tokenizer {model_file}: its post-processor adds {around} to a text; expected [BOS, EOS] "
        "(a CLIP tokenizer.json)"
      )
    self._bos_id, self._eos_id = around

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._eos_id

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> np.ndarray:
    """int32 (len(texts), max_len): [BOS] + pieces (truncated) + [EOS], then padding (the EOS id)."""
    del num_threads  # tokenizers parallelises a batch itself
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    for row, encoding in enumerate(self._tok.encode_batch(texts) if texts else []):
      ids = encoding.ids
      if len(ids) > self.max_len:
        ids = ids[: self.max_len - 1] + [self.eos_id]
      out[row, : len(ids)] = ids
    return out

  def _decode_ids(self, ids: list[int]) -> str:
    return self._tok.decode(ids)

  def pieces(self, text: str) -> list[str]:
    return self._tok.encode(text, add_special_tokens=False).tokens


def load(path: str, max_len: int) -> Tokenizer | HFTokenizer:
  """The tokenizer in `path`: a Hugging Face tokenizer.json (any name ending in .json), else a SentencePiece
  model."""
  return HFTokenizer(path, max_len) if str(path).endswith(".json") else Tokenizer(path, max_len)


def reservoir_sample(items: Iterable, size: int, seed: int) -> tuple[list, int]:
  """(sample, count): a uniformly random `size`-subset of the `count` items of the stream `items` (all of them,
  in stream order, when there are no more than `size`), drawn with `seed`; memory holds `size` items at most.

  Li's Algorithm L (ACM TOMS 1994): after the first `size` items, the gap to the next item that replaces a
  random slot is drawn directly, so the random calls grow with size * log(count / size), not with count.
  """
  if size < 1:
    raise ValueError(f"reservoir size {size}: expected >= 1")
  rng = random.Random(seed)
  sample: list = []
  weight = next_taken = 0.0
  count = 0
  for count, item in enumerate(items, 1):
    if count <= size:
      sample.append(item)
      if count == size:
        weight = math.exp(math.log(rng.random()) / size)
        next_taken = count + _gap(rng, weight)
    elif count == next_taken:
      sample[rng.randrange(size)] = item
      weight *= math.exp(math.log(rng.random()) / size)
      next_taken = count + _gap(rng, weight)
  return sample, count


def _gap(rng: random.Random, weight: float) -> int:
  """Algorithm L's step to the next replacing item: 1 + Geometric(weight) skipped items."""
  uniform = 1.0 - rng.random()  # in (0, 1]: log defined
  if weight >= 1.0:
    return 1
  if weight <= 0.0:  # underflow after ~1e308 items: none is taken any more
    return math.inf
  return int(math.log(uniform) / math.log1p(-weight)) + 1


def train_tokenizer(
  lines: Iterable[str],
  vocab_size: int,
  out_prefix: str,
  *,
  model_type: str = "bpe",
  normalization: str = "nmt_nfkc_cf",
  num_threads: int = 1,
) -> str:
  """Trains a SentencePiece model on `lines` (one text each) and writes `<out_prefix>.model`; returns its path.

  Deterministic: every line used in order (no sampling or shuffling inside SentencePiece), and the file does
  not record where it was written, so the same lines and `num_threads` give the same bytes (SentencePiece's
  threads split its work in fixed chunks: another thread count gives another, equally good, file). `vocab_size` is an
  upper bound (a small corpus gives fewer pieces). `normalization` is a SentencePiece rule: nmt_nfkc_cf (NFKC + case
  folding, the default), nmt_nfkc, nfkc, identity.
  """
  if model_type not in MODEL_TYPES:
    raise DataError(f"tokenizer model_type={model_type!r}: expected one of {MODEL_TYPES}")
  lines = [line.strip() for line in lines]
  lines = [line for line in lines if line]
  if not lines:
    raise DataError(f"tokenizer {out_prefix}: no non-empty lines to train on")
  if int(vocab_size) <= 4:
    raise DataError(f"tokenizer {out_prefix}: vocab_size={vocab_size} must exceed the 4 special pieces")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      vocab_size=int(vocab_size),
      model_type=model_type,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      num_threads=int(num_threads),
      input_sentence_size=0,
      shuffle_input_sentence=False,
      hard_vocab_limit=False,
      character_coverage=1.0,
      normalization_rule_name=normalization,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise DataError(f"tokenizer {out_prefix}: SentencePiece training failed: {e}") from e
  path = f"{out_prefix}.model"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic.write(path, model.getvalue())
  return path
