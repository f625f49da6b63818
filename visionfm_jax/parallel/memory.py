"""Bytes one device holds of the train state under a ZeRO strategy, from shapes and PartitionSpecs only."""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P
import numpy as np

from visionfm_jax.parallel.sharding import (
  STRATEGY_SHARDS,
  Overrides,
  grad_specs,
  param_specs,
  shard_shape,
  tree_specs,
  unbox,
)


def tree_bytes_per_device(abstract_tree, specs, mesh_shape: dict[str, int]) -> int:
  """Bytes of one device's shard of every leaf of an (unboxed, abstract) tree laid out by the matching `specs`."""
  leaves = jax.tree.leaves(abstract_tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return sum(
    math.prod(shard_shape(leaf.shape, spec, mesh_shape)) * np.dtype(leaf.dtype).itemsize
    for leaf, spec in zip(leaves, spec_leaves, strict=True)
  )


def bytes_per_device(
  abstract_boxed_state,
  mesh_shape: dict[str, int],
  strategy: str,
  optimizer_over_data: bool = False,
  overrides: Sequence = (),
) -> dict[str, int]:
  """{'params', 'grads', 'opt_state', 'total'}: bytes on one device under `strategy` (gradients in the params'
  dtypes, laid out as the train step constrains them); total is their sum. `optimizer_over_data`, `overrides`
  (config.sharding.overrides): as `state_specs`'."""
  shards = STRATEGY_SHARDS[strategy]
  boxed_params, boxed_opt = abstract_boxed_state.params, abstract_boxed_state.opt_state
  params, opt_state = unbox(boxed_params), unbox(boxed_opt)
  own_specs = param_specs(boxed_params, mesh_shape, strategy, overrides)  # first: it checks the overrides
  opt_specs = tree_specs(boxed_opt, mesh_shape, shards["opt_state"], optimizer_over_data, Overrides(overrides))
  out = dict(
    params=tree_bytes_per_device(params, own_specs, mesh_shape),
    grads=tree_bytes_per_device(params, grad_specs(boxed_params, mesh_shape, strategy, overrides), mesh_shape),
    opt_state=tree_bytes_per_device(opt_state, opt_specs, mesh_shape),
  )
  out["total"] = sum(out.values())
  return out
