"""Room in /dev/shm for a training run's batches: checked before training, its exhaustion while training named.

A grain data worker hands each batch to the trainer as one POSIX shared-memory segment per array, in /dev/shm, a
tmpfs (RAM) whose size the machine or container sets (Docker's default is 64 MiB). The batches there at once:

  in_flight = workers x 2 x (config.data.prefetch + 1) + config.data.device_prefetch + 2

A worker queues config.data.prefetch batches and holds one more waiting for a place in the queue; the trainer reads
each worker ahead as deep again, through a thread of its own; then come the batch the loader hands out, the
config.data.device_prefetch batches on their way to the devices and the step's own batch. Each array of a batch
takes its bytes rounded up to whole pages. The workers fill every buffer while the trainer compiles, so a run
reaches this at its start: the demo's tiny run (2 workers, prefetch 2, device_prefetch 2) holds up to 62 segments,
15.5 batches of 4 arrays, against 16 here. The need counts one process; processes that share a node share its
/dev/shm.

`ensure` stops a run whose /dev/shm has less room than that, before training, with one line. A /dev/shm that fills
up later (other jobs' files) kills the worker writing a batch with SIGBUS (the segment is sparse: tmpfs refuses
the page only when it is written), or refuses a semaphore with ENOSPC; `explained` turns either into one line
naming /dev/shm.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import signal

import grain
import numpy as np

from visionfm_jax.data.loader.reaping import SHM_DIR
from visionfm_jax.errors import UserError

# How grain's main process reports a worker that ended without a word (grain 0.2: process_prefetch.py).
_WORKER_ENDED = re.compile(r"Worker process was terminated unexpectedly with exit code (-?\d+)")


def batch_bytes(record: dict, operations, batch_size: int) -> int:
  """The /dev/shm one batch takes: `record` taken through the record -> example `operations` in this process (every
  example has the same arrays), each array times `batch_size`, rounded up to whole pages."""
  element, rng = record, np.random.default_rng(0)
  for op in operations:
    element = op.random_map(element, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(element)
  total = 0
  for value in element.values():
    array = np.asarray(value)
    if not array.dtype.hasobject:  # grain passes object arrays through the pipe, not /dev/shm
      total += -(-batch_size * array.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
  return total


def batches_in_flight(workers: int, prefetch: int, device_prefetch: int) -> int:
  """The batches in /dev/shm at once (module docstring); 0 without workers, which read in the trainer."""
  return workers * 2 * (prefetch + 1) + device_prefetch + 2 if workers else 0


def room(directory: str = SHM_DIR) -> tuple[int, int] | None:
  """(bytes free to this user, size) of the file system of `directory`; None where there is none."""
  try:
    stats = os.statvfs(directory)
  except OSError:
    return None
  return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize


def describe_need(data_cfg, workers: int, one_batch: int) -> str:
  """What the pipeline holds in /dev/shm, for the error lines: the bytes, and the sum that gives them."""
  in_flight = batches_in_flight(workers, data_cfg.prefetch, data_cfg.device_prefetch)
  return (
    f"the input pipeline holds up to {_mib(in_flight * one_batch)} of batches there ({in_flight} batches of "
    f"{_mib(one_batch)}: config.data.num_workers={workers} x 2 x (config.data.prefetch={data_cfg.prefetch} + 1)"
    f" + config.data.device_prefetch={data_cfg.device_prefetch} + 2)"
  )


def ensure(data_cfg, workers: int, one_batch: int, directory: str = SHM_DIR) -> None:
  """UserError naming `directory`, its free room and the pipeline's need when the need does not fit."""
  need = batches_in_flight(workers, data_cfg.prefetch, data_cfg.device_prefetch) * one_batch
  free = room(directory)
  if free is not None and need > free[0]:
    raise UserError(
      f"{directory} has {_mib(free[0])} free (of {_mib(free[1])}) but "
      f"{describe_need(data_cfg, workers, one_batch)}; {_REMEDY}"
    )


_REMEDY = (
  "make room there or enlarge it (docker run --shm-size, a Kubernetes emptyDir of medium Memory, "
  "'mount -o remount,size=...'), or lower config.data.num_workers or config.data.prefetch"
)


def explained(error: BaseException, need: str, directory: str = SHM_DIR) -> UserError | None:
  """The one-line error for `error`, raised while the trainer read its data workers, where it is the loader's
  shared memory running out (ENOSPC, or a worker killed by SIGBUS) or a worker killed by another signal; None for
  anything else. `need` says what the pipeline holds there (`describe_need`)."""
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    return UserError(
      f"{directory} is full ({_room_now(directory)}): the input pipeline could not make a semaphore "
      f"or a batch there (errno ENOSPC); {need}; {_REMEDY}"
    )
  ended = _WORKER_ENDED.search(str(error)) if isinstance(error, RuntimeError) else None
  if ended is None or int(ended[1]) >= 0:
    return None
  killed_by = signal.Signals(-int(ended[1])).name
  if killed_by == "SIGBUS":  # tmpfs refused a page of a batch's segment
    return UserError(
      f"a data worker was killed by SIGBUS writing a batch into {directory} ({_room_now(directory)}): "
      f"it ran out of room; {need}; {_REMEDY}"
    )
  cause = " (the kernel's out-of-memory killer sends it: see 'dmesg'; or a kill -9)" if killed_by == "SIGKILL" else ""
  return UserError(
    f"a data worker was killed by {killed_by}{cause}; restarted, the run resumes from its newest checkpoint"
  )


def _room_now(directory: str) -> str:
  free = room(directory)
  return "size unknown" if free is None else f"{_mib(free[0])} free of {_mib(free[1])}"


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
