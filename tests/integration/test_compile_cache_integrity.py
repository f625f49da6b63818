"""The compile cache loads an entry only when it matches the digest recorded as it was written: a swapped, cut
short or unrecorded entry is a warning naming it, removed, and its program compiled again."""

import json
import logging
import shutil

import jax
import pytest

from visionfm_jax.training import train
from visionfm_jax.training.infra import compile_cache

from conftest import tiny_vit_config


@pytest.fixture(autouse=True)
def every_program_cached():
  """JAX writes only programs that took 1 s or more to compile by default; these take less."""
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def _train(workdir, cache, lr=1e-3):
  """Trains 3 steps with peak learning rate `lr` through the cache folder `cache`, from programs in no process
  memory (the persistent cache or the compiler); returns (step, lr, loss) of each step."""
  config = tiny_vit_config(total_steps=3, log_every=1, eval_every=3, checkpoint_every=3, compile_cache=str(cache))
  config.optim.lr = lr
  config.data.num_workers = 0
  config.data.eval_examples = 16
  jax.clear_caches()
  train.run(config, str(workdir))
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["train/lr"], r["train/loss"]) for r in rows if "train/loss" in r]


def _train_steps(cache):
  return set(cache.glob("jit_train_step-*-cache"))


@pytest.mark.slow
def test_another_runs_program_under_an_entrys_name_is_removed_and_compiled_again(tmp_path, caplog):
  """Run B's train step (another learning rate) copied over run A's under A's file name: A's rerun warns, naming
  the entry, compiles its train step again and trains as A did (today's JAX loads B's step: B's learning rate)."""
  cache = tmp_path / "cache"
  trained = _train(tmp_path / "a", cache)
  [a_step] = _train_steps(cache)
  _train(tmp_path / "b", cache, lr=0.5)
  [b_step] = _train_steps(cache) - {a_step}
  shutil.copyfile(b_step, a_step)

  with caplog.at_level(logging.INFO):
    assert _train(tmp_path / "a_again", cache) == trained
  assert (
    f"compile cache entry {a_step} does not match the digest recorded when it was written: removed, "
    "compiling its program again" in caplog.messages
  )
  assert a_step.read_bytes() != b_step.read_bytes()  # written again, as compiled
  assert len([m for m in caplog.messages if "compile cache entry" in m]) == 1  # the others of A load as they were


def _scaled(x):
  return x * 3.0


def _compile_through(cache) -> float:
  jax.clear_caches()
  with compile_cache.in_use(str(cache), "unused"):
    return float(jax.jit(_scaled)(2.0))


@pytest.mark.parametrize(
  "damage, problem",
  [
    # An entry not written through `in_use` (by JAX outside a run, or before this check): not trusted, as its
    # bytes could be anything; one compile rewrites it with its digest.
    (lambda entry, digest: digest.unlink(), "has no recorded digest"),
    # What a kill while JAX writes an entry leaves: the digest (written first) and a part of the entry.
    (
      lambda entry, digest: entry.write_bytes(entry.read_bytes()[:100]),
      "does not match the digest recorded when it was written",
    ),
  ],
  ids=["no digest", "cut short"],
)
def test_an_entry_without_its_digest_or_cut_short_is_removed_and_compiled_again(tmp_path, caplog, damage, problem):
  """A program compiled through `in_use`, its entry damaged, compiled through it again: a warning naming the
  entry, no program loaded, the entry written again with its digest, and loaded by the next compile."""
  jax_factory = compile_cache.jax_cache_internals.get_file_cache
  assert _compile_through(tmp_path) == 6.0
  [entry] = tmp_path.glob("jit__scaled-*-cache")
  digest = entry.with_name(entry.name.removesuffix("-cache") + "-digest")
  recorded = digest.read_text()
  assert recorded.startswith("xxh3_128:" if compile_cache.xxhash else "blake2b:")
  damage(entry, digest)

  with caplog.at_level(logging.INFO):
    assert _compile_through(tmp_path) == 6.0
  assert f"compile cache entry {entry} {problem}: removed, compiling its program again" in caplog.messages
  assert entry.exists() and digest.exists()  # written again, with its digest: loaded below with no warning
  assert f"compile cache {tmp_path}: 0 programs loaded" in caplog.messages
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert _compile_through(tmp_path) == 6.0
  assert f"compile cache {tmp_path}: 1 program loaded" in caplog.messages
  assert compile_cache.jax_cache_internals.get_file_cache is jax_factory  # JAX's own cache outside a run
