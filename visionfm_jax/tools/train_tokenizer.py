r"""Trains a SentencePiece tokenizer (pad=0, unk=1, bos=2, eos=3) for the text towers.

  python -m visionfm_jax.tools.train_tokenizer --input=TEXT --vocab_size=N --out=PATH
  python -m visionfm_jax.tools.train_tokenizer --records='/data/laion_filtered/train-*.array_record' \
      --vocab_size=32000 --out=/data/laion_filtered/tokenizer_32k
  python -m visionfm_jax.tools.train_tokenizer --shapes_records=20000 --vocab_size=256 \
      --normalization=identity --out=visionfm_jax/data/assets/shapes_tokenizer   # the shipped demo tokenizer

TEXT holds one caption per line; --records reads the `caption` field of the ArrayRecord files matching GLOB
(as tools.prepare_data and tools.filter_clip_score write them; files in name order, records without a caption
skipped), every caption held in memory. Writes PATH.model (a trailing '.model' on PATH is accepted) and prints its
vocabulary size. Training is deterministic: the same lines give the same file. Errors print one line and exit
with status 2.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags

from visionfm_jax.data import records as records_lib, tokenizer
from visionfm_jax.errors import DataError, UserError
from visionfm_jax.tools import cli


def make_flags() -> flags.FlagValues:
  """This tool's flags, on their own FlagValues: importing the module (tests) defines no global flags."""
  fv = flags.FlagValues()
  flags.DEFINE_string("input", None, "Text file, one caption per line.", flag_values=fv)
  flags.DEFINE_string("records", None, "Instead of --input: a glob of ArrayRecord files of image-text pairs; "
                      "trains on their captions.", flag_values=fv)
  flags.DEFINE_integer("shapes_records", 0, "Instead of --input: the captions of the first N shapes train records "
                       "(at 32 px).", flag_values=fv)
  flags.DEFINE_integer("vocab_size", None, "Vocabulary size (an upper bound for a small corpus).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output prefix: writes OUT.model.", flag_values=fv)
  flags.DEFINE_enum("model_type", "bpe", tokenizer.MODEL_TYPES, "SentencePiece model type.", flag_values=fv)
  flags.DEFINE_string("normalization", "nmt_nfkc_cf", "SentencePiece normalisation rule: nmt_nfkc_cf (case "
                      "folding), nmt_nfkc, nfkc, identity.", flag_values=fv)
  return fv


def read_lines(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  except OSError as e:
    raise UserError(f"--input={path}: cannot read: {e.strerror or e}") from e
  except UnicodeDecodeError as e:
    raise UserError(f"--input={path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_record_captions(pattern: str) -> list[str]:
  """The captions of the ArrayRecord records matching `pattern`, files in name order; records without one
  (image-only, unreadable) are skipped. UserError naming --records when no file matches or none has one."""
  try:
    source = records_lib.ArrayRecordSource(os.path.expanduser(pattern))
  except DataError as e:
    raise UserError(f"--records: {e}") from e
  captions = [caption for caption in (source[i].get("caption") for i in range(len(source))) if caption]
  if not captions:
    raise UserError(f"--records={pattern}: none of its {len(source)} records has a caption")
  return captions


def run(input_path: str | None, shapes_records: int, vocab_size: int, out: str, model_type: str = "bpe",
        normalization: str = "nmt_nfkc_cf", records: str | None = None) -> tokenizer.Tokenizer:
  """Trains and writes the tokenizer; returns it loaded."""
  if sum((bool(input_path), shapes_records > 0, bool(records))) != 1:
    raise UserError("give exactly one of --input=TEXT, --records=GLOB and --shapes_records=N")
  if records:
    lines = read_record_captions(records)
  else:
    lines = read_lines(input_path) if input_path else tokenizer.shapes_captions(shapes_records)
  prefix = out[:-len(".model")] if out.endswith(".model") else out
  path = tokenizer.train_tokenizer(lines, vocab_size, prefix, model_type=model_type, normalization=normalization)
  return tokenizer.Tokenizer(path, max_len=2)


def _main(fv, rest: list[str]) -> None:
  cli.check_args(fv, rest, ("vocab_size", "out"))
  tok = run(fv.input, fv.shapes_records, fv.vocab_size, fv.out, fv.model_type, fv.normalization, fv.records)
  print(f"wrote {tok.model_file}: {tok.vocab_size} pieces")


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), trains and writes the tokenizer; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
