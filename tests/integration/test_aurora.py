"""Aurora-Vision-XL: size, masking, the split loss and two-pass accumulation, config errors."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import config_lib, models, parallel, param_rules, tasks
from visionfm_jax.bench import hlo_cost
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate import panels
from visionfm_jax.tasks import aurora, image_text
from visionfm_jax.tasks.base import EvalContext
from visionfm_jax.tools import summary

from conftest import random_params, tiny_aurora_config
import test_train_step


def _pair_batches(config, n, seed=0, uncaptioned=0.25):
  """Random uint8 images, captions BOS w.. EOS PAD.. of random lengths, SimMIM masks of the configured ratio; a
  random `uncaptioned` share of the examples are images without captions (all PAD, has_text False), as a
  mixture's image-only entries give."""
  rng = np.random.default_rng(seed)
  size, length = config.data.image_size, config.model.text.max_len
  grid = size // config.data.mim.mask_patch_size
  batches = []
  for _ in range(n):
    b = config.global_batch_size
    text = np.zeros((b, length), np.int32)
    for row in text:
      words = rng.integers(2, length - 1)
      row[0], row[1 : words + 1], row[words + 1] = 2, rng.integers(4, config.model.text.vocab_size, words), 3
    masks = np.stack([transforms.mim_mask(grid, config.data.mim.mask_ratio, rng) for _ in range(b)])
    has_text = rng.random(b) >= uncaptioned
    text[~has_text] = 0
    batches.append(
      {
        "image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
        "text": text,
        "mim_mask": masks,
        "has_text": has_text,
      }
    )
  return batches


def _tiny(**overrides):
  """The tiny Aurora on the femto encoder (pico's first stage alone: no patch merging), whose programs compile in
  about three quarters of the time: what the tests below check is of the heads, the loss and the step, which see
  the encoder's tokens whatever its stages."""
  return tiny_aurora_config(**{"model.encoder.variant": "femto", **overrides})


_PARAMS = {}


def _params(task):
  """Random params by shape (conftest.random_params: no init compile, and no identity-like blocks that would
  hide a dropped or leaked path), shared by tests whose model configs agree (mim_view and drop_path do not
  change the params)."""
  model = task.config.model.copy_and_resolve_references()
  model.mim_view, model.encoder.drop_path = "separate", 0.0
  key = model.to_json()
  if key not in _PARAMS:
    _PARAMS[key] = random_params(task)
  return _PARAMS[key]


def _train(config, batches, devices=None, params=None):
  state, _, history = test_train_step._train(config, batches, devices=devices, params=params)
  return jax.device_get(state.params), history


def test_default_config_has_the_seeds_3_7b_parameters():
  from configs import aurora_xl  # pylint: disable=g-import-not-at-top

  s = summary.summarize(aurora_xl.get_config(), devices=64, strategy="zero2")
  assert abs(s["total_params"] / 3.7e9 - 1) < 0.02, s["total_params"]
  assert s["modules"]["encoder"] == 2_997_815_008 + 512  # SwinV2-G without head, plus the mask token
  assert s["total_params"] == 3_704_005_857


def test_every_no_decay_rule_exempts_a_kernel():
  """Only kernels decay (optim.decay_mask_fn), so a no_decay rule that matches no kernel would do nothing."""
  config = tiny_aurora_config()
  params = jax.eval_shape(tasks.build(config).init_variables, jax.random.key(0))["params"]
  kernels = [name for name, _ in param_rules.named_leaves(params) if name.endswith("/kernel")]
  for rule in config.optim.no_decay:
    assert any(re.search(rule, name) for name in kernels), rule


def test_uncaptioned_images_train_mim_only():
  """Contrastive and caption losses are those of the captioned examples alone; MIM covers every image."""
  config = _tiny(global_batch_size=16)
  task = tasks.build(config)
  params = _params(task)
  batch = _pair_batches(config, 1, uncaptioned=0.4)[0]
  captioned = {k: v[batch["has_text"]] for k, v in batch.items()}
  assert 0 < len(captioned["text"]) < 16
  loss = jax.jit(lambda b: task.loss(params, b, jax.random.key(0))[1])
  mixed, alone = loss(batch), loss(captioned)
  for key in ("train/contrastive_loss", "train/caption_loss"):
    np.testing.assert_allclose(mixed[key], alone[key], rtol=1e-5, err_msg=key)
  everyone = loss({**batch, "has_text": np.ones(16, bool)})  # the empty captions taken as captions
  assert abs(everyone["train/contrastive_loss"] - mixed["train/contrastive_loss"]) > 1e-3
  assert abs(mixed["train/mim_loss"] - alone["train/mim_loss"]) > 1e-4  # MIM: every image, not the subset


# Two steps (zero2) accumulated over 4 micro-batches of 8 on 8 devices (one example per device), and the same
# in one step on one device (the reference: no partitioning, and it compiles in ~60% of the time 8 devices take).
# Not square: with 64 = 8 x 8 the split's reshape to (B / steps, steps) and one to (steps, B / steps) are the
# same, so mixing the two up could not show. The count is a scan's length (4 proves what the recipe's 8 would),
# and a batch of 32 compiles ~25% faster than one of 64. The accumulated run sums each device's gradients
# unreduced and reduces them once (config.accumulate_unreduced, the recipe's setting).
ACCUM_BATCH, ACCUM_STEPS = 32, 4
GPUS_PER_NODE = 4  # the HLO check below reads the 8 devices as 2 nodes of 4


@pytest.fixture(scope="module")
def accumulation_runs():
  """((params, metrics history) of two steps of the batch of 32 in one step on one device, the same accumulated
  over 4 micro-batches of 8 on 8 devices, and the accumulated step's partitioned HLO), from one initial state (the
  module's random params: no init compile, and no identity-like blocks), in the 'shared' view: one encoder pass
  where 'separate' runs two, and its programs compile in about four fifths of the time; the accumulation takes the
  'separate' view's second pass, which feeds the MIM head alone, as any other part of the loss, and both views'
  pass-1 features are checked below."""

  def config(accum, **fields):
    return tiny_aurora_config(
      global_batch_size=ACCUM_BATCH, strategy="zero2", grad_accum_steps=accum, **{"model.mim_view": "shared"}, **fields
    )

  batches = _pair_batches(config(1), 2)
  params = _params(tasks.build(config(1)))
  state, _, history, hlo = test_train_step._train(
    config(ACCUM_STEPS, accumulate_unreduced=True), batches, with_hlo=True, params=params
  )
  return (
    _train(config(1), batches, devices=jax.devices()[:1], params=params),
    (jax.device_get(state.params), history),
    hlo,
  )


@pytest.mark.slow
@pytest.mark.xdist_group("aurora_accumulation")
def test_four_accumulation_steps_equal_one_step_of_four_times_the_batch(accumulation_runs):
  """Two-pass accumulation: the contrastive loss spans the whole batch of 32 (8 devices, zero2), not 8, and
  its captioned examples only (a quarter are uncaptioned images); the devices' unreduced sums, reduced once a
  step, are the whole batch's gradient (that of one step of the batch of 32 on one device)."""
  (ref, ref_hist), (got, hist), _ = accumulation_runs
  for key in ("train/loss", "train/contrastive_loss", "train/caption_loss", "train/mim_loss", "train/grad_norm"):
    np.testing.assert_allclose(hist[-1][key], ref_hist[-1][key], rtol=2e-5, err_msg=key)
  chex.assert_trees_all_close(_without_key_biases(got), _without_key_biases(ref), atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("aurora_accumulation")
def test_unreduced_accumulation_communicates_once_a_step(accumulation_runs):
  """No collective runs inside the micro-batch loops (each device sums its own gradients); after them the fp32
  gradients, a whole copy per device, are reduced across all 8 devices (both "nodes") once."""
  _, (params, _), hlo = accumulation_runs
  collectives = [k for k in hlo_cost.Program(hlo, devices_per_node=GPUS_PER_NODE).kernels if k.kind == "collective"]
  assert not [(k.collective, k.label) for k in collectives if k.count > 1]
  reductions = [k for k in collectives if k.collective in ("all-reduce", "reduce-scatter")]
  across = sum(k.bytes for k in reductions if k.group_spans_nodes and k.group_size == 8)
  whole = 4 * sum(np.size(x) for x in jax.tree.leaves(params))
  assert whole < across < 1.5 * whole, (across, whole)


def _without_key_biases(params):
  """Key biases have an exactly zero gradient (softmax is shift-invariant per query): Adam turns their float
  noise (~1e-12) into lr-sized steps, so they are excluded from comparisons."""

  def drop(path, x):
    names = [getattr(k, "key", "") for k in path]
    if names[-2:] == ["kv", "bias"]:
      return jnp.asarray(x).at[..., 0, :, :].set(0)
    if names[-2:] == ["qkv", "bias"]:
      return jnp.asarray(x).at[..., 1, :, :].set(0)
    return x

  return jax.tree_util.tree_map_with_path(drop, params)


def test_naive_accumulation_would_differ():
  """The check above can fail: contrastive losses over micro-batches of 8 are not the loss over 32."""
  config = _tiny(global_batch_size=ACCUM_BATCH)
  task = tasks.build(config)
  params = _params(task)
  batch = jax.tree.map(jnp.asarray, _pair_batches(config, 1)[0])
  batch, context = task.whole_batch(batch, jax.random.key(1))

  @jax.jit
  def whole_and_micro(params, batch):
    """The contrastive loss of the whole batch and those of its micro-batches, in one program."""
    feats = task.batch_features(params, batch, jax.random.key(1), context)
    loss = lambda f, has_text: task.global_loss(params, f, {**context, "has_text": has_text})[1]
    return loss(feats, context["has_text"]), [
      loss(jax.tree.map(lambda f, i=i: f[i::ACCUM_STEPS], feats), context["has_text"][i::ACCUM_STEPS])
      for i in range(ACCUM_STEPS)
    ]

  whole, micro = whole_and_micro(params, batch)
  micro = np.mean([m["train/contrastive_loss"] for m in micro])
  assert abs(whole["train/contrastive_loss"] - micro) > 0.1


_DROPOUT = {}


def _with_stochastic_depth(view):
  """(task, params, passes) of the tiny Aurora with drop_path 0.5 in `view`; passes: (params, batch, rng, context)
  -> (the features of pass 1, batch_features; those of pass 2, the loss's), jitted: one compile per view, shared
  by the tests of the view's passes below."""
  if view not in _DROPOUT:
    task = tasks.build(_tiny(**{"model.encoder.drop_path": 0.5, "model.mim_view": view}))
    passes = jax.jit(lambda *args: (task.batch_features(*args), task.local_loss(*args)[1]))
    _DROPOUT[view] = task, _params(task), passes
  return _DROPOUT[view]


@pytest.mark.xdist_group("aurora_views")
@pytest.mark.parametrize("view", ["separate", "shared"])
def test_accumulation_features_match_the_loss_features_with_stochastic_depth(view):
  """Pass 1 (forward-only features) must see the same dropout draws as pass 2 (the loss)."""
  task, params, passes = _with_stochastic_depth(view)
  batch = jax.tree.map(jnp.asarray, _pair_batches(task.config, 1)[0])
  rng = jax.random.key(3)
  batch, context = task.whole_batch(batch, rng)
  feats, loss_feats = passes(params, batch, rng, context)
  chex.assert_trees_all_close(feats, loss_feats, atol=1e-6)
  other, _ = passes(params, batch, jax.random.key(4), context)
  assert not np.allclose(other[0], feats[0], atol=1e-4)  # the draws matter, so equality above means something


def test_masked_patches_do_not_reach_the_encoder():
  config = _tiny()
  task = tasks.build(config)
  params = _params(task)
  batch = _pair_batches(config, 1)[0]
  factor = config.data.image_size // batch["mim_mask"].shape[1]
  pixels = np.kron(batch["mim_mask"], np.ones((factor, factor), np.uint8))[..., None].astype(bool)
  changed = np.where(pixels, 255 - batch["image"], batch["image"])
  encode = jax.jit(lambda im, m: task.model.apply({"params": params}, task.normalize(im), m, method="encode"))
  masked_a, masked_b = encode(batch["image"], batch["mim_mask"]), encode(changed, batch["mim_mask"])
  np.testing.assert_allclose(masked_a, masked_b, atol=1e-6)
  clean_a, clean_b = encode(batch["image"], None), encode(changed, None)
  assert not np.allclose(clean_a, clean_b, atol=1e-3)
  # the loss's one encoder call for both views gives each view's own call (to fp32 roundoff: other GEMM shapes)
  views = jax.jit(lambda im, m: task.model.apply({"params": params}, task.normalize(im), m, method="encode_views"))
  clean, masked = views(batch["image"], batch["mim_mask"])
  np.testing.assert_allclose(clean, clean_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(masked, masked_a, rtol=1e-5, atol=1e-6)


@pytest.mark.xdist_group("aurora_views")
def test_views_decide_which_heads_see_the_masked_image():
  """The loss's image embedding (the contrastive head's input) sees the mask in the 'shared' view only; the
  dropout draws are the same for both masks."""

  def image_emb(view, mask_value):
    task, params, passes = _with_stochastic_depth(view)
    batch = _pair_batches(task.config, 1)[0]
    batch = jax.tree.map(jnp.asarray, {**batch, "mim_mask": np.full_like(batch["mim_mask"], mask_value)})
    rng = jax.random.key(3)
    batch, context = task.whole_batch(batch, rng)
    return passes(params, batch, rng, context)[1][0]

  np.testing.assert_allclose(image_emb("separate", 0), image_emb("separate", 1), atol=1e-6)
  assert not np.allclose(image_emb("shared", 0), image_emb("shared", 1), atol=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("aurora_accumulation")
def test_train_metrics_log_every_loss_term(accumulation_runs):
  """The first step's metrics, in one step and accumulated: the loss is the weighted sum of the logged terms."""
  config = tiny_aurora_config()
  weights = config.loss
  for _, hist in accumulation_runs[:2]:
    m = hist[0]
    total = (
      weights.mim_weight * m["train/mim_loss"]
      + weights.contrastive_weight * m["train/contrastive_loss"]
      + weights.caption_weight * m["train/caption_loss"]
    )
    np.testing.assert_allclose(m["train/loss"], total, rtol=1e-5)
    assert abs(m["train/caption_loss"] - np.log(config.model.text.vocab_size)) < 0.5  # at init: about ln(vocab)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("model.text.pool", "eos", "text.pool"),
    ("model.mim_view", "both", "mim_view"),
    ("model.image_size", 20, "image_size=20"),
    ("model.decoder_depth", 0, "decoder_depth"),
  ],
)
def test_bad_model_configs_name_the_field(field, value, message):
  config = tiny_aurora_config(**{field: value})
  with pytest.raises(ConfigError, match=message):
    config_lib.check(config)  # as main does: the field domains (decoder_depth) first,
    tasks.build(config)  # then what only the model knows


def test_model_config_knows_aurora():
  c = config_lib.model_config("aurora")
  assert c.text.pool == "cls" and c.encoder.variant == "T"
  with pytest.raises(ConfigError, match="aurora"):
    config_lib.model_config("coca")


def test_flops_count_the_second_encoder_pass_of_the_separate_view():
  separate, shared = (tasks.build(tiny_aurora_config(**{"model.mim_view": v})) for v in ("separate", "shared"))
  encoder = models.train_flops_per_example(separate.model.encoder)
  assert separate.train_flops_per_example() - shared.train_flops_per_example() == pytest.approx(encoder)
  assert shared.train_flops_per_example() > encoder


def test_the_panel_shows_the_masked_input_the_reconstruction_and_the_original():
  """The panel of random params on the first held-out pairs: rows of (masked input, reconstruction, original), each
  image scaled to at least TILE px; the first row's masked input is grey exactly where its mask is, its
  reconstruction is the original outside the mask, its original is the image."""
  config = _tiny()
  mesh = parallel.make_mesh(config.mesh)
  task = tasks.build(config, mesh)
  ctx = EvalContext(mesh, config.global_batch_size, 0, 1)
  with parallel.activation_sharding(mesh):
    picture = task.panel(ctx)(_params(task))
  first = next(iter(image_text.held_out_pairs(task, ctx, mim=config.data.mim)()))
  image, grid = first["image"][0], first["mim_mask"][0]
  scale = -(-panels.TILE // image.shape[0])
  cell_width = picture.shape[1] // 3  # three columns of equal width
  top = panels.LINE + 3 * panels.MARGIN  # the title's line, then the first row's margin

  def shown(column):
    left = column * cell_width + panels.MARGIN
    return picture[top : top + image.shape[0] * scale : scale, left : left + image.shape[1] * scale : scale]

  masked = np.kron(grid, np.ones((image.shape[0] // grid.shape[0],) * 2, np.uint8))[..., None] > 0
  assert masked.any() and not masked.all()
  np.testing.assert_array_equal(shown(0), np.where(masked, np.uint8(128), image))
  np.testing.assert_array_equal(np.where(masked, 0, shown(1)), np.where(masked, 0, image))
  assert not np.array_equal(shown(1), image)  # the masked patches hold the model's pixels
  np.testing.assert_array_equal(shown(2), image)
  assert picture.shape[0] >= aurora.PANEL_ROWS * image.shape[0] * scale
