"""Hugging Face SwinV2 -> our SwinV2: fp32 parity with transformers, block layouts, bad weights and configs,
model_type dispatch, and a tools.import_hf round trip whose printed overrides rebuild the model."""

import functools
import json
import math
import os
import re
import shlex

from absl import flags
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from visionfm_jax import config_lib, convert, models
from visionfm_jax.errors import CheckpointError
from visionfm_jax.models import swinv2
from visionfm_jax.tools import import_hf
from visionfm_jax.training import checks, stored

# The HF-directory helpers of the ViT importer's tests (importing them skips this module, as that one, without
# torch or transformers): images as torch NCHW and our NHWC, edited copies of save_pretrained directories,
# running tools.import_hf.
from test_convert_vit import ATOL, _edited_copy, _images, _import_hf, torch, transformers

jax.config.update("jax_default_matmul_precision", "highest")

BACKBONE, CLASSIFIER = "Swinv2Model", "Swinv2ForImageClassification"

# Tiny models; the comments give each stage's (feature map, window, shift) as transformers picks them.
CONFIGS = {
  # 16x16 (4, 2), 8x8 (4, 2): shifted windows and their mask in both stages; the "pico" size.
  "shifted": dict(
    arch=CLASSIFIER,
    image_size=32,
    patch_size=2,
    embed_dim=16,
    depths=[2, 2],
    num_heads=[2, 4],
    window_size=4,
    pretrained_window_sizes=[0, 0],
    num_labels=3,
  ),
  # 8x8 (8, 0), 4x4 (4, 0), 2x2 (2, 0): every map fits one window, clamped and unshifted; no q/v biases
  # (zeros in ours); in the last block half the logit scales above the clamp log(100) (only there: a scale
  # of 100 multiplies the fp32 rounding of its input by 100, in transformers as in ours).
  "clamped_windows": dict(
    arch=BACKBONE,
    image_size=32,
    patch_size=4,
    embed_dim=8,
    depths=[2, 2, 2],
    num_heads=[2, 2, 4],
    window_size=8,
    pretrained_window_sizes=[0, 0, 0],
    qkv_bias=False,
    over_clamp="encoder.layers.2.blocks.1.",
  ),
  # Odd depths (stages of 1 and 3 blocks: unrolled only), drop_path_rate in the config (eval: no stochastic depth),
  # 16x16 (4, 2), 8x8 (4, 2), 4x4 (4, 0). Offsets normalised by the pretraining windows (3, 2, 0), not the
  # window (a 4th entry, as in 4-stage configs, is unused); mlp_ratio 2; a large eps that shows which norms
  # use layer_norm_eps (blocks, final) and which 1e-5 (patch embedding, merging).
  "classifier_odd_depths": dict(
    arch=CLASSIFIER,
    image_size=32,
    patch_size=2,
    embed_dim=12,
    depths=[1, 3, 1],
    num_heads=[3, 2, 6],
    window_size=4,
    pretrained_window_sizes=[3, 2, 0, 5],
    mlp_ratio=2.0,
    layer_norm_eps=1e-2,
    num_labels=5,
    drop_path_rate=0.3,
  ),
  # Maps that do not divide into windows: 11x11 padded to 12 (4, 2), then merged with a padding row and
  # column into 6x6, padded to 8 (4, 2); transformers clamps stage 1 from 11 // 2 = 5, the same (4, 2).
  # Padded tokens take part in attention (as keys of zero, values of v_bias), as in transformers.
  "padded": dict(
    arch=BACKBONE,
    image_size=22,
    patch_size=2,
    embed_dim=8,
    depths=[2, 2],
    num_heads=[1, 2],
    window_size=4,
    pretrained_window_sizes=[0, 0],
  ),
}
# The unrolled layout is compared with transformers for these too (and "shifted" unrolled through
# tools.import_hf); the others run scanned only: compiles take most of the time.
UNROLLED = ("classifier_odd_depths",)


def _randomise(model: torch.nn.Module, seed: int, over_clamp: str | None = None) -> None:
  """Every parameter random: HF init leaves norms at 1/0 (and the post-norms hide mapping errors), biases at 0
  and logit scales at log(10). Blocks named `over_clamp...` get logit scales above the clamp in even heads."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("logit_scale"):
        p.copy_(math.log(10.0) + 0.5 * noise)
        if over_clamp and over_clamp in name:
          p[::2] = math.log(100.0) + 0.2 + noise[::2].abs()
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.3 * noise)
      else:  # fan-in scaling keeps activations and position-bias MLP outputs O(1)
        p.copy_(noise / math.sqrt(p[0].numel()))


def _build_hf(spec: dict, seed: int = 0):
  spec = dict(spec)
  arch, over_clamp = spec.pop("arch"), spec.pop("over_clamp", None)
  model = getattr(transformers, arch)(transformers.Swinv2Config(**spec))
  _randomise(model, seed, over_clamp)
  return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """name -> (directory written by save_pretrained, the HF model), built once per module."""

  @functools.lru_cache(maxsize=None)
  def get(name):
    hf, path = _build_hf(CONFIGS[name], seed=list(CONFIGS).index(name)), tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return str(path), hf

  return get


def _reference(hf, pixels) -> dict[str, np.ndarray]:
  with torch.no_grad():
    backbone = hf if isinstance(hf, transformers.Swinv2Model) else hf.swinv2
    out = backbone(pixel_values=pixels)
    ref = {"tokens": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}
    if not isinstance(hf, transformers.Swinv2Model):
      ref["logits"] = hf(pixel_values=pixels).logits.numpy()
  return ref


# One compile per distinct model (flax modules hash by their fields), shared across tests. Compiles take most
# of this file's time; LLVM at -O0 halves them (outputs move by ~1e-6: other instruction orders, same HLO).
_apply = jax.jit(
  lambda model, variables, images: model.apply(variables, images),
  static_argnums=0,
  compiler_options={"xla_backend_optimization_level": 0},
)


@functools.lru_cache(maxsize=None)
def _from_hf(path: str, scan: bool):
  """convert.from_hf, once per directory and layout (its results are immutable)."""
  return convert.from_hf(path, scan=scan)


def _assert_matches(ours, ref, label: str) -> None:
  assert set(ours) == set(ref)
  diffs = {k: float(np.max(np.abs(np.asarray(ours[k]) - ref[k]))) for k in ref}
  print(f"{label}: max abs diff {diffs}")
  chex.assert_trees_all_close({k: np.asarray(v) for k, v in ours.items()}, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
  "name, scan", [(n, True) for n in CONFIGS if n not in UNROLLED] + [(n, False) for n in UNROLLED]
)
def test_matches_transformers(hf_dir, name, scan):
  path, hf = hf_dir(name)
  spec = CONFIGS[name]
  model, variables = _from_hf(path, scan)
  assert (model.embed_dim, model.depths, model.num_heads, model.window_size, model.patch_size, model.image_size) == (
    spec["embed_dim"],
    tuple(spec["depths"]),
    tuple(spec["num_heads"]),
    spec["window_size"],
    spec["patch_size"],
    spec["image_size"],
  )
  assert model.pretrained_window_sizes == tuple(spec.get("pretrained_window_sizes", [0] * 4)[: len(spec["depths"])])
  assert (model.mlp_ratio, model.layer_norm_eps, model.extra_norm_period, model.scan) == (
    spec.get("mlp_ratio", 4.0),
    spec.get("layer_norm_eps", 1e-5),
    0,
    scan,
  )
  assert model.num_classes == spec.get("num_labels", 0)
  assert ("blocks" in variables["params"]["stage_0"]) == scan
  pixels, images = _images(spec["image_size"])
  _assert_matches(_apply(model, variables, images), _reference(hf, pixels), f"{name} scan={scan}")


def test_scanned_and_unrolled_hold_the_same_numbers(hf_dir):
  path, _ = hf_dir("clamped_windows")
  scanned = _from_hf(path, True)[1]["params"]
  unrolled = _from_hf(path, False)[1]["params"]
  depths = CONFIGS["clamped_windows"]["depths"]
  stacked = {
    k: convert.stack_layers(v, depths[int(k[-1])], members=swinv2.PAIR) if k.startswith("stage_") else v
    for k, v in unrolled.items()
  }
  chex.assert_trees_all_equal(stacked, scanned)
  chex.assert_trees_all_equal(
    jax.tree.map(lambda a: a[0], scanned["stage_1"]["blocks"]["shifted"]), unrolled["stage_1"]["blocks_1"]
  )  # block 2j + 1: the shifted one of pair j


def test_odd_depths_import_unrolled_only(hf_dir):
  path, _ = hf_dir("classifier_odd_depths")
  with pytest.raises(CheckpointError, match=r"depths \[1, 3, 1\].*even.*scan=False"):
    _from_hf(path, True)


def test_qkv_bias_false_converts_to_zero_biases(hf_dir):
  params = _from_hf(hf_dir("clamped_windows")[0], True)[1]["params"]
  attn = params["stage_2"]["blocks"]["plain"]["attn"]
  assert attn["q_bias"].shape == attn["v_bias"].shape == (1, 4, 8)
  assert not np.any(attn["q_bias"]) and not np.any(attn["v_bias"])


def test_buffers_and_mask_token_are_ignored(hf_dir, tmp_path):
  """Older transformers saved the relative-position buffers; Swinv2Model(use_mask_token=True) a mask token."""
  path, hf = hf_dir("shifted")
  attn = hf.swinv2.encoder.layers[1].blocks[0].attention.self
  extra = {
    "swinv2.embeddings.mask_token": np.zeros((1, 1, 16), np.float32),
    "swinv2.encoder.layers.1.blocks.0.attention.self.relative_coords_table": attn.relative_coords_table.numpy(),
    "swinv2.encoder.layers.1.blocks.0.attention.self.relative_position_index": attn.relative_position_index.numpy(),
  }
  edited = _edited_copy(path, tmp_path / "buffers", tensors=lambda t: t.update(extra))
  chex.assert_trees_all_equal(convert.from_hf(edited)[1], _from_hf(path, True)[1])


KEY = "swinv2.encoder.layers.1.blocks.1.attention.self.continuous_position_bias_mlp.2.weight"
MERGE = "swinv2.encoder.layers.0.downsample.reduction.weight"
EXTRA = "swinv2.encoder.layers.1.blocks.2.output.dense.bias"
# name -> (edited tensors, the key the message names)
BAD_WEIGHTS = {
  "missing": (lambda t: t.pop(KEY), KEY),
  "wrong_shape": (lambda t: t.update({KEY: np.zeros((2, 512), np.float32)}), KEY),
  "missing_merge": (lambda t: t.pop(MERGE), MERGE),
  "unexpected": (lambda t: t.update({EXTRA: np.zeros(32, np.float32)}), EXTRA),
}
# name -> (edited config.json, the field the message names after "config.json: ")
BAD_CONFIGS = {
  "absolute_embeddings": (lambda c: c.update(use_absolute_embeddings=True), "use_absolute_embeddings=True"),
  "tanh_gelu": (lambda c: c.update(hidden_act="gelu_new"), "hidden_act"),
  "grey": (lambda c: c.update(num_channels=1), "num_channels"),
  "non_square_image": (lambda c: c.update(image_size=[32, 48]), "image_size"),
  "non_square_patch": (lambda c: c.update(patch_size=[2, 4]), "patch_size"),
  "image_not_divisible": (lambda c: c.update(image_size=33), "image_size=33 is not divisible by patch_size"),
  "window_pair": (lambda c: c.update(window_size=[4, 4]), "window_size"),
  "short_pretrained_windows": (lambda c: c.update(pretrained_window_sizes=[0]), "pretrained_window_sizes"),
  "pretrained_window_1": (lambda c: c.update(pretrained_window_sizes=[1, 0]), "pretrained_window_sizes"),
  "heads": (lambda c: c.update(num_heads=[3, 4]), r"num_heads\[0\]"),
  "heads_per_stage": (lambda c: c.update(num_heads=[2]), "num_heads"),
  "masked_image_modeling": (lambda c: c.update(architectures=["Swinv2ForMaskedImageModeling"]), "architectures"),
  "wrong_arch": (lambda c: c.update(architectures=[BACKBONE]), "architectures"),
  # Grid 10 -> 5 -> 3 here (merging pads), but transformers clamps the last window to 10 // 4 = 2.
  "windows_differ": (
    lambda c: c.update(
      image_size=40, patch_size=4, depths=[2, 2, 2], num_heads=[2, 4, 8], pretrained_window_sizes=[0, 0, 0]
    ),
    "window_size=4 with image_size=40",
  ),
  # Neither ViT nor SwinV2: convert.from_hf's dispatch.
  "swin_v1": (lambda c: c.update(model_type="swin"), "model_type='swin': supported are 'vit', 'swinv2'"),
  "deit": (lambda c: c.update(model_type="deit"), "model_type='deit': supported are 'vit', 'swinv2'"),
}
BAD = {
  **{k: (dict(tensors=edit), re.escape(key)) for k, (edit, key) in BAD_WEIGHTS.items()},
  **{k: (dict(config=edit), f"config.json: {field}") for k, (edit, field) in BAD_CONFIGS.items()},
}


@pytest.mark.parametrize("edits, message", BAD.values(), ids=list(BAD))
def test_bad_weights_or_config_are_rejected_by_name(hf_dir, tmp_path, edits, message):
  path = _edited_copy(hf_dir("shifted")[0], tmp_path / "bad", **edits)
  with pytest.raises(CheckpointError, match=message) as e:
    convert.from_hf(path)
  assert path in str(e.value)


def _config_from_flags(line: str):
  """base_config('swinv2') with the printed overrides parsed as main.py's --config flag parses them, and
  validated as main validates it (every printed value lies in its field's domain)."""
  argv = ["main", *shlex.split(line)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", config_lib.base_config("swinv2"), flag_values=values, sys_argv=argv)
  values(argv)
  checks.validate(values.config)
  return values.config


def test_import_hf_overrides_and_params_reproduce_transformers(hf_dir, tmp_path):
  path, hf = hf_dir("shifted")
  out = str(tmp_path / "imported")
  result = _import_hf(f"--src={path}", f"--out={out}", "--scan=false")
  assert result.returncode == 0, result.stderr
  flag_line = result.stdout.splitlines()[1]
  for flag in (
    "--config.model.name=swinv2",
    "--config.model.variant=pico",
    "--config.model.window_size=4",
    "--config.model.image_size=32",
    "--config.model.patch_size=2",
    "--config.model.num_classes=3",
    "--config.model.extra_norm_period=0",
    "--config.model.scan=False",
    f"--config.init_from={out}",
  ):
    assert flag in flag_line.split(), result.stdout
  with open(os.path.join(out, "model.json")) as f:
    meta = json.load(f)
  expected = dict(
    name="swinv2",
    variant="pico",
    embed_dim=16,
    depths=[2, 2],
    heads=[2, 4],
    window_size=4,
    pretrained_window_sizes=[0, 0],
    image_size=32,
    num_classes=3,
    layer_norm_eps=1e-5,
    scan=False,
  )
  assert {k: meta[k] for k in expected} == expected

  # What a training run does with these flags: build config.model, initialise, load init_from.
  config = _config_from_flags(flag_line)
  model = models.build(config.model, jnp.float32, "cpu")
  converted, variables = _from_hf(path, False)
  # The same function: remat only changes what a backward pass recomputes.
  assert model.remat_policy != "none" and model.pretrained_window_sizes == (0, 0)
  assert model.clone(remat_policy="none") == converted
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images))["params"]
  target = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  loaded = stored.load_params(config.init_from, target)
  chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(variables["params"]))
  pixels, images = _images(32, seed=1)
  _assert_matches(_apply(converted, {"params": loaded}, images), _reference(hf, pixels), "import_hf round trip")


def test_import_hf_overrides_build_a_swinv2_of_no_named_size(hf_dir):
  """Depths of no named size, pretrained windows and an MLP ratio of 2: the printed flags spell the size out
  (config.model.variant '<embed_dim>x<depth,...>x<heads,...>') and build the very model the import converted."""
  path, _ = hf_dir("classifier_odd_depths")
  converted = _from_hf(path, False)[0]
  meta = import_hf.metadata(converted, path)
  assert (meta["variant"], meta["pretrained_window_sizes"], meta["mlp_ratio"]) == ("12x1,3,1x3,2,6", [3, 2, 0], 2.0)
  flags_, notes = import_hf.overrides(meta, "/tmp/out")
  config = _config_from_flags(" ".join(flags_))
  assert (config.model.pretrained_window_sizes, config.model.layer_norm_eps, config.model.num_classes) == (
    (3, 2, 0),
    1e-2,
    5,
  )
  assert models.build(config.model, jnp.float32, "cpu").clone(remat_policy="none") == converted
  assert notes == []


def test_import_hf_swinv2_error_is_one_line_and_exit_2(hf_dir, tmp_path):
  path = _edited_copy(hf_dir("padded")[0], tmp_path / "bad", config=lambda c: c.update(use_absolute_embeddings=True))
  result = _import_hf(f"--src={path}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "use_absolute_embeddings" in lines[0], result.stderr
  assert "Traceback" not in result.stderr
