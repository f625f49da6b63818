"""The one logical-axis table (`parallel.sharding.LOGICAL_AXIS_RULES`): ordered mesh axes per logical axis, the
fsdp fallback, and the activation rules flax gets from it."""

from jax.sharding import PartitionSpec as P

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
  assert sharding.activation_rules() == (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None),
                                         ("act_mlp", "tensor"), ("act_heads", "tensor"))
