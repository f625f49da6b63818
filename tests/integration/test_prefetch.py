"""training/prefetch.py: batches copied ahead, while the data state and counts stay those of the step."""

import jax
import ml_collections
import numpy as np
import pytest

from visionfm_jax import parallel
from visionfm_jax.training import prefetch


class _Counting:
  """Batch i holds i; the state is the number of batches read; one record in three is 'skipped'."""

  def __init__(self):
    self.position = self.read = self.skipped = 0

  def __next__(self):
    self.position += 1
    self.read += 3
    self.skipped += 1
    return {"x": np.full((8, 2), self.position, np.float32)}

  def get_state(self):
    return str(self.position).encode()


def _batch_sharding():
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
  return parallel.batch_sharding(mesh)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_state_and_counts_are_those_of_the_last_batch_handed_out(depth):
  sharding = _batch_sharding()
  source = _Counting()
  batches = prefetch.DevicePrefetch(source, sharding, depth)
  for i in range(1, 5):
    batch = next(batches)
    assert isinstance(batch["x"], jax.Array) and batch["x"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["x"]), i)
    assert source.position == i + depth  # read ahead ...
    assert batches.get_state() == str(i).encode() and (batches.read, batches.skipped) == (3 * i, i)  # ... not seen


def test_an_iterator_without_counts_has_none_through_the_prefetch():
  class Plain:
    def __next__(self):
      return {"x": np.zeros((8, 2), np.float32)}

    def get_state(self):
      return b""

  sharding = _batch_sharding()
  batches = prefetch.DevicePrefetch(Plain(), sharding, 2)
  next(batches)
  assert not hasattr(batches, "skipped") and not hasattr(batches, "read")


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_copies_of_depth_batches_ahead_are_started_through_parallel(monkeypatch, depth):
  """The prefetch asks parallel/ (no task) how a host batch becomes a global one, and starts those copies ahead:
  when batch i is handed out, the copies of batches 1 .. i + depth have been issued, in order, with the run's
  sharding, and the handed-out array is the one its copy made (nothing is copied again at hand-out)."""
  assert prefetch.host_to_global is parallel.host_to_global
  sharding = _batch_sharding()
  copies = []  # (batch number, sharding, global array) of every host-to-device copy, as issued
  make_array = jax.make_array_from_process_local_data

  def recorded(target, local, *args, **kwargs):
    out = make_array(target, local, *args, **kwargs)
    copies.append((int(local[0, 0]), target, out))
    return out

  monkeypatch.setattr(jax, "make_array_from_process_local_data", recorded)
  batches = prefetch.DevicePrefetch(_Counting(), sharding, depth)
  assert not copies  # nothing is read before the first batch is asked for
  for i in range(1, 5):
    batch = next(batches)
    assert [number for number, _, _ in copies] == list(range(1, i + depth + 1))
    assert all(target == sharding for _, target, _ in copies)
    assert batch["x"] is copies[i - 1][2]
