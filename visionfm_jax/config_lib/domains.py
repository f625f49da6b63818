"""The values each field may take: one table, `DOMAINS` (a numeric range, or a set of names, per field regex),
which `check` checks; every numeric domain is finite (inf is never a value)."""

from __future__ import annotations

import dataclasses
import math
import re

import ml_collections

from visionfm_jax.config_lib.resume_rules import allowed_changes
from visionfm_jax.config_lib.schema import (
  COMPUTE_DTYPES,
  CONTRASTIVE_LOSSES,
  RANDAUGMENT_MAX_MAGNITUDE,
  REMAT_POLICIES,
  STRATEGIES,
  fields,
  report_to,
)
from visionfm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Domain:
  """The values a numeric field may take: a range (ends open or closed), integer or real, plus `extra` values
  with a meaning of their own (e.g. -1 for 'all'). A tuple field is checked element by element."""
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False
  extra: tuple = ()
  note: str = ""

  def contains(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if value in self.extra:
      return True
    if not math.isfinite(value):  # inf passes a one-sided range and breaks training later (NaN, or no learning)
      return False
    if self.integer and value != int(value):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def __str__(self) -> str:
    kind = "an integer" if self.integer else "a number"
    if self.low > -math.inf and self.high < math.inf:
      text = f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
    elif self.low > -math.inf:
      text = f"{kind if self.integer else 'a finite number'} {'>' if self.low_open else '>='} {self.low:g}"
    else:
      text = f"{kind if self.integer else 'a finite number'} {'<' if self.high_open else '<='} {self.high:g}"
    if self.extra:
      text += ", or " + " or ".join(str(v) for v in self.extra)
    return text + (f" ({self.note})" if self.note else "")


@dataclasses.dataclass(frozen=True)
class Choices:
  """The names a string field may take."""
  names: tuple

  def contains(self, value) -> bool:
    return isinstance(value, str) and value in self.names

  def __str__(self) -> str:
    return "one of " + ", ".join(self.names)


POSITIVE = Domain(0, low_open=True)
NON_NEGATIVE = Domain(0)
COUNT = Domain(1, integer=True)  # sizes, steps, counts
NON_NEGATIVE_INT = Domain(0, integer=True)
FRACTION = Domain(0, 1)
RATE = Domain(0, 1, high_open=True)  # drop rates, Adam betas
ALL_OR_COUNT = Domain(1, integer=True, extra=(-1,), note="-1: all")

# (regex over the dotted field path, domain): the first rule whose regex matches the whole path applies.
DOMAINS: tuple[tuple[str, Domain | Choices], ...] = (
    (r"strategy", Choices(STRATEGIES)),
    (r"precision\.compute_dtype", Choices(COMPUTE_DTYPES)),
    (r"model\.remat_policy", Choices(REMAT_POLICIES)),
    (r"model\.contrastive_loss", Choices(CONTRASTIVE_LOSSES)),
    (r"total_steps|global_batch_size|grad_accum_steps|log_every|eval_every|checkpoint_every|keep_checkpoints",
     COUNT),
    (r"step_timeout_s|peer_timeout_s", Domain(0, note="0: no timeout")),
    (r"checkpoint_keep_period", Domain(0, integer=True, note="0: none")),
    (r"lock_wait_s", NON_NEGATIVE),
    (r"mesh\.(data|fsdp|tensor)", Domain(1, integer=True, extra=(-1,), note="-1: the devices left")),
    (r"optim\.lr", POSITIVE),
    (r"optim\.b[12]", RATE),
    (r"optim\.eps", Domain(0, low_open=True, note="Adam divides by sqrt(nu) + eps, and nu is 0 for unused params")),
    (r"optim\.(weight_decay|end_lr)", NON_NEGATIVE),
    (r"optim\.clip_norm", Domain(0, note="0: no clipping")),
    (r"optim\.warmup_steps", NON_NEGATIVE_INT),
    (r"optim\.layer_decay", Domain(0, 1, low_open=True, note="1: off")),
    (r"optim\.ema_decay", Domain(0, 1, high_open=True, note="0: no EMA")),
    (r"precision\.(loss_scale_init|loss_scale_min)", POSITIVE),
    (r"precision\.(loss_scale_period|max_consecutive_skips)", COUNT),
    (r"health\.(window|warmup|burst_window|max_rollbacks_window)", COUNT),
    (r"health\.(burst_skips|restore_before|skip_margin|max_rollbacks)", NON_NEGATIVE_INT),
    (r"health\.z", POSITIVE),
    (r"health\.rise", Domain(1, low_open=True, extra=(0,), note="0: off")),
    (r"(.+\.)?(drop_path|dropout|token_drop)", RATE),
    (r"(.+\.)?layer_norm_eps", POSITIVE),
    (r"(.+\.)?(image_size|patch_size|window_size|mask_patch_size)", COUNT),
    (r"(.+\.)?token_subgrid", Domain(1, integer=True, note="1: off")),
    (r"(.+\.)?pretrained_window_sizes", Domain(0, integer=True, note="0: the stage's own window")),
    (r"model\.num_classes", Domain(0, integer=True, note="0: no head")),
    (r"model\.(embed_dim|caption_queries|decoder_depth)|model\.text\.(max_len|vocab_size)", COUNT),
    (r"(.+\.)?extra_norm_period", Domain(0, integer=True, extra=(-1,), note="0: none; -1: the size's default")),
    (r"(.+\.)?eos_id", NON_NEGATIVE_INT),
    (r"data\.num_workers", Domain(0, integer=True, extra=(-1,), note="-1: from the CPUs of the process")),
    (r"data\.(device_prefetch|skip_check_after|seg_eval_width)", NON_NEGATIVE_INT),
    (r"data\.(prefetch|shapes_train_size|shapes_eval_size|scenes_max_objects|max_boxes)", COUNT),
    (r"data\.max_skipped_fraction", FRACTION),
    (r"data\.eval_examples|probe\.(train_examples|eval_examples)|eval\.zeroshot_examples", ALL_OR_COUNT),
    (r"data\.std|data\.augment\.crop_ratio|data\.(seg|det)_scale_range", POSITIVE),
    (r"data\.mean", FRACTION),
    (r"data\.augment\.crop_scale", Domain(0, 1, low_open=True)),
    (r"data\.augment\.(color_jitter|mixup_alpha)", NON_NEGATIVE),
    (r"data\.augment\.randaugment_ops", NON_NEGATIVE_INT),
    (r"data\.augment\.randaugment_magnitude", Domain(0, RANDAUGMENT_MAX_MAGNITUDE)),
    (r"data\.mim\.mask_ratio", Domain(0, 1, low_open=True, high_open=True)),
    (r"probe\.(knn_k|linear_steps)", COUNT),
    (r"probe\.knn_temperature", POSITIVE),
    (r"probe\.linear_l2", NON_NEGATIVE),
    (r"loss\.\w+_weight|head\.(class_weight|l1_weight|giou_weight|focal_gamma)", NON_NEGATIVE),
    (r"head\.focal_alpha", FRACTION),
    (r"head\.prior_prob", Domain(0, 1, low_open=True, high_open=True)),
    (r"head\.num_convs", NON_NEGATIVE_INT),
    (r"head\.(num_classes|head_channels|neck_channels|top_k|eval_stride|levels|neck_strides|ppm_scales)", COUNT),
)
_COMPILED_DOMAINS = tuple((re.compile(pattern), (pattern, domain)) for pattern, domain in DOMAINS)
# Fields holding (low, high): low must not exceed high.
ORDERED_PAIRS = ("data.augment.crop_scale", "data.augment.crop_ratio", "data.seg_scale_range",
                 "data.det_scale_range")


def rule_of(path: str) -> tuple[str, Domain | Choices] | None:
  """The DOMAINS rule of a dotted field path (the first whose regex matches it whole), None when none does."""
  for compiled, rule in _COMPILED_DOMAINS:
    if compiled.fullmatch(path):
      return rule
  return None


def check_domains(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first field whose value lies outside its DOMAINS entry, or an ORDERED_PAIRS field
  whose low end exceeds its high end."""
  for path, value in fields(config):
    rule = rule_of(path)
    if rule is None:
      continue
    domain = rule[1]
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not all(domain.contains(v) for v in values):
      each = "each element " if isinstance(value, (tuple, list)) else ""
      raise ConfigError(f"config.{path}={value!r}: {each}must be {domain}")
    if path in ORDERED_PAIRS and (len(values) != 2 or values[0] > values[1]):
      raise ConfigError(f"config.{path}={value!r}: expected (low, high) with low <= high")


def check(config: ml_collections.ConfigDict) -> None:
  """What the config checks alone, without jax: every field in its DOMAINS entry, and the resume's
  allow_changes naming fields. ConfigError naming the field."""
  check_domains(config)
  allowed_changes(config)
  report_to(config)
