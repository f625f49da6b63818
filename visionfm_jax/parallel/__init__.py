"""Device meshes (data, fsdp, tensor), global batches on them and the ZeRO-style sharding rules.

Its names are imported on first use (a module `__getattr__`), so that the launcher's coordination service
(`python -m visionfm_jax.parallel.coordination`, which needs JAX's native library only) starts without JAX, Flax
and this package's sharding code."""

import importlib

_EXPORTS = {
  "batch": (
    "BATCH_AXES",
    "BATCH_SPEC",
    "BatchGeometry",
    "batch_axes_of",
    "batch_sharding",
    "data_parallel_size",
    "host_to_global",
  ),
  "memory": ("bytes_per_device", "tree_bytes_per_device"),
  "mesh": ("AXES", "data_mesh", "make_mesh", "mesh_shape"),
  "sharding": (
    "STRATEGY_SHARDS",
    "activation_mesh",
    "activation_rules",
    "activation_sharding",
    "batch_local",
    "constrain_to",
    "device_local",
    "grad_specs",
    "map_with_names",
    "param_specs",
    "partition_spec",
    "shard_shape",
    "state_specs",
    "tree_specs",
    "Overrides",
    "Partitioned",
    "unbox",
  ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name in _EXPORTS:  # a submodule, which importing the package once brought in
    return importlib.import_module(f"{__name__}.{name}")
  module = _MODULE_OF.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
