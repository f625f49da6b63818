"""One share of a tool's work per task of a cluster job (`--task_index=i --task_count=n`).

The tools that write one output per input file (prepare_data's shards, index_tars's indexes) give task i of n
the inputs i, i + n, i + 2n, ... of their sorted list: the tasks' shares are disjoint and cover every input,
and each task stats, reads and writes only its own inputs and outputs (the sorted list comes from the input's one
listing), so tasks never touch each other's files, a task's load on a shared file system's metadata is its
share's, and a task rerun resumes its own share. Without the flags, a SLURM job array's environment gives them: the
task's SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT (`sbatch --array=0-99`); outside an
array, one task does everything.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence, TypeVar

from absl import flags

from visionfm_jax.errors import UserError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Task:
  index: int = 0
  count: int = 1

  def share(self, items: Sequence[T]) -> list[T]:
    """This task's items: positions index, index + count, ... of `items`."""
    return list(items[self.index :: self.count])

  def __str__(self) -> str:
    return f"task {self.index} of {self.count}"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer(
    "task_index",
    None,
    "This task's number in [0, --task_count); default: from a SLURM job "
    "array ($SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN), else 0.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "task_count",
    None,
    "Tasks sharing the work (each takes every task_count-th input); default: $SLURM_ARRAY_TASK_COUNT, else 1.",
    flag_values=fv,
  )


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"${name}={value!r}: expected an integer") from None


def from_flags(fv: flags.FlagValues, environ: Mapping[str, str] | None = None) -> Task:
  """The task of --task_index / --task_count, each defaulting from the SLURM array environment; UserError for an
  index outside [0, count)."""
  environ = os.environ if environ is None else environ
  index, count = fv.task_index, fv.task_count
  if count is None:
    count = _env_int(environ, "SLURM_ARRAY_TASK_COUNT") or 1
  if index is None:
    task_id = _env_int(environ, "SLURM_ARRAY_TASK_ID")
    index = 0 if task_id is None else task_id - (_env_int(environ, "SLURM_ARRAY_TASK_MIN") or 0)
  if count < 1 or not 0 <= index < count:
    raise UserError(
      f"--task_index={index}, --task_count={count}: expected count >= 1 and 0 <= index < count "
      f"(from the flags or the SLURM array's environment)"
    )
  return Task(index, count)
