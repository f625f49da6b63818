"""What a change of a field from the checkpoint's config means for a resume (training/resume.py applies it)."""

from __future__ import annotations

import difflib
import re

import ml_collections

from visionfm_jax.config_lib.schema import fields
from visionfm_jax.errors import ConfigError

# What a change of a field from the checkpoint's config means for a resume (the first regex matching the dotted
# path whole): 'refused' (another model, task, precision or data: the checkpoint does not continue it),
# 'free' (how the run is laid out, logged or evaluated), else 'opt_in' (the schedule and the optimiser:
# accepted only when named in config.resume.allow_changes).
REFUSED, OPT_IN, FREE = "refused", "opt_in", "free"
RESUME_RULES: tuple[tuple[str, str], ...] = (
  # how a model computes, not what: its attention implementation and remat policy (same params, same numbers
  # up to rounding), e.g. a run moved from the CPU to GPUs or to a policy that fits another batch
  (r"model\.(\w+\.)?(attention|remat_policy|stage_remat_policies|stage_scan_unrolls|scan_unroll)", FREE),
  # the blocks' GEMMs in FP8 or not: the same params and state, another rounding of the products
  (r"precision\.gemm", FREE),
  (r"model\..+|task|head\..+|precision\.compute_dtype|optim\.freeze", REFUSED),
  (r"data\.(source|mixture|train_split|tokenizer|image_size|shapes_train_size|shapes_captions|mean|std)", REFUSED),
  (
    r"log_every|eval_every|checkpoint_every|keep_checkpoints|checkpoint_digests|step_timeout_s|peer_timeout_s|"
    r"lock_wait_s|compile_cache|progress_bar|report_to|wandb\..+|mlflow\..+",
    FREE,
  ),
  (r"health\..+", FREE),  # how the run is guarded; a new window starts its statistics afresh
  (
    r"strategy|optimizer_over_data|mesh\..+|sharding\..+|grad_accum_steps|accumulate_unreduced|resume\..+|init_from\w*|"
    r"probe\..+|eval\..+",
    FREE,
  ),
  # evaluated and exported weights only: a resume starts or drops the EMA as needed (training/ema.py)
  (r"optim\.ema_decay", FREE),
  (r"data\.(eval_\w+|data_dir|num_workers|prefetch|device_prefetch|max_skipped_fraction|skip_check_after)", FREE),
  (r"data\.(shapes_eval_size|seg_eval_width)", FREE),
)
# Not a field: in config.resume.allow_changes, it accepts a checkpoint that carries no config to compare with
# (its file deleted or emptied, or saved by a version before checkpoints carried one), resumed unchecked.
MISSING_CONFIG = "missing_config"
_COMPILED_RESUME_RULES = tuple((re.compile(pattern), kind) for pattern, kind in RESUME_RULES)


def resume_kind(path: str) -> str:
  for compiled, kind in _COMPILED_RESUME_RULES:
    if compiled.fullmatch(path):
      return kind
  return OPT_IN


def resume_changes(saved: dict, current: dict) -> dict[str, list[tuple[str, object, object]]]:
  """{kind: [(dotted path, saved value, current value)]} of the fields whose value differs between two configs
  as JSON dicts (a field only one of them has, from another version of the code, is left out)."""
  old, new = dict(fields(saved)), dict(fields(current))
  changes: dict[str, list[tuple[str, object, object]]] = {REFUSED: [], OPT_IN: [], FREE: []}
  for path in sorted(old.keys() & new.keys()):
    if old[path] != new[path]:
      changes[resume_kind(path)].append((path, old[path], new[path]))
  return changes


def allowed_changes(config: ml_collections.ConfigDict) -> list[str]:
  """config.resume.allow_changes as dotted paths (and MISSING_CONFIG); ConfigError naming one that is no field of
  `config`."""
  names = [name.strip() for name in config.resume.allow_changes.split(",") if name.strip()]
  known = {path for path, _ in fields(config)} | {MISSING_CONFIG}
  for name in names:
    if name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=3)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      raise ConfigError(f"config.resume.allow_changes={config.resume.allow_changes!r}: {name!r} is no field{hint}")
  return names
