"""GPU targets for compiling a step on a machine without the GPU (deviceless, ahead of time).

XLA's GPU compiler runs on any host: given a device description (`gpu_targets/<name>.txtpb`, XLA's
`GpuTargetConfigProto` text) and a topology, `jax.experimental.topologies` hands out abstract devices of that GPU
that `jit(...).lower(...).compile()` targets. The result is the program the GPU would run (its kernels, fusions,
collectives and their schedule, and the buffer assignment that decides its memory), minus autotuning: nothing is
timed without a device, so each GEMM keeps XLA's default algorithm.

XLA sizes its rematerialisation and its schedule to the memory the program may use: on a GPU, JAX passes the
allocator's limit (the GPU's memory x XLA_PYTHON_CLIENT_MEM_FRACTION) as the compile's device memory size; without
a device XLA would assume 80% of the GPU's memory. `launch_memory` passes the launch's figure, so that the
deviceless program is the one the job compiles.

This needs XLA's CUDA compiler, the `jax-cuda12-plugin` with its cuDNN and cuBLAS wheels matching the installed
jaxlib (`pip install -e '.[gpu-aot]'`). The host stays a CPU machine: the process runs with JAX_PLATFORMS=cpu and
the target's XLA flags (the launch script's, as a job on that GPU sets them), which `environment` supplies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re

from visionfm_jax import protowire
from visionfm_jax.errors import ConfigError, UserError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


@dataclasses.dataclass(frozen=True)
class Target:
  """One GPU: its XLA device description and the figures the roofline prices kernels with (vendor datasheets;
  bandwidths in bytes/s in one direction per GPU)."""

  name: str
  description: str
  peak_flops_16bit: float  # dense bf16 / fp16 tensor-core peak
  peak_flops_tf32: float  # fp32 products on tensor cores (XLA's default precision for fp32 dots on GPUs)
  peak_flops_fp8: float  # dense FP8 (e4m3 / e5m2) tensor-core peak; 0: no FP8 tensor cores
  memory_bandwidth: float  # HBM
  nvlink_bandwidth: float  # within a node
  network_bandwidth: float  # across nodes, per GPU (one NIC per GPU)
  memory_bytes: int  # what the CUDA driver reports (the txtpb's device_memory_size)
  gpus_per_node: int
  flags_script: str  # launch/ script whose XLA flags a job on this GPU runs with

  @property
  def spec_file(self) -> str:
    return os.path.join(HERE, "gpu_targets", f"{self.name}.txtpb")


TARGETS = {
  "h100": Target(
    "h100",
    "NVIDIA H100 SXM 80GB",
    989e12,
    494e12,
    1979e12,
    3.35e12,
    450e9,
    50e9,
    84929347584,
    8,
    "launch/xla_flags_h100.sh",
  ),
  "h200": Target(
    "h200",
    "NVIDIA H200 SXM 141GB",
    989e12,
    494e12,
    1979e12,
    4.8e12,
    450e9,
    50e9,
    150110011392,
    8,
    "launch/xla_flags_h100.sh",
  ),
  "a100": Target(
    "a100",
    "NVIDIA A100 SXM 80GB",
    312e12,
    156e12,
    0.0,
    2.039e12,
    300e9,
    25e9,
    85051572224,
    8,
    "launch/xla_flags_a100.sh",
  ),
}


def get(name: str, flag: str = "--target") -> Target:
  if name not in TARGETS:
    raise ConfigError(f"{flag}={name}: expected one of {sorted(TARGETS)}")
  return TARGETS[name]


def require_compiler(target: Target) -> None:
  """UserError unless XLA's CUDA compiler (the jax CUDA plugin) is installed."""
  if not any(importlib.util.find_spec(p.split(".")[0]) and importlib.util.find_spec(p) for p in PLUGINS):
    raise UserError(
      f"--target={target.name} compiles for a GPU with XLA's CUDA compiler, which is not installed: "
      f"pip install -e '.[gpu-aot]' (the jax CUDA plugin matching jaxlib, with its cuDNN and cuBLAS "
      f"wheels); no GPU is needed"
    )


def launch_flags(target: Target) -> list[str]:
  """The XLA flags that `target.flags_script` exports: every `--xla_...=value` in it and in the launch scripts it
  sources."""
  return _script_flags(os.path.join(REPO, target.flags_script), target)


def launch_memory_bytes(target: Target) -> int:
  """The device memory a job launched with `target.flags_script` may allocate: what the GPU reports times the
  script's default XLA_PYTHON_CLIENT_MEM_FRACTION (the rest is left to NCCL and the CUDA libraries)."""
  fractions = [
    float(f)
    for text in _script_texts(os.path.join(REPO, target.flags_script), target)
    for f in re.findall(r"XLA_PYTHON_CLIENT_MEM_FRACTION:-([0-9.]+)", text)
  ]
  if len(fractions) != 1:
    raise UserError(
      f"--target={target.name}: {target.flags_script} and the scripts it sources set "
      f"XLA_PYTHON_CLIENT_MEM_FRACTION's default {len(fractions)} times, expected once"
    )
  return int(target.memory_bytes * fractions[0])


def _script_flags(path: str, target: Target) -> list[str]:
  return [
    flag for text in _script_texts(path, target) for flag in re.findall(r"(?<![\w$])--xla_[a-z0-9_]+=[^\s\"')]*", text)
  ]


def _script_texts(path: str, target: Target) -> list[str]:
  """The text of a launch script and of the xla_flags scripts it sources, sourced ones first."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise UserError(
      f"--target={target.name}: cannot read its XLA flags from {path} ({e.strerror}); run from a "
      f"source checkout (pip install -e .)"
    ) from e
  texts = []
  for sourced in re.findall(r"^source .*?(xla_flags_\w+\.sh)", text, re.M):
    texts += _script_texts(os.path.join(os.path.dirname(path), sourced), target)
  return texts + [text]


def environment(target: Target, env: dict[str, str]) -> dict[str, str] | None:
  """The environment a deviceless compile for `target` runs in (CPU platform, the target's XLA flags), or None
  when `env` is it already."""
  flags = launch_flags(target)
  current = env.get("XLA_FLAGS", "")
  if env.get("JAX_PLATFORMS") == "cpu" and all(f in current.split() for f in flags):
    return None
  return dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([current] + flags).strip())


def topology_string(devices: int, gpus_per_node: int) -> str:
  """XLA's `<slices>x<hosts>x<devices per host>` for `devices` GPUs on nodes of `gpus_per_node`."""
  per_host = min(devices, gpus_per_node)
  if devices % per_host:
    raise ConfigError(f"--devices={devices}: not a whole number of {gpus_per_node}-GPU nodes")
  return f"1x{devices // per_host}x{per_host}"


def devices(target: Target, count: int) -> list:
  """`count` abstract devices of `target` on nodes of `target.gpus_per_node`, for meshes and shardings."""
  require_compiler(target)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  with open(target.spec_file, encoding="utf-8") as f:
    spec = f.read()
  topology = topologies.get_topology_desc(
    platform="cuda", target_config=spec, topology=topology_string(count, target.gpus_per_node)
  )
  return list(topology.devices)


@contextlib.contextmanager
def launch_memory(target: Target):
  """Within: JAX's compiles pass `launch_memory_bytes(target)` as the device memory size (module docstring), as JAX
  does on a GPU from its allocator's limit. For programs lowered within it (JAX keeps a lowering's executable, which
  a second compile outside would return), from one thread (it swaps a module function)."""
  from jax._src import compiler  # pylint: disable=g-import-not-at-top  (the one place JAX builds compile options)

  original = compiler.get_compile_options
  size = launch_memory_bytes(target)
  compiler.get_compile_options = lambda *a, **k: with_device_memory_size(original(*a, **k), size)
  try:
    yield
  finally:
    compiler.get_compile_options = original


def with_device_memory_size(options, size: int):
  """A copy of JAX's `CompileOptions` with `ExecutableBuildOptionsProto.device_memory_size` (field 15 of field 3 of
  `CompileOptionsProto`, XLA's pjrt/proto/compile_options.proto) set, which its Python binding does not expose: a
  message field given twice is merged into the first, so appending one that holds only this field sets it."""
  if size <= 0:
    raise ValueError(f"device memory size {size}: expected a positive byte count")
  device_memory_size = protowire.varint(15 << 3) + protowire.varint(size)
  return type(options).ParseFromString(options.SerializeAsString() + protowire.length_delimited(3, device_memory_size))
