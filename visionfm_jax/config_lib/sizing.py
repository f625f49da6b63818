"""Fields a recipe leaves to the run: the value `SIZED` (-1), which the run replaces before anything reads the
config (training/sizing.py), logging a warning line that says what it chose and why.

  model.num_classes   the training data's class count, from its dataset.json (classification)
  optim.warmup_steps  a tenth of config.total_steps, rounded down
  eval_every          a sixth of config.total_steps, rounded up: six evaluations a run, the last at its end
  checkpoint_every    the same as eval_every

and config.eval.zeroshot_classes '' (no zero-shot) with a config.eval.zeroshot_source named becomes 'data': the
zero-shot images' own class names, from their dataset.json.

The sizes of a `:small` recipe are the machine's (`fill_machine`, MACHINE_RULES), each said on its warning line:

  model.image_size, data.image_size   224 px with a GPU; 64 without one
  global_batch_size                   128 with a GPU; without one 32, halved (down to 8) while a step would be
                                      over CPU_STEP_FLOPS
  total_steps                         3,000 with a GPU (1,000 from a checkpoint, config.init_from); without one,
                                      the steps of CPU_SECONDS at CPU_FLOPS_PER_S (10 to 300)
  eval_every                          without one, half of config.total_steps, rounded up: two evaluations a
                                      run (an evaluation on a CPU, CLIP's zero-shot over 80 templates and its
                                      retrieval, takes minutes: six would outlast the training)

So the same command trains a model worth evaluating on a GPU and finishes in minutes on a laptop's CPU.

So a recipe shortened or lengthened by `--config.total_steps=` alone keeps its warmup and cadence in proportion,
and a field given on the command line keeps the value given. The `:small` recipes (config_lib.small_data, the
ViT's class count) leave these to the run. The rules here need nothing but the config; the class count needs the
data, which the run reads (training/sizing.py).
"""

from __future__ import annotations

import math
from typing import Callable

import ml_collections

from visionfm_jax.config_lib.domains import COUNT, SIZED
from visionfm_jax.config_lib.schema import set_paths

NUM_CLASSES = "model.num_classes"
ZEROSHOT_FROM_DATA = "data"  # evaluate/zeroshot.py FROM_DATA


def _tenth(total: int) -> int:
  return total // 10


def _sixth(total: int) -> int:
  return -(-total // 6)


# dotted field -> (its value for a run of `total_steps`, the rule in words)
STEP_RULES = {
  "optim.warmup_steps": (_tenth, "a tenth of config.total_steps"),
  "eval_every": (_sixth, "a sixth of config.total_steps, rounded up"),
  "checkpoint_every": (_sixth, "a sixth of config.total_steps, rounded up"),
}


def _get(config: ml_collections.ConfigDict, path: str):
  node = config
  for key in path.split("."):
    if key not in node:
      return None
    node = node[key]
  return node


def is_sized(config: ml_collections.ConfigDict, path: str) -> bool:
  """True when the dotted field `path` of `config` holds SIZED: the run fills it."""
  return _get(config, path) == SIZED


def fill_value(config: ml_collections.ConfigDict, path: str, value, why: str) -> str:
  """Sets the field `path`, left to the run, to `value` in place; returns the line that says so
  ('config.eval_every=-1 is 7: a sixth of config.total_steps=40, rounded up')."""
  before = _get(config, path)
  set_paths(config, {path: value})
  return f"config.{path}={before!r} is {value!r}: {why}"


def fill_steps(config: ml_collections.ConfigDict) -> list[str]:
  """Fills the SIZED step fields of `config` (STEP_RULES) in place from config.total_steps; returns a line for
  each, saying what it chose; none while total_steps is not a count (its check names it)."""
  total = config.total_steps
  if not COUNT.contains(total):
    return []
  return [
    fill_value(config, path, rule(total), why.replace("config.total_steps", f"config.total_steps={total}"))
    for path, (rule, why) in STEP_RULES.items()
    if is_sized(config, path)
  ]


# dotted field -> (its value with a GPU, without one)
MACHINE_RULES = {"model.image_size": (224, 64), "data.image_size": (224, 64)}
GPU_BATCH, CPU_BATCH, CPU_MIN_BATCH = 128, 32, 8
GPU_STEPS, GPU_STEPS_FROM_A_CHECKPOINT = 3000, 1000
CPU_FLOPS_PER_S = 2e10  # what 2 shared cores sustain on ViT-S/16 at 64 px (docs/your_data.md)
CPU_SECONDS = 240.0
CPU_STEP_FLOPS = 15 * CPU_FLOPS_PER_S
CPU_STEPS = (10, 300)
MACHINE_FIELDS = (*MACHINE_RULES, "global_batch_size", "total_steps")


def fill_machine(
  config: ml_collections.ConfigDict,
  accelerator: str | None,
  flops_per_example: Callable[[ml_collections.ConfigDict], float | None],
) -> list[str]:
  """Fills the SIZED sizes of `config` (the module's docstring) in place for a machine with `accelerator` ('gpu',
  'tpu') or none; `flops_per_example(config)`, once the image size is set: a training example's FLOPs (None where
  the model has no count: a CPU then takes its longest steps). Returns a line for each field it set."""
  where = f"this machine has a {accelerator.upper()}" if accelerator else "this machine has no GPU"
  lines = [
    fill_value(
      config,
      path,
      gpu if accelerator else cpu,
      f"{where} ({cpu} without one)" if accelerator else f"{where} ({gpu} with one)",
    )
    for path, (gpu, cpu) in MACHINE_RULES.items()
    if is_sized(config, path)
  ]
  if not (is_sized(config, "global_batch_size") or is_sized(config, "total_steps")):
    return lines
  flops = None if accelerator else flops_per_example(config)
  if is_sized(config, "global_batch_size"):
    lines.append(fill_value(config, "global_batch_size", *_batch(accelerator, flops, where)))
  if is_sized(config, "total_steps"):
    lines.append(fill_value(config, "total_steps", *_steps(config, accelerator, flops, where)))
  if not accelerator and is_sized(config, "eval_every") and COUNT.contains(config.total_steps):
    lines.append(
      fill_value(
        config,
        "eval_every",
        -(-config.total_steps // 2),
        f"{where}: half of config.total_steps={config.total_steps}, rounded up, two evaluations "
        f"a run (a sixth with one)",
      )
    )
  return lines


def _batch(accelerator: str | None, flops: float | None, where: str) -> tuple[int, str]:
  if accelerator:
    return GPU_BATCH, f"{where} ({CPU_BATCH} or fewer without one)"
  batch = CPU_BATCH
  while flops and batch > CPU_MIN_BATCH and flops * batch > CPU_STEP_FLOPS:
    batch //= 2
  if not flops:
    return batch, f"{where} ({GPU_BATCH} with a GPU)"
  return batch, (
    f"{where}: examples of {flops / 1e9:,.1f} GFLOP, at most {CPU_STEP_FLOPS / CPU_FLOPS_PER_S:.0f} s a "
    f"step at {CPU_FLOPS_PER_S / 1e9:.0f} GFLOP/s ({GPU_BATCH} with a GPU)"
  )


def _steps(
  config: ml_collections.ConfigDict, accelerator: str | None, flops: float | None, where: str
) -> tuple[int, str]:
  gpu = GPU_STEPS_FROM_A_CHECKPOINT if config.init_from else GPU_STEPS
  gpu_why = f"{gpu:,} with a GPU{' from a checkpoint (config.init_from)' if config.init_from else ''}"
  if accelerator:
    return gpu, (
      f"{where}{' and config.init_from starts from a checkpoint' if config.init_from else ''} (without "
      f"a GPU: the steps a CPU trains in about {CPU_SECONDS / 60:.0f} minutes)"
    )
  if not flops or not COUNT.contains(config.global_batch_size):
    return CPU_STEPS[1], f"{where} ({gpu_why})"
  fits = math.floor(CPU_SECONDS * CPU_FLOPS_PER_S / (flops * config.global_batch_size))
  steps = min(max(fits, CPU_STEPS[0]), CPU_STEPS[1])
  return steps, (
    f"{where}: about {CPU_SECONDS / 60:.0f} minutes at {CPU_FLOPS_PER_S / 1e9:.0f} GFLOP/s, steps of "
    f"{config.global_batch_size} examples of {flops / 1e9:,.1f} GFLOP each ({CPU_STEPS[0]} to "
    f"{CPU_STEPS[1]}; {gpu_why})"
  )


def fill_zeroshot(config: ml_collections.ConfigDict) -> list[str]:
  """config.eval.zeroshot_classes '' with a zeroshot_source named: 'data' in place (the names of the source's
  dataset.json; evaluate/zeroshot.py reads them); returns the line that says so, or none."""
  eval_cfg = config.get("eval")
  if (
    eval_cfg is None
    or "zeroshot_classes" not in eval_cfg
    or eval_cfg.zeroshot_classes
    or not (eval_cfg.zeroshot_source)
  ):
    return []
  return [
    fill_value(
      config,
      "eval.zeroshot_classes",
      ZEROSHOT_FROM_DATA,
      f"config.eval.zeroshot_source={eval_cfg.zeroshot_source!r} names no classes file: the class "
      f"names of its dataset.json",
    )
  ]
