"""CLIP text tower and CLIP model: fp32 parity with transformers' CLIPTextModelWithProjection, the causal mask,
scan/unrolled equivalence, parameter counts, logical axis names, CLIP with SwinV2 and ViT towers, config errors.
"""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import config_lib, models
from visionfm_jax.convert import stack_layers, unstack_layers
from visionfm_jax.data.text.tokenizer import BOS_ID, EOS_ID
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import clip, kernels, text

from conftest import randomize_hf_params

jax.config.update("jax_default_matmul_precision", "highest")

ATOL = 1e-4
VOCAB, MAX_LEN = 50, 12


def _tokens(rows, length):
  """Rows of word ids -> BOS words EOS, padded with 0 to `length`."""
  out = np.zeros((len(rows), length), np.int32)
  for i, words in enumerate(rows):
    seq = [BOS_ID, *words, EOS_ID]
    out[i, : len(seq)] = seq
  return out


# Different lengths, one row filling the whole length, word ids above and below the special ids' range.
TOKENS = _tokens([[4, 17, 9], [], [30, 31, 32, 33, 34, 35, 36, 37], [49, 5]], 10)


def _pico(**overrides):
  return text.TextTransformer(
    **dict(text.parse_variant("pico"), embed_dim=16, vocab_size=VOCAB, max_len=MAX_LEN, **overrides)
  )


def _init(model, tokens=TOKENS):
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def pico_variables():
  return _init(_pico())


# --- parity with transformers -------------------------------------------------------------------------------


HF_CONFIGS = {
  "w32_eps1e-5": dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    layer_norm_eps=1e-5,
  ),
  "w48_4heads_eps1e-6": dict(
    hidden_size=48,
    intermediate_size=80,
    projection_dim=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    layer_norm_eps=1e-6,
  ),
}


@pytest.fixture(scope="module")
def hf_text(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cache = {}

  def get(name):
    if name not in cache:
      cfg = transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        max_position_embeddings=MAX_LEN,
        hidden_act="gelu",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **HF_CONFIGS[name],
      )
      model = transformers.CLIPTextModelWithProjection(cfg).eval()
      randomize_hf_params(model, len(cache))
      path = tmp_path_factory.mktemp(name)
      model.save_pretrained(path)
      with torch.no_grad():
        out = model(input_ids=torch.as_tensor(TOKENS, dtype=torch.long))
        hidden = model.text_model(input_ids=torch.as_tensor(TOKENS, dtype=torch.long))
      cache[name] = (
        str(path),
        {
          "tokens": out.last_hidden_state.numpy(),
          "pooled": hidden.pooler_output.numpy(),
          "embedding": out.text_embeds.numpy(),
        },
      )
    return cache[name]

  return get


@pytest.mark.parametrize("name, scan", [("w32_eps1e-5", True), ("w48_4heads_eps1e-6", False)])
def test_text_tower_matches_transformers(hf_text, name, scan):
  from visionfm_jax.convert import hf_clip_text  # pylint: disable=g-import-not-at-top

  path, ref = hf_text(name)
  model, variables = hf_clip_text.from_hf(path, scan=scan)
  spec = HF_CONFIGS[name]
  assert (model.width, model.depth, model.num_heads, model.mlp_dim, model.embed_dim, model.layer_norm_eps) == (
    spec["hidden_size"],
    spec["num_hidden_layers"],
    spec["num_attention_heads"],
    spec["intermediate_size"],
    spec["projection_dim"],
    spec["layer_norm_eps"],
  )
  assert (model.vocab_size, model.max_len, model.eos_id) == (VOCAB, MAX_LEN, 3)
  ours = jax.jit(model.apply)(variables, jnp.asarray(TOKENS))
  for key in ("tokens", "pooled", "embedding"):
    np.testing.assert_allclose(ours[key], ref[key], atol=ATOL, rtol=0, err_msg=key)
  # The pooled row is the first EOS position of each row.
  np.testing.assert_array_equal(text.eos_positions(jnp.asarray(TOKENS)), [4, 1, 9, 3])


def test_converter_rejects_an_activation_our_towers_lack(tmp_path):
  pytest.importorskip("torch")  # transformers builds the reference model in torch
  transformers = pytest.importorskip("transformers")
  from visionfm_jax.convert import hf_clip_text  # pylint: disable=g-import-not-at-top
  from visionfm_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top

  cfg = transformers.CLIPTextConfig(
    vocab_size=VOCAB,
    max_position_embeddings=MAX_LEN,
    hidden_size=16,
    intermediate_size=32,
    projection_dim=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    eos_token_id=3,
    hidden_act="relu",
  )
  transformers.CLIPTextModelWithProjection(cfg).save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match="hidden_act='relu'"):
    hf_clip_text.from_hf(str(tmp_path))


# --- the text tower ---------------------------------------------------------------------------------------------


def test_causal_mask_later_tokens_do_not_change_earlier_outputs(pico_variables):
  changed = TOKENS.copy()
  changed[:, 6] = 7  # rows 0, 1 and 3: padding -> a word; row 2: another word
  out = jax.jit(_pico().apply)(pico_variables, np.concatenate([TOKENS, changed]))
  a, b = np.split(np.asarray(out["tokens"]), 2)
  np.testing.assert_array_equal(a[:, :6], b[:, :6])
  assert not np.allclose(a[:, 6], b[:, 6])
  # Padding after the EOS never reaches the pooled features.
  pooled_a, pooled_b = np.split(np.asarray(out["pooled"]), 2)
  before_eos = [0, 1, 3]  # rows whose EOS comes before position 6
  np.testing.assert_array_equal(pooled_a[before_eos], pooled_b[before_eos])
  assert not np.allclose(pooled_a[2], pooled_b[2])


def test_masked_attention_matches_jax_reference():
  q, k, v = np.random.default_rng(0).standard_normal((3, 2, 5, 2, 8)).astype(np.float32)
  pad = np.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)[:, None, None, :]

  @jax.jit
  def both(q, k, v):
    return (
      kernels.attention(q, k, v, mask=pad, causal=True),
      jax.nn.dot_product_attention(q, k, v, mask=pad, is_causal=True, implementation="xla"),
    )

  ours, ref = both(q, k, v)
  np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_scanned_and_unrolled_text_blocks_agree(pico_variables):
  scanned, unrolled = _pico(remat_policy="nothing_saveable"), _pico(scan=False)
  params = pico_variables["params"]
  flat = unstack_layers(params, 2)
  chex.assert_trees_all_equal(stack_layers(flat, 2), params)

  @jax.jit
  def outputs_and_grads(params, flat):
    def loss(model, p):
      out = model.apply({"params": p}, TOKENS)
      return jnp.sum(out["embedding"] ** 2), out

    (_, out_scan), g_scan = jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True)(params)
    (_, out_unrolled), g_unrolled = jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True)(flat)
    return out_scan, out_unrolled, g_scan, g_unrolled

  out_scan, out_unrolled, g_scan, g_unrolled = outputs_and_grads(params, flat)
  chex.assert_trees_all_close(out_scan, out_unrolled, atol=1e-5)
  chex.assert_trees_all_close(unstack_layers(g_scan, 2), g_unrolled, atol=1e-4, rtol=1e-4)


def _num_params(width: int, depth: int, vocab_size: int, max_len: int, embed_dim: int) -> int:
  """Parameters of a TextTransformer with a 4 x width MLP: per block 12W^2 + 13W."""
  return (vocab_size + max_len) * width + depth * (12 * width**2 + 13 * width) + 2 * width + width * embed_dim


@pytest.mark.parametrize("size", ["B", "H"])
def test_text_parameter_formula(size):
  spec = text.parse_variant(size)
  w = spec["width"]
  model = text.TextTransformer(**spec, embed_dim=512, vocab_size=32000, max_len=77)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 77), jnp.int32)))["params"]
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
  assert count(params["blocks"]) == spec["depth"] * (12 * w * w + 13 * w)
  assert count(params) == _num_params(w, spec["depth"], 32000, 77, 512)
  if size == "B":  # CLIP's 63M text tower (its 49,408-token vocabulary, 512-d embedding)
    assert _num_params(512, 12, 49408, 77, 512) == 63_428_096


def test_bf16_text_tower_keeps_fp32_params_and_outputs(pico_variables):
  out, ref = jax.jit(lambda v: (_pico(dtype=jnp.bfloat16).apply(v, TOKENS), _pico().apply(v, TOKENS)))(pico_variables)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
  np.testing.assert_allclose(out["embedding"], ref["embedding"], atol=0.1)


def test_too_long_tokens_are_an_error(pico_variables):
  with pytest.raises(ValueError, match="max_len=12"):
    jax.eval_shape(_pico().apply, pico_variables, np.zeros((1, 13), np.int32))


# --- CLIP ---------------------------------------------------------------------------------------------------------


def _clip_config(tower):
  c = config_lib.model_config("clip", image_tower=tower)
  c.image_size, c.embed_dim = 32, 16
  c.image.variant = "pico" if tower == "swinv2" else "pico/8"
  if tower == "swinv2":
    c.image.window_size = 4
  c.text.variant, c.text.vocab_size, c.text.max_len = "pico", VOCAB, MAX_LEN
  return c


IMAGES = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("tower", ["swinv2", "vit"])
def test_clip_params_names_and_output_shapes(tower):
  model = models.build(_clip_config(tower), jnp.float32, "cpu")
  boxed = jax.eval_shape(model.init, jax.random.key(0), IMAGES)  # tokens default: every param from images alone
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  params = boxed["params"]
  assert set(params) == {"image", "image_proj", "text", "logit_scale"}
  assert "head" not in params["image"] and params["image_proj"]["kernel"].value.shape == (32, 16)
  assert params["logit_scale"].value.shape == () and params["logit_scale"].names == ()
  assert params["text"]["token_embed"]["embedding"].names == ("vocab", "embed")
  assert params["text"]["token_embed"]["embedding"].value.shape == (VOCAB, 32)
  assert params["text"]["blocks"]["attn"]["qkv"]["kernel"].names == ("layers", "embed", None, "heads", "kv")
  out = jax.eval_shape(model.apply, nn.unbox(boxed), IMAGES, TOKENS)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
    "image_emb": ((4, 16), jnp.float32),
    "text_emb": ((4, 16), jnp.float32),
    "logit_scale": ((), jnp.float32),
  }


def test_clip_embeddings_and_entry_points():
  model = models.build(_clip_config("vit"), jnp.float32, "cpu")  # the SwinV2 tower compiles slowly on CPU
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), IMAGES))
  out, image_emb, text_emb = jax.jit(
    lambda v: (
      model.apply(v, IMAGES, TOKENS),
      model.apply(v, IMAGES, method=clip.CLIP.embed_images),
      model.apply(v, TOKENS, method=clip.CLIP.embed_texts),
    )
  )(variables)
  np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(out["text_emb"], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(out["logit_scale"], 2.659260, atol=1e-6)
  np.testing.assert_allclose(image_emb, out["image_emb"], atol=1e-6)
  np.testing.assert_allclose(text_emb, out["text_emb"], atol=1e-6)
  assert not np.allclose(out["image_emb"][0], out["image_emb"][1])
  assert not np.allclose(out["text_emb"][0], out["text_emb"][1])


def test_clamp_logit_scale():
  params = {"logit_scale": jnp.float32(5.0), "text": {"x": jnp.ones(2)}}
  clamped = clip.clamp_logit_scale(params)
  np.testing.assert_allclose(clamped["logit_scale"], math.log(100.0), rtol=1e-6)
  assert clamped["text"] is params["text"] and params["logit_scale"] == 5.0  # pure
  assert clip.clamp_logit_scale({"logit_scale": jnp.float32(-1.0)})["logit_scale"] == 0.0
  assert clip.clamp_logit_scale({"logit_scale": jnp.float32(2.0)})["logit_scale"] == 2.0
  # Differentiable where it does not clamp, usable inside jit.
  assert jax.jit(clip.clamp_logit_scale)({"logit_scale": jnp.float32(1.5)})["logit_scale"] == 1.5


def test_clip_default_config_builds_large_tower_shapes():
  c = config_lib.model_config("clip")
  assert (c.name, c.image.name, c.text.max_len, c.logit_scale_init) == ("clip", "swinv2", 77, pytest.approx(2.659260))
  c.text.variant = "H"
  model = models.build(c, jnp.bfloat16, "cpu")
  assert (model.text.width, model.text.depth, model.text.num_heads, model.text.max_len) == (1024, 24, 16, 77)
  assert model.image.image_size == 224 and model.image.num_classes == 0 and model.image.scan


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("text.variant", "XXL", "text.variant=.XXL."),
    ("text.vocab_size", 3, "text.vocab_size=3"),
    ("text.pool", "mean", "text.pool='mean': expected 'eos' \\(CLIP\\) or 'cls' \\(CoCa\\)"),
    ("image.name", "resnet", "image.name='resnet'"),
    ("image.variant", "Q", "image: SwinV2 variant 'Q'"),
    ("image.image_size", 64, "image.image_size=64 differs from image_size=32"),
  ],
)
def test_config_errors_name_the_field(field, value, match):
  c = _clip_config("swinv2")
  parent, leaf = (c[field.split(".")[0]], field.split(".")[1]) if "." in field else (c, field)
  parent[leaf] = value
  with pytest.raises(ConfigError, match=f"config.model: {match}"):
    models.build(c, jnp.float32, "cpu")


def test_sizes_are_checked_by_their_domains_and_the_pool_by_the_tower():
  """A size out of its domain (its row's, config_lib) is validate's error, not the builder's; an unknown pool is
  the tower's own error, when it is made (a config or not)."""
  config = config_lib.base_config("clip")
  config.model.embed_dim = 0
  with pytest.raises(ConfigError, match=r"config.model.embed_dim=0: must be an integer >= 1"):
    config_lib.check_domains(config)
  with pytest.raises(ValueError, match="pool='mean'"):
    text.TextTransformer(width=8, depth=1, num_heads=2, mlp_dim=16, pool="mean")
