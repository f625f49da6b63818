"""What the config checks alone, without jax: every field a row of the schema of the config's own family and task,
in that row's domain; the resume's allow_changes naming fields; the trackers known; delayed FP8 scaling without
micro-batches."""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from visionfm_jax.config_lib.domains import Choices, Domain, TransformerSize
from visionfm_jax.config_lib.resume_rules import allowed_changes
from visionfm_jax.config_lib.rows import row_at
from visionfm_jax.config_lib.schema import fields, report_to, schema_of
from visionfm_jax.errors import ConfigError


def domain_of(config: ml_collections.ConfigDict, path: str) -> Domain | Choices | TransformerSize | None:
  """The domain of a dotted field path of `config` (its row's); None for a field without one or without a row."""
  row = row_at(schema_of(config), path)
  return row.domain if row else None


def check_domains(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first field whose value lies outside its row's domain, or an ordered pair whose low
  end exceeds its high end."""
  rows = schema_of(config)
  for path, value in fields(config):
    row = row_at(rows, path)
    if row is None or row.domain is None:
      continue
    domain = row.domain
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not all(domain.contains(v) for v in values):
      each = "each element " if isinstance(value, (tuple, list)) else ""
      raise ConfigError(f"config.{path}={value!r}: {each}must be {domain}")
    if getattr(domain, "ordered", False) and (len(values) != 2 or values[0] > values[1]):
      raise ConfigError(f"config.{path}={value!r}: expected (low, high) with low <= high")


def check_rows(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first field without a row in the schema of `config`'s own family and task (e.g. a
  window size on a ViT tower), which nothing would read or check. A model of an unknown family is its builder's
  to name."""
  rows = schema_of(config)
  known_model = bool(rows["model"])
  for path, _ in fields(config):
    keys = path.split(".")
    depth = _unknown_at(rows, keys)
    if depth is not None and (known_model or keys[0] != "model"):
      raise ConfigError(f"config.{'.'.join(keys[: depth + 1])}: {_owner(config, keys[:depth])} has no such field")


def _unknown_at(rows, keys: list[str]) -> int | None:
  """The index of the first of `keys` that `rows` holds no row or section for; None when they lead to one."""
  node = rows
  for depth, key in enumerate(keys):
    if not isinstance(node, Mapping):
      return None
    if key not in node:
      return depth
    node = node[key]
  return None


def _owner(config: ml_collections.ConfigDict, keys: list[str]) -> str:
  """What the section at `keys` of `config` is, in words."""
  task = config.get("task")
  if not keys:
    return f"a {task} run"
  if keys == ["model"]:
    return f"a {config.model.name} model"
  if keys == ["model", "image"]:
    return f"a {config.model.image.get('name', 'swinv2')} image tower"
  if keys == ["model", "encoder"]:
    return "Aurora's SwinV2 encoder"
  if keys == ["head"]:
    return f"a {task} head"
  return f"config.{'.'.join(keys)}"


def check(config: ml_collections.ConfigDict) -> None:
  """What the config checks alone, without jax: every field a row of its schema and in that row's domain, and the
  resume's allow_changes naming fields. ConfigError naming the field."""
  check_rows(config)
  check_domains(config)
  allowed_changes(config)
  report_to(config)
  check_delayed_fp8(config)


def check_delayed_fp8(config: ml_collections.ConfigDict) -> None:
  """ConfigError for delayed FP8 scaling with micro-batches: a step records one amax per tensor, from the whole
  batch's pass (models/fp8.py), and micro-batches' gradients are summed where amaxes take a max."""
  precision = config.get("precision")
  if precision is not None and precision.get("gemm") == "fp8_delayed" and config.get("grad_accum_steps", 1) > 1:
    raise ConfigError(
      f"config.precision.gemm=fp8_delayed records its amax histories from one pass over the batch: "
      f"it takes no micro-batches (config.grad_accum_steps={config.grad_accum_steps}); use "
      f"config.precision.gemm=fp8 with them"
    )
