"""The one logical-axis table (`parallel.sharding.LOGICAL_AXIS_RULES`): ordered mesh axes per logical axis, the
fsdp fallback, and the activation rules flax gets from it."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from visionfm_jax import parallel
from visionfm_jax.models import layers
from visionfm_jax.parallel import sharding

MESH = {"data": 1, "fsdp": 4, "tensor": 2}


def test_a_logical_axis_takes_its_first_mesh_axis_that_fits(monkeypatch):
  monkeypatch.setitem(sharding.LOGICAL_AXIS_RULES, "mlp", ("tensor", "fsdp"))
  assert sharding.partition_spec(("embed", "mlp"), (8, 6), MESH, True) == P("fsdp", "tensor")
  assert sharding.partition_spec(("embed", "mlp"), (8, 4), {**MESH, "tensor": 1}, True) == P("fsdp", None)
  assert sharding.partition_spec(("kv", "mlp"), (3, 4), {**MESH, "tensor": 1}, True) == P(None, "fsdp")
  assert sharding.partition_spec(("kv", "mlp"), (3, 4), {**MESH, "tensor": 1}, False) == P(None, None)


def test_fsdp_falls_back_to_the_largest_free_divisible_dim_but_never_layers():
  assert sharding.partition_spec(("embed", "classes"), (6, 21840), {**MESH, "tensor": 1}, True) == P(None, "fsdp")
  assert sharding.partition_spec(("layers", "embed", "kv"), (16, 6, 8), MESH, True) == P(None, None, "fsdp")
  assert sharding.partition_spec(("layers", "embed"), (16, 6), MESH, True) == P(None, None)
  assert sharding.partition_spec((None, None), (12, 16), MESH, True) == P(None, "fsdp")
  assert sharding.partition_spec((None, None), (12, 16), MESH, False) == P(None, None)


def test_activation_rules_are_the_activation_rows_of_the_table():
  assert sharding.activation_rules() == (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
  )


def test_an_unknown_axis_name_is_an_error_naming_it():
  """A mistyped name used to leave its dim unsharded without a word; None (never split) stays allowed."""
  with pytest.raises(ValueError, match=r"'emebd' not in LOGICAL_AXIS_RULES \(its parameter axes: embed, mlp"):
    sharding.partition_spec(("emebd", None), (8, 6), MESH, True)
  with pytest.raises(ValueError, match=r"'batch' not in LOGICAL_AXIS_RULES \(its parameter axes"):
    sharding.partition_spec(("batch", "embed"), (8, 6), MESH, True)  # an activation's name on a parameter
  with pytest.raises(ValueError, match=r"'embed' not in LOGICAL_AXIS_RULES \(its activation axes: batch"):
    layers.constrain(jnp.zeros((2, 3)), ("batch", "embed"))
  assert sharding.partition_spec((None, "embed"), (8, 6), MESH, False) == P(None, None)


def test_the_batch_splits_over_the_data_parallel_axes_of_parallel_batch():
  """One home for the batch's layout (parallel/batch.py): the activation rule of `batch`, the batch's spec, the
  data-parallel size that parallel/checks.py divides the batch by, and the axes a sharded loss gathers over."""
  assert sharding.LOGICAL_AXIS_RULES["batch"] == (parallel.BATCH_AXES,) and parallel.BATCH_SPEC == P(("data", "fsdp"))
  assert parallel.data_parallel_size(MESH) == 4 and parallel.data_parallel_size({**MESH, "data": 2}) == 8
  assert parallel.batch_axes_of(Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))) == ("data",)
