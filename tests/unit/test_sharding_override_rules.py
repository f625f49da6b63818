"""`config.sharding.overrides` (parallel/sharding.py `Overrides`): a recipe's (regex, layout) rules over param paths
on the tiny ViT's state, from shapes only, on a mesh of 8 fsdp devices: which parts of the state each layout moves,
what the plan counts, the errors naming a rule or a param, and what a resume makes of a change."""

import functools
import math

import jax
from jax.sharding import PartitionSpec as P
import pytest

from visionfm_jax import config_lib, parallel, param_rules, tasks
from visionfm_jax.errors import ConfigError
from visionfm_jax.training import checks, optim, resume
from visionfm_jax.training import step as step_lib

from conftest import tiny_vit_config

MESH = {"data": 1, "fsdp": 8, "tensor": 1}
PATCH, HEAD, FC1 = "patch_embed/kernel", "head/kernel", "blocks/mlp/fc1/kernel"  # (4, 4, 3, 32), (32, 8), (2, 32, 64)


@functools.cache
def _state():
  """The tiny ViT's boxed train state, shapes only."""
  config = tiny_vit_config()
  tx = optim.make_optimizer(config.optim, optim.schedule(config.optim, config.total_steps))
  return jax.eval_shape(step_lib.make_init_fn(tasks.build(config), tx, config), jax.random.key(0))


def _at(specs, path: str) -> P:
  """The spec of the param at `path` in a tree of specs in the params' structure."""
  return dict(param_rules.named_leaves(specs))[path]


def _specs(strategy: str, overrides=()):
  """(params, Adam's first moment, gradients) specs of the tiny ViT under `strategy` and `overrides`."""
  specs = parallel.state_specs(_state(), MESH, strategy, overrides=overrides)
  grads = parallel.grad_specs(_state().params, MESH, strategy, overrides)
  (mu,) = [s.mu for s in jax.tree.leaves(specs.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
  return specs.params, mu, grads


def test_replicated_keeps_one_param_whole_and_its_optimizer_state_as_the_strategy_has_it():
  """zero3 shards the patch embedding's kernel over its width; 'replicated' keeps that param whole on every device,
  while its gradient and Adam moments stay sharded (zero2's layout of it) and every other param stays as it was."""
  before = _specs("zero3")
  params, mu, grads = _specs("zero3", ((f"^{PATCH}$", "replicated"),))
  assert _at(before[0], PATCH) == P(None, None, None, "fsdp")
  assert _at(params, PATCH) == P()
  assert _at(mu, PATCH) == _at(grads, PATCH) == P(None, None, None, "fsdp")
  assert {k: v for k, v in param_rules.named_leaves(params) if k != PATCH} == {
    k: v for k, v in param_rules.named_leaves(before[0]) if k != PATCH
  }


def test_mesh_axes_shard_a_param_that_ddp_replicates():
  """The reverse: under ddp every param is whole; mesh axes split the patch embedding's width over fsdp, and the
  plan's params bytes fall by 7/8 of that kernel, nothing else."""
  rules = ((PATCH, (None, None, None, "fsdp")),)
  params, mu, grads = _specs("ddp", rules)
  assert _at(params, PATCH) == P(None, None, None, "fsdp") and _at(mu, PATCH) == _at(grads, PATCH) == P(*(None,) * 4)
  kernel = math.prod((4, 4, 3, 32)) * 4
  whole, moved = (
    parallel.bytes_per_device(_state(), MESH, "ddp"),
    parallel.bytes_per_device(_state(), MESH, "ddp", overrides=rules),
  )
  assert moved == {**whole, "params": whole["params"] - kernel * 7 // 8, "total": whole["total"] - kernel * 7 // 8}


def test_logical_axes_are_read_by_the_table_for_every_part_of_the_state():
  """The head's kernel named (None, 'embed'): the table splits its classes (8) instead of its width (32), in the
  params under zero3, in the gradient and the Adam moments under zero2 (whose params stay whole)."""
  rules = ((HEAD, (None, "embed")),)
  assert _at(_specs("zero3")[0], HEAD) == P("fsdp", None)
  assert _at(_specs("zero3", rules)[0], HEAD) == P(None, "fsdp")
  params, mu, grads = _specs("zero2", rules)
  assert _at(params, HEAD) == P(None, None) and _at(mu, HEAD) == _at(grads, HEAD) == P(None, "fsdp")


def test_the_first_matching_rule_wins():
  """fc1's kernel (3 dims) takes the first rule, so the second's 4 axes never meet it."""
  params = _specs("zero3", (("mlp/fc1/kernel$", "replicated"), (f"^({PATCH}|{FC1})$", (None,) * 4)))[0]
  assert _at(params, FC1) == P() and _at(params, PATCH) == P(None, None, None, "fsdp")  # the table's fallback


@pytest.mark.parametrize(
  "rules,message",
  [
    ((("^head/kernal$", "replicated"),), r"config.sharding.overrides: '\^head/kernal\$' matches no param"),
    (
      ((PATCH, ("fsdp", None, None, None)),),
      r"param patch_embed/kernel of shape \(4, 4, 3, 32\): its dim of 4 "
      r"does not divide over mesh axes 'fsdp' \(8 devices",
    ),
    (((HEAD, ("embed",)),), r"param head/kernel of shape \(32, 8\) has 2 dims, its layout \('embed',\) 1"),
  ],
)
def test_a_rule_that_fits_no_param_is_an_error_naming_it(rules, message):
  with pytest.raises(ConfigError, match=message):
    parallel.state_specs(_state(), MESH, "zero3", overrides=rules)
  with pytest.raises(ConfigError, match=message):  # the plan meets it as the run does
    parallel.bytes_per_device(_state(), MESH, "zero3", overrides=rules)


@pytest.mark.parametrize(
  "rules,message",
  [
    (
      (("head", ("embed", "bogus")),),
      r"'bogus' is neither a logical axis \(embed, .*\) nor a mesh axis "
      r"\(data, fsdp, tensor\)",
    ),
    ((("head", ("fsdp", ("data", "fsdp"))),), r"mesh axis 'fsdp' splits more than one dim"),
    ((("head", ("embed", "tensor")),), r"'embed' beside mesh axes: logical and mesh axes in one layout"),
    ((("head", "sharded"),), r"expected 'replicated' or a tuple of axes"),
    ((("head[", "replicated"),), r"'head\[' is not a regex"),
    ((("head",),), r"is not a \(regex, layout\) pair"),
  ],
)
def test_a_malformed_rule_stops_validate_naming_the_field(rules, message):
  """training/checks.validate reads the rules' form before anything is built."""
  config = tiny_vit_config(**{"sharding.overrides": rules})
  with pytest.raises(ConfigError, match=r"config.sharding.overrides: .*" + message):
    checks.validate(config)


def test_a_resume_may_change_the_overrides_as_it_may_the_strategy():
  """A layout field: the checkpoint restores into this run's shardings, so a change is free (RESUME_RULES), compared
  as the checkpoint's config holds it (JSON)."""
  saved, current = config_lib.base_config(), config_lib.base_config()
  current.sharding.overrides = ((HEAD, "replicated"), (PATCH, (None, None, None, "fsdp")))
  changes = config_lib.resume_changes(resume.as_json(saved), resume.as_json(current))
  assert changes == {
    config_lib.FREE: [("sharding.overrides", [], [[HEAD, "replicated"], [PATCH, [None, None, None, "fsdp"]]])],
    config_lib.REFUSED: [],
    config_lib.OPT_IN: [],
  }
  assert not config_lib.resume_changes(resume.as_json(current), resume.as_json(current))[config_lib.FREE]
