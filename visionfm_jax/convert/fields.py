"""What an export does with each field of a model: every field of a Linen class that a converter writes is in
its `ExportFields`, so that none reaches transformers unread.

  expressed   fields the converter writes (config.json and tensors), whatever their value; a value transformers
              cannot compute is the converter's ConfigError naming the field and the value
  only        {field: the one value the export computes}: another value is refused (`refuse`), one ConfigError
              naming the field and its value
  inert       {field: why}: fields that change nothing the exported model computes (how a run trains, compiles or
              remats; what only training uses)

tests/unit/test_export_fields.py walks every family with a converter (models.FAMILIES, and its towers): each field
of its class sits in exactly one of the three.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

from visionfm_jax.errors import ConfigError

# The fields of how a block stack trains, compiles and remats: the same function at inference, in fp32.
RUN = {
  "dtype": "the export is float32",
  "scan": "the block layout",
  "scan_unroll": "the block layout",
  "remat_policy": "the backward pass",
  "attention": "the attention kernel: the same function",
  "drop_path": "training only",
  "dropout": "training only",
  "head_bias_init": "the head's initial bias",
}


@dataclasses.dataclass(frozen=True)
class ExportFields:
  """How a converter treats the fields of one Linen class (the module docstring)."""

  expressed: tuple[str, ...]
  only: Mapping[str, Any]
  inert: Mapping[str, str]

  def names(self) -> list[str]:
    """Every field named, in the order expressed, only, inert."""
    return [*self.expressed, *self.only, *self.inert]

  def refusal(self, model, why: str) -> str | None:
    """'<field>=<value> (<why>: the export computes <field>=<value>)' for the first `only` field of `model` at
    another value; None when there is none."""
    for name, value in self.only.items():
      if getattr(model, name) != value:
        return f"{name}={getattr(model, name)!r} ({why} computes {name}={value!r} only)"
    return None

  def refuse(self, model, why: str) -> None:
    """ConfigError of `refusal`, if any."""
    reason = self.refusal(model, why)
    if reason:
      raise ConfigError(reason)
