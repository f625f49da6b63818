"""The batch and mesh checks between fields (training/checks.py runs them with the other owners'): the global
batch against its micro-batches, and, once the device and process counts are known, against the mesh."""

from __future__ import annotations

from visionfm_jax import config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.parallel.batch import BatchGeometry
from visionfm_jax.parallel.mesh import mesh_shape


def check_batch(config) -> None:
  """ConfigError when config.global_batch_size does not split into config.grad_accum_steps micro-batches, or
  config.accumulate_unreduced or config.optimizer_over_data asks for what its strategy or mesh cannot give."""
  if config.optimizer_over_data and config_lib.STRATEGY_ALIASES.get(config.strategy, config.strategy) == "ddp":
    raise ConfigError(
      f"config.optimizer_over_data=True splits the optimizer state over data x fsdp; "
      f"config.strategy={config.strategy!r} keeps it whole (use zero1, zero2 or zero3)"
    )
  if config.global_batch_size % config.grad_accum_steps:
    raise ConfigError(
      f"config.global_batch_size={config.global_batch_size} is not divisible by "
      f"config.grad_accum_steps={config.grad_accum_steps}"
    )
  if config.accumulate_unreduced:
    if config_lib.STRATEGY_ALIASES.get(config.strategy, config.strategy) == "zero3":
      raise ConfigError(
        f"config.accumulate_unreduced=True needs each device to hold the whole params; "
        f"config.strategy={config.strategy!r} shards them (use zero2, zero1 or ddp)"
      )
    if config.mesh.tensor != 1:
      raise ConfigError(
        f"config.accumulate_unreduced=True computes each device's rows alone; "
        f"config.mesh.tensor={config.mesh.tensor} splits them (set it to 1)"
      )


def check_mesh(config, num_devices: int, num_processes: int = 1) -> dict[str, int]:
  """The mesh shape of config.mesh over `num_devices` devices in `num_processes` processes; ConfigError when the
  mesh does not fit them, a micro-batch does not divide over its data-parallel devices, or its batch axes do
  not split over the processes."""
  shape = mesh_shape(config.mesh, num_devices)
  batch = BatchGeometry.of(config, shape, num_processes)
  if batch.micro_batch % batch.data_parallel:
    raise ConfigError(
      f"config.global_batch_size={config.global_batch_size} / config.grad_accum_steps={config.grad_accum_steps} "
      f"= {batch.micro_batch} examples per micro-batch do not divide over the {batch.data_parallel} "
      f"data-parallel devices (mesh {shape})"
    )
  # Each process loads its 1/P of the batch (training/train.py), which is its devices' rows only when the batch
  # axes split over the processes: a tensor axis wider than a process would put one row on several of them.
  if batch.data_parallel % num_processes:
    raise ConfigError(
      f"config.mesh={shape}: the data x fsdp = {batch.data_parallel} batch shards do not divide over the "
      f"{num_processes} processes (each loads its own share of the batch); keep config.mesh.tensor within a "
      f"process ({num_devices // num_processes} devices)"
    )
  return shape
