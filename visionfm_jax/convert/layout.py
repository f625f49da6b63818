"""Scanned <-> unrolled block layouts of plain (unboxed) param trees; both hold the same numbers.

Scanned (`scan=True`): one subtree `params[name]` whose leaves have a leading depth axis; or, for a stack that
scans groups of blocks (`members`: SwinV2's (plain, shifted) pairs, `swinv2.PAIR`), `params[name][member]` whose
leaves have a leading depth / len(members) axis, block g * k + i being member i of group k.
Unrolled (`scan=False`): subtrees `params[f'{name}_{i}']` for i in range(depth).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.errors import CheckpointError


def _stack(*xs):
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def _unrolled_names(params: dict[str, Any], name: str) -> list[str]:
  pattern = re.compile(rf"{re.escape(name)}_\d+")
  return sorted((k for k in params if pattern.fullmatch(k)), key=lambda k: int(k.rsplit("_", 1)[1]))


def stack_layers(
  params: dict[str, Any], depth: int, name: str = "blocks", members: tuple[str, ...] = ()
) -> dict[str, Any]:
  """`{name}_0` ... `{name}_{depth-1}` -> `{name}` with a leading depth axis (with `members`: `{name}/{member}`,
  see the module docstring); other entries unchanged."""
  wanted = [f"{name}_{i}" for i in range(depth)]
  found = _unrolled_names(params, name)
  if found != wanted or name in params:
    raise CheckpointError(
      f"stack_layers: expected exactly {name}_0 .. {name}_{depth - 1} and no {name!r}; "
      f"found {found + ([name] if name in params else [])}"
    )
  layers = [params[k] for k in wanted]
  structures = {str(jax.tree.structure(layer)) for layer in layers}
  if len(structures) != 1:
    raise CheckpointError(f"stack_layers: {name}_* have different structures: {sorted(structures)}")
  out = {k: v for k, v in params.items() if k not in wanted}
  if not members:
    out[name] = jax.tree.map(_stack, *layers)
    return out
  if depth % len(members):
    raise CheckpointError(f"stack_layers: {depth} {name} do not make groups of {len(members)} {members}")
  out[name] = {m: jax.tree.map(_stack, *layers[i :: len(members)]) for i, m in enumerate(members)}
  return out


def unstack_layers(
  params: dict[str, Any], depth: int | None = None, name: str = "blocks", members: tuple[str, ...] = ()
) -> dict[str, Any]:
  """`{name}` with a leading depth axis (with `members`: `{name}/{member}`, see the module docstring) ->
  `{name}_0` ... `{name}_{depth-1}`; other entries unchanged."""
  if name not in params or _unrolled_names(params, name):
    raise CheckpointError(f"unstack_layers: expected a scanned {name!r} and no {name}_<i>; found {sorted(params)}")
  groups = len(members) or 1
  if members and (not isinstance(params[name], dict) or sorted(params[name]) != sorted(members)):
    raise CheckpointError(
      f"unstack_layers: expected {name!r} to hold {list(members)}; found "
      f"{sorted(params[name]) if isinstance(params[name], dict) else type(params[name]).__name__}"
    )
  sizes = {leaf.shape[0] * groups if np.ndim(leaf) else None for leaf in jax.tree.leaves(params[name])}
  if len(sizes) != 1 or None in sizes or (depth is not None and sizes != {depth}):
    raise CheckpointError(
      f"unstack_layers: leading axes of {name!r} make depths {sorted(sizes, key=str)}, expected "
      f"one depth{f' = {depth}' if depth is not None else ''}"
    )
  out = {k: v for k, v in params.items() if k != name}
  for i in range(sizes.pop()):
    stacked = params[name][members[i % groups]] if members else params[name]
    out[f"{name}_{i}"] = jax.tree.map(lambda x, k=i // groups: x[k], stacked)
  return out
