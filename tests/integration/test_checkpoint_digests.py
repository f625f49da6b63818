"""Checkpoints carry the digests of their arrays: bytes flipped in a committed checkpoint's array data (as bit rot
does) make it unreadable at a resume (set aside, the previous one taken) and an error in the tools, where Orbax
alone restores them without a word; config.checkpoint_digests=False writes and checks none; a checkpoint saved
without digests restores with a note; with zero3 on the 8 simulated devices each shard has its digest, and a restore
onto another mesh and strategy checks the saved slices it rebuilds from its own."""

import json
import logging
import math
import os
import re
import shutil

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from visionfm_jax.tools import evaluate
from visionfm_jax.training import checkpoint, checkpoint_digests, train

from conftest import tiny_vit_config
from test_checkpoint_safety import _FakeIterator, _restore_on, _train_steps

pytestmark = pytest.mark.usefixtures("compilation_cache")
SHARED_RUNS = pytest.mark.xdist_group("checkpoint_digests_runs")
ARRAY_NAMED = r"the bytes of (params|opt_state)/[\w/]+\[[\d:,]+\] differ from the digest \(xxh3_128\) saved with it"


def _config(total_steps, **overrides):
  config = tiny_vit_config(
    total_steps=total_steps, checkpoint_every=1, log_every=1, eval_every=100, strategy="zero3", **overrides
  )
  config.data.num_workers = 0
  config.data.eval_examples = 16
  return config


def _continued(**overrides):
  """The config of a run resuming `zero3_run` (2 steps) for 3 steps in all."""
  return _config(3, **{"resume.allow_changes": "total_steps", **overrides})


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, compilation_cache):
  """A workdir of the tiny ViT trained 2 steps with zero3 on 8 devices, checkpoints 1 and 2 (read-only: copy it)."""
  del compilation_cache  # on before the first run compiles
  workdir = tmp_path_factory.mktemp("digests") / "run"
  train.run(_config(2), str(workdir))
  return workdir


def _copy(run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  return workdir


def _flip_array_bytes(step_dir):
  """Flips the lowest bit of 4 bytes of the largest array data file of `step_dir`'s state, as bit rot would, where
  Orbax still restores the arrays without a word and they change within their scale: the data is zstd-compressed,
  so a flip can instead break the stream or decode to anything (an overflow would stop a run that trains on it
  unchecked), depending on which array's chunk lies there (a third of the offsets do). Offsets from the middle
  on, 512 bytes apart, until one does."""
  state = step_dir / "state"
  before = jax.tree.leaves(checkpoint.restore_on_host(state))
  largest = max(state.glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  size = largest.stat().st_size
  for offset in [(size // 2 + k * 512) % (size - 4) for k in range(size // 512)]:
    original = _xor_low_bits(largest, offset)
    try:
      after = jax.tree.leaves(checkpoint.restore_on_host(state))
    except Exception:  # pylint: disable=broad-except  # the stream no longer decodes
      after = None
    if after is not None and _changed_within_scale(after, before):
      return
    _xor_low_bits(largest, offset, original)
  raise AssertionError(f"no 4 bytes of {largest} flip into changed arrays within their scale")


def _changed_within_scale(after, before) -> bool:
  """Some array changed, and every float array stays within 4x its largest magnitude (a flipped low exponent bit):
  finite values that train as bit rot's do, not an overflow."""
  floats = [(a, b) for a, b in zip(after, before) if np.issubdtype(b.dtype, np.floating)]
  return any(not np.array_equal(a, b) for a, b in zip(after, before)) and all(
    np.max(np.abs(a), initial=0) <= 4 * np.max(np.abs(b), initial=0) for a, b in floats
  )


def _xor_low_bits(path, offset, restore=None) -> bytes:
  """Flips the lowest bit of the 4 bytes at `offset` (or writes `restore` there); returns the bytes it replaced."""
  with open(path, "r+b") as f:
    f.seek(offset)
    original = f.read(4)
    f.seek(offset)
    f.write(restore if restore is not None else bytes(b ^ 0x01 for b in original))
  return original


@SHARED_RUNS
def test_a_resume_sets_aside_a_checkpoint_whose_array_bytes_changed(zero3_run, tmp_path, caplog):
  workdir = _copy(zero3_run, tmp_path)
  _flip_array_bytes(workdir / "checkpoints" / "2")
  with caplog.at_level(logging.INFO):
    last = train.run(_continued(), str(workdir))
  where = f"{workdir / 'checkpoints'}/2"
  unreadable = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
  assert len(unreadable) == 1
  assert unreadable[0].startswith(
    f"checkpoint {where} is unreadable, trying the previous one: cannot restore {where}: "
  )
  assert re.search(ARRAY_NAMED, unreadable[0]), unreadable
  assert f"resuming from {workdir / 'checkpoints'}/1" in caplog.text
  assert last["step"] == 3 and math.isfinite(last["train/loss"])
  assert _train_steps(workdir)[-2:] == [2, 3]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "2.unreadable", "3"]


@SHARED_RUNS
def test_evaluate_on_a_checkpoint_whose_array_bytes_changed_takes_the_previous_one_or_names_it(
  zero3_run, tmp_path, capsys, caplog
):
  """As a resume does: the newest intact step, with one warning naming the changed one; asked for by --step, one
  error line naming it."""
  workdir = _copy(zero3_run, tmp_path)
  _flip_array_bytes(workdir / "checkpoints" / "2")
  capsys.readouterr()
  with caplog.at_level(logging.WARNING):
    assert evaluate.main(["evaluate", f"--checkpoint={workdir}", "--batch_size=8"]) == 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 1
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint {workdir / 'checkpoints'}/2 is corrupt: ")
  assert re.search(ARRAY_NAMED, warnings[0]) and warnings[0].endswith(
    "taking step 1, the newest checkpoint whose params are intact"
  ), warnings
  assert evaluate.main(["evaluate", f"--checkpoint={workdir}", "--batch_size=8", "--step=2"]) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, errors
  assert errors[0].startswith(f"error: --step=2: checkpoint {workdir / 'checkpoints'}/2 is corrupt: ")
  assert re.search(ARRAY_NAMED, errors[0]), errors[0]


@SHARED_RUNS
def test_evaluate_warns_naming_the_optimiser_state_that_fails_its_digests(zero3_run, tmp_path, caplog):
  """The params intact, the tool evaluates them, and one warning names the part a resume would find changed."""
  workdir = _copy(zero3_run, tmp_path)
  step_dir = workdir / "checkpoints" / "2"
  digests_file = step_dir / checkpoint_digests.ITEM / "process_0-of-1.json"
  saved = json.loads(digests_file.read_text())
  name = "opt_state/1/0/mu/head/kernel"
  bounds = next(iter(saved["arrays"][name]["slices"]))
  saved["arrays"][name]["slices"][bounds] = "0" * 32
  digests_file.write_text(json.dumps(saved))
  with caplog.at_level(logging.WARNING):
    assert evaluate.main(["evaluate", f"--checkpoint={workdir}", "--batch_size=8"]) == 0
  warnings = [r.getMessage() for r in caplog.records if "digest" in r.getMessage()]
  assert warnings == [
    f"checkpoint {step_dir}: its params are intact, not its opt_state (the bytes of {name}[{bounds}] "
    f"differ from the digest (xxh3_128) saved with it: changed at rest since the save); a resume "
    f"skips this checkpoint as unreadable"
  ]


@SHARED_RUNS
def test_evaluate_reads_a_step_without_orbaxs_missing_metadata_warning(zero3_run, tmp_path, caplog):
  """Reading `<step>/state` alone made Orbax warn that its _CHECKPOINT_METADATA (kept in the step folder) is
  missing: nothing is wrong, and the line is not shown."""
  workdir = _copy(zero3_run, tmp_path)
  with caplog.at_level(logging.WARNING):
    assert evaluate.main(["evaluate", f"--checkpoint={workdir}", "--batch_size=8"]) == 0
  assert "Metadata file does not exist" not in caplog.text


@SHARED_RUNS
def test_with_digests_off_none_are_written_and_a_restore_checks_none(zero3_run, tmp_path, caplog):
  """The flipped bytes of step 2 restore without a word when nothing checks them (what every checkpoint did before
  digests); the run's new checkpoints carry none. The field changes across a resume without allow_changes."""
  workdir = _copy(zero3_run, tmp_path)
  _flip_array_bytes(workdir / "checkpoints" / "2")
  with caplog.at_level(logging.INFO):
    last = train.run(_continued(checkpoint_digests=False), str(workdir))
  assert f"resuming from {workdir / 'checkpoints'}/2" in caplog.text
  assert not re.search("is unreadable|carries no digests|match their digests", caplog.text)
  assert last["step"] == 3
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]
  assert not (workdir / "checkpoints" / "3" / checkpoint_digests.ITEM).exists()
  assert (workdir / "checkpoints" / "2" / checkpoint_digests.ITEM).exists()  # kept from the run that saved it


@SHARED_RUNS
def test_a_checkpoint_saved_without_digests_restores_with_a_note(zero3_run, tmp_path, caplog):
  workdir = _copy(zero3_run, tmp_path)
  for step in ("1", "2"):  # as a version before digests saved them
    shutil.rmtree(workdir / "checkpoints" / step / checkpoint_digests.ITEM)
  with caplog.at_level(logging.INFO):
    last = train.run(_continued(), str(workdir))
  notes = [r.getMessage() for r in caplog.records if "carries no digests" in r.getMessage()]
  assert notes == [
    f"checkpoint {workdir / 'checkpoints'}/2 carries no digests (saved before checkpoints had them, or "
    f"with config.checkpoint_digests=False): read unverified"
  ]
  assert f"resuming from {workdir / 'checkpoints'}/2" in caplog.text
  assert last["step"] == 3
  assert (workdir / "checkpoints" / "3" / checkpoint_digests.ITEM / "process_0-of-1.json").exists()


@SHARED_RUNS
def test_zero3_digests_each_shard_and_a_reshard_checks_the_slices_it_rebuilds(zero3_run, caplog):
  saved = checkpoint_digests.read(zero3_run / "checkpoints" / "2" / checkpoint_digests.ITEM)
  kernel = saved["params/blocks/mlp/fc1/kernel"]
  assert len(kernel["slices"]) == 8 and len(set(kernel["slices"].values())) == 8  # one per device, distinct
  assert len(saved["step"]["slices"]) == 1  # replicated: one digest
  arrays = len(saved)
  slices = sum(len(entry["slices"]) for entry in saved.values())
  with caplog.at_level(logging.INFO):
    _restore_on(zero3_run, jax.devices(), "zero3")  # the same slices
    _restore_on(zero3_run, jax.devices()[:4], "zero3")  # each saved slice within a restored one
    _restore_on(zero3_run, jax.devices()[:4], "ddp")  # each saved slice within the whole array
  matched = [r.getMessage() for r in caplog.records if "match their digests" in r.getMessage()]
  assert (
    matched == [f"checkpoint {zero3_run / 'checkpoints'}/2: {slices} slices of {arrays} arrays match their digests"] * 3
  )
  assert "not verified" not in caplog.text


def test_a_saved_slice_spread_over_restored_shards_is_rebuilt_and_one_held_in_part_is_reported(tmp_path, caplog):
  """Saved in 2 slices, restored in 8 (each saved slice assembled from 4 restored shards, and one bit changed in one
  found); a restored tree that holds only part of a saved slice, as a process of a resharded multi-process run can,
  leaves it unverified."""
  values = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  two = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("x",)), P(None, "x"))
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, {"w": jax.device_put(values, two)}, _FakeIterator(1))
  eight = NamedSharding(Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y")), P("x", "y"))
  with caplog.at_level(logging.INFO):
    restored = ckpt.restore(1, {"w": jax.ShapeDtypeStruct(values.shape, values.dtype, sharding=eight)})
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(restored["w"]), values)
  assert f"checkpoint {tmp_path}/1: 2 slices of 1 arrays match their digests" in caplog.text
  saved = checkpoint_digests.read(tmp_path / "1" / checkpoint_digests.ITEM)
  altered = values.copy()
  altered[5, 4] = np.nextafter(altered[5, 4], np.inf)  # one bit of one element
  verdict = checkpoint_digests.verify(saved, {"w": jax.device_put(altered, eight)})
  assert verdict.matched == 1 and verdict.mismatched == ["w[0:8,3:6]"]
  verdict = checkpoint_digests.verify(saved, {"w": values[:, :2]}, prefix="")
  assert verdict.matched == 0 and verdict.unverified == ["w (saved as float32[8, 6], restored as float32[8, 2])"]
  # pylint: disable=protected-access
  held = {((0, 4), (0, 3)): values[:4, :3]}  # a quarter: half of the saved slice 0:8,0:3, none of 0:8,3:6
  assert checkpoint_digests._rebuilt(((0, 8), (0, 3)), held) is checkpoint_digests._PARTIAL
  assert checkpoint_digests._rebuilt(((0, 8), (3, 6)), held) is None  # another process's to check


def test_a_missing_or_garbled_digests_file_makes_the_checkpoint_unreadable(tmp_path):
  values = {"w": np.arange(16, dtype=np.float32)}
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, values, _FakeIterator(1))
  target = {
    "w": jax.ShapeDtypeStruct((16,), np.float32, sharding=NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x")))
  }
  digests_file = tmp_path / "1" / checkpoint_digests.ITEM / "process_0-of-1.json"
  digests_file.write_text('{"hash": "xxh3_128", "arrays": garbled')
  with pytest.raises(checkpoint.CheckpointError, match=f"cannot read the digests {digests_file}"):
    ckpt.restore(1, target)
  digests_file.rename(digests_file.with_name("process_0-of-2.json"))  # process 1's file lost
  with pytest.raises(checkpoint.CheckpointError, match=r"digests: missing process_1-of-2\.json"):
    ckpt.restore(1, target)
  ckpt.close()
