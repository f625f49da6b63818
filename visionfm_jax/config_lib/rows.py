"""A config field's row: its default, its domain and its doc together (`Field`). A section of the config is a
mapping of rows, a nested mapping a subsection; `defaults` makes the ConfigDict a recipe starts from."""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any, Union

import ml_collections

from visionfm_jax.config_lib.domains import Choices, Domain, TransformerSize


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its default, the values it may take (None: any of the default's type, the owner checks
  what else it needs) and what it means."""

  default: Any
  domain: Domain | Choices | TransformerSize | None = None
  doc: str = ""


Rows = Mapping[str, Union[Field, "Rows"]]


def defaults(rows: Rows) -> ml_collections.ConfigDict:
  """The ConfigDict of `rows`' defaults, in their order, a subsection for each nested mapping."""
  return ml_collections.ConfigDict(
    {key: defaults(row) if isinstance(row, Mapping) else row.default for key, row in rows.items()}
  )


def row_at(rows: Rows, path: str) -> Field | None:
  """The row of a dotted field path in `rows`; None when `rows` has none."""
  node: Field | Rows = rows
  for key in path.split("."):
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node if isinstance(node, Field) else None


def without(rows: Rows, *names: str) -> dict:
  """`rows` less the fields `names`."""
  return {key: row for key, row in rows.items() if key not in names}


def nest(rows: Rows, path: str, section: Rows) -> dict[str, Field | Rows]:
  """`rows` with `section` at the dotted `path` ('data.mim'), the subsections above it copied, not changed."""
  key, _, rest = path.partition(".")
  if not rest:
    return {**rows, key: section}
  above = rows[key]
  assert isinstance(above, Mapping), f"{key!r} in {path!r} is a field, not a section"  # every key but the last is
  return {**rows, key: nest(above, rest, section)}
