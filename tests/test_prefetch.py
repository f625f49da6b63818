"""training/prefetch.py: batches copied ahead, while the data state and counts stay those of the step."""

import pathlib

import jax
import numpy as np
import pytest
import ml_collections

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


def test_the_prefetch_places_batches_with_no_task():
  """Training asks parallel/ (not tasks/) how a host batch becomes a global one."""
  assert "visionfm_jax.tasks" not in pathlib.Path(prefetch.__file__).read_text()
