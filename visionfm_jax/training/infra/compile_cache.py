"""JAX's persistent cache of compiled programs, per run: a requeued, preempted or resumed run loads its programs
from the previous launch instead of compiling them again (minutes of every restart for the seeds' models; a
pico CLIP's first two steps on CPU: 31 CPU s compiling, 5 loading).

`config.compile_cache`: '' keeps JAX's own setting when one is made (JAX_COMPILATION_CACHE_DIR), else
`<workdir>/compile_cache`; 'off' compiles every program; any other path is used as it is (a folder that runs of
one model and mesh share), made absolute. The cache's key is the program with its compile options, devices and
jaxlib, so a changed config compiles afresh and a loaded program computes what a compiled one would. Among the
compile options is the cache's own folder: JAX keeps XLA's per-fusion autotune results in
`<folder>/xla_gpu_per_fusion_autotune_cache_dir` (the flag of that name), so a cache copied to another path
compiles afresh. With several processes, process 0 writes it and every process reads it (on a workdir that the
nodes share). `main --compile_only` fills it for a job (training/compile_only.py).

What is trusted: JAX names an entry `<program>-<key>-cache` and loads whatever bytes that file holds, so an entry
changed after it was written (another run's program copied under its name, a write cut short by a kill, a
truncated copy) would run as the program asked for. Here, before JAX writes an entry, the digest of its key and
bytes goes in `<program>-<key>-digest` beside it (xxh3-128, named in the record), and an entry is loaded only
when its bytes match it. An entry that does not, or that has no digest (one written by JAX outside a run), is a
one-line warning, removed
(by process 0, the writer; JAX's `-atime` file of it too) and its program compiled and written again: a cache is
only a speed-up. The digest is written first so that an entry cut short by a SIGKILL fails its check instead of
lacking one. It guards against accidents, not against someone who can write the folder: they can write a
digest as well, and JAX's own warning holds (whoever writes a cache folder runs code in the runs that read it)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from absl import logging
import jax
from jax._src import compilation_cache as jax_cache_internals  # the seam: the factory of JAX's file cache
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import xxhash

OFF = "off"
HIT = "/jax/compilation_cache/cache_hits"
_JAX_FILE_CACHE = jax_cache_internals.get_file_cache


def directory(setting: str, workdir: str) -> str | None:
  """The cache folder a run with `config.compile_cache = setting` in `workdir` uses; None: no cache."""
  if setting == OFF:
    return None
  # jax.config sets its flags as attributes at run time; its class declares none
  cache_dir = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
  return os.path.abspath(setting or cache_dir or os.path.join(workdir, "compile_cache"))


@contextlib.contextmanager
def in_use(setting: str, workdir: str) -> Iterator[None]:
  """Compiles (and loads checked entries) through the run's cache inside, and restores the process's setting
  after it."""
  # jax.config sets its flags as attributes at run time; its class declares none
  path, before = directory(setting, workdir), jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
  loaded = []

  def count(event: str, **_) -> None:
    if event == HIT:
      loaded.append(event)

  _use(path, checked=True)
  jax.monitoring.register_event_listener(count)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_listener(count)
    _use(before, checked=False)
    if path is not None and jax.process_index() == 0:
      logging.info("compile cache %s: %d program%s loaded", path, len(loaded), "" if len(loaded) == 1 else "s")


def _use(path: str | None, checked: bool) -> None:
  jax_cache_internals.get_file_cache = _checked_file_cache if checked else _JAX_FILE_CACHE
  jax.config.update("jax_compilation_cache_dir", path)
  jax_cache.reset_cache()  # JAX opens its cache once, at the first compile after this


def _checked_file_cache(path: str):
  made = _JAX_FILE_CACHE(path)
  return None if made is None else (_CheckedEntries(made[0]), made[1])


class _CheckedEntries:
  """JAX's file cache (its `get` and `put`) whose entries load only when they match their recorded digest."""

  def __init__(self, jax_file_cache):
    self._files = jax_file_cache
    self._path = jax_file_cache._path  # pylint: disable=protected-access  # JAX's reset_cache names it

  def get(self, key: str) -> bytes | None:
    entry = self._files.get(key)
    if entry is None:
      return None
    problem = self._problem(key, entry)
    if problem:
      self._reject(key, problem)
      return None
    return entry

  def put(self, key: str, entry: bytes) -> None:
    if not self._file(key, "cache").exists():  # JAX keeps the first entry written under a key, and so its digest
      self._file(key, "digest").write_text(_digest(key, entry))
    self._files.put(key, entry)

  def _problem(self, key: str, entry: bytes) -> str | None:
    try:
      recorded = self._file(key, "digest").read_text()
    except OSError:
      return "has no recorded digest"
    if recorded != _digest(key, entry):
      return "does not match the digest recorded when it was written"
    return None

  def _reject(self, key: str, problem: str) -> None:
    removed = jax.process_index() == 0  # the one writer: the others would race its rewrite
    if removed:
      for suffix in ("cache", "atime", "digest"):  # the entry first: JAX's eviction reads the atime of each entry
        self._file(key, suffix).unlink(missing_ok=True)
    logging.warning(
      "compile cache entry %s %s: %s, compiling its program again",
      self._file(key, "cache"),
      problem,
      "removed" if removed else "not loaded",
    )

  def _file(self, key: str, suffix: str):
    return self._path / f"{key}-{suffix}"


def _digest(key: str, entry: bytes) -> str:
  digest = xxhash.xxh3_128()
  digest.update(key.encode())
  digest.update(entry)
  return f"xxh3_128:{digest.hexdigest()}"
