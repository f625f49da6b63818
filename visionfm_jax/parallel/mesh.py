"""The device mesh: axes (data, fsdp, tensor).

Devices are ordered by (process index, device id) and reshaped row-major, so the trailing axes (tensor, then fsdp)
stay within a host when they fit: put the sharded-state axis (fsdp) within a node and the replica axis
(data) across nodes, the hybrid layout of HSDP / ZeRO++.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh
import numpy as np

from visionfm_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves the config's axis sizes (one of them may be -1) against the device count."""
  sizes = {axis: int(mesh_cfg[axis]) for axis in AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f"config.mesh={sizes}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"config.mesh={sizes}: sizes must be positive or -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if num_devices % known:
      raise ConfigError(
        f"config.mesh={sizes}: the fixed axes ({known} devices) do not divide the {num_devices} devices"
      )
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"config.mesh={sizes} needs {math.prod(sizes.values())} devices but {num_devices} are present")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  devices.sort(key=lambda d: (d.process_index, d.id))
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.array(devices, dtype=object).reshape([shape[a] for a in AXES]), AXES)


def data_mesh(devices=None) -> Mesh:
  """Every device (or those of `devices`) on the data axis: each batch split across them, the params replicated;
  the mesh of the tools that run a trained model."""
  return make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
