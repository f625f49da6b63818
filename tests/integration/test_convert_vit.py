"""Hugging Face ViT -> our ViT: fp32 parity with transformers, block layouts, bad weights, tools.import_hf (and the
folders it writes)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402  pylint: disable=g-import-not-at-top

from visionfm_jax import convert, models, output_folder  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.errors import CheckpointError  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.models import vit  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.tools import import_hf  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.training import stored  # noqa: E402  pylint: disable=g-import-not-at-top

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKBONE, CLASSIFIER = "ViTModel", "ViTForImageClassification"
ATOL = 1e-4

# Small models that differ in every size, qkv bias, eps, head and pooler.
CONFIGS = {
  "backbone_pooler": dict(
    arch=BACKBONE,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    qkv_bias=True,
    layer_norm_eps=1e-12,
  ),
  "classifier_no_qkv_bias": dict(
    arch=CLASSIFIER,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=80,
    image_size=24,
    patch_size=8,
    qkv_bias=False,
    layer_norm_eps=1e-6,
    num_labels=5,
  ),
  "classifier_3_heads": dict(
    arch=CLASSIFIER,
    hidden_size=24,
    num_hidden_layers=1,
    num_attention_heads=3,
    intermediate_size=96,
    image_size=12,
    patch_size=2,
    qkv_bias=True,
    layer_norm_eps=1e-12,
    num_labels=7,
  ),
  "backbone_no_pooler": dict(
    arch=BACKBONE,
    pooler=False,
    hidden_size=40,
    num_hidden_layers=2,
    num_attention_heads=5,
    intermediate_size=64,
    image_size=20,
    patch_size=5,
    qkv_bias=False,
    layer_norm_eps=1e-6,
  ),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """HF init leaves norms at 1/0, biases at 0 and attention near uniform: any of those hides mapping errors."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layernorm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.3 * noise)
      elif "cls_token" in name or "position_embeddings" in name:
        p.copy_(0.5 * noise)
      else:  # fan-in scaling keeps activations O(1) and attention logits O(1)
        p.copy_(noise / math.sqrt(p[0].numel()))


def _build_hf(spec: dict, seed: int = 0):
  spec = dict(spec)
  arch, pooler = spec.pop("arch"), spec.pop("pooler", True)
  cfg = transformers.ViTConfig(**spec)
  model = (
    transformers.ViTModel(cfg, add_pooling_layer=pooler)
    if arch == BACKBONE
    else transformers.ViTForImageClassification(cfg)
  )
  _randomise(model, seed)
  return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """name -> (directory written by save_pretrained, the HF model), built once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      model = _build_hf(CONFIGS[name], seed=len(cache))
      path = tmp_path_factory.mktemp(name)
      model.save_pretrained(path)
      cache[name] = (str(path), model)
    return cache[name]

  return get


def _images(size: int, seed: int = 0, batch: int = 2):
  """The same random normalised images as torch NCHW and as our NHWC."""
  pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
  return pixels, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))


def _reference(hf, pixels) -> dict[str, np.ndarray]:
  with torch.no_grad():
    backbone = hf if isinstance(hf, transformers.ViTModel) else hf.vit
    tokens = backbone(pixel_values=pixels).last_hidden_state.numpy()
    out = {"tokens": tokens, "pooled": tokens[:, 0]}
    if not isinstance(hf, transformers.ViTModel):
      out["logits"] = hf(pixel_values=pixels).logits.numpy()
  return out


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(hf_dir, name, scan):
  path, hf = hf_dir(name)
  spec = CONFIGS[name]
  model, variables = convert.from_hf(path, scan=scan)
  assert (model.width, model.depth, model.num_heads, model.mlp_dim, model.patch_size, model.image_size) == (
    spec["hidden_size"],
    spec["num_hidden_layers"],
    spec["num_attention_heads"],
    spec["intermediate_size"],
    spec["patch_size"],
    spec["image_size"],
  )
  assert (model.layer_norm_eps, model.qkv_bias, model.scan) == (spec["layer_norm_eps"], spec["qkv_bias"], scan)
  assert model.num_classes == spec.get("num_labels", 0 if spec["arch"] == BACKBONE else None)
  assert ("blocks" in variables["params"]) == scan
  pixels, images = _images(spec["image_size"])
  ours = jax.jit(model.apply)(variables, images)
  ref = _reference(hf, pixels)
  assert set(ours) == set(ref)
  diffs = {k: float(np.max(np.abs(np.asarray(ours[k]) - ref[k]))) for k in ref}
  print(f"{name} scan={scan}: max abs diff {diffs}")
  chex.assert_trees_all_close({k: np.asarray(v) for k, v in ours.items()}, ref, atol=ATOL, rtol=0)


def test_stack_unstack_round_trip(hf_dir):
  path, _ = hf_dir("classifier_no_qkv_bias")
  scanned = convert.from_hf(path, scan=True)[1]["params"]
  unrolled = convert.from_hf(path, scan=False)[1]["params"]
  chex.assert_trees_all_equal(convert.stack_layers(unrolled, 3), scanned)
  chex.assert_trees_all_equal(convert.unstack_layers(scanned), unrolled)
  chex.assert_trees_all_equal(convert.unstack_layers(convert.stack_layers(unrolled, 3), 3), unrolled)
  partial = {k: v for k, v in unrolled.items() if k != "blocks_2"}
  with pytest.raises(CheckpointError, match="blocks_2"):
    convert.stack_layers(partial, 3)
  with pytest.raises(CheckpointError, match="depth = 4"):
    convert.unstack_layers(scanned, 4)


def _edited_copy(src: str, dst, *, tensors=None, config=None) -> str:
  """A copy of an HF directory with its tensors and/or config.json edited in place by the given functions."""
  shutil.copytree(src, dst)
  if tensors:
    file = os.path.join(dst, "model.safetensors")
    weights = load_file(file)
    tensors(weights)
    save_file(weights, file)
  if config:
    file = os.path.join(dst, "config.json")
    with open(file) as f:
      cfg = json.load(f)
    config(cfg)
    with open(file, "w") as f:
      json.dump(cfg, f)
  return str(dst)


KEY = "vit.encoder.layer.1.intermediate.dense.bias"
BAD_WEIGHTS = {
  "missing": (lambda t: t.pop(KEY), KEY),
  "wrong_shape": (lambda t: t.update({KEY: np.zeros(81, np.float32)}), KEY),
  "unexpected": (
    lambda t: t.update({"vit.encoder.layer.3.output.dense.bias": np.zeros(48, np.float32)}),
    "vit.encoder.layer.3.output.dense.bias",
  ),
}


@pytest.mark.parametrize("edit, key", BAD_WEIGHTS.values(), ids=list(BAD_WEIGHTS))
def test_bad_weights_name_the_key(hf_dir, tmp_path, edit, key):
  path = _edited_copy(hf_dir("classifier_no_qkv_bias")[0], tmp_path / "bad", tensors=edit)
  with pytest.raises(CheckpointError, match=re.escape(key)) as e:
    convert.from_hf(path)
  assert path in str(e.value)


BAD_CONFIGS = {
  "tanh_gelu": (lambda c: c.update(hidden_act="gelu_new"), "hidden_act"),
  "grey": (lambda c: c.update(num_channels=1), "num_channels"),
  "other_model": (lambda c: c.update(architectures=["ViTForMaskedImageModeling"]), "architectures"),
  "wrong_arch": (lambda c: c.update(architectures=[BACKBONE]), "architectures"),
  "heads": (lambda c: c.update(num_attention_heads=5), "num_attention_heads"),
}


@pytest.mark.parametrize("edit, field", BAD_CONFIGS.values(), ids=list(BAD_CONFIGS))
def test_unsupported_config_is_rejected(hf_dir, tmp_path, edit, field):
  path = _edited_copy(hf_dir("classifier_no_qkv_bias")[0], tmp_path / "bad", config=edit)
  with pytest.raises(CheckpointError, match=field):
    convert.from_hf(path)


def test_no_safetensors_is_rejected_without_unpickling(hf_dir, tmp_path):
  path = _edited_copy(hf_dir("backbone_pooler")[0], tmp_path / "pickled")
  os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
  with pytest.raises(CheckpointError, match="pytorch_model.bin"):
    convert.from_hf(path)
  with pytest.raises(CheckpointError, match="no such directory"):
    convert.from_hf(str(tmp_path / "absent"))


def test_bfloat16_weights_are_widened_exactly(tmp_path):
  hf = _build_hf(CONFIGS["classifier_3_heads"]).to(torch.bfloat16)
  hf.save_pretrained(tmp_path / "bf16")
  hf.float().save_pretrained(tmp_path / "fp32")
  bf16 = convert.from_hf(str(tmp_path / "bf16"))[1]
  fp32 = convert.from_hf(str(tmp_path / "fp32"))[1]
  chex.assert_trees_all_equal(bf16, fp32)


def test_sharded_weights_match_a_single_file(hf_dir, tmp_path):
  path, hf = hf_dir("classifier_no_qkv_bias")
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  chex.assert_trees_all_equal(convert.from_hf(str(tmp_path / "sharded"))[1], convert.from_hf(path)[1])


def _import_hf(*args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run(
    [sys.executable, "-m", "visionfm_jax.tools.import_hf", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=120,
    check=False,
  )


def _fresh_params(model: vit.ViT, size: int):
  """Params of a jitted init: arrays with a (single-device) sharding, as training hands to load_params."""
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  return nn.unbox(jax.jit(model.init)(jax.random.key(1), images)["params"])


def test_import_hf_output_initialises_a_fresh_model(hf_dir, tmp_path):
  path, _ = hf_dir("classifier_no_qkv_bias")
  out = str(tmp_path / "imported")
  result = _import_hf(f"--src={path}", f"--out={out}")
  assert result.returncode == 0, result.stderr
  for flag in (
    "--config.model.num_classes=5",
    "--config.model.layer_norm_eps=1e-06",
    "--config.model.image_size=24",
    f"--config.init_from={out}",
  ):
    assert flag in result.stdout
  with open(os.path.join(out, "model.json")) as f:
    meta = json.load(f)
  assert (meta["name"], meta["width"], meta["depth"], meta["heads"], meta["patch"]) == ("vit", 48, 3, 4, 8)

  model, variables = convert.from_hf(path)
  fresh = models.from_checkpoint_fields(meta)  # what tools.export_hf rebuilds from the directory
  loaded = stored.load_params(out, _fresh_params(fresh, 24))
  chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(variables["params"]))
  _, images = _images(24, seed=1)
  assert fresh == model
  apply = jax.jit(fresh.apply)
  chex.assert_trees_all_close(apply({"params": loaded}, images), apply(variables, images), atol=1e-6)

  seven = fresh.clone(num_classes=7)
  target = _fresh_params(seven, 24)
  with pytest.raises(CheckpointError, match="head/kernel"):
    stored.load_params(out, target)
  loaded7 = stored.load_params(out, target, skip="head")
  chex.assert_trees_all_equal(jax.device_get(loaded7["head"]), jax.device_get(target["head"]))
  body = {k: v for k, v in variables["params"].items() if k != "head"}
  chex.assert_trees_all_equal(jax.device_get({k: v for k, v in loaded7.items() if k != "head"}), jax.device_get(body))
  assert jax.eval_shape(seven.apply, {"params": loaded7}, images)["logits"].shape == (2, 7)


def test_import_hf_error_is_one_line_and_exit_2(hf_dir, tmp_path):
  path = _edited_copy(
    hf_dir("backbone_pooler")[0], tmp_path / "bad", tensors=lambda t: t.pop("encoder.layer.0.output.dense.weight")
  )
  result = _import_hf(f"--src={path}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "encoder.layer.0.output.dense.weight" in lines[0], result.stderr
  assert "Traceback" not in result.stderr


def _import_in_process(capsys, *args) -> tuple[int, str, list[str]]:
  """tools.import_hf's main in this process: (exit status, stdout, its error: lines)."""
  status = import_hf.main(["import_hf", *args])
  out, err = capsys.readouterr()
  assert "Traceback" not in err
  return status, out, [line for line in err.splitlines() if line.startswith("error:")]


def test_import_hf_refuses_a_weight_that_is_not_floating_point(hf_dir, tmp_path, capsys):
  key = "encoder.layer.0.output.dense.weight"
  path = _edited_copy(
    hf_dir("backbone_pooler")[0], tmp_path / "bad", tensors=lambda t: t.update({key: t[key].astype(np.int32)})
  )
  status, out, errors = _import_in_process(capsys, f"--src={path}", f"--out={tmp_path / 'out'}")
  assert status == 2 and not out and len(errors) == 1 and f"{key} (int32)" in errors[0], errors
  assert not (tmp_path / "out").exists()


def test_import_hf_writes_only_into_a_folder_it_may_claim(hf_dir, tmp_path, capsys):
  """A folder of the user's is refused unless --overwrite, its own is written again, its source never."""
  path, out = hf_dir("backbone_pooler")[0], tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("the user's notes")
  status, _, errors = _import_in_process(capsys, f"--src={path}", f"--out={out}")
  assert status == 2 and len(errors) == 1 and "notes.txt" in errors[0] and "--overwrite" in errors[0], errors
  assert os.listdir(out) == ["notes.txt"]
  assert _import_in_process(capsys, f"--src={path}", f"--out={out}", "--overwrite")[0] == 0
  assert sorted(os.listdir(out)) == [output_folder.MARKER, "model.json", "params"]
  assert _import_in_process(capsys, f"--src={path}", f"--out={out}")[0] == 0
  src = shutil.copytree(path, tmp_path / "src")
  status, _, errors = _import_in_process(capsys, f"--src={src}", f"--out={src}", "--overwrite")
  assert status == 2 and len(errors) == 1 and "which import_hf reads" in errors[0], errors
  assert sorted(os.listdir(tmp_path)) == ["out", "src"] and (src / "config.json").exists()
