"""Dense models: SwinV2 stage outputs, the simple feature pyramid's levels for any patch size, UPerHead,
Segmenter / Detector outputs and gradients on tiny ViT and SwinV2 backbones, sliding-window inference."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax.evaluate import detection as evaluate_detection
from visionfm_jax.losses import detection as detection_losses
from visionfm_jax.losses import matching, pixels
from visionfm_jax.models import dense_heads, detector, segmenter, swinv2, vit

# Tiny backbones on 32 px images: ViT 2x2 tokens (the simple pyramid upsamples twice for stride 4); SwinV2
# 16x16, 8x8, 4x4 stages (strides 2, 4, 8).
VIT = vit.ViT(**vit.parse_variant("pico/16"))
SWIN = swinv2.SwinV2(embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 2), window_size=4, patch_size=2, scan=False)
IMAGES = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
NUM_CLASSES = 5


def _jit(fn):
  """jit at LLVM -O0: these tests are dominated by compile time (see test_convert_swinv2)."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _random_params(model):
  """Params of `model` for 32 px images drawn with numpy (compiling `init`'s many random ops costs far more
  than these tests): kernels ~ N(0, 1 / fan_in), norm scales ~ 1, everything else ~ N(0, 0.1)."""
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES)))["params"]
  rng = np.random.default_rng(0)

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      return noise / np.sqrt(np.prod(x.shape[:-1]))
    return 0.1 * noise + (1.0 if name.endswith("['scale']") else 0.0)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _shapes(tree):
  return jax.tree.map(lambda x: x.shape, tree)


def _init_shapes(model, images=IMAGES, **kwargs):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, **kwargs))


def test_swinv2_stages_are_the_maps_before_merging():
  model = SWIN.clone(scan=False)  # compiles faster than the scanned stages
  params = _random_params(model)
  out = _jit(lambda p: model.apply({"params": p}, IMAGES, return_stages=True))(params)
  assert [s.shape for s in out["stages"]] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 32)]
  # The last stage output, normalised by the final norm, is `tokens`.
  last = out["stages"][-1].reshape(2, 16, 32)
  mean, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
  ln = params["norm"]["ln"]
  np.testing.assert_allclose(out["tokens"], (last - mean) / np.sqrt(var + 1e-5) * ln["scale"] + ln["bias"], atol=1e-4)
  assert set(jax.eval_shape(lambda: model.apply({"params": params}, IMAGES))) == {"tokens", "pooled"}


@pytest.mark.parametrize(
  "patch, image, expected_sizes, expected_strides",
  [
    (16, 64, [16, 8, 4, 2], [4, 8, 16, 32]),  # two up, one up, identity, one down
    (8, 64, [16, 8, 4, 2], [4, 8, 16, 32]),  # one up, identity, two down
    (14, 56, [16, 8, 4, 2], [3.5, 7, 14, 28]),  # as p = 16: strides relative to the patch
    (4, 36, [9, 5, 3, 2], [4, 8, 16, 32]),  # odd maps: max-pooling pads (ceil)
  ],
)
def test_simple_feature_pyramid_levels(patch, image, expected_sizes, expected_strides):
  sfp = dense_heads.SimpleFeaturePyramid(patch, channels=8)
  x = jnp.zeros((1, image // patch, image // patch, 32))
  strides = []

  def init():
    (maps, level_strides), variables = sfp.init_with_output(jax.random.key(0), x)
    strides.extend(level_strides)  # python floats: kept out of eval_shape's abstract outputs
    return maps, variables

  maps, variables = jax.eval_shape(init)
  assert [m.shape for m in maps] == [(1, s, s, 8) for s in expected_sizes]
  assert strides == expected_strides
  ups = {name for name in variables["params"] if "_up_" in name and "norm" not in name}
  steps = {4: -dense_heads.pyramid_steps(patch, 4), 8: -dense_heads.pyramid_steps(patch, 8)}
  assert len(ups) == max(steps[4], 0) + max(steps[8], 0)


def test_uperhead_on_pyramid_levels():
  maps = [jnp.zeros((2, 16 // 2**i, 16 // 2**i, 8 * 2**i)) for i in range(4)]
  head = dense_heads.UPerHead(NUM_CLASSES, channels=16, input_norms=True)
  logits, variables = jax.eval_shape(lambda: head.init_with_output(jax.random.key(0), maps))
  assert logits.shape == (2, 16, 16, NUM_CLASSES) and logits.dtype == jnp.float32
  fpn = variables["params"]["fpn"]
  assert set(fpn["ppm"]) == {"scale_1", "scale_2", "scale_3", "scale_6", "bottleneck"}
  assert {k for k in fpn if k.startswith(("lateral", "output", "input_norm"))} == {
    "lateral_0",
    "lateral_1",
    "lateral_2",
    "output_0",
    "output_1",
    "output_2",
    "input_norm_0",
    "input_norm_1",
    "input_norm_2",
    "input_norm_3",
  }


def test_adaptive_avg_pool_matches_pytorch_bins():
  x = jnp.arange(5 * 7, dtype=jnp.float32).reshape(1, 5, 7, 1)
  pooled = dense_heads.adaptive_avg_pool(x, 3)
  # PyTorch bins over 5 rows: [0, 2), [1, 4), [3, 5); over 7 columns: [0, 3), [2, 5), [4, 7).
  rows, cols = [(0, 2), (1, 4), (3, 5)], [(0, 3), (2, 5), (4, 7)]
  expected = [[x[0, r0:r1, c0:c1, 0].mean() for c0, c1 in cols] for r0, r1 in rows]
  np.testing.assert_allclose(pooled[0, ..., 0], expected, rtol=1e-6)


@pytest.mark.parametrize("backbone", [VIT, SWIN], ids=["vit", "swinv2"])
def test_dense_models_outputs_and_param_layout(backbone):
  init = lambda model: jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), IMAGES))
  logits, seg = init(segmenter.Segmenter(backbone, NUM_CLASSES, neck_channels=8, head_channels=8))
  assert logits.shape == (2, 32, 32, NUM_CLASSES) and logits.dtype == jnp.float32
  levels = (8, 16, 32) if backbone is VIT else (4, 8)
  out, det = init(detector.Detector(backbone, NUM_CLASSES, levels=levels, neck_channels=8, head_channels=8))
  queries = sum((32 // s) ** 2 for s in levels)
  assert out["logits"].shape == (2, queries, NUM_CLASSES) and out["boxes"].shape == (2, queries, 4)
  standalone = _shapes(nn.unbox(_init_shapes(backbone))["params"])
  # SwinV2's segmenter normalises the stage outputs in its head: it has no neck.
  assert set(seg["params"]) == ({"backbone", "neck", "head"} if backbone is VIT else {"backbone", "head"})
  assert set(det["params"]) == {"backbone", "neck", "head"}
  for variables in (seg, det):
    params = variables["params"]
    assert _shapes(nn.unbox(params)["backbone"]) == standalone  # a pretraining checkpoint loads by prefix
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    assert all(x.value.dtype == jnp.float32 for x in leaves)


def test_bf16_compute_keeps_fp32_logits():
  seg = segmenter.Segmenter(VIT.clone(dtype=jnp.bfloat16), NUM_CLASSES, 8, 8, dtype=jnp.bfloat16)
  out = jax.eval_shape(lambda: seg.init_with_output(jax.random.key(0), IMAGES)[0])
  assert out.shape == (2, 32, 32, NUM_CLASSES) and out.dtype == jnp.float32
  det = detector.Detector(
    VIT.clone(dtype=jnp.bfloat16), NUM_CLASSES, neck_channels=8, head_channels=8, dtype=jnp.bfloat16
  )
  out = jax.eval_shape(lambda: det.init_with_output(jax.random.key(0), IMAGES)[0])
  assert out["logits"].dtype == jnp.float32 and out["boxes"].dtype == jnp.float32


def test_a_classification_head_on_the_backbone_is_refused():
  with pytest.raises(ValueError, match="num_classes=3"):
    _init_shapes(segmenter.Segmenter(VIT.clone(num_classes=3), NUM_CLASSES))


# Fewer pooling scales and levels than the defaults: compile time dominates (the defaults are checked by shape).
SEGMENTER = segmenter.Segmenter(
  VIT, NUM_CLASSES, neck_channels=8, head_channels=8, ppm_scales=(1, 2), neck_strides=(4, 8, 16)
)
LABELS = np.random.default_rng(2).integers(0, NUM_CLASSES, (2, 32, 32)).astype(np.int32)
LABELS[:, :4] = 255


@_jit
def _segmenter_step(params, images):
  """(loss, grads, logits) of the ViT segmenter: one compile shared by the gradient and sliding-window tests."""

  def loss_fn(p):
    logits = SEGMENTER.apply({"params": p}, images)
    return pixels.segmentation_cross_entropy(logits, LABELS), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, logits


def test_segmenter_logits_and_gradients():
  _, grads, logits = _segmenter_step(_random_params(SEGMENTER), IMAGES)
  assert logits.shape == (2, 32, 32, NUM_CLASSES) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Every neck / head parameter (the transposed convs included) and the backbone's first layer learn.
  assert {"s4_up_0", "s4_up_1", "s8_up_0"} <= set(grads["neck"])
  for path, g in jax.tree_util.tree_leaves_with_path({k: v for k, v in grads.items() if k != "backbone"}):
    assert np.any(g), jax.tree_util.keystr(path)
  assert np.any(grads["backbone"]["patch_embed"]["kernel"])


def test_detector_gradients_through_matching():
  # SwinV2 compiles slowly; its detector (FPN neck) is checked by shape above.
  model = detector.Detector(VIT, NUM_CLASSES, levels=(8, 16), num_convs=1, neck_channels=8, head_channels=8)
  classes = jnp.array([[1, 3, -1], [0, -1, -1]], jnp.int32)
  targets = jnp.array(
    [[[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8], [0, 0, 0, 0]], [[0.2, 0.3, 0.7, 0.9], [0, 0, 0, 0], [0, 0, 0, 0]]],
    jnp.float32,
  )

  @_jit
  def run(params):
    def loss_fn(p):
      out = model.apply({"params": p}, IMAGES)
      cost = matching.batched_match_cost(out["logits"], out["boxes"], classes, targets)
      index = matching.hungarian_match(cost, classes >= 0)
      return detection_losses.detection_set_loss(out["logits"], out["boxes"], classes, targets, index)[0], out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, out, grads

  loss, out, grads = run(_random_params(model))
  assert np.isfinite(loss)
  # Each box of the finest level (stride 8: 4 x 4 locations) surrounds its location's centre.
  centres = (np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) + 0.5) / 4
  first = out["boxes"][0, :16]
  assert np.all(first[:, :2] < centres) and np.all(first[:, 2:] > centres)
  for path, g in jax.tree_util.tree_leaves_with_path({k: v for k, v in grads.items() if k != "backbone"}):
    assert np.any(g), jax.tree_util.keystr(path)
  assert np.any(grads["backbone"]["patch_embed"]["kernel"])
  top = evaluate_detection.top_k_detections(out["logits"], out["boxes"], 7)
  assert top["scores"].shape == (2, 7) and np.all(np.diff(top["scores"], axis=1) <= 0)
  assert np.all((top["boxes"] >= 0) & (top["boxes"] <= 1))


def test_detection_head_starts_at_the_prior_with_boxes_around_location_centres():
  head = dense_heads.DenseDetectionHead(NUM_CLASSES, channels=4, num_convs=0, prior_prob=0.02)
  maps = [jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 1, 1, 4))]  # zero features: outputs are the biases
  out, variables = _jit(lambda: head.init_with_output(jax.random.key(0), maps, [16.0, 32.0], (32, 32)))()
  np.testing.assert_allclose(variables["params"]["classifier"]["bias"].value, np.log(0.02 / 0.98), rtol=1e-6)
  np.testing.assert_allclose(jax.nn.sigmoid(out["logits"]), 0.02, rtol=1e-5)
  # Centres of a 32 px image: level 0 (stride 16) at 8 and 24 px, row-major; level 1 (stride 32) at 16 px.
  # A zero raw distance is one stride on every side.
  centres = np.array([[8, 8], [24, 8], [8, 24], [24, 24], [16, 16]], np.float32)
  stride = np.array([16, 16, 16, 16, 32], np.float32)[:, None]
  np.testing.assert_allclose(out["boxes"][0], np.concatenate([centres - stride, centres + stride], 1) / 32, atol=1e-6)


def test_sliding_window_equals_whole_image_when_the_window_is_the_image():
  params = _random_params(SEGMENTER)
  apply_fn = lambda x: _segmenter_step(params, x)[2]
  whole = apply_fn(IMAGES)
  slid = segmenter.sliding_window_logits(apply_fn, IMAGES, window=32, stride=16, num_classes=NUM_CLASSES)
  np.testing.assert_array_equal(slid, whole)


def test_sliding_window_averages_overlaps():
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.standard_normal((2, 10, 7, 3)), jnp.float32)
  # Per-pixel logits are the same in every window: any tiling gives the whole-image result.
  weights = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
  pointwise = lambda x: x @ weights
  out = segmenter.sliding_window_logits(pointwise, images, window=4, stride=3, num_classes=4)
  np.testing.assert_allclose(out, pointwise(images), rtol=1e-5, atol=1e-6)
  # Window means: every pixel gets the average over the windows that cover it (rows 0..3, 3..6, 6..9).
  mean = lambda x: jnp.broadcast_to(x.mean(axis=(1, 2), keepdims=True)[..., :1], x.shape[:3] + (1,))
  out = segmenter.sliding_window_logits(mean, images, window=(4, 7), stride=3, num_classes=1)
  starts = segmenter.window_starts(10, 4, 3)
  assert starts == [0, 3, 6]
  expected = np.zeros((2, 10, 7, 1))
  counts = np.zeros((10, 1, 1))
  for y in starts:
    expected[:, y : y + 4] += np.asarray(images[:, y : y + 4, :, :1]).mean(axis=(1, 2), keepdims=True)
    counts[y : y + 4] += 1
  np.testing.assert_allclose(out, expected / counts, rtol=1e-5)
  # Images smaller than the window are padded; their logits come back at the image size.
  small = segmenter.sliding_window_logits(pointwise, images[:, :3, :3], window=4, stride=2, num_classes=4)
  np.testing.assert_allclose(small, pointwise(images[:, :3, :3]), rtol=1e-5, atol=1e-6)
  assert segmenter.window_starts(8, 8, 4) == [0] and segmenter.window_starts(9, 4, 4) == [0, 4, 5]


@pytest.mark.parametrize("size", [(9, 16), (3, 5)])
def test_resize_bilinear_matches_jax_image_resize(size):
  x = np.random.default_rng(5).standard_normal((2, 4, 8, 3)).astype(np.float32)
  expected = jax.image.resize(x, (2, *size, 3), method="bilinear", antialias=False)
  np.testing.assert_allclose(dense_heads.resize_bilinear(x, size), expected, rtol=1e-5, atol=1e-6)
