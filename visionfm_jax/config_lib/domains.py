"""The values a field may take: a numeric range (`Domain`), a set of names (`Choices`) or a transformer's size
(`TransformerSize`: a named one or its sizes spelled out), and the common ranges.
Every numeric domain is finite (inf is never a value). A field's domain sits on its row in the schema."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Domain:
  """The values a numeric field may take: a range (ends open or closed), integer or real, plus `extra` values
  with a meaning of their own (e.g. -1 for 'all'). A tuple field is checked element by element; an `ordered` one
  is a (low, high) pair whose low end must not exceed its high end."""

  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False
  extra: tuple = ()
  note: str = ""
  ordered: bool = False

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


def custom_size(spec: str) -> tuple[int, int, int, int] | None:
  """'<width>x<depth>x<mlp>x<heads>' (a transformer of no named size, e.g. an imported one) -> (width, depth,
  mlp_dim, heads); None when `spec` is not spelled so."""
  dims = spec.split("x")
  if len(dims) != 4 or not all(d.isdigit() and int(d) > 0 for d in dims):
    return None
  width, depth, mlp_dim, heads = map(int, dims)
  return width, depth, mlp_dim, heads


def staged_size(spec: str) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
  """'<embed_dim>x<depth,...>x<heads,...>' (a model of stages of no named size, e.g. an imported SwinV2: one depth
  and one head count a stage, '96x2,2,6,2x3,6,12,24') -> (embed_dim, depths, heads); None when not spelled so."""
  parts = spec.split("x") if isinstance(spec, str) else []
  if len(parts) != 3:
    return None
  try:
    width, depths, heads = int(parts[0]), tuple(map(int, parts[1].split(","))), tuple(map(int, parts[2].split(",")))
  except ValueError:
    return None
  if width <= 0 or len(depths) != len(heads) or min(depths + heads) <= 0:
    return None
  return width, depths, heads


@dataclasses.dataclass(frozen=True)
class TransformerSize:
  """A transformer's size: one of its model's named `names`, or its sizes spelled out (`parse`: `custom_size`, or
  `staged_size` for a model of stages; `spelling` says how)."""

  names: tuple
  parse: Callable[[str], Any] = custom_size
  spelling: str = "'<width>x<depth>x<mlp>x<heads>'"

  def contains(self, value) -> bool:
    return isinstance(value, str) and (value in self.names or self.parse(value) is not None)

  def __str__(self) -> str:
    return f"{Choices(self.names)}, or {self.spelling}"


POSITIVE = Domain(0, low_open=True)
NON_NEGATIVE = Domain(0)
COUNT = Domain(1, integer=True)  # sizes, steps, counts
NON_NEGATIVE_INT = Domain(0, integer=True)
FRACTION = Domain(0, 1)
OPEN_FRACTION = Domain(0, 1, low_open=True, high_open=True)  # a probability that is never certain either way
RATE = Domain(0, 1, high_open=True)  # drop rates, Adam betas
ALL_OR_COUNT = Domain(1, integer=True, extra=(-1,), note="-1: all")
SIZED = -1  # the value of a field the run fills from the data or from total_steps (config_lib/sizing.py)
SIZED_COUNT = Domain(1, integer=True, extra=(SIZED,), note="-1: sized by the run, config_lib/sizing.py")
