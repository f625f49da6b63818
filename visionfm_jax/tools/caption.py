r"""Captions images with a trained Aurora model: greedy decoding, or beam search with --beam_size > 1.

  python -m visionfm_jax.tools.caption --checkpoint=WORKDIR --images=PATHS... [--beam_size=1] [--max_len=N]
      [--step=N] [--ema] [--length_penalty=0.0] [--batch_size=32]

WORKDIR is a training workdir (its config.json and checkpoints/<step>); the newest checkpoint unless --step; its
EMA of the params with --ema (a run with config.optim.ema_decay set).
--images takes comma-separated entries (further ones may follow as arguments): image files (anything Pillow
reads), resized and cropped as the run's evaluation does (config.data.eval_preprocess), or `shapes:A-B`,
records A..B (inclusive; `shapes:A` is one) of the embedded shapes validation split. Prints one line per
image, `<path>\t<caption>`. Errors print one line naming the culprit and exit with status 2.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags
import numpy as np

from visionfm_jax import cli, tasks
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import UserError
from visionfm_jax.models import generate
from visionfm_jax.trained import workdir as workdir_lib

SHAPES_PREFIX = "shapes:"
SHAPES_SPLIT = "validation"


def make_flags() -> flags.FlagValues:
  """This tool's flags, on their own FlagValues: importing the module (tests) defines no global flags."""
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "Training workdir (config.json + checkpoints/).", flag_values=fv)
  flags.DEFINE_list("images", [], "Image files and/or shapes:A-B record ranges.", flag_values=fv)
  flags.DEFINE_integer("beam_size", 1, "1: greedy decoding; K > 1: beam search with K beams.", flag_values=fv)
  flags.DEFINE_integer(
    "max_len", 0, "Tokens per caption, BOS and EOS included; 0: the text encoder's max_len.", flag_values=fv
  )
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.", flag_values=fv)
  flags.DEFINE_bool(
    "ema", False, "Caption with the checkpoint's EMA of the params (config.optim.ema_decay).", flag_values=fv
  )
  flags.DEFINE_float(
    "length_penalty", 0.0, "Beam search: GNMT length penalty alpha (0: summed log-probs).", flag_values=fv
  )
  flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", flag_values=fv)
  return fv


def parse_shapes_range(entry: str) -> range:
  """'shapes:A-B' -> range(A, B + 1); 'shapes:A' -> range(A, A + 1)."""
  spec = entry[len(SHAPES_PREFIX) :]
  first, _, last = spec.partition("-")
  try:
    a, b = int(first), int(last or first)
  except ValueError:
    raise UserError(f"--images entry {entry!r}: expected shapes:A-B with record numbers A <= B") from None
  if not 0 <= a <= b:
    raise UserError(f"--images entry {entry!r}: expected shapes:A-B with record numbers 0 <= A <= B")
  return range(a, b + 1)


def read_image(path: str, size: int, preprocess: str = "inception") -> np.ndarray:
  """An image file -> uint8 (size, size, 3) by the eval transform (`preprocess`: config.data.eval_preprocess)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"--images: cannot read {path}: {e.strerror or e}") from e
  try:  # apart from the read: Pillow's UnidentifiedImageError is an OSError too
    image = transforms.decode_image(data)  # in full, as evaluation
  except transforms.DECODE_ERRORS as e:
    raise UserError(f"--images: cannot decode {path}: {e}") from e
  return transforms.EvalTransform(size, preprocess).map({"image": image})["image"]


def load_images(entries: Sequence[str], config) -> tuple[list[str], list[np.ndarray]]:
  """(names, uint8 images at the model's size, viewed as the run's evaluation views them) of the --images
  entries, in order."""
  size, preprocess = config.data.image_size, config.data.eval_preprocess
  names, images = [], []
  for entry in entries:
    if entry.startswith(SHAPES_PREFIX):
      records = parse_shapes_range(entry)
      source = shapes.ShapesSource(
        SHAPES_SPLIT, records.stop, size, seed=shapes.SEED, caption_style=config.data.get("shapes_captions", "full")
      )
      for i in records:
        names.append(f"{SHAPES_PREFIX}{i}")
        images.append(transforms.EvalTransform(size, preprocess).map(source[i])["image"])
    else:
      names.append(entry)
      images.append(read_image(entry, size, preprocess))
  return names, images


def run(
  workdir: str,
  images: Sequence[str],
  *,
  beam_size: int = 1,
  max_len: int = 0,
  step: int | None = None,
  length_penalty: float = 0.0,
  batch_size: int = 32,
  use_ema: bool = False,
) -> list[tuple[str, str]]:
  """(name, caption) per image entry (the EMA of the params with `use_ema`); UserError for bad input."""
  if not images:
    raise UserError("--images: give at least one image file or shapes:A-B")
  if beam_size < 1 or batch_size < 1 or max_len < 0 or length_penalty < 0:
    raise UserError(
      f"--beam_size={beam_size}, --batch_size={batch_size}, --max_len={max_len}, --length_penalty="
      f"{length_penalty}: beam and batch sizes must be positive, max_len and the penalty >= 0"
    )
  workdir = os.path.expanduser(workdir)
  config = workdir_lib.load_config(workdir, ("aurora",), "an Aurora model")
  task = tasks.build(config)
  limit = task.model.text.max_len
  if max_len > limit:
    raise UserError(f"--max_len={max_len}: this model's text encoder takes at most {limit} tokens")
  names, pixels = load_images(images, config)
  params = workdir_lib.load_params(task, workdir, step, use_ema=use_ema)
  captions = []
  for start in range(0, len(pixels), batch_size):
    captions += generate.caption_images(
      task,
      params,
      np.stack(pixels[start : start + batch_size]),
      beam_size=beam_size,
      max_len=max_len or limit,
      length_penalty=length_penalty,
    )
  return list(zip(names, captions))


def _main(fv, rest: list[str]) -> None:
  if not fv.checkpoint:
    raise UserError("--checkpoint: required (a training workdir)")
  lines = run(
    fv.checkpoint,
    list(fv.images) + rest,
    beam_size=fv.beam_size,
    max_len=fv.max_len,
    step=fv.step,
    length_penalty=fv.length_penalty,
    batch_size=fv.batch_size,
    use_ema=fv.ema,
  )
  for name, caption in lines:
    print(f"{name}\t{caption}")


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), prints the captions; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
