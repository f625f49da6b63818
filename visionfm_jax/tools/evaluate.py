r"""Runs a checkpoint's evaluators without training: the ones the training loop runs every eval_every steps.

  python -m visionfm_jax.tools.evaluate --checkpoint=DIR [--step=N] [--batch_size=256] [--out=FILE]
      [--config.<field>=V ...]

DIR is a training workdir (config.json + checkpoints/<step>; the newest unless --step) of any task, a
tools.import_hf directory of a CLIP, or a transformers CLIPModel directory (config.json + model.safetensors +
tokenizer.json; trained/loader.py). The evaluators are the task's (`task.evaluators`): for a CLIP
ImageNet zero-shot top-1 / top-5 with OpenAI's names and templates, retrieval on held-out pairs, the
config.eval.retrieval_benchmarks and the config.eval.zeroshot_benchmarks (ImageNet-V2, -Sketch, -R, -A:
`eval/zeroshot_<name>/top1`); for a classifier top-1 on its eval split and the probes; and so on: the sets the
checkpoint's config names, and those the command adds. An imported or raw CLIP's config is the contrastive
defaults (`trained.clip_config.task_config`): zero-shot on `tfds:imagenet2012` validation (all 50,000) and no retrieval
set unless the command names one, e.g. `--config.eval.zeroshot_source=...
--config.eval.retrieval_benchmarks="(('coco', 'coco_karpathy:/data/coco'),)"`, or held-out pairs with
`--config.eval.retrieval=true --config.data.eval_source=arrayrecord:/data/pairs/{split}-*.array_record`.

Prints one line per metric (`eval/<name>/<metric>=value`, as training logs them), then one JSON line; --out
also writes that JSON to FILE. The params are replicated on every device (the model must fit on one), each
batch split across all devices. Errors print one line naming the culprit and exit with status 2. A workdir's
newest checkpoint whose params are damaged (unreadable, or failing their digests) gives way to the newest whose
params are intact, with one warning naming the damaged part and the step taken; a damaged --step is an error. A
checkpoint whose other parts (the optimiser state, the step, the EMA) fail their digests is evaluated with one
warning naming them: a resume would skip it.
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

from visionfm_jax import atomic, cli, config_lib, parallel
from visionfm_jax.errors import UserError
from visionfm_jax.parallel import distributed
from visionfm_jax.trained import loader
from visionfm_jax.training import evaluation as evaluation_lib
from visionfm_jax.training import stored


def make_flags(config=None, argv: Sequence[str] = ()) -> flags.FlagValues:
  """This tool's flags, on their own FlagValues; `config` (the checkpoint's) adds the `--config.<field>`
  overrides that `argv` names."""
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, f"The model to evaluate: {loader.LAYOUTS}.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir; default: the newest.", flag_values=fv)
  flags.DEFINE_integer(
    "batch_size",
    256,
    "Examples per eval batch, over all devices (rounded up to a multiple of the device count).",
    flag_values=fv,
  )
  flags.DEFINE_string("out", None, "Also write the results as JSON to this file.", flag_values=fv)
  if config is not None:
    config_flags.DEFINE_config_dict(
      "config", config, "The checkpoint's config (overridable).", flag_values=fv, sys_argv=list(argv)
    )
  return fv


def run(config, path: str, *, step: int | None = None, batch_size: int = 256) -> dict[str, float]:
  """{'eval/<name>/<metric>': value, ..., 'step': the workdir's step or None} of the model at `path` under
  `config` (its own, overridden)."""
  if batch_size < 1:
    raise UserError(f"--batch_size={batch_size}: must be positive")
  config_lib.check_domains(config)  # the --config.* overrides
  mesh = parallel.data_mesh()
  batch_size = -(-batch_size // mesh.size) * mesh.size
  loaded = loader.load(path, step, NamedSharding(mesh, P()), config=config, mesh=mesh)
  if loaded.step is not None and jax.process_index() == 0:  # its params checked; the rest of the state too
    stored.warn_of_damaged_parts(loaded.origin, loaded.step)
  evaluation = evaluation_lib.build(loaded.task, mesh, batch_size, panel=False)
  if not evaluation.evaluators:
    raise UserError(f"--checkpoint={path}: its config runs no evaluators (see config.eval)")
  # Run as the training loop runs them: the same programs, which a persistent compile cache the run wrote
  # (JAX_COMPILATION_CACHE_DIR) then serves on the same devices instead of compiling them again.
  with parallel.activation_sharding(mesh):
    results = evaluation.of_params(loaded.params, loaded.step)
  return {**{name: float(value) for name, value in results.items()}, "step": loaded.step}


def _main(fv, rest: list[str]) -> None:
  cli.check_args(fv, rest, ("checkpoint",))
  results = run(fv.config, fv.checkpoint, step=fv.step, batch_size=fv.batch_size)
  for name, value in results.items():
    if name != "step":
      print(f"{name}={value:g}" if name.endswith("count") else f"{name}={value:.4f}")
  line = json.dumps(results)
  print(line)
  if fv.out and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(fv.out)), exist_ok=True)
    atomic.write(fv.out, line + "\n")


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), evaluates, prints the results; returns the exit status."""
  distributed.initialize()
  return cli.run_with_config(argv, loader.checkpoint_config, make_flags, __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
