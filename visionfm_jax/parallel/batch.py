"""How a global batch lies on the mesh: split over the data-parallel axes (data, fsdp), the same rows on every
`tensor` device, and assembled from each process's rows; its sizes derived once (`BatchGeometry`)."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
  """The sizes of a run's batch, derived once from the config, the mesh and the process count (training/plan.py
  holds the run's): `global_batch` examples a step, `per_process` of them loaded by each process,
  `accum_steps` micro-batches of `micro_batch` examples, each split over `data_parallel` devices."""

  global_batch: int
  per_process: int
  micro_batch: int
  accum_steps: int
  data_parallel: int

  @classmethod
  def of(cls, config, mesh_shape: dict[str, int], num_processes: int) -> BatchGeometry:
    """The geometry of config.global_batch_size in config.grad_accum_steps micro-batches on a mesh of
    `mesh_shape` over `num_processes` processes (parallel/checks.py checks that each split is whole)."""
    return cls(
      global_batch=config.global_batch_size,
      per_process=config.global_batch_size // num_processes,
      micro_batch=config.global_batch_size // config.grad_accum_steps,
      accum_steps=config.grad_accum_steps,
      data_parallel=data_parallel_size(mesh_shape),
    )

  @property
  def micro_batch_per_device(self) -> int:
    return self.micro_batch // self.data_parallel


def host_to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array split over the data-parallel axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
