"""Fine-tuning optimizer rules: layer-wise lr decay (scanned and unrolled ViT, SwinV2, a backbone under a prefix),
lr multiplier rules, frozen params."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from visionfm_jax import config_lib, models, parallel, param_rules, tasks
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import segmenter, swinv2, vit
from visionfm_jax.training import optim
from visionfm_jax.training import step as step_lib

from conftest import override, tiny_vit_config


def _shapes(module, image_size=16):
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
  return {
    param_rules.path_str(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract["params"]))[0]
  }


def _optim(**fields):
  cfg = config_lib.base_config().optim
  for k, v in fields.items():
    cfg[k] = v
  return cfg


def _vit(scan):
  return vit.ViT(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4, num_classes=5, scan=scan)


@pytest.mark.parametrize("scan", [True, False])
def test_vit_layer_multipliers(scan):
  mults = optim.lr_multipliers(_optim(layer_decay=0.5), _shapes(_vit(scan)), _vit(scan))
  d = 0.5  # L = 3: embeddings d^4, block i d^(3 - i), final norm and head 1
  for name in ("patch_embed/kernel", "patch_embed/bias", "cls_token", "pos_embed"):
    assert mults[name] == d**4, name
  for name in ("norm/ln/scale", "head/kernel", "head/bias"):
    assert mults[name] == 1.0, name
  if scan:
    np.testing.assert_array_equal(mults["blocks/mlp/fc1/kernel"].reshape(-1), [d**3, d**2, d])
    assert mults["blocks/mlp/fc1/kernel"].shape == (3, 1, 1)  # broadcasts along the leading layers axis
    assert mults["blocks/norm1/ln/scale"].shape == (3, 1)
  else:
    for i in range(3):
      assert mults[f"blocks_{i}/attn/qkv/kernel"] == d ** (3 - i)


@pytest.mark.parametrize("scan", [True, False])
def test_swinv2_layer_ids_count_blocks_across_stages(scan):
  model = swinv2.SwinV2(
    embed_dim=16,
    depths=(2, 4),
    num_heads=(2, 4),
    window_size=2,
    patch_size=2,
    num_classes=3,
    scan=scan,
    mask_token=True,
  )
  shapes = _shapes(model, image_size=8)
  ids, total = optim.layer_ids(model, shapes)
  assert total == 6
  for name in ("patch_embed/kernel", "patch_norm/ln/scale", "mask_token"):
    assert ids[name] == 0, name
  assert ids["stage_0/downsample/reduction/kernel"] == 2  # with the block before it: stage 0's last
  assert ids["norm/ln/scale"] == ids["head/kernel"] == 7
  if scan:  # (plain, shifted) pairs: blocks 2j and 2j + 1 of their stage
    np.testing.assert_array_equal(ids["stage_0/blocks/plain/attn/qkv/kernel"], [1])
    np.testing.assert_array_equal(ids["stage_0/blocks/shifted/attn/qkv/kernel"], [2])
    np.testing.assert_array_equal(ids["stage_1/blocks/plain/attn/cpb_mlp/fc1/kernel"], [3, 5])
    np.testing.assert_array_equal(ids["stage_1/blocks/shifted/attn/cpb_mlp/fc1/kernel"], [4, 6])
  else:
    assert [ids[f"stage_1/blocks_{i}/mlp/fc2/kernel"] for i in range(4)] == [3, 4, 5, 6]
  mults = optim.lr_multipliers(_optim(layer_decay=0.8), shapes, model)
  np.testing.assert_allclose(
    np.ravel(mults["stage_1/blocks/shifted/attn/logit_scale" if scan else "stage_1/blocks_3/attn/logit_scale"])[-1], 0.8
  )


def test_backbone_under_a_prefix_and_rules_first_match_wins():
  shapes = {f"backbone/{k}": v for k, v in _shapes(_vit(True)).items() if not k.startswith("head")}
  shapes.update({"neck/fpn/kernel": (16, 8), "head/kernel": (8, 3), "head/bias": (3,)})
  model = segmenter.Segmenter(backbone=_vit(True).clone(num_classes=0), num_classes=3)  # answers for 'backbone/'
  cfg = _optim(layer_decay=0.5, lr_mults=(("head/kernel", 3.0), ("head", 2.0), ("pos_embed", 0.0)))
  mults = optim.lr_multipliers(cfg, shapes, model)
  assert mults["head/kernel"] == 3.0 and mults["head/bias"] == 2.0 and mults["neck/fpn/kernel"] == 1.0
  assert mults["backbone/cls_token"] == 0.5**4 and mults["backbone/pos_embed"] == 0.0
  np.testing.assert_array_equal(np.ravel(mults["backbone/blocks/attn/out/kernel"]), [0.125, 0.25, 0.5])
  assert optim.lr_multipliers(_optim(lr_mults=(("head", 2.0),)), shapes)["backbone/blocks/attn/out/kernel"] == 1.0

  with pytest.raises(ConfigError, match="'decoder' matches no param"):
    optim.lr_multipliers(_optim(lr_mults=(("decoder", 2.0),)), shapes)
  with pytest.raises(ConfigError, match="layer_decay needs a model with one ViT or SwinV2 backbone; a CLIP"):
    optim.layer_ids(
      models.build(config_lib.model_config("clip"), jnp.float32, "cpu"), ["image/blocks/k", "text/blocks/k"]
    )
  for decay in (0.0, 1.5):  # one rule, its row's domain in config_lib: (0, 1]
    with pytest.raises(ConfigError, match=rf"config.optim.layer_decay={decay}: must be a number in \(0, 1\]"):
      config_lib.check(tiny_vit_config(**{"optim.layer_decay": decay}))


def _random_tree(shapes, seed):
  rng = np.random.default_rng(seed)
  return _nest({n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()})


def _nest(flat):
  out = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _flat(tree):
  return {param_rules.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


BASE = dict(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=1.0)


def test_multipliers_scale_the_whole_adamw_step():
  """One step with layer decay moves each param by its multiplier times the plain AdamW step (weight decay
  included: the kernels here decay)."""
  shapes = _shapes(_vit(True))
  params, grads = _random_tree(shapes, 0), _random_tree(shapes, 1)
  lr_schedule = optim.schedule(_optim(**BASE), 10)
  plain_tx = optim.make_optimizer(_optim(**BASE), lr_schedule)
  decayed_tx = optim.make_optimizer(_optim(layer_decay=0.5, **BASE), lr_schedule, _vit(True))
  steps = jax.jit(lambda p, g: tuple(tx.update(g, tx.init(p), p)[0] for tx in (plain_tx, decayed_tx)))
  plain, decayed = (_flat(u) for u in steps(params, grads))
  mults = optim.lr_multipliers(_optim(layer_decay=0.5), shapes, _vit(True))
  for name, update in plain.items():
    np.testing.assert_allclose(decayed[name], update * mults[name], rtol=1e-6, atol=1e-8, err_msg=name)


def test_frozen_backbone_stays_bitwise_while_the_head_trains():
  shapes = _shapes(_vit(True))
  tx = optim.make_optimizer(
    _optim(freeze=(r"^(?!head/)",), layer_decay=0.7, **BASE), optim.schedule(_optim(**BASE), 10), _vit(True)
  )
  params = _random_tree(shapes, 0)
  moments = _flat(tx.init(params)[0].inner_states["train"].inner_state[1].mu)  # (clip, adam, decay) of 'train'
  assert sorted(moments) == ["head/bias", "head/kernel"]  # none for the frozen params
  grads = [_random_tree(shapes, 10 + i) for i in range(3)]
  loud = jax.tree.map(lambda g: g * 1e6, grads[0])
  loud["head"] = grads[0]["head"]

  @jax.jit
  def run(params, grads, loud):
    state, new = tx.init(params), params
    for g in grads:
      updates, state = tx.update(g, state, new)
      new = optax.apply_updates(new, updates)
    # Clipping sees only the trainable gradients: huge frozen gradients leave the head's step as it was.
    first = tx.update(grads[0], tx.init(params), params)[0]
    return new, first, tx.update(loud, tx.init(params), params)[0]

  new, first, first_loud = run(params, grads, loud)
  for name, value in _flat(new).items():
    if name.startswith("head/"):
      assert not np.array_equal(value, _flat(params)[name]), name
    else:
      np.testing.assert_array_equal(value, _flat(params)[name], err_msg=name)
  chex.assert_trees_all_close(first_loud, first)


def test_frozen_state_shards_and_checkpoints(tmp_path):
  """The boxed init of the train loop, its shardings and an Orbax round trip of a state with absent moments."""
  config = tiny_vit_config(strategy="zero1", **{"optim.freeze": (r"^(?!head/)",), "optim.layer_decay": 0.7})
  task = tasks.build(config)
  tx = optim.make_optimizer(config.optim, optim.schedule(config.optim, config.total_steps), task.model)
  init_fn = step_lib.make_init_fn(task, tx, config)
  mesh = parallel.make_mesh(config.mesh)
  abstract, shardings, _ = step_lib.state_shardings(init_fn, mesh, config)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)  # host arrays save fastest
  ckpt = ocp.StandardCheckpointer()  # what checkpoint.Checkpointer writes the state with
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  restored = ckpt.restore(tmp_path / "state", target)
  chex.assert_trees_all_equal(jax.device_get(restored), state)
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(abstract.opt_state)
  head_mu = restored.opt_state[0].inner_states["train"].inner_state[1].mu["head"]["kernel"]
  assert head_mu.sharding == shardings.opt_state[0].inner_states["train"].inner_state[1].mu["head"]["kernel"]


def test_freeze_rules_are_checked():
  config = tiny_vit_config()
  task = tasks.build(config)
  for freeze, message in (
    ((".",), "freezes every param"),
    (("backbone/",), "'backbone/' matches no param"),
    (("head[",), "is not a regex"),
  ):
    with pytest.raises(ConfigError, match=message):
      optim_cfg = override(config.copy_and_resolve_references(), **{"optim.freeze": freeze}).optim
      tx = optim.make_optimizer(optim_cfg, optim.schedule(optim_cfg, 10))
      jax.eval_shape(step_lib.make_init_fn(task, tx, config), jax.random.key(0))


@pytest.mark.slow
def test_frozen_params_are_not_differentiated_and_stay_out_of_the_logged_norm():
  """Frozen gradients are zeroed where they are made: XLA drops the frozen backbone's backward, and
  train/grad_norm is the norm clipping sees (the head's), not the whole model's."""
  import test_train_step  # pylint: disable=g-import-not-at-top

  flops = {}
  for freeze in ((), (r"^(?!head/)",)):
    config = tiny_vit_config(strategy="ddp", **{"optim.freeze": freeze})
    mesh = parallel.make_mesh(config.mesh)
    task = tasks.build(config, mesh)
    batch = task.synthetic_batch(config.global_batch_size, np.random.default_rng(0))
    cost = step_lib.compile_train_step(config, mesh, batch, task).cost_analysis()
    flops[bool(freeze)] = (cost[0] if isinstance(cost, list) else cost)["flops"]
  assert flops[True] < 0.5 * flops[False], flops

  state, step, _ = test_train_step._setup(config, task)  # the frozen config's task
  [batch] = test_train_step._random_batches(config, 1)
  # The zero-initialised head would block every backbone gradient: give it random weights.
  rng = np.random.default_rng(1)
  nonzero_head = lambda path, x: (
    jax.device_put(rng.normal(0, 0.1, x.shape).astype(x.dtype), x.sharding)
    if param_rules.path_str(path) == "head/kernel"
    else x
  )
  state = state.replace(params=jax.tree_util.tree_map_with_path(nonzero_head, state.params))
  params = jax.device_get(state.params)  # the step donates the state
  _, metrics = step(state, batch)
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)  # the step's rng at step 0
  with parallel.activation_sharding(mesh):
    grads = jax.jit(jax.grad(lambda p: task.loss(p, batch, rng)[0]))(params)
  head_norm, full_norm = jax.jit(lambda g: (optax.tree.norm(g["head"]), optax.tree.norm(g)))(grads)  # not per leaf
  assert full_norm > 1.05 * head_norm  # so the check below can fail
  np.testing.assert_allclose(metrics["train/grad_norm"], head_norm, rtol=1e-4)
