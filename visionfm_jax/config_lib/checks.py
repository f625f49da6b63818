"""What the config checks alone, without jax: every field in the domain of its row (the schema of the config's own
family and task), the resume's allow_changes naming fields, the trackers known."""

from __future__ import annotations

import ml_collections

from visionfm_jax.config_lib.domains import Choices, Domain
from visionfm_jax.config_lib.resume_rules import allowed_changes
from visionfm_jax.config_lib.rows import row_at
from visionfm_jax.config_lib.schema import fields, report_to, schema_of
from visionfm_jax.errors import ConfigError


def domain_of(config: ml_collections.ConfigDict, path: str) -> Domain | Choices | None:
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


def check(config: ml_collections.ConfigDict) -> None:
  """What the config checks alone, without jax: every field in its row's domain, and the resume's allow_changes
  naming fields. ConfigError naming the field."""
  check_domains(config)
  allowed_changes(config)
  report_to(config)
