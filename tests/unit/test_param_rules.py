"""The one rule mechanism over param paths (`param_rules`): re.search matching, the first matching rule wins, an
error naming a rule that matches no param; and its four users (weight decay, lr multipliers, freezing,
init_from skips)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import vit
from visionfm_jax.param_rules import ParamRules, named_leaves, path_str
from visionfm_jax.training import init_from, optim, stored

from conftest import override

NAMES = ["backbone/pos_embed", "backbone/blocks/attn/qkv/kernel", "backbone/blocks/attn/qkv/bias", "head/kernel"]


def test_a_rule_matches_anywhere_in_the_path_unless_anchored():
  rules = ParamRules.of_patterns(("attn", "^kernel", "bias$"), field="f")
  assert [rules.matches(n) for n in NAMES] == [False, True, True, False]


def test_the_first_matching_rule_wins():
  rules = ParamRules([("head/kernel", 3.0), ("head", 2.0), ("kernel", 0.5)], field="f")
  assert [rules.value(n, 1.0) for n in NAMES] == [1.0, 0.5, 1.0, 3.0]
  assert rules.patterns == ("head/kernel", "head", "kernel")


def test_an_empty_pattern_list_is_no_rule():
  assert not ParamRules.of_patterns("", field="f") and not ParamRules.of_patterns((), field="f")
  assert ParamRules.of_patterns("head", field="f").patterns == ("head",)


def test_a_rule_that_matches_no_param_is_an_error_naming_it_and_the_field():
  rules = ParamRules.of_patterns(("head", "decoder"), field="config.optim.freeze")
  with pytest.raises(
    ConfigError,
    match=r"config.optim.freeze: 'decoder' matches no param \(param paths look like "
    r"backbone/pos_embed",
  ):
    rules.require_matches(NAMES)
  ParamRules.of_patterns(("head",), field="f").require_matches(NAMES)


def test_bad_rules_name_the_field_and_the_rule():
  with pytest.raises(ConfigError, match=r"config.optim.lr_mults: 'head\[' is not a regex"):
    ParamRules([("head[", 2.0)], field="config.optim.lr_mults")
  with pytest.raises(ConfigError, match=r"config.optim.lr_mults: 'head' is not a \(regex, multiplier\) pair"):
    ParamRules(["head"], field="config.optim.lr_mults", value_name="multiplier")
  with pytest.raises(ConfigError, match=r"config.optim.lr_mults: \('head', 'x'\) has no valid multiplier"):
    ParamRules([("head", "x")], field="config.optim.lr_mults", value_name="multiplier", convert=float)


def test_named_leaves_unbox_partitioned_params():
  tree = {"a": {"kernel": nn.Partitioned(jnp.ones(2), ("embed",))}, "b": jnp.zeros(3)}
  assert [(n, x.shape) for n, x in named_leaves(tree)] == [("a/kernel", (2,)), ("b", (3,))]
  assert [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]] == ["a/kernel", "b"]


# --------------------------------------------------------------------------------------------- the users


def _tree(names):
  tree = {}
  for name in names:
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.zeros((2, 2))
  return tree


def test_weight_decay_excludes_matching_kernels_and_tolerates_rules_that_match_nothing():
  mask = optim.decay_mask_fn(("qkv", "cpb_mlp"))(_tree(NAMES))  # no cpb_mlp here: no error
  assert {path_str(p): d for p, d in jax.tree_util.tree_flatten_with_path(mask)[0]} == {
    "backbone/pos_embed": False,
    "backbone/blocks/attn/qkv/kernel": False,
    "backbone/blocks/attn/qkv/bias": False,
    "head/kernel": True,
  }


def _lr_mults(*rules):
  return override(config_lib.base_config(), **{"optim.lr_mults": rules}).optim


def test_lr_mults_first_match_and_no_match_error():
  shapes = {n: (2, 2) for n in NAMES}
  mults = optim.lr_multipliers(_lr_mults(("head/kernel", 3.0), ("kernel", 2.0)), shapes)
  assert mults == {
    "backbone/pos_embed": 1.0,
    "backbone/blocks/attn/qkv/kernel": 2.0,
    "backbone/blocks/attn/qkv/bias": 1.0,
    "head/kernel": 3.0,
  }
  with pytest.raises(ConfigError, match="config.optim.lr_mults: 'decoder' matches no param"):
    optim.lr_multipliers(_lr_mults(("decoder", 2.0)), shapes)


def test_freeze_labels_and_no_match_error():
  labels = optim.freeze_labels_fn(("^backbone/",))(_tree(NAMES))
  assert {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(labels)[0]} == {
    **{n: "frozen" for n in NAMES[:3]},
    "head/kernel": "train",
  }
  with pytest.raises(ConfigError, match="config.optim.freeze: 'decoder' matches no param"):
    optim.freeze_labels_fn(("decoder",))(_tree(NAMES))


def test_init_from_skip_keeps_matching_params_fresh_and_names_a_rule_that_matches_none(tmp_path):
  model = vit.ViT(width=8, depth=1, mlp_dim=16, num_heads=2, patch_size=4, image_size=8, num_classes=3)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
  source = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), abstract)
  stored.save_params(str(tmp_path), source, {"name": "vit"})
  target = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), jax.devices()[0]), abstract)
  config = config_lib.base_config("vit")
  config.init_from, config.init_from_skip = str(tmp_path), "^head/"
  loaded = jax.device_get(init_from.load(config, target, model))
  assert float(loaded["head"]["kernel"].sum()) == 0.0 and float(loaded["pos_embed"].min()) == 1.0
  config.init_from_skip = "^decoder/"
  with pytest.raises(ConfigError, match="config.init_from_skip: '\\^decoder/' matches no param"):
    init_from.load(config, target, model)
