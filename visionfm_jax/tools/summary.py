r"""Parameter counts and per-device state bytes of a config, from shapes only (no weights allocated).

  python -m visionfm_jax.tools.summary --config=configs/vit_huge.py [--devices=8] [--strategy=zero3]

Prints parameters per top-level module, `total_params=<int>`, and the bytes of params + optimizer state
that one device holds under the strategy on a mesh of N devices, `state_bytes_per_device=<int>`.
"""

from __future__ import annotations

import math
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from visionfm_jax import optim, parallel, tasks, train
from visionfm_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 1, "Number of (simulated) devices for the per-device bytes.")
_STRATEGY = flags.DEFINE_string("strategy", None, "ddp | zero1 | zero2 | zero3 | fsdp; default: the config's.")
flags.mark_flag_as_required("config")


def params_by_module(abstract_params) -> dict[str, int]:
  return {name: sum(math.prod(x.shape) for x in jax.tree.leaves(sub)) for name, sub in abstract_params.items()}


def state_bytes_per_device(abstract_boxed_state, mesh_shape: dict[str, int], strategy: str) -> int:
  """Bytes of one device's shard of every train-state leaf under `strategy`."""
  specs = parallel.state_specs(abstract_boxed_state, mesh_shape, strategy)
  unboxed = jax.tree.leaves(train.nn.unbox(abstract_boxed_state))
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  total = 0
  for leaf, spec in zip(unboxed, spec_leaves, strict=True):
    total += math.prod(parallel.shard_shape(leaf.shape, spec, mesh_shape)) * np.dtype(leaf.dtype).itemsize
  return total


def summarize(config, devices: int, strategy: str) -> dict[str, int]:
  task = tasks.build(config)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  abstract_boxed = jax.eval_shape(train.make_init_fn(task, tx, config), jax.random.key(0))
  params = train.nn.unbox(abstract_boxed.params)
  modules = params_by_module(params)
  mesh_shape = parallel.mesh_shape(config.mesh, devices)
  total_state = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(train.nn.unbox(abstract_boxed)))
  return dict(modules=modules, total_params=sum(modules.values()), mesh=mesh_shape, state_bytes=total_state,
              state_bytes_per_device=state_bytes_per_device(abstract_boxed, mesh_shape, strategy))


def main(argv):
  del argv
  config = _CONFIG.value
  strategy = _STRATEGY.value or config.strategy
  if strategy not in parallel.STRATEGY_SHARDS:
    print(f"error: --strategy={strategy!r}: expected one of {sorted(parallel.STRATEGY_SHARDS)}", file=sys.stderr)
    sys.exit(2)
  try:
    s = summarize(config, _DEVICES.value, strategy)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  width = max(len(k) for k in s["modules"])
  for name, count in s["modules"].items():
    print(f"{name:<{width}}  {count:>15,}")
  print(f"total_params={s['total_params']}")
  print(f"mesh={s['mesh']} strategy={strategy}")
  print(f"state_bytes_total={s['state_bytes']}")
  print(f"state_bytes_per_device={s['state_bytes_per_device']}")


if __name__ == "__main__":
  app.run(main)
