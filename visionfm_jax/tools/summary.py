r"""Parameter counts and per-device state bytes of a config, from shapes only (no weights allocated).

  python -m visionfm_jax.tools.summary --config=configs/vit_huge.py [--devices=8] [--strategy=zero3|all]

Prints parameters per top-level module, `total_params=<int>`, a table of the bytes one device holds of params,
gradients and optimizer state under the strategy (every strategy with `--strategy=all`) on a mesh of N
devices, and for one strategy the bytes of its whole train state per device, `state_bytes_per_device=<int>`.
Any config field is overridable (`--config.model.num_classes=0`). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from visionfm_jax import cli, config_lib, parallel, tasks
from visionfm_jax.errors import UserError
from visionfm_jax.parallel.sharding import unbox
from visionfm_jax.training import checks, optim, sizing
from visionfm_jax.training import step as step_lib
from visionfm_jax.training.dry_run import human_bytes

ALL_STRATEGIES = config_lib.ZERO_STAGES  # each stage once, not its aliases


def make_flags(argv: Sequence[str]) -> flags.FlagValues:
  """This tool's flags, on their own FlagValues (the `--config.<field>` overrides `argv` names included)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant'.", lock_config=True, flag_values=fv, sys_argv=list(argv)
  )
  flags.DEFINE_integer("devices", 1, "Number of (simulated) devices for the per-device bytes.", flag_values=fv)
  flags.DEFINE_string(
    "strategy", None, f"{' | '.join(config_lib.STRATEGIES)} | all; default: the config's.", flag_values=fv
  )
  return fv


def params_by_module(abstract_params) -> dict[str, int]:
  return {name: sum(math.prod(x.shape) for x in jax.tree.leaves(sub)) for name, sub in abstract_params.items()}


def state_bytes_per_device(
  abstract_boxed_state, mesh_shape: dict[str, int], strategy: str, optimizer_over_data: bool = False, overrides=()
) -> int:
  """Bytes of one device's shard of every train-state leaf under `strategy` (`optimizer_over_data`, `overrides`:
  the config's)."""
  specs = parallel.state_specs(abstract_boxed_state, mesh_shape, strategy, optimizer_over_data, overrides)
  return parallel.tree_bytes_per_device(unbox(abstract_boxed_state), specs, mesh_shape)


def summarize(config, devices: int, strategy: str) -> dict:
  """Sizes from shapes only. `per_device`: {strategy: parallel.bytes_per_device} for `strategy`, or for every
  strategy when it is 'all' (then there is no `state_bytes_per_device`)."""
  sizing.fill(config)  # the fields the recipe leaves to the run
  config_lib.check_domains(config)  # the --config.* overrides
  task = tasks.build(config)
  tx, _ = optim.fresh_optimizer(config, task.model)
  abstract_boxed = jax.eval_shape(step_lib.make_init_fn(task, tx, config), jax.random.key(0))
  params = unbox(abstract_boxed.params)
  modules = params_by_module(params)
  mesh_shape = parallel.mesh_shape(config.mesh, devices)
  total_state = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(unbox(abstract_boxed)))
  strategies = ALL_STRATEGIES if strategy == "all" else (strategy,)
  out = dict(
    modules=modules,
    total_params=sum(modules.values()),
    mesh=mesh_shape,
    state_bytes=total_state,
    per_device={
      s: parallel.bytes_per_device(abstract_boxed, mesh_shape, s, config.optimizer_over_data, config.sharding.overrides)
      for s in strategies
    },
  )
  if strategy != "all":
    out["state_bytes_per_device"] = state_bytes_per_device(
      abstract_boxed, mesh_shape, strategy, config.optimizer_over_data, config.sharding.overrides
    )
  return out


def bytes_table(per_device: dict[str, dict[str, int]]) -> list[str]:
  """One row per strategy: bytes per device of params, gradients, optimizer state and their total."""
  columns = ("params", "grads", "opt_state", "total")
  rows = [("strategy",) + columns] + [(s,) + tuple(human_bytes(b[c]) for c in columns) for s, b in per_device.items()]
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return [
    "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    for row in rows
  ]


def _main(fv, rest: list[str]) -> None:
  cli.check_args(fv, rest, ("config",))
  config = fv.config
  checks.validate(config)
  strategy = fv.strategy or config.strategy
  if strategy not in parallel.STRATEGY_SHARDS and strategy != "all":
    raise UserError(f"--strategy={strategy!r}: expected one of {sorted(parallel.STRATEGY_SHARDS)} or 'all'")
  if fv.devices < 1:
    raise UserError(f"--devices={fv.devices}: expected a positive number")
  s = summarize(config, fv.devices, strategy)
  width = max(len(k) for k in s["modules"])
  for name, count in s["modules"].items():
    print(f"{name:<{width}}  {count:>15,}")
  print(f"total_params={s['total_params']}")
  print(f"mesh={s['mesh']} strategy={strategy}")
  print(f"state_bytes_total={s['state_bytes']}  ({human_bytes(s['state_bytes'])})")
  print("bytes per device (gradients as the train step lays them out):")
  for line in bytes_table(s["per_device"]):
    print(f"  {line}")
  if "state_bytes_per_device" in s:
    print(f"state_bytes_per_device={s['state_bytes_per_device']}  ({human_bytes(s['state_bytes_per_device'])})")


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), prints the summary; returns the exit status."""
  return cli.run(argv, make_flags(argv), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
