r"""k-NN and linear-probe top-1 of a trained backbone's frozen features (evaluate/probe.py).

  python -m visionfm_jax.tools.probe --checkpoint=WORKDIR [--step=N] [--ema] [--batch_size=256]
      [--config.<field>=V ...]

WORKDIR (`--workdir` is the same flag) is a training workdir (config.json + checkpoints/<step>; the newest
checkpoint unless --step; its EMA of the params with --ema) of a run with a ViT or SwinV2: a classifier, a CLIP (its
image tower is probed), Aurora (its encoder) or a dense model (its backbone). The splits and the probes' settings are
the run's `config.probe` and `config.data`; any field can be overridden, e.g.
`--config.probe.train_examples=50000 --config.probe.source=tfds:imagenet2012`. Runs of configs from before
`config.probe` existed get its defaults.

Prints one line per metric, then one JSON line: {"knn/top1", "linear_probe/top1",
"linear_probe/train_objective", "train_examples", "eval_examples", "feature_dim", "step"}. With several
processes (jax.distributed, joined from the environment as visionfm_jax.main does) each process reads its
share of the splits and all print the same numbers. The params are replicated on every device (the model must
fit on one), each batch split across all devices. Errors print one line naming the culprit and exit with
status 2.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import flags
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from visionfm_jax import cli, config_lib, parallel, tasks
from visionfm_jax.errors import UserError
from visionfm_jax.evaluate import probe
from visionfm_jax.parallel import distributed
from visionfm_jax.tasks.base import EvalContext
from visionfm_jax.trained import workdir as workdir_lib


def make_flags(config=None, argv: Sequence[str] = ()) -> flags.FlagValues:
  """This tool's flags, on their own FlagValues; `config` (the run's) adds the `--config.<field>` overrides that
  `argv` names (AttributeError for a field the config does not have)."""
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "Training workdir (config.json + checkpoints/).", flag_values=fv)
  flags.DEFINE_alias("workdir", "checkpoint", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.", flag_values=fv)
  flags.DEFINE_bool(
    "ema",
    False,
    "Probe the checkpoint's EMA of the params (config.optim.ema_decay) instead of the params.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "batch_size",
    256,
    "Images per forward pass, over all devices (rounded up to a multiple of the device count).",
    flag_values=fv,
  )
  if config is not None:
    config_flags.DEFINE_config_dict(
      "config", config, "The run's config (overridable).", flag_values=fv, sys_argv=list(argv)
    )
  return fv


def load_config(workdir: str):
  config = workdir_lib.load_config(os.path.expanduser(workdir), tuple(tasks.TASKS), "a model of this project")
  if "probe" not in config:
    config.probe = config_lib.base_config().probe
  return config


def run(
  config, workdir: str, *, step: int | None = None, batch_size: int = 256, use_ema: bool = False
) -> dict[str, float]:
  """The probe results of `workdir`'s checkpoint (newest, or `step`; its EMA of the params with `use_ema`) under
  `config`."""
  if batch_size < 1:
    raise UserError(f"--batch_size={batch_size}: must be positive")
  config_lib.check_domains(config)  # the --config.* overrides
  workdir = os.path.expanduser(workdir)
  mesh = parallel.data_mesh()
  batch_size = -(-batch_size // mesh.size) * mesh.size
  task = tasks.build(config, mesh)
  step, params = workdir_lib.intact_params(task, workdir, step, sharding=NamedSharding(mesh, P()), use_ema=use_ema)
  ctx = EvalContext(mesh, batch_size, jax.process_index(), jax.process_count())
  feature_probe = probe.FeatureProbe(probe.pooled_features(task), config.probe, config.data, ctx)
  train, test = feature_probe.features(params, "train"), feature_probe.features(params, "eval")
  scores = feature_probe.score(train, test)
  return {
    "knn/top1": scores["knn"]["top1"],
    "linear_probe/top1": scores["linear_probe"]["top1"],
    "linear_probe/train_objective": scores["linear_probe"]["train_objective"],
    "train_examples": len(train[1]),
    "eval_examples": len(test[1]),
    "feature_dim": int(train[0].shape[1]),
    "step": step,
  }


def _main(fv, rest: list[str]) -> None:
  if rest:
    raise UserError(f"unexpected arguments {rest}")
  if not fv.checkpoint:
    raise UserError("--checkpoint (or --workdir): required (a training workdir)")
  results = run(fv.config, fv.checkpoint, step=fv.step, batch_size=fv.batch_size, use_ema=fv.ema)
  for name in ("knn/top1", "linear_probe/top1"):
    print(f"{name}={results[name]:.4f}")
  print(json.dumps(results))


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), prints the results; returns the exit status."""
  distributed.initialize()
  return cli.run_with_config(argv, load_config, make_flags, __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
