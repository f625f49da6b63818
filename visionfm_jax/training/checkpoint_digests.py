"""Digests of a checkpoint's arrays, written with every save and checked at every restore: bytes changed at rest (bit
rot, a bad disk, a partial overwrite) are found, instead of trained on or evaluated.

Each process digests the slices of each array that it holds (one per distinct slice: replicas hold the same bytes),
keyed by the array's path in the saved tree and the slice's global bounds ('0:64,0:128'), and writes them to
`<step>/digests/process_<i>-of-<n>.json` (`DigestHandler`, an Orbax item beside the state). It reads the host copies
the save makes anyway, taken before the save returns (so before the next train step can donate the state's
buffers): on a CPU a view of the device buffer; on a GPU jax keeps a shard's host copy with the shard, so Orbax's
own write of it reuses the one taken here (replica-parallel writes of several hosts slice on the device instead and
copy apart). The hashing runs in the save's background commit, which Orbax waits for before it commits the step, so
a committed step always has its digests. The hash is xxh3-128 (`xxhash`), several GB/s per core, on the raw bytes of
each slice, with the GIL released.

`verify` digests what a restore returned and compares. A slice restored as it was saved compares directly. After a
reshard (another mesh, strategy or process count) a saved slice is rebuilt from the restored shards this process
holds when they cover it; a saved slice that this process holds only part of (the rest on another process) cannot
be checked here and is reported as unverified.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Sequence

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash

from visionfm_jax.errors import CheckpointError

ITEM = "digests"
HASH = "xxh3_128"
_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
# Threads that hash at once (xxhash releases the GIL on large buffers): enough to keep up with a disk, few enough to
# leave the training thread and the input pipeline their cores.
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))

Bounds = tuple[tuple[int, int], ...]  # a slice of an array: (start, stop) per dimension


def process_file_name(index: int, count: int) -> str:
  return f"process_{index}-of-{count}.json"


def every_process_file(directory: epath.Path, culprit: str) -> list[epath.Path]:
  """The per-process files `process_<i>-of-<n>.json` of `directory` (digests, grain's iterator states), in process
  order: all n of one process count n, else a CheckpointError that starts with `culprit`."""
  names = sorted(p.name for p in directory.glob("process_*-of-*.json"))
  counts = {int(m.group(2)) for m in map(_FILE.fullmatch, names) if m}
  if len(counts) != 1:
    raise CheckpointError(
      f"{culprit}: expected process_<i>-of-<n>.json files of one process count, found {names or 'none'}"
    )
  count = counts.pop()
  missing = [process_file_name(i, count) for i in range(count) if process_file_name(i, count) not in names]
  if missing:
    raise CheckpointError(f"{culprit}: missing {', '.join(missing)}")
  return [directory / process_file_name(i, count) for i in range(count)]


def _key_name(key) -> str:
  """A tree path's step as the same text whatever node holds it (a dataclass field, a dict key, a tuple index), so
  that a TrainState saved and a dict restored name their arrays alike."""
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  return "/".join(_key_name(k) for k in path)


def _bounds_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Bounds:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def bounds_text(bounds: Bounds) -> str:
  return ",".join(f"{start}:{stop}" for start, stop in bounds)


def _parse_bounds(text: str) -> Bounds:
  return tuple(_parse_slice(part) for part in text.split(",")) if text else ()


def _parse_slice(text: str) -> tuple[int, int]:
  start, stop = text.split(":")
  return int(start), int(stop)


def _volume(bounds: Bounds) -> int:
  return math.prod(stop - start for start, stop in bounds)


def digest(data: np.ndarray) -> str:
  return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)


@dataclasses.dataclass
class HostArray:
  """An array as one process holds it on the host: its global shape and dtype, and its distinct slices."""

  shape: tuple[int, ...]
  dtype: str
  pieces: dict[Bounds, np.ndarray]


def _one_shard_per_slice(array: jax.Array) -> list:
  """This process's shards of `array`, one per distinct slice: those of the first shard's replica first, the ones
  Orbax writes from this process (its host copies are the ones shared)."""
  shards = array.addressable_shards
  first = shards[0].replica_id
  chosen: dict[Bounds, jax.Shard] = {}
  for shard in sorted(shards, key=lambda s: s.replica_id != first):
    chosen.setdefault(_bounds_of(shard.index, array.shape), shard)
  return list(chosen.items())


def host_arrays(tree) -> dict[str, HostArray]:
  """{path: HostArray} of the jax and numpy arrays in `tree`, on this process's host: each device shard copied once
  (all copies started before any is waited for); other leaves (Python numbers, None) are left out."""
  arrays: dict[str, tuple[jax.Array | np.ndarray, list]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)  # what Orbax writes of a key
      arrays[path_name(path)] = (leaf, _one_shard_per_slice(leaf))
    elif isinstance(leaf, (np.ndarray, np.generic)):
      leaf = np.asarray(leaf)
      arrays[path_name(path)] = (leaf, [(_bounds_of((slice(None),) * leaf.ndim, leaf.shape), leaf)])
  for _, shards in arrays.values():
    for _, shard in shards:
      if not isinstance(shard, np.ndarray):
        shard.data.copy_to_host_async()
  return {
    name: HostArray(
      tuple(leaf.shape),
      str(leaf.dtype),
      {bounds: shard if isinstance(shard, np.ndarray) else np.asarray(shard.data) for bounds, shard in shards},
    )
    for name, (leaf, shards) in arrays.items()
  }


def _hash_all(jobs: Sequence[Callable[[], Any]]) -> list[Any]:
  """The digest of the array each job returns (what it returns when that is no array), on `HASH_THREADS`
  threads."""

  def run(job):
    data = job()
    return digest(data) if isinstance(data, np.ndarray) else data

  with concurrent.futures.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="checkpoint_digests") as pool:
    return list(pool.map(run, jobs))


def _given(data: np.ndarray) -> Callable[[], np.ndarray]:
  """A `_hash_all` job that hands over `data`, held already."""
  return lambda: data


def record(arrays: dict[str, HostArray]) -> dict:
  """The JSON this process saves: {'hash', 'arrays': {path: {'shape', 'dtype', 'slices': {bounds: digest}}}}."""
  jobs = [(name, bounds, data) for name, array in arrays.items() for bounds, data in array.pieces.items()]
  digests = _hash_all([_given(data) for _, _, data in jobs])
  out: dict[str, dict[str, Any]] = {
    name: {"shape": list(array.shape), "dtype": array.dtype, "slices": {}} for name, array in arrays.items()
  }
  for (name, bounds, _), value in zip(jobs, digests):
    out[name]["slices"][bounds_text(bounds)] = value
  return {"hash": HASH, "arrays": out}


# ------------------------------------------------------------------------------------------------- saving


def _write(directory: epath.Path, arrays: dict[str, HostArray]) -> None:
  (directory / process_file_name(jax.process_index(), jax.process_count())).write_text(json.dumps(record(arrays)))


class DigestHandler(ocp.handlers.AsyncCheckpointHandler):
  """Orbax handler of the digests item: takes the state's host copies in the save's blocking part, hashes them and
  writes this process's file in its commit (a background thread, before the step commits)."""

  async def async_save(self, directory: epath.Path, args: DigestSave) -> list[ocp.future.Future]:
    arrays = host_arrays(args.item)  # now: the training step after the save may donate these buffers
    return [ocp.future.CommitFutureAwaitingContractedSignals(self._commit(directory, arrays), name="digests_save")]

  async def _commit(self, directory: epath.Path, arrays: dict[str, HostArray]) -> None:
    _write(directory, arrays)

  def save(self, directory: epath.Path, args: DigestSave) -> None:
    _write(directory, host_arrays(args.item))

  def restore(self, directory: epath.Path, args: DigestRestore | None = None) -> dict | None:
    del args
    return read(directory)

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DigestHandler, for_save=True)
@dataclasses.dataclass
class DigestSave(ocp.args.CheckpointArgs):
  item: Any  # the tree whose arrays are digested (the train state)


@ocp.args.register_with_handler(DigestHandler, for_restore=True)
@dataclasses.dataclass
class DigestRestore(ocp.args.CheckpointArgs):
  pass


# ------------------------------------------------------------------------------------------------ reading


def read(directory) -> dict | None:
  """{path: {'shape', 'dtype', 'slices'}} of every process's file in a step's digests folder, None when the step has
  none (saved before checkpoints carried digests, or with config.checkpoint_digests off). A missing or garbled
  file is a CheckpointError naming it: what was written cannot be checked."""
  directory = epath.Path(directory)
  if not directory.exists():
    return None
  arrays: dict[str, dict] = {}
  for path in every_process_file(directory, str(directory)):
    try:
      saved = json.loads(path.read_text())
      if saved.get("hash") != HASH:
        raise ValueError(f"digests of {saved.get('hash')!r}, not {HASH}")
      for name, entry in saved["arrays"].items():
        arrays.setdefault(name, {**entry, "slices": {}})["slices"].update(entry["slices"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"cannot read the digests {path}: {e}") from e
  return arrays


# ---------------------------------------------------------------------------------------------- verifying


@dataclasses.dataclass
class Verdict:
  """What `verify` found: the slices that match, those that differ and those this process could not check (each
  'path[bounds]', or 'path (why)' for a whole array)."""

  matched: int = 0
  arrays: int = 0
  mismatched: list[str] = dataclasses.field(default_factory=list)
  unverified: list[str] = dataclasses.field(default_factory=list)


_PARTIAL = object()  # a saved slice this process holds only part of


def _overlap(a: Bounds, b: Bounds) -> Bounds | None:
  both = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
  return None if any(lo >= hi for lo, hi in both) else both


def _within(inner: Bounds, outer: Bounds) -> tuple[slice, ...]:
  return tuple(slice(lo - o0, hi - o0) for (lo, hi), (o0, _) in zip(inner, outer))


def _rebuilt(bounds: Bounds, pieces: dict[Bounds, np.ndarray]):
  """The saved slice `bounds` from this process's `pieces` of the restored array: one piece itself, a view into the
  one piece that contains it, or a copy assembled from several; None when no piece overlaps it (another process
  checks it), `_PARTIAL` when they cover only part of it."""
  if bounds in pieces:
    return pieces[bounds]
  if not _volume(bounds):
    return np.empty(0, np.uint8)  # no bytes: nothing can have changed
  overlaps = [
    (o, piece_bounds, data)
    for piece_bounds, data in pieces.items()
    if (o := _overlap(bounds, piece_bounds)) is not None
  ]
  if not overlaps:
    return None
  for o, piece_bounds, data in overlaps:
    if o == bounds:
      return data[_within(bounds, piece_bounds)]
  if sum(_volume(o) for o, _, _ in overlaps) != _volume(bounds):
    return _PARTIAL
  out = np.empty(tuple(stop - start for start, stop in bounds), overlaps[0][2].dtype)
  for o, piece_bounds, data in overlaps:
    out[_within(o, bounds)] = data[_within(o, piece_bounds)]
  return out


def verify(saved: dict, tree, prefix: str = "") -> Verdict:
  """Compares the arrays of `tree` (restored; `prefix`: its path in the saved tree, e.g. 'params') with the `saved`
  digests (`read`). Every array of `tree` is checked on the slices this process holds."""
  verdict = Verdict()
  jobs, labels, expected = [], [], []
  for name, array in host_arrays(tree).items():
    full = f"{prefix}/{name}" if prefix and name else prefix or name
    entry = saved.get(full)
    if entry is None:
      verdict.unverified.append(f"{full} (saved without a digest)")
      continue
    if tuple(entry["shape"]) != array.shape or entry["dtype"] != array.dtype:
      verdict.unverified.append(
        f"{full} (saved as {entry['dtype']}{entry['shape']}, restored as {array.dtype}{list(array.shape)})"
      )
      continue
    verdict.arrays += 1
    for text, value in entry["slices"].items():
      jobs.append(lambda bounds=_parse_bounds(text), pieces=array.pieces: _rebuilt(bounds, pieces))
      labels.append(f"{full}[{text}]")
      expected.append(value)
  for label, want, got in zip(labels, expected, _hash_all(jobs)):
    if got is _PARTIAL:
      verdict.unverified.append(f"{label} (partly held by another process)")
    elif got == want:
      verdict.matched += 1
    elif got is not None:
      verdict.mismatched.append(label)
  return verdict


def _listed(labels: list[str], most: int = 3) -> str:
  return ", ".join(labels[:most]) + (f" and {len(labels) - most} more" if len(labels) > most else "")


def mismatch_text(verdict: Verdict) -> str:
  """What differs, on one line: the first slices by name, and how many in all."""
  count = len(verdict.mismatched)
  return (
    f"the bytes of {_listed(verdict.mismatched)} differ from the digest{'s' if count > 1 else ''} ({HASH}) "
    f"saved with {'them' if count > 1 else 'it'}: changed at rest since the save"
  )


def unverified_text(verdict: Verdict) -> str:
  return f"{len(verdict.unverified)} not verified on this process: {_listed(verdict.unverified)}"
