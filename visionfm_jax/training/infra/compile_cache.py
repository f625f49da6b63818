"""JAX's persistent cache of compiled programs, per run: a requeued, preempted or resumed run loads its programs
from the previous launch instead of compiling them again (minutes of every restart for the seeds' models; a
pico CLIP's first two steps on CPU: 31 CPU s compiling, 5 loading).

`config.compile_cache`: '' keeps JAX's own setting when one is made (JAX_COMPILATION_CACHE_DIR), else
`<workdir>/compile_cache`; 'off' compiles every program; any other path is used as it is (a folder that runs of
one model and mesh share). The cache's key is the program with its compile options, devices and jaxlib, so a
changed config compiles afresh and a loaded program computes what a compiled one would. With several
processes, process 0 writes it and every process reads it (on a workdir that the nodes share)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache as jax_cache

OFF = "off"
_HIT = "/jax/compilation_cache/cache_hits"


def directory(setting: str, workdir: str) -> str | None:
  """The cache folder a run with `config.compile_cache = setting` in `workdir` uses; None: no cache."""
  if setting == OFF:
    return None
  return setting or jax.config.jax_compilation_cache_dir or os.path.join(workdir, "compile_cache")


@contextlib.contextmanager
def in_use(setting: str, workdir: str) -> Iterator[None]:
  """Compiles (and loads) through the run's cache inside, and restores the process's setting after it."""
  path, before = directory(setting, workdir), jax.config.jax_compilation_cache_dir
  loaded = []

  def count(event: str, **_) -> None:
    if event == _HIT:
      loaded.append(event)

  if path != before:
    _use(path)
  jax.monitoring.register_event_listener(count)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_listener(count)
    if path != before:
      _use(before)
    if path is not None and jax.process_index() == 0:
      logging.info("compile cache %s: %d program%s loaded", path, len(loaded), "" if len(loaded) == 1 else "s")


def _use(path: str | None) -> None:
  jax.config.update("jax_compilation_cache_dir", path)
  jax_cache.reset_cache()  # JAX opens its cache once, at the first compile after this
