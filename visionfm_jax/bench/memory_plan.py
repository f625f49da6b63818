r"""Per-device memory of a config's train step on a simulated mesh, from shapes only (nothing is allocated):

  python -m visionfm_jax.bench.memory_plan --config=configs/swinv2_g_clip.py --devices=128 [--hbm_gib=80]

The step is train.py's, lowered for `--devices` simulated CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count; the tool re-executes itself with it when the process has fewer
devices) and compiled ahead of time. XLA's buffer assignment of the partitioned program then gives what one
device holds: the train state's shard (arguments; the donated state is reused for the new one), the batch
shard, and the temporaries (activations saved for the backward pass under the config's remat policy,
gathered parameters, gradients, collectives' buffers). The CPU compiler schedules and fuses differently from
the GPU one, so read the temporaries as an estimate (within tens of percent); the state bytes are exact.

Prints a table and, last, one JSON object: state_bytes (analytic, parallel.memory), argument/output/alias/temp
bytes as compiled, total_bytes (arguments + outputs - aliased + temporaries), and whether it fits `--hbm_gib`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from visionfm_jax.errors import ConfigError
from visionfm_jax.tools import cli

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
GIB = 2 ** 30


def make_flags(argv) -> flags.FlagValues:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.", lock_config=True,
                                  flag_values=fv, sys_argv=list(argv))
  flags.DEFINE_integer("devices", 8, "Simulated devices of the mesh (config.mesh resolves against them).",
                       flag_values=fv)
  flags.DEFINE_float("hbm_gib", 80.0, "Device memory to check the plan against, GiB.", flag_values=fv)
  return fv


def ensure_devices(count: int, argv) -> None:
  """Re-executes this tool with `count` simulated CPU devices unless JAX already has them. Must run before
  anything initialises a JAX backend."""
  flag = f"{DEVICE_COUNT_FLAG}={count}"
  if flag in os.environ.get("XLA_FLAGS", ""):
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() >= count:
    return
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(), JAX_PLATFORMS="cpu")
  os.execve(sys.executable, [sys.executable, "-m", "visionfm_jax.bench.memory_plan", *argv[1:]], env)


def plan(config, devices: int) -> dict:
  """Compiles `config`'s train step for the first `devices` devices; returns the per-device byte counts."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from visionfm_jax import config_lib, parallel, tasks  # pylint: disable=g-import-not-at-top

  from visionfm_jax.training import optim, train

  if jax.device_count() < devices:
    raise ConfigError(f"--devices={devices}: this process has {jax.device_count()} devices")
  config_lib.validate(config, devices)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:devices])
  task = tasks.build(config, mesh)
  batch = task.synthetic_batch(1, np.random.default_rng(0))
  batch = {k: jax.ShapeDtypeStruct((config.global_batch_size,) + v.shape[1:], v.dtype) for k, v in batch.items()}
  tx = optim.make_optimizer(config.optim, config.total_steps, task.model)
  abstract_boxed = jax.eval_shape(train.make_init_fn(task, tx, config), jax.random.key(0))
  mesh_shape = parallel.mesh_shape(config.mesh, devices)
  state = parallel.bytes_per_device(abstract_boxed, mesh_shape, config.strategy)
  analysis = train.compile_train_step(config, mesh, batch, task).memory_analysis()
  out = {"devices": devices, "mesh": mesh_shape, "strategy": config.strategy,
         "global_batch": config.global_batch_size, "grad_accum_steps": config.grad_accum_steps,
         "remat_policy": config.model.remat_policy, "compute_dtype": config.precision.compute_dtype,
         "state_params_bytes": state["params"], "state_opt_bytes": state["opt_state"],
         "argument_bytes": analysis.argument_size_in_bytes, "output_bytes": analysis.output_size_in_bytes,
         "alias_bytes": analysis.alias_size_in_bytes, "temp_bytes": analysis.temp_size_in_bytes}
  out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def _body(fv, rest):
  del rest
  if fv.config is None:
    raise ConfigError("--config is required")
  result = plan(fv.config, fv.devices)
  result["hbm_bytes"] = int(fv.hbm_gib * GIB)
  result["fits"] = result["total_bytes"] <= result["hbm_bytes"]
  for key in ("state_params_bytes", "state_opt_bytes", "argument_bytes", "output_bytes", "alias_bytes",
              "temp_bytes", "total_bytes"):
    print(f"{key:>20}: {result[key] / GIB:9.2f} GiB")
  print(f"{'fits':>20}: {result['fits']} ({fv.hbm_gib:g} GiB per device, mesh {result['mesh']}, "
        f"{result['strategy']}, batch {result['global_batch']} / {result['grad_accum_steps']} micro-batches)")
  print(json.dumps(result, sort_keys=True))


def main(argv) -> int:
  fv = make_flags(argv)
  if not any(a in cli.HELP_FLAGS for a in argv[1:]):
    try:
      fv(list(argv))
      ensure_devices(fv.devices, argv)
    except flags.Error:
      pass  # cli.run reports it
  return cli.run(argv, make_flags(argv), __doc__, _body)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
