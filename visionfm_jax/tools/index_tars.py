r"""Indexes img2dataset WebDataset tars for the `wds:` source, which trains from them in place.

  python -m visionfm_jax.tools.index_tars --input=GLOB [--num_workers=P] [--task_index=I --task_count=N]

Writes next to each tar matching GLOB its `<tar>.index.npz` (`data.wds.index_tar`: per sample with an image
its key, the offsets and sizes of its image, caption and .json members and LAION's scores from the .json;
about 1.1 MB per 10,000 samples, a fraction of a percent of the tar), via a temporary file renamed when
complete. Reads each tar's headers, captions and .json members once, decoding no image (about 10,000 samples
per CPU-second). A tar whose index was written for its current size is skipped, so a rerun resumes.
Across a cluster, task I of N indexes the tars I, I + N, ... of the sorted list (`tools.cluster_task`;
default: from a SLURM job array). Then train with `--config.data.source='wds:GLOB'`.
Prints one summary line; errors print one line naming the culprit and exit with status 2.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from typing import Sequence

from absl import flags

from visionfm_jax.data import wds
from visionfm_jax.errors import DataError, UserError
from visionfm_jax.tools import cli, cluster_task


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("input", None, "A glob of img2dataset .tar files.", flag_values=fv)
  flags.DEFINE_integer("num_workers", None, "Processes indexing tars; 0 or 1: inline. Default: the CPU count.",
                       flag_values=fv)
  cluster_task.define_flags(fv)
  return fv


def _index_one(tar: str) -> dict:
  return wds.write_index(tar)


def index_tars(pattern: str, *, task: cluster_task.Task = cluster_task.Task(), num_workers: int = 0) -> dict:
  """Indexes `task`'s share of the tars matching `pattern` that have no current index; {tars (this task's),
  indexed (written now), samples and incomplete (of those written now)}."""
  try:
    tars = task.share(wds.matching_tars(pattern))
  except DataError as e:
    raise UserError(f"--input={pattern}: {e}") from e
  pending = [tar for tar in tars if wds.read_index(tar, fields=()) is None]
  if num_workers <= 1 or len(pending) <= 1:
    results = list(map(_index_one, pending))
  else:
    with multiprocessing.get_context("spawn").Pool(min(num_workers, len(pending))) as pool:
      results = pool.map(_index_one, pending)
  return {"tars": len(tars), "indexed": len(pending), "samples": sum(r["samples"] for r in results),
          "incomplete": sum(r["incomplete"] for r in results)}


def _main(fv, rest: list[str]) -> None:
  if rest:
    raise UserError(f"unexpected arguments {rest}; all options are --flags")
  if not fv.input:
    raise UserError("--input: required (a glob of .tar files)")
  start = time.monotonic()
  task = cluster_task.from_flags(fv)
  workers = (os.cpu_count() or 1) if fv.num_workers is None else fv.num_workers
  done = index_tars(fv.input, task=task, num_workers=workers)
  print(f"index_tars: {task}: {done['indexed']} of its {done['tars']} tars indexed now ({done['samples']} samples, "
        f"{done['incomplete']} without an image left out), the others were already, "
        f"{time.monotonic() - start:.1f} s")


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), indexes, prints the summary line; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
