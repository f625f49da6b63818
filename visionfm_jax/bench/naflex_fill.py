r"""NaFlex's token-budget fill: the fraction of a budget's patch rows that hold an image's patches, by the grid rule
the pipeline packs with (data/transforms/naflex.grid_for_budget). Without sequence packing the rest is padding
that the tower computes on all the same.

  python -m visionfm_jax.bench.naflex_fill [--budgets=64,256,576] [--patch=16] [--sizes=HxW,...]

Without --sizes it reads the sizes of skimage.data's colour photos (`pip install scikit-image`). Prints one line a
budget (the mean fill over the images, and its minimum), then, as the last line, one JSON object with the figures.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from absl import flags

from visionfm_jax import cli
from visionfm_jax.data.transforms import naflex
from visionfm_jax.errors import UserError

# skimage.data's RGB photographs (`cat` is `chelsea`, `logo` a drawing), as (height, width) once loaded
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_list("budgets", ["64", "256", "576"], "Token budgets (patches an image).", flag_values=fv)
  flags.DEFINE_integer("patch", 16, "Patch side in pixels.", flag_values=fv)
  flags.DEFINE_list("sizes", [], "Image sizes HxW; default: skimage.data's colour photos.", flag_values=fv)
  return fv


def fill(sizes: Sequence[tuple[int, int]], patch: int, max_tokens: int) -> list[float]:
  """Per (height, width): its grid's patches over `max_tokens`."""
  fractions = []
  for height, width in sizes:
    rows, columns = naflex.grid_for_budget(height, width, patch, max_tokens)
    fractions.append(rows * columns / max_tokens)
  return fractions


def skimage_sizes() -> dict[str, tuple[int, int]]:
  try:
    from skimage import data  # pylint: disable=import-outside-toplevel; a bench-only dependency
  except ImportError:
    raise UserError("skimage: not installed (pip install scikit-image), or give --sizes=HxW,...") from None
  return {name: getattr(data, name)().shape[:2] for name in SKIMAGE_PHOTOS}


def _parse(fv) -> tuple[list[int], dict[str, tuple[int, int]]]:
  try:
    budgets = [int(b) for b in fv.budgets]
    sizes = {s: tuple(int(n) for n in s.lower().split("x")) for s in fv.sizes}
  except ValueError:
    raise UserError(
      f"--budgets={','.join(fv.budgets)} / --sizes={','.join(fv.sizes)}: expected integers like "
      "64,256 and HxW like 300x451"
    ) from None
  if any(len(size) != 2 or min(size) <= 0 for size in sizes.values()):
    raise UserError(f"--sizes={','.join(fv.sizes)}: expected positive HxW like 300x451")
  if fv.patch < naflex.MIN_PATCH or not budgets or not all(0 < b < 2**16 for b in budgets):
    raise UserError(
      f"--patch={fv.patch} / --budgets={','.join(fv.budgets)}: expected a patch >= {naflex.MIN_PATCH} "
      f"and budgets of 1 .. {2**16 - 1} patches"
    )
  return budgets, sizes


def _body(fv, rest: list[str]) -> None:
  del rest
  budgets, sizes = _parse(fv)
  sizes = sizes or skimage_sizes()
  report = {"patch": fv.patch, "images": {name: list(size) for name, size in sizes.items()}, "budgets": {}}
  for budget in budgets:
    fractions = fill(list(sizes.values()), fv.patch, budget)
    mean = sum(fractions) / len(fractions)
    report["budgets"][budget] = {"mean_fill": round(mean, 4), "min_fill": round(min(fractions), 4)}
    print(f"budget {budget}: mean fill {mean:.3f}, min {min(fractions):.3f} over {len(fractions)} images")
  print(json.dumps(report, sort_keys=True))


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), prints the fill per budget; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _body)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
