"""The open files a training run's input pipeline may hold, and the process's limit raised to fit them.

Every reader of stored shards keeps a bounded number of them open per process (`max_open_files` of a source:
`sources.open_shards.bound()` for `arrayrecord:`, `wds.WdsSource.CACHED_INDEXES` for `wds:`; the embedded sets none),
so what a process needs is a function of its sources and worker processes, never of how many shards it has touched.
RLIMIT_NOFILE counts per process, and the main process holds the most:

  need = the sum over the training sources of max_open_files + PER_WORKER x data workers + RUN_FILES

(a grain worker holds every source's readers and little else; the main process holds them too, for its first records
and evaluation, plus the pipes and shared memory of each worker and the run's own files: the evaluation readers, the
compile cache, checkpoints and the collectives' sockets). At start-up the run raises its soft RLIMIT_NOFILE to the
need when the hard limit allows, else stops with one line naming both; the dry run reports the need beside the
limits of the shell it runs in.
"""

from __future__ import annotations

from absl import logging

from visionfm_jax.errors import UserError

try:
  import resource
except ImportError:  # not on Windows: no limit to read or raise
  resource = None

# The run's own descriptors beside the training readers: a CPU demo holds 8, evaluation readers at most 32 threads'
# shards per evaluated source, a GPU process some dozens for NCCL and the distributed client.
RUN_FILES = 512
PER_WORKER = 8  # the main process's end of a grain worker: its pipes, queues and shared-memory segments in flight


def per_process(mixture) -> int:
  """The shards one process (a worker, or the main process) may hold open for `mixture`'s sources."""
  return sum(int(getattr(entry.source, "max_open_files", 0)) for entry in mixture.entries)


def needed(mixture, workers: int) -> int:
  """Descriptors the main process of a run reading `mixture` with `workers` grain workers may hold (module
  docstring); a worker holds fewer."""
  return per_process(mixture) + PER_WORKER * int(workers) + RUN_FILES


def limits() -> tuple[int, int] | None:
  """(soft, hard) RLIMIT_NOFILE of this process, None where there is none."""
  if resource is None:
    return None
  return resource.getrlimit(resource.RLIMIT_NOFILE)


def ensure(need: int) -> None:
  """Raises the soft RLIMIT_NOFILE to `need` when it is lower and the hard limit allows; UserError naming both when
  it does not. Worker processes inherit the raised limit."""
  current = limits()
  if current is None or _fits(need, current[0]):
    return
  soft, hard = current
  if not _fits(need, hard):
    raise UserError(
      f"the input pipeline may hold {need} open files (its sources and config.data.num_workers, "
      f"data/loader/open_files.py) but this process may open at most {hard} (hard RLIMIT_NOFILE): raise "
      f"it ('ulimit -Hn {need}' where allowed, or the cluster's limits.conf)"
    )
  resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
  logging.info("open files: soft RLIMIT_NOFILE raised %d -> %d for the input pipeline (hard %d)", soft, need, hard)


def _fits(need: int, limit: int) -> bool:
  return limit == resource.RLIM_INFINITY or need <= limit


def describe(need: int, current: tuple[int, int] | None) -> str:
  """The dry run's line: the need and the shell's limits `current` (read before the loader raised them)."""
  if current is None:
    return f"open files: the input pipeline needs up to {need}"
  soft, hard = (("unlimited" if v == resource.RLIM_INFINITY else v) for v in current)
  verdict = "fits" if _fits(need, current[0]) else "raised at start-up"
  return (
    f"open files: the input pipeline needs up to {need}; this shell's RLIMIT_NOFILE soft {soft}, hard {hard} "
    f"({verdict})"
  )
