r"""Trains a SentencePiece tokenizer (pad=0, unk=1, bos=2, eos=3) for the text towers.

  python -m visionfm_jax.datatools.train_tokenizer --input=TEXT --vocab_size=N --out=PATH
  python -m visionfm_jax.datatools.train_tokenizer --records='/data/laion_filtered/train-*.array_record' \
      --vocab_size=32000 --out=/data/laion_filtered/tokenizer_32k [--max_sentences=10000000] [--seed=0]
  python -m visionfm_jax.datatools.train_tokenizer --tars='/raw/laion/*.tar' --vocab_size=32000 --out=PATH
  python -m visionfm_jax.datatools.train_tokenizer --shapes_records=20000 --vocab_size=256 \
      --normalization=identity --num_threads=1 --out=visionfm_jax/data/text/assets/shapes_tokenizer   # the demo's

The captions are streamed, never the images decoded: TEXT holds one caption per line; --records reads the
`caption` field of the ArrayRecord files matching GLOB (as datatools.prepare_data and datatools.filter_clip_score write
them; files in name order, records without a caption or unreadable skipped: only the caption of each msgpack
map is built, its image bytes are skipped over); --tars reads the `.txt` members of the img2dataset tars
matching GLOB (names in order, each tar read front to back once, other members skipped over). Of all the
captions (stripped, empty ones left out) a uniform sample of --max_sentences is kept (a reservoir drawn with
--seed; all of them, in order, when there are fewer), so memory holds the sample only, whatever the corpus:
about (mean caption bytes + 60) per sentence in Python, and SentencePiece's trainer several times the sample's
text (docs/data_preparation.md has the measured figures). SentencePiece trains on --num_threads threads.
A caption (or line) over data/limits.py's MAX_TEXT_BYTES is never read whole: it is left out and counted, as
are the tar samples `data.sources.wds.tar_listing` refuses (links, unsafe names, oversized members).

Writes PATH.model (a trailing '.model' on PATH is accepted) and prints how many captions it sampled from how
many, how many it left out and why, and the vocabulary size; a vocabulary smaller than --vocab_size (a small
corpus) adds a warning line saying why. Deterministic: the same captions, --max_sentences, --seed and --num_threads
give the same file. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import collections
import glob
import os
import sys
from typing import Iterable, Iterator, Sequence

from absl import flags
from array_record.python import array_record_module
import msgpack

from visionfm_jax import cli
from visionfm_jax.data import limits
from visionfm_jax.data.sources import wds
from visionfm_jax.data.text import tokenizer
from visionfm_jax.errors import DataError, UserError

DEFAULT_MAX_SENTENCES = 10_000_000
DEFAULT_NUM_THREADS = 16
READ_CHUNK = 1024  # records read at a time from an ArrayRecord file


def make_flags() -> flags.FlagValues:
  """This tool's flags, on their own FlagValues: importing the module (tests) defines no global flags."""
  fv = flags.FlagValues()
  flags.DEFINE_string("input", None, "Text file, one caption per line.", flag_values=fv)
  flags.DEFINE_string(
    "records",
    None,
    "Instead of --input: a glob (or a comma-separated list of globs) of "
    "ArrayRecord files of image-text pairs; trains on their captions.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "tars",
    None,
    "Instead of --input: a glob (or a comma-separated list of globs) of img2dataset "
    "tars; trains on their .txt captions.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "shapes_records",
    0,
    "Instead of --input: the captions of the first N shapes train records (at 32 px).",
    flag_values=fv,
  )
  flags.DEFINE_integer("vocab_size", None, "Vocabulary size (an upper bound for a small corpus).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output prefix: writes OUT.model.", flag_values=fv)
  flags.DEFINE_enum("model_type", "bpe", tokenizer.MODEL_TYPES, "SentencePiece model type.", flag_values=fv)
  flags.DEFINE_string(
    "normalization",
    "nmt_nfkc_cf",
    "SentencePiece normalisation rule: nmt_nfkc_cf (case folding), nmt_nfkc, nfkc, identity.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "max_sentences",
    DEFAULT_MAX_SENTENCES,
    "Captions kept: a uniform sample (reservoir) of this many from all of them.",
    flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Seed of the caption sample.", flag_values=fv)
  flags.DEFINE_integer(
    "num_threads",
    DEFAULT_NUM_THREADS,
    "SentencePiece training threads (the file depends on this count, not on the machine's cores).",
    flag_values=fv,
  )
  return fv


def stream_lines(path: str, left_out: collections.Counter | None = None) -> Iterator[str]:
  """The lines of the text file `path`; one over limits.MAX_TEXT_BYTES is read no further than that, left out
  and counted in `left_out`."""
  left_out = collections.Counter() if left_out is None else left_out
  try:
    with open(path, encoding="utf-8") as f:
      while line := f.readline(limits.MAX_TEXT_BYTES + 1):
        if not limits.text_too_large(line):
          yield line
          continue
        left_out[limits.TOO_LARGE] += 1
        while line and not line.endswith("\n"):  # the rest of the long line
          line = f.readline(limits.MAX_TEXT_BYTES)
  except OSError as e:
    raise UserError(f"--input={path}: cannot read: {e.strerror or e}") from e
  except UnicodeDecodeError as e:
    raise UserError(f"--input={path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _matching(flag: str, patterns: str) -> list[str]:
  """The files of a comma-separated list of globs, each of which must match at least one."""
  files = set()
  for pattern in (os.path.expanduser(p) for p in patterns.split(",") if p):
    matched = {f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f) and not f.endswith(".tmp")}
    if not matched:
      raise UserError(f"--{flag}={pattern}: no files match")
    files |= matched
  return sorted(files)


def record_caption(data: bytes) -> str | None:
  """The 'caption' of a packed record (records.pack_record), building no other field; None without one or
  for bytes that are not such a map."""
  unpacker = msgpack.Unpacker(raw=False)
  unpacker.feed(data)
  try:
    for _ in range(unpacker.read_map_header()):
      if unpacker.unpack() == "caption":
        caption = unpacker.unpack()
        return caption if isinstance(caption, str) else None
      unpacker.skip()
  except (ValueError, TypeError, msgpack.UnpackException):
    return None
  return None


def stream_record_captions(pattern: str, left_out: collections.Counter | None = None) -> Iterator[str]:
  """The captions of the ArrayRecord files matching `pattern`, files in name order, READ_CHUNK records at a time;
  one over limits.MAX_TEXT_BYTES is left out, and counted in `left_out`."""
  left_out = collections.Counter() if left_out is None else left_out
  for path in _matching("records", pattern):
    try:
      reader = array_record_module.ArrayRecordReader(path)
    except (RuntimeError, OSError, ValueError) as e:
      raise UserError(f"--records: cannot read {path} as ArrayRecord: {e}") from e
    try:
      for begin in range(0, reader.num_records(), READ_CHUNK):
        for data in reader.read(begin, min(begin + READ_CHUNK, reader.num_records())):
          caption = record_caption(data)
          if caption is not None and limits.text_too_large(caption):
            left_out[limits.TOO_LARGE] += 1
          elif caption is not None:
            yield caption
    finally:
      reader.close()


def stream_tar_captions(pattern: str, left_out: collections.Counter | None = None) -> Iterator[str]:
  """The captions (`.txt` members) of the tars matching `pattern`, names in order, each tar read once front to
  back, its images never read (`data.sources.wds.tar_captions`); the samples it leaves out are counted in `left_out`."""
  for path in _matching("tars", pattern):
    try:
      for _, caption in wds.tar_captions(path, left_out):
        yield caption
    except DataError as e:
      raise UserError(f"--tars: cannot read {path}: {e}") from e


def _nonempty(lines: Iterable[str]) -> Iterator[str]:
  for line in lines:
    line = line.strip()
    if line:
      yield line


def sample_captions(lines: Iterable[str], max_sentences: int, seed: int) -> tuple[list[str], int]:
  """(sample, count): `tokenizer.reservoir_sample` of the non-empty stripped `lines`."""
  if max_sentences < 1:
    raise UserError(f"--max_sentences={max_sentences}: expected >= 1")
  return tokenizer.reservoir_sample(_nonempty(lines), max_sentences, seed)


def read_record_captions(pattern: str) -> list[str]:
  """Every caption of the ArrayRecord records matching `pattern` (small sets and tests; the tool samples)."""
  return list(stream_record_captions(pattern))


def caption_stream(
  input_path: str | None,
  shapes_records: int,
  records: str | None,
  tars: str | None,
  left_out: collections.Counter | None = None,
):
  """(the captions of the one given input, the flag that names it); those the readers leave out (data/limits.py)
  are counted in `left_out`."""
  given = [
    name
    for name, value in (
      ("input", input_path),
      ("shapes_records", shapes_records > 0),
      ("records", records),
      ("tars", tars),
    )
    if value
  ]
  if len(given) != 1:
    raise UserError("give exactly one of --input=TEXT, --records=GLOB, --tars=GLOB and --shapes_records=N")
  if records:
    return stream_record_captions(records, left_out), f"--records={records}"
  if tars:
    return stream_tar_captions(tars, left_out), f"--tars={tars}"
  if input_path:
    return stream_lines(input_path, left_out), f"--input={input_path}"
  return iter(tokenizer.shapes_captions(shapes_records)), f"--shapes_records={shapes_records}"


def run(
  input_path: str | None,
  shapes_records: int,
  vocab_size: int,
  out: str,
  model_type: str = "bpe",
  normalization: str = "nmt_nfkc_cf",
  records: str | None = None,
  *,
  tars: str | None = None,
  max_sentences: int = DEFAULT_MAX_SENTENCES,
  seed: int = 0,
  num_threads: int = DEFAULT_NUM_THREADS,
) -> tokenizer.Tokenizer:
  """Samples the captions, trains and writes the tokenizer; returns it loaded, with `sampled` and `captions`
  (how many of how many) and `left_out` ({data/limits.py reason: captions or samples}) set on it."""
  if num_threads < 1:
    raise UserError(f"--num_threads={num_threads}: expected >= 1")
  left_out = collections.Counter()
  lines, what = caption_stream(input_path, shapes_records, records, tars, left_out)
  sample, count = sample_captions(lines, max_sentences, seed)
  if not sample:
    raise UserError(f"{what}: no captions (none of its records or lines has non-empty text)")
  prefix = out[: -len(".model")] if out.endswith(".model") else out
  path = tokenizer.train_tokenizer(
    sample, vocab_size, prefix, model_type=model_type, normalization=normalization, num_threads=num_threads
  )
  tok = tokenizer.Tokenizer(path, max_len=2)
  tok.sampled, tok.captions, tok.left_out = len(sample), count, dict(left_out)
  tok.short_of = short_of(tok.vocab_size, vocab_size, sample, normalization)
  return tok


def short_of(pieces: int, asked: int, sample: Sequence[str], normalization: str) -> str:
  """Why the vocabulary holds fewer pieces than `asked`, in words ('' when it does not): SentencePiece learns
  pieces within words only, so once every distinct word of the captions is whole pieces there is nothing left to
  learn. Words are counted as the tokenizer sees them: split at whitespace, case-folded by a '_cf' rule."""
  if pieces >= asked:
    return ""
  fold = str.casefold if normalization.endswith("_cf") else str
  words = {fold(word) for caption in sample for word in caption.split()}
  return (
    f"{pieces} pieces, fewer than the {asked} asked: the {len(sample)} captions hold {len(words)} distinct "
    f"words, and a piece never spans two words, so the words were whole before the vocabulary filled; more "
    f"varied captions give more pieces"
  )


def _main(fv, rest: list[str]) -> None:
  cli.check_args(fv, rest, ("vocab_size", "out"))
  tok = run(
    fv.input,
    fv.shapes_records,
    fv.vocab_size,
    fv.out,
    fv.model_type,
    fv.normalization,
    fv.records,
    tars=fv.tars,
    max_sentences=fv.max_sentences,
    seed=fv.seed,
    num_threads=fv.num_threads,
  )
  left_out = f"; left out {sum(tok.left_out.values())} ({wds.reasons_text(tok.left_out)})" if tok.left_out else ""
  print(f"sampled {tok.sampled} of {tok.captions} captions{left_out}; wrote {tok.model_file}: {tok.vocab_size} pieces")
  if tok.short_of:
    print(f"warning: {tok.short_of}")


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), trains and writes the tokenizer; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
