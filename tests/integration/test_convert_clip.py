"""HF CLIPModel -> our CLIP (ViT tower with CLIP's pre-LayerNorm, text tower, projections, logit scale) and
back: fp32 parity with transformers on random-init models of two sizes, quick_gelu and gelu, the legacy
eos_token_id=2 pooling and the new one; export round-trips bitwise."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import convert
from visionfm_jax.convert import hf_files
from visionfm_jax.errors import CheckpointError, ConfigError

from conftest import randomize_hf_params

ATOL = 1e-4
# Two sizes, both activations; 'legacy' has eos_token_id=2 (OpenAI's configs: HF pools the largest id, the
# tokenizer's end-of-text token, the last of the vocabulary), 'new' pools the first eos_token_id (5).
CONFIGS = {
  "quick_gelu_legacy": dict(
    projection_dim=16,
    vision=dict(
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=16,
      patch_size=4,
      hidden_act="quick_gelu",
      layer_norm_eps=1e-5,
    ),
    text=dict(
      vocab_size=64,
      hidden_size=24,
      intermediate_size=40,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=12,
      hidden_act="quick_gelu",
      layer_norm_eps=1e-5,
      eos_token_id=2,
    ),
  ),
  "gelu_new": dict(
    projection_dim=24,
    vision=dict(
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=3,
      num_attention_heads=3,
      image_size=24,
      patch_size=8,
      hidden_act="gelu",
      layer_norm_eps=1e-6,
    ),
    text=dict(
      vocab_size=80,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=3,
      num_attention_heads=4,
      max_position_embeddings=10,
      hidden_act="gelu",
      layer_norm_eps=1e-6,
      eos_token_id=5,
    ),
  ),
}


def _tokens(spec, rows=4, seed=0):
  """BOS, words, EOS, then padding (the EOS id) of random lengths; EOS is the largest id of each row in the
  legacy config, where it is the last of the vocabulary."""
  text = spec["text"]
  vocab, length = text["vocab_size"], text["max_position_embeddings"]
  legacy = text["eos_token_id"] == 2
  eos, bos, first_word = (vocab - 1, vocab - 2, 3) if legacy else (text["eos_token_id"], 1, 6)
  rng = np.random.default_rng(seed)
  tokens = np.full((rows, length), eos, np.int32)
  for row, words in enumerate(rng.integers(0, length - 1, rows)):
    tokens[row, 0] = bos
    tokens[row, 1 : 1 + words] = rng.integers(first_word, vocab - 2, words)
  return tokens


def _images(spec, rows=3, seed=1):
  size = spec["vision"]["image_size"]
  return np.random.default_rng(seed).standard_normal((rows, size, size, 3)).astype(np.float32)


def _hf_outputs(model, spec):
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    out = model(
      input_ids=torch.as_tensor(_tokens(spec), dtype=torch.long),
      pixel_values=torch.as_tensor(_images(spec).transpose(0, 3, 1, 2)),
    )
  return {"image": out.image_embeds.numpy(), "text": out.text_embeds.numpy(), "logits": out.logits_per_image.numpy()}


@pytest.fixture(scope="module")
def hf_clip_dirs(tmp_path_factory):
  """name -> (a save_pretrained CLIPModel directory, transformers' outputs on _images / _tokens)."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cache = {}

  def get(name):
    if name not in cache:
      spec = CONFIGS[name]
      cfg = transformers.CLIPConfig(
        text_config=spec["text"], vision_config=spec["vision"], projection_dim=spec["projection_dim"]
      )
      model = transformers.CLIPModel(cfg).eval()
      randomize_hf_params(model, seed=len(cache))
      with __import__("torch").no_grad():
        model.logit_scale.fill_(2.5)
      path = tmp_path_factory.mktemp(name)
      model.save_pretrained(path)
      cache[name] = str(path), _hf_outputs(model, spec)
    return cache[name]

  return get


def _ours(model, variables, spec):
  params = variables["params"]
  image = jax.jit(lambda v, x: model.apply(v, x, method="embed_images"))(variables, _images(spec))
  text = jax.jit(lambda v, t: model.apply(v, t, method="embed_texts"))(variables, _tokens(spec))
  return {"image": image, "text": text, "logits": jnp.exp(params["logit_scale"]) * image @ text.T}


def _max_diffs(ours, ref):
  return {k: float(np.max(np.abs(np.asarray(ours[k]) - ref[k]))) for k in ref}


@pytest.mark.parametrize("name, scan", [("quick_gelu_legacy", True), ("gelu_new", False)])
def test_clip_matches_transformers(hf_clip_dirs, name, scan):
  path, ref = hf_clip_dirs(name)
  spec = CONFIGS[name]
  with jax.default_matmul_precision("highest"):
    model, variables = convert.from_hf(path, scan=scan)
    diffs = _max_diffs(_ours(model, variables, spec), ref)
    assert all(d < ATOL for d in diffs.values()), diffs
    vision, text = spec["vision"], spec["text"]
    assert (model.image.pre_norm, model.image.patch_bias, model.image.act, model.text.act) == (
      True,
      False,
      vision["hidden_act"],
      text["hidden_act"],
    )
    legacy = text["eos_token_id"] == 2
    assert model.text.eos_id == (text["vocab_size"] - 1 if legacy else text["eos_token_id"])
    # the activation matters at this tolerance: the other one misses it
    other = {"gelu": "quick_gelu", "quick_gelu": "gelu"}[vision["hidden_act"]]
    swapped = model.clone(image=model.image.clone(act=other), text=model.text.clone(act=other))
    assert min(_max_diffs(_ours(swapped, variables, spec), ref).values()) > 10 * ATOL


def test_export_round_trips_bitwise(hf_clip_dirs, tmp_path):
  transformers = pytest.importorskip("transformers")
  path, ref = hf_clip_dirs("quick_gelu_legacy")
  model, variables = convert.from_hf(path)
  out = tmp_path / "exported"
  arch, notes = convert.to_hf(model, variables["params"], str(out))
  assert (arch, notes) == ("CLIPModel", [])
  original, exported = hf_files.read_tensors(path), hf_files.read_tensors(str(out))
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    assert exported[key].shape == value.shape, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # transformers computes the same from it (the legacy eos_token_id=2 is written as the EOS id it meant)
  assert (
    hf_files.read_config(str(out))["text_config"]["eos_token_id"]
    == CONFIGS["quick_gelu_legacy"]["text"]["vocab_size"] - 1
  )
  reloaded = transformers.CLIPModel.from_pretrained(str(out)).eval()
  diffs = _max_diffs(_hf_outputs(reloaded, CONFIGS["quick_gelu_legacy"]), ref)
  assert all(d < 1e-6 for d in diffs.values()), diffs
  model2, variables2 = convert.from_hf(str(out))
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, variables2, variables)


def test_unexportable_clip_names_the_field():
  from visionfm_jax.models import clip, text, vit  # pylint: disable=g-import-not-at-top

  tower = vit.ViT(**vit.parse_variant("pico/4"), image_size=8)  # no pre-norm, a patch bias
  model = clip.CLIP(image=tower, text=text.TextTransformer(**text.parse_variant("pico"), embed_dim=8), embed_dim=8)
  with pytest.raises(ConfigError, match="image.pre_norm=False"):
    convert.to_hf(model, {}, "/nonexistent")


def test_mismatched_weights_are_named(hf_clip_dirs, tmp_path):
  path, _ = hf_clip_dirs("gelu_new")
  cfg = hf_files.read_config(path)
  tensors = hf_files.read_tensors(path)
  del tensors["vision_model.pre_layrnorm.bias"]
  hf_files.write_dir(str(tmp_path), cfg, tensors)
  with pytest.raises(CheckpointError, match="missing vision_model.pre_layrnorm.bias"):
    convert.from_hf(str(tmp_path))
  cfg["vision_config"]["hidden_act"] = "relu"
  hf_files.write_dir(str(tmp_path), cfg, hf_files.read_tensors(path))
  with pytest.raises(CheckpointError, match="vision_config.hidden_act='relu'"):
    convert.from_hf(str(tmp_path))
  assert os.path.exists(os.path.join(tmp_path, "model.safetensors"))
