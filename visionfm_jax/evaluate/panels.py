"""Panels: a picture of what the model sees and says, drawn at every evaluation on the same fixed validation
examples (the first rows of the first eval batch), so that one panel reads against the next.

A task's `panel(ctx)` (tasks/base.py) returns a function of the params that runs the model on those examples and
lays out `Cell`s (an image and the lines under it) with `render`. The loop writes the picture to
`<workdir>/panels/step_<N>.png` and to the trackers (training/infra/metrics.py)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from visionfm_jax.errors import DataError

TILE = 96  # px: each example image is shown at least this large (nearest-neighbour upscaling of small images)
LINE = 12  # px a line of text takes in PIL's built-in font
MARGIN = 4


@dataclasses.dataclass(frozen=True)
class Cell:
  image: np.ndarray  # HxWx3 (or HxW) uint8
  lines: tuple[str, ...] = ()


def first_rows(fn: Callable, params, local_batch: dict[str, np.ndarray], ctx, rows: int) -> dict[str, np.ndarray]:
  """`fn(params, batch)` on the global batch that every process's `local_batch` forms (a collective: every
  process calls it), gathered to the host: {**the batch's fields, "out": fn's output}, the first `rows` rows of
  each. `fn` is jitted by the caller."""
  batch = ctx.to_global(local_batch)
  gathered = multihost_utils.process_allgather({**batch, "out": fn(params, batch)}, tiled=True)
  return jax.tree.map(lambda x: np.asarray(x)[:rows], gathered)


def render(rows: list[list[Cell]], title: str = "") -> np.ndarray:
  """The cells as a grid (one list per row), each image scaled up to TILE px with its lines below, `title` on
  top: an HxWx3 uint8 picture."""
  font = ImageFont.load_default()
  columns = max(len(row) for row in rows)
  tiles = [[_tile(cell) for cell in row] for row in rows]
  cell_w = max(t.shape[1] for row in tiles for t in row)
  text_w = max((int(font.getlength(line)) for row in rows for cell in row for line in cell.lines), default=0)
  cell_w = max(cell_w, text_w) + 2 * MARGIN
  heights = [
    max(t.shape[0] for t in row) + max(len(c.lines) for c in cells) * LINE + 2 * MARGIN
    for row, cells in zip(tiles, rows)
  ]
  top = LINE + 2 * MARGIN if title else 0
  canvas = Image.new("RGB", (columns * cell_w, top + sum(heights)), "white")
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((MARGIN, MARGIN), title, fill="black", font=font)
  y = top
  for row_tiles, cells, height in zip(tiles, rows, heights):
    for column, (tile, cell) in enumerate(zip(row_tiles, cells)):
      x = column * cell_w + MARGIN
      canvas.paste(Image.fromarray(tile), (x, y + MARGIN))
      for i, line in enumerate(cell.lines):
        draw.text((x, y + MARGIN + tile.shape[0] + i * LINE), line, fill="black", font=font)
    y += height
  return np.asarray(canvas)


def _tile(cell: Cell) -> np.ndarray:
  image = np.asarray(cell.image, np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, -1)
  scale = max(1, -(-TILE // max(image.shape[:2])))
  return np.repeat(np.repeat(image, scale, 0), scale, 1)


def clipped(text: str, width: int = 24) -> str:
  """`text`, cut to `width` characters with '...' when longer (a line under a TILE-wide image)."""
  return text if len(text) <= width else text[: width - 3] + "..."


def top_k(probabilities: np.ndarray, names, k: int = 3) -> tuple[str, ...]:
  """'name 0.87' lines of the k most probable classes."""
  best = np.argsort(-probabilities)[:k]
  return tuple(f"{names[i]} {probabilities[i]:.2f}" for i in best)


def class_names_or_numbers(names: Callable[[], list[str]], count: int) -> list[str]:
  """The data's class names, or 'class <i>' where it has none (or not one per class)."""
  try:
    found = list(names())
  except DataError:  # a source without names
    found = []
  return found if len(found) >= count else [f"class {i}" for i in range(count)]
