"""One prepare_data run writes into an output folder at a time: two would write the same shards and dataset.json.

The run holds `<output>/.prepare_data.lock` (a task of a cluster job, `<output>/.prepare_data-<I>-of-<N>.lock`: the
tasks write disjoint shards side by side) with the workdir's lock (training/infra/workdir.py): a POSIX record lock
that the kernel drops when its holder dies, naming the holder (host, pid, SLURM job) for the error line of a run
that is refused. The file stays (removing it would let a run that opened the old file and one that creates a new
file both hold "the" lock), emptied of its holder by a clean end.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from visionfm_jax.datatools import cluster_task
from visionfm_jax.errors import UserError
from visionfm_jax.training.infra import workdir


def lock_name(task: cluster_task.Task | None) -> str:
  """The lock file's name for `task` (None: --finalize, which writes what a whole run writes last)."""
  if task is None or task.count == 1:
    return ".prepare_data.lock"
  return f".prepare_data-{task.index:05d}-of-{task.count:05d}.lock"


class OutputLock(workdir.WorkdirLock):
  """The lock of one output folder: the workdir's lock under another file name, refused at once (no waiting for a
  requeued predecessor: a converter has none) in one line naming the holder."""

  def __init__(self, output_dir: str, name: str):
    super().__init__(output_dir)
    self.path = os.path.join(self.workdir, name)

  def _wait_for(self, fd: int, wait_s: float) -> None:
    del wait_s
    if not self._take_guarded(fd):
      raise UserError(
        f"--output={self.workdir}: another prepare_data is writing into it "
        f"({workdir.describe(workdir._read_holder(fd))}; lock file {self.path}): wait for it to end, "  # pylint: disable=protected-access
        f"or choose another --output"
      )


@contextlib.contextmanager
def held(output_dir: str, task: cluster_task.Task | None) -> Iterator[None]:
  """Creates `output_dir` and holds its lock for the block; UserError when another run holds it or when
  `output_dir` is no folder."""
  output_dir = os.path.expanduser(output_dir)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output={output_dir}: exists and is not a directory")
  created = not os.path.exists(output_dir)
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--output={output_dir}: cannot create ({e.strerror or e})") from e
  lock = OutputLock(output_dir, lock_name(task))
  lock.acquire(0)
  try:
    yield
  except BaseException:
    lock.release()
    if created:
      _remove_if_unwritten(output_dir, lock.path)
    raise
  lock.release()


def _remove_if_unwritten(output_dir: str, lock_path: str) -> None:
  """Removes a folder this run created and wrote nothing into but its lock (a refused flag): a failed run leaves
  no trace of itself where it wrote nothing."""
  if os.listdir(output_dir) == [os.path.basename(lock_path)]:
    os.remove(lock_path)
    os.rmdir(output_dir)
