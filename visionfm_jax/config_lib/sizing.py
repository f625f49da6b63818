"""Fields a recipe leaves to the run: the value `SIZED` (-1), which the run replaces before anything reads the
config (training/sizing.py), logging a warning line that says what it chose and why.

  model.num_classes   the training data's class count, from its dataset.json (classification)
  optim.warmup_steps  a tenth of config.total_steps, rounded down
  eval_every          a sixth of config.total_steps, rounded up: six evaluations a run, the last at its end
  checkpoint_every    the same as eval_every

and config.eval.zeroshot_classes '' (no zero-shot) with a config.eval.zeroshot_source named becomes 'data': the
zero-shot images' own class names, from their dataset.json.

So a recipe shortened or lengthened by `--config.total_steps=` alone keeps its warmup and cadence in proportion,
and a field given on the command line keeps the value given. The `:small` recipes (config_lib.small_data, the
ViT's class count) leave these to the run. The rules here need nothing but the config; the class count needs the
data, which the run reads (training/sizing.py).
"""

from __future__ import annotations

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
  return [fill_value(config, path, rule(total), why.replace("config.total_steps", f"config.total_steps={total}"))
          for path, (rule, why) in STEP_RULES.items() if is_sized(config, path)]


def fill_zeroshot(config: ml_collections.ConfigDict) -> list[str]:
  """config.eval.zeroshot_classes '' with a zeroshot_source named: 'data' in place (the names of the source's
  dataset.json; evaluate/zeroshot.py reads them); returns the line that says so, or none."""
  eval_cfg = config.get("eval")
  if eval_cfg is None or "zeroshot_classes" not in eval_cfg or eval_cfg.zeroshot_classes or not (
      eval_cfg.zeroshot_source):
    return []
  return [fill_value(config, "eval.zeroshot_classes", ZEROSHOT_FROM_DATA,
                     f"config.eval.zeroshot_source={eval_cfg.zeroshot_source!r} names no classes file: the class "
                     f"names of its dataset.json")]
