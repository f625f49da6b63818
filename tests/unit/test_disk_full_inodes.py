"""A disk full by inodes is named as such (not as 'No space left on device', which reads as bytes), is refused
before a save that would run out of them, and leaves nothing half-written: the write probe goes whatever fails,
and the temporary directory of a save that failed is removed at the next start with a warning naming it."""

import errno
import logging
import os

import grain
import numpy as np
import pytest

from visionfm_jax.errors import WorkdirError
from visionfm_jax.training.checkpoint import Checkpointer
from visionfm_jax.training.infra import workdir


def _inodes(monkeypatch, free, files=None, when=lambda: True):
  """os.statvfs with `free` inodes left (of `files`, the real count unless given) while `when()` holds."""
  real_statvfs = os.statvfs

  def statvfs(path):
    stats = real_statvfs(path)
    if not when():
      return stats
    total = stats.f_files if files is None else files
    return os.statvfs_result((*stats[:5], total, free, free, *stats[8:]))

  monkeypatch.setattr(workdir.os, "statvfs", statvfs)


def _mount_of(path) -> str:
  mount = os.path.realpath(path)
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  return mount


def test_an_enospc_without_a_free_inode_is_named_as_inodes(tmp_path, monkeypatch):
  enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "gone" / "file"))
  assert "No space left on device (errno ENOSPC" in str(workdir.storage_error("cannot write to", tmp_path, enospc))
  _inodes(monkeypatch, free=0)
  assert str(workdir.storage_error("cannot write to", tmp_path, enospc)) == (
    f"cannot write to {tmp_path}: no free inodes on {_mount_of(tmp_path)} (df -i) (errno ENOSPC, writing "
    f"{tmp_path}/gone/file)"
  )
  _inodes(monkeypatch, free=0, files=0)  # a file system without an inode count (btrfs): bytes ran out
  assert "No space left on device" in str(workdir.storage_error("cannot write to", tmp_path, enospc))


def test_a_save_is_refused_before_it_runs_out_of_inodes(tmp_path, monkeypatch):
  needed = workdir.inodes_needed()
  assert needed <= 300  # a checkpoint's files: 27 for a pico state on one process
  _inodes(monkeypatch, free=needed - 1)
  with pytest.raises(
    WorkdirError,
    match=rf"^no room for a checkpoint in {tmp_path}: {needed - 1} free inodes on "
    rf"{_mount_of(tmp_path)} \(df -i\), one checkpoint writes up to about "
    rf"{needed} files \(errno ENOSPC\)$",
  ):
    workdir.check_storage(tmp_path, 1000)
  _inodes(monkeypatch, free=0)
  with pytest.raises(WorkdirError, match=r": no free inodes on .* \(df -i\)"):
    workdir.check_room(tmp_path, 1000)
  _inodes(monkeypatch, free=needed)
  workdir.check_storage(tmp_path, 1000)
  _inodes(monkeypatch, free=0, files=0)  # no inode count: nothing to check
  workdir.check_storage(tmp_path, 1000)


def test_the_write_probe_is_removed_when_its_write_fails(tmp_path, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(workdir.os, "fsync", full)
  with pytest.raises(WorkdirError, match=rf"^cannot write to {tmp_path}: No space left on device \(errno ENOSPC"):
    workdir.check_writable(tmp_path)
  assert os.listdir(tmp_path) == []


def test_a_save_out_of_inodes_is_named_so_and_its_leftovers_go_at_the_next_start_with_a_warning(
  tmp_path, monkeypatch, caplog
):
  """Step 2's save fails with ENOSPC inside Orbax (grain's handler creating its file) once the inodes run out:
  the error names inodes; its temporary directory stays beside the committed step 1 until the next Checkpointer
  on the directory names it in a warning and Orbax removes it before the next save."""
  directory = tmp_path / "checkpoints"
  state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(4, np.float32)}
  checkpointer = Checkpointer(str(directory), async_save=False)
  checkpointer.save(1, state)
  checkpointer.wait()

  full = []
  save = grain.checkpoint.CheckpointHandler.save

  def out_of_inodes(self, path, *args, **kwargs):
    if "2.orbax-checkpoint-tmp" in str(path):
      full.append(True)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "process_0-of-1.json"))
    return save(self, path, *args, **kwargs)

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", out_of_inodes)
  _inodes(monkeypatch, free=0, when=lambda: bool(full))

  class Iterator:
    def get_state(self):
      return {"position": 2}

  with pytest.raises(
    WorkdirError,
    match=rf"^cannot save a checkpoint to {directory}: no free inodes on "
    rf"{_mount_of(tmp_path)} \(df -i\) \(errno ENOSPC, writing "
    rf"{directory}/2\.orbax-checkpoint-tmp",
  ):
    checkpointer.save(2, state, Iterator())
    checkpointer.wait()
  leftovers = sorted(name for name in os.listdir(directory) if ".orbax-checkpoint-tmp" in name)
  assert leftovers and all(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers)
  monkeypatch.undo()

  with caplog.at_level(logging.WARNING):
    checkpointer = Checkpointer(str(directory), async_save=False)
  assert (
    f"removing {len(leftovers)} unfinished save(s) from {directory}, left by a run that stopped while saving: "
    f"{', '.join(leftovers)}"
  ) in caplog.text
  checkpointer.save(3, state)
  checkpointer.close()
  assert sorted(os.listdir(directory)) == ["1", "3"]
