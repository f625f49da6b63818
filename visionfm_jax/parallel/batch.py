"""How a global batch lies on the mesh: split over the data-parallel axes (data, fsdp), the same rows on every
`tensor` device, and assembled from each process's rows."""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

BATCH_AXES = ("data", "fsdp")
BATCH_SPEC = P(BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def batch_axes_of(mesh: Mesh) -> tuple[str, ...]:
  """The `BATCH_AXES` that `mesh` has (a shard_map over a mesh of fewer axes splits the batch over those)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh_shape: dict[str, int]) -> int:
  """The number of devices a global batch is split over."""
  return math.prod(mesh_shape[a] for a in BATCH_AXES)


def host_to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array split over the data-parallel axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
