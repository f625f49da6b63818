"""Our ViT / SwinV2 -> Hugging Face transformers (convert.to_hf, tools.export_hf): ours -> HF -> ours gives the
same model and identical params in either block layout; transformers' from_pretrained loads every tensor and
reproduces our tokens, pooled features and logits (fp32); the CLI exports a training workdir, a CLIP workdir's
image tower and an import_hf directory (back to the tensors it was imported from); photos of several sizes through
the exported image processor and model give the run's evaluation logits (a ViT) and image embeddings (a CLIP); the
CLI writes only into a folder it may claim, with the user's umask; bad input is named."""

import json
import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402  pylint: disable=g-import-not-at-top

from visionfm_jax import convert, data, output_folder, tasks  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.convert import hf_files, hf_swinv2, hf_vit  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.data.embedded import shapes  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.errors import CheckpointError, ConfigError, UserError  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.models import swinv2, text, vit  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.tools import export_hf, import_hf  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.trained import loader  # noqa: E402  pylint: disable=g-import-not-at-top
from visionfm_jax.training import checkpoint

from conftest import randomize_hf_params, tiny_clip_config, tiny_vit_config  # noqa: E402  pylint: disable=g-import-not-at-top
from test_clip_checkpoint import CONFIG as HF_CLIP  # noqa: E402  pylint: disable=g-import-not-at-top
from test_clip_checkpoint import _bpe_tokenizer

jax.config.update("jax_default_matmul_precision", "highest")

# Tiny models that differ in every size; the SwinV2 has a shifted first stage (8x8 map, window 4, shift 2), a
# one-window second stage, pretrained windows, mlp_ratio 2 and a large eps.
MODELS = {
  "vit_classifier": vit.ViT(
    width=24,
    depth=2,
    mlp_dim=40,
    num_heads=3,
    patch_size=4,
    image_size=12,
    num_classes=5,
    qkv_bias=False,
    layer_norm_eps=1e-6,
  ),
  "vit_backbone": vit.ViT(
    width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=8, scan=False, layer_norm_eps=1e-12
  ),
  "swin_classifier": swinv2.SwinV2(
    embed_dim=8,
    depths=(2, 2),
    num_heads=(2, 4),
    window_size=4,
    pretrained_window_sizes=(3, 2),
    patch_size=2,
    image_size=16,
    num_classes=3,
    mlp_ratio=2.0,
    layer_norm_eps=1e-4,
  ),
}
ARCHS = {
  "vit_classifier": "ViTForImageClassification",
  "vit_backbone": "ViTModel",
  "swin_classifier": "Swinv2ForImageClassification",
}
# max |ours - transformers| over max |transformers|, per output
RTOL = 1e-5
# Our forward compiles without LLVM's expensive passes (outputs move by ~1e-7: the same HLO).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _random_params(model, seed=0, init=None):
  """float32 numpy params in `model`'s shapes (from eval_shape of `init` or model.init: no compile), every one
  random: init leaves norms at 1, biases and heads at 0, which would hide mapping errors. Kernels N(0, 1 / fan-in)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, noise = path[-1].key, rng.standard_normal(leaf.shape)
    if name == "scale":
      value = 1.0 + 0.3 * noise
    elif name == "logit_scale":
      value = np.log(10.0) + 0.5 * noise
    elif name == "kernel":
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]) if leaf.ndim == 2 else leaf.shape[0])
    else:
      value = 0.3 * noise
    return value.astype(np.float32)

  if init is None:
    images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    init = lambda: model.init(jax.random.key(0), images)  # noqa: E731
  return jax.tree_util.tree_map_with_path(draw, nn.unbox(jax.eval_shape(init))["params"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """name -> (params, directory written by convert.to_hf), once per model."""
  cache = {}

  def get(name):
    if name not in cache:
      params = _random_params(MODELS[name], seed=len(cache))
      path = str(tmp_path_factory.mktemp(name))
      assert convert.to_hf(MODELS[name], params, path) == (ARCHS[name], [])
      cache[name] = params, path
    return cache[name]

  return get


def _transformers_outputs(path: str, arch: str, images: np.ndarray) -> dict[str, np.ndarray]:
  auto = transformers.AutoModelForImageClassification if "Classification" in arch else transformers.AutoModel
  hf, info = auto.from_pretrained(path, output_loading_info=True)
  assert type(hf).__name__ == arch
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  base = getattr(hf, "vit", None) or getattr(hf, "swinv2", None) or hf
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = base.eval()(pixel_values=pixels)
    # ViTForImageClassification's ViTModel has no pooler: it classifies the class token, our `pooled`.
    pooled = out.last_hidden_state[:, 0] if out.pooler_output is None else out.pooler_output
    ref = {"tokens": out.last_hidden_state.numpy(), "pooled": pooled.numpy()}
    if base is not hf:
      ref["logits"] = hf.eval()(pixel_values=pixels).logits.numpy()
  return ref


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_and_transformers_parity(exported, name):
  model = MODELS[name]
  params, path = exported(name)
  back, variables = convert.from_hf(path, scan=model.scan)
  assert back == model  # every field, so with identical params every output is identical
  chex.assert_trees_all_equal(jax.device_get(variables["params"]), params)

  images = np.random.default_rng(1).standard_normal((2, model.image_size, model.image_size, 3)).astype(np.float32)
  ours = jax.jit(model.apply, compiler_options=FAST_COMPILE)({"params": params}, images)
  ref = _transformers_outputs(path, ARCHS[name], images)
  assert set(ours) == set(ref)
  errors = {k: float(np.max(np.abs(np.asarray(ours[k]) - ref[k])) / np.max(np.abs(ref[k]))) for k in ref}
  print(f"{name}: max |ours - transformers| / max |transformers| {errors}")
  assert max(errors.values()) < RTOL, errors


@pytest.mark.parametrize("name, exporter", [("vit_classifier", hf_vit.to_hf), ("swin_classifier", hf_swinv2.to_hf)])
def test_scanned_and_unrolled_export_the_same_tensors(exported, name, exporter):
  model = MODELS[name]
  params, path = exported(name)
  unrolled = convert.from_hf(path, scan=False)[1]["params"]
  config, tensors, _ = exporter(model, params)
  config_unrolled, tensors_unrolled, _ = exporter(model.clone(scan=False), unrolled)
  assert config == config_unrolled
  chex.assert_trees_all_equal(tensors_unrolled, tensors)
  chex.assert_trees_all_equal(load_file(os.path.join(path, "model.safetensors")), tensors)


SWIN = MODELS["swin_classifier"]
# What transformers cannot express: the message names our field.
INEXPRESSIBLE = {
  "extra_norms": (SWIN.clone(extra_norm_period=6), "extra_norm_period=6"),
  # 8x8 / window 4 then 4x4 / window 2 (shifted): transformers' one window gives the second stage (4, 0).
  "per_stage_windows": (SWIN.clone(window_size=(4, 2)), r"window_size=\(4, 2\)"),
  "pretrained_window_1": (SWIN.clone(pretrained_window_sizes=(1, 0)), r"pretrained_window_sizes=\(1, 0\)"),
}


@pytest.mark.parametrize("model, field", INEXPRESSIBLE.values(), ids=list(INEXPRESSIBLE))
def test_what_transformers_cannot_express_is_named(tmp_path, model, field):
  with pytest.raises(ConfigError, match=field):
    convert.to_hf(model, {}, str(tmp_path))  # the fields are checked before the params
  assert not os.listdir(tmp_path)


def test_a_vit_head_on_mean_pooled_tokens_needs_an_integer_mlp_ratio(exported, tmp_path):
  """pool='gap' with a head exports as a Dinov2ForImageClassification (test_vit_demo_fields_export_exactly_or_are_
  refused), whose MLP is an integer multiple of its width: 40 / 24 is refused, naming both."""
  params, _ = exported("vit_classifier")
  with pytest.raises(ConfigError, match="mlp_dim=40, width=24"):
    convert.to_hf(MODELS["vit_classifier"].clone(pool="gap"), params, str(tmp_path))


def test_per_stage_windows_that_transformers_also_uses_export(exported, tmp_path):
  """(4, 8): the second map (4x4) is one window either way, as with transformers' window 4."""
  params, path = exported("swin_classifier")
  convert.to_hf(SWIN.clone(window_size=(4, 8)), params, str(tmp_path))
  chex.assert_trees_all_equal(
    load_file(str(tmp_path / "model.safetensors")), load_file(os.path.join(path, "model.safetensors"))
  )


def test_params_that_do_not_fit_or_other_models_are_rejected(exported, tmp_path):
  params, _ = exported("vit_classifier")
  broken = {**params, "blocks": {**params["blocks"], "mlp": {"fc1": params["blocks"]["mlp"]["fc1"]}}}
  with pytest.raises(CheckpointError, match="blocks/mlp/fc2/kernel"):
    convert.to_hf(MODELS["vit_classifier"], broken, str(tmp_path))
  tower = text.TextTransformer(width=8, depth=1, num_heads=2, mlp_dim=16, embed_dim=8, vocab_size=10, max_len=4)
  with pytest.raises(ConfigError, match="TextTransformer does not export"):
    convert.to_hf(tower, {}, str(tmp_path))
  with pytest.raises(UserError, match="exportable are vit and swinv2"):
    export_hf.backbone(tower)


def _workdir(directory, config, step=3):
  """A training workdir of `config` whose checkpoint `step` holds random params; returns (task, params)."""
  task = tasks.build(config)
  params = _random_params(task.model, init=lambda: task.init_variables(jax.random.key(0)))
  ckpt = checkpoint.Checkpointer(str(directory / "checkpoints"), async_save=False)
  ckpt.save(step, {"params": params})
  ckpt.close()
  (directory / "config.json").write_text(config.to_json_best_effort(indent=2))
  return task, params


def _export(capsys, *args):
  """tools.export_hf in this process: (exit status, stdout, stderr)."""
  status = export_hf.main(["export_hf", *args])
  out, err = capsys.readouterr()
  return status, out, err


def _photos(sizes=((23, 41), (64, 37), (50, 50), (120, 90), (17, 150)), seed=0) -> list[np.ndarray]:
  """Photo-like uint8 images of several sizes and aspects: colour noise with a natural image's 1/f spectrum, detail
  at every scale, so that any difference of resampling, rounding or crop offset shows in the outputs."""
  rng, photos = np.random.default_rng(seed), []
  for height, width in sizes:
    frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    amplitude = 1.0 / np.maximum(frequency, 1.0 / max(height, width))
    shape = (height, width // 2 + 1, 3)
    noise = amplitude[..., None] * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    image = np.fft.irfft2(noise, s=(height, width), axes=(0, 1))
    photos.append(np.round(255 * (image - image.min()) / (image.max() - image.min())).astype(np.uint8))
  return photos


def _run_eval_view(data_cfg, photos) -> np.ndarray:
  """The photos as the run's evaluation batches hold them (uint8, data/loader/pipeline.py's eval iterator)."""
  records = [{"image": photo, "label": 0} for photo in photos]
  batch = next(
    data.make_eval_iterator(data_cfg, batch_size=len(photos), process_index=0, process_count=1, source=records)
  )
  assert batch["mask"].all()
  return batch["image"]


def _processor_pixels(out, photos):
  """The photos through the exported image processor, as transformers' users call it (PIL images in)."""
  processor = transformers.AutoImageProcessor.from_pretrained(str(out))
  pixels = processor(images=[Image.fromarray(p) for p in photos], return_tensors="pt")["pixel_values"]
  return processor, pixels


def _assert_close(ours, theirs, what: str, tolerance: float = RTOL) -> None:
  """max |ours - theirs| within `tolerance` of max |theirs| (1 at least)."""
  error = float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))
  print(f"{what}: max |ours - transformers| {error:.2e}, max |transformers| {float(np.max(np.abs(theirs))):.2f}")
  assert error < tolerance * max(1.0, float(np.max(np.abs(theirs)))), (what, error)


def test_cli_exports_a_training_workdir_that_sees_what_the_run_saw(tmp_path, capsys):
  """The export's image processor reproduces the run's evaluation view (config.data.eval_preprocess 'inception':
  the shorter side to round(16 / 0.875) = 18, bilinear, the central 16 x 16, mean / std), so that photos of any
  size through AutoImageProcessor and AutoModelForImageClassification give the run's evaluation logits."""
  config = tiny_vit_config(**{"model.pool": "cls"})  # the demo's 'gap' would export without its head
  task, params = _workdir(tmp_path / "run", config)
  out = tmp_path / "hf"
  status, stdout, stderr = _export(capsys, f"--checkpoint={tmp_path / 'run'}", f"--out={out}")
  assert status == 0, stderr
  assert f"wrote {out}: ViTForImageClassification" in stdout and "step 3 of" in stdout
  assert "AutoModelForImageClassification.from_pretrained" in stdout
  model, variables = convert.from_hf(str(out), scan=config.model.scan)
  assert (model.width, model.depth, model.patch_size, model.num_classes) == (32, 2, 4, config.model.num_classes)
  chex.assert_trees_all_equal(jax.device_get(variables["params"]), params)
  with open(out / "config.json") as f:
    assert list(json.load(f)["id2label"].values()) == list(shapes.SHAPE_NAMES)
  assert hf_files.read_normalisation(str(out)) == {"mean": list(config.data.mean), "std": list(config.data.std)}

  photos = _photos()
  images = _run_eval_view(config.data, photos)
  predict = jax.jit(
    lambda p, x: (task.normalize(x), task.logits(p, task.normalize(x), train=False)), compiler_options=FAST_COMPILE
  )
  pixels, logits = predict(params, images)
  processor, hf_pixels = _processor_pixels(out, photos)
  assert type(processor).__name__.startswith("BitImageProcessor")
  _assert_close(pixels, hf_pixels.numpy().transpose(0, 2, 3, 1), "normalised pixels", 1e-6)
  hf = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
  with torch.no_grad():
    _assert_close(logits, hf(pixel_values=hf_pixels).logits.numpy(), "logits")


# Camera photos (the longer side 1,200 to 2,000 px, either orientation) and small files, JPEG and PNG: files whose
# shorter side is many times the model's resize side are where Pillow's JPEG draft mode (a reduced-scale DCT
# decode) would differ from a full decode.
PHOTO_FILES = {
  "landscape.jpg": (1200, 1600),
  "portrait.jpg": (2000, 1500),
  "wide.jpg": (1224, 1632),
  "small.jpg": (60, 90),
  "large.png": (900, 1300),
  "small.png": (40, 30),
}


def _photo_files(directory) -> list[str]:
  """PHOTO_FILES written by Pillow (JPEG quality 90, as a camera or a browser saves them): their paths."""
  directory.mkdir()
  photos = _photos(list(PHOTO_FILES.values()), seed=3)
  for name, photo in zip(PHOTO_FILES, photos):
    Image.fromarray(photo).save(directory / name, **({"quality": 90} if name.endswith(".jpg") else {}))
  return [str(directory / name) for name in PHOTO_FILES]


def test_photo_files_give_the_runs_logits_through_transformers(tmp_path, capsys):
  """Image files of camera sizes (JPEG, PNG): `visionfm_jax.load(...).logits(paths)`, the run's evaluation
  iterator over the files' bytes and the export through AutoImageProcessor + AutoModelForImageClassification
  (transformers decodes in full, load_image as its pipelines do) agree within 1e-5: no JPEG draft decode."""
  import visionfm_jax  # pylint: disable=g-import-not-at-top

  config = tiny_vit_config(**{"model.pool": "cls"})
  _workdir(tmp_path / "run", config)
  out = tmp_path / "hf"
  assert _export(capsys, f"--checkpoint={tmp_path / 'run'}", f"--out={out}")[0] == 0
  paths = _photo_files(tmp_path / "photos")
  model = visionfm_jax.load(str(tmp_path / "run"), batch_size=8)
  ours = model.logits(paths)
  records = [{"image": open(path, "rb").read(), "label": 0} for path in paths]
  batch = next(data.make_eval_iterator(config.data, batch_size=8, process_index=0, process_count=1, source=records))
  np.testing.assert_array_equal(batch["image"][: len(paths)], model.preprocess(paths))  # evaluation's view, too
  processor = transformers.AutoImageProcessor.from_pretrained(str(out))
  images = [transformers.image_utils.load_image(path) for path in paths]
  hf = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
  with torch.no_grad():
    theirs = hf(**processor(images=images, return_tensors="pt")).logits.numpy()
  _assert_close(ours, theirs, "logits of photo files")


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
  """(workdir, config, params) of the tiny CLIP (femto SwinV2 image tower, unrolled)."""
  config, directory = tiny_clip_config(), tmp_path_factory.mktemp("clip")
  return directory, config, _workdir(directory, config)[1]


def test_cli_exports_the_image_tower_of_a_clip_workdir(clip_workdir, tmp_path, capsys):
  workdir, config, params = clip_workdir
  status, stdout, stderr = _export(capsys, f"--checkpoint={workdir}", f"--out={tmp_path / 'hf'}")
  assert status == 0, stderr
  assert "Swinv2Model" in stdout and "note: exported config.model.image only" in stdout
  model, variables = convert.from_hf(str(tmp_path / "hf"), scan=config.model.scan)
  assert (model.embed_dim, model.num_classes, model.window_size, model.patch_size) == (16, 0, 4, 2)
  chex.assert_trees_all_equal(jax.device_get(variables["params"]), params["image"])


def test_an_imported_clip_exports_whole_and_sees_what_the_run_saw(tmp_path, capsys):
  """A transformers CLIPModel (with its tokenizer.json) through tools.import_hf and back through tools.export_hf:
  AutoProcessor loads the export's CLIP view (the shorter side to 24, bicubic, the central crop, OpenAI's mean /
  std) and its tokenizer, and photos of any size give the image embeddings that the run's evaluation computes."""
  hf_config = transformers.CLIPConfig(
    text_config=HF_CLIP["text"], vision_config=HF_CLIP["vision"], projection_dim=HF_CLIP["projection_dim"]
  )
  clip = transformers.CLIPModel(hf_config)
  randomize_hf_params(clip, seed=5)
  clip.save_pretrained(tmp_path / "hf")
  _bpe_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
  imported, out = tmp_path / "imported", tmp_path / "exported"
  assert import_hf.main(["import_hf", f"--src={tmp_path / 'hf'}", f"--out={imported}"]) == 0
  status, stdout, stderr = _export(capsys, f"--checkpoint={imported}", f"--out={out}")
  assert status == 0 and "CLIPModel" in stdout and "note:" not in stdout, stderr

  loaded = loader.load(str(imported))
  photos = _photos(seed=1)
  images = _run_eval_view(loaded.task.config.data, photos)
  embed = jax.jit(
    lambda p, x: (loaded.task.normalize(x), loaded.task.embed_images(p, x)), compiler_options=FAST_COMPILE
  )
  pixels, embeddings = embed(loaded.params, images)
  processor = transformers.AutoProcessor.from_pretrained(str(out))
  assert type(processor.image_processor).__name__.startswith("CLIPImageProcessor")
  inputs = processor(text=["a red circle"], images=[Image.fromarray(p) for p in photos], return_tensors="pt")
  _assert_close(pixels, inputs["pixel_values"].numpy().transpose(0, 2, 3, 1), "normalised pixels", 1e-6)
  hf = transformers.CLIPModel.from_pretrained(str(out)).eval()
  with torch.no_grad():
    _assert_close(embeddings, hf(**inputs).image_embeds.numpy(), "image embeddings")


def test_cli_exports_an_import_hf_directory_back_to_its_tensors(exported, tmp_path, capsys):
  _, path = exported("vit_classifier")
  import_hf.convert(path, str(tmp_path / "imported"), scan=False)
  status, stdout, stderr = _export(capsys, f"--checkpoint={tmp_path / 'imported'}", f"--out={tmp_path / 'hf'}")
  assert status == 0, stderr
  assert "ViTForImageClassification" in stdout
  chex.assert_trees_all_equal(
    load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(os.path.join(path, "model.safetensors"))
  )
  with open(tmp_path / "hf" / "config.json") as f, open(os.path.join(path, "config.json")) as g:
    assert json.load(f) == json.load(g)


def _one_error(status, stdout, stderr, *fragments) -> None:
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert status == 2 and len(errors) == 1 and not stdout and "Traceback" not in stderr, stderr
  assert all(f in errors[0] for f in fragments), (fragments, errors[0])


# ViT demo runs (init-only checkpoints) whose fields a transformers ViT lacks or names otherwise: each exports so that
# transformers computes the run's logits (a backbone: its pooled features, from what export_hf's last line says), or
# export_hf refuses it in one line naming the field and its value.
FIELD_RUNS = {
  "act": ({"model.act": "gelu_pytorch_tanh", "model.pool": "cls"}, "ViTForImageClassification"),
  "gap": ({}, "Dinov2ForImageClassification"),  # the demo's pool
  "gap_backbone": ({"model.num_classes": 0}, "ViTModel"),
  "pre_norm": ({"model.pre_norm": True}, "config.model.pre_norm=True"),
  "map": ({"model.pool": "map"}, "config.model.pool='map'"),
}


@pytest.mark.parametrize("overrides, expected", FIELD_RUNS.values(), ids=list(FIELD_RUNS))
def test_vit_demo_fields_export_exactly_or_are_refused(tmp_path, capsys, overrides, expected):
  config = tiny_vit_config(**overrides)
  task, params = _workdir(tmp_path / "run", config)
  out = tmp_path / "hf"
  status, stdout, stderr = _export(capsys, f"--checkpoint={tmp_path / 'run'}", f"--out={out}")
  if expected.startswith("config."):
    _one_error(status, stdout, stderr, expected)
    assert not out.exists()
    return
  assert status == 0 and f": {expected} (" in stdout, stderr
  images = np.random.default_rng(2).standard_normal((3, 16, 16, 3)).astype(np.float32)
  ours = jax.jit(task.model.apply, compiler_options=FAST_COMPILE)({"params": params}, images)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
  with torch.no_grad():
    if config.model.num_classes:
      hf = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
      _assert_close(ours["logits"], hf(pixel_values=pixels).logits.numpy(), f"{expected} logits")
      return
    tokens = transformers.AutoModel.from_pretrained(str(out)).eval()(pixel_values=pixels).last_hidden_state.numpy()
  last = stdout.splitlines()[-1]
  assert last.endswith("the run's pooled features are last_hidden_state[:, 1:].mean(1)"), last
  _assert_close(ours["pooled"], tokens[:, 1:].mean(1), "pooled features")


def _tree(folder) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cli_writes_only_into_a_folder_it_may_claim(exported, tmp_path, capsys, monkeypatch):
  """--out is written whole: a user's folder or another model's is refused (one error line, nothing touched)
  unless --overwrite, which leaves the export's files alone there (never the folder one works in); the tool's own
  folder is written again while nobody added to it; files get the user's umask; no temporary folder stays beside."""
  import_hf.convert(exported("vit_backbone")[1], str(tmp_path / "imported"))
  source = f"--checkpoint={tmp_path / 'imported'}"
  user, bert = tmp_path / "user", tmp_path / "bert"
  user.mkdir()
  (user / "model.safetensors").write_bytes(b"the user's weights")
  (user / "preprocessor_config.json").write_text("{}")
  bert.mkdir()
  (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
  for name in ("model.safetensors", "tokenizer.json", "vocab.txt"):
    (bert / name).write_text(f"BERT's {name}")
  for folder, named in ((user, "model.safetensors"), (bert, "tokenizer.json")):
    before = _tree(folder)
    _one_error(*_export(capsys, source, f"--out={folder}"), f"--out={folder}", named, "--overwrite")
    assert _tree(folder) == before
  monkeypatch.chdir(user)
  _one_error(*_export(capsys, source, f"--out={user}", "--overwrite"), f"holds the working directory ({user})")
  monkeypatch.undo()

  assert _export(capsys, source, f"--out={bert}", "--overwrite")[0] == 0
  written = sorted(os.listdir(bert))
  assert written == [output_folder.MARKER, "config.json", "model.safetensors", "preprocessor_config.json"]
  assert hf_files.read_config(str(bert))["model_type"] == "vit"
  assert _export(capsys, source, f"--out={bert}")[0] == 0  # its own folder, as it left it
  (bert / "README.md").write_text("the user's notes")
  _one_error(*_export(capsys, source, f"--out={bert}"), "README.md")
  assert sorted(os.listdir(bert)) == sorted(written + ["README.md"])

  umask = os.umask(0o027)
  try:
    assert _export(capsys, source, f"--out={tmp_path / 'private' / 'vit'}")[0] == 0
  finally:
    os.umask(umask)
  modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "private" / "vit").iterdir()}
  assert modes == dict.fromkeys(written, 0o640) and (tmp_path / "private" / "vit").stat().st_mode & 0o777 == 0o750
  assert sorted(os.listdir(tmp_path)) == ["bert", "imported", "private", "user"]


def test_bad_checkpoint_dirs_are_named(exported, clip_workdir, tmp_path, capsys):
  _, hf_dir = exported("vit_backbone")
  # The same params with main-branch norms every block (parameter-free): transformers has none.
  shutil.copytree(clip_workdir[0], tmp_path / "extra_norms")
  fields = json.loads((tmp_path / "extra_norms" / "config.json").read_text())
  fields["model"]["image"]["extra_norm_period"] = 1
  (tmp_path / "extra_norms" / "config.json").write_text(json.dumps(fields))
  (tmp_path / "empty").mkdir()
  (tmp_path / "no_ckpt").mkdir()
  (tmp_path / "no_ckpt" / "config.json").write_text(tiny_vit_config().to_json_best_effort())
  import_hf.convert(hf_dir, str(tmp_path / "imported"))
  cases = {
    "absent": ([f"--checkpoint={tmp_path / 'absent'}"], "no such directory"),
    "empty": ([f"--checkpoint={tmp_path / 'empty'}"], "neither a training workdir"),
    "transformers_dir": ([f"--checkpoint={hf_dir}"], "a transformers directory already"),
    "no_checkpoints": ([f"--checkpoint={tmp_path / 'no_ckpt'}"], "no checkpoints"),
    "step_of_import_dir": ([f"--checkpoint={tmp_path / 'imported'}", "--step=5"], "--step=5"),
    "out_is_a_workdir": ([f"--checkpoint={tmp_path / 'imported'}", f"--out={tmp_path / 'imported'}"], "--out="),
    "no_checkpoint_flag": ([], "--checkpoint: required"),
    "inexpressible": (
      [f"--checkpoint={tmp_path / 'extra_norms'}"],
      f"--checkpoint={tmp_path / 'extra_norms'}: config.model.image.extra_norm_period=1: "
      "transformers' Swinv2 has no main-branch LayerNorm",
    ),
  }
  for name, (args, message) in cases.items():
    if not any(a.startswith("--out=") for a in args):
      args = [*args, f"--out={tmp_path / 'out'}"]
    status, stdout, stderr = _export(capsys, *args)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and message in errors[0], (name, stderr)
    assert not stdout and "Traceback" not in stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["vit_classifier", "swin_classifier", "vit_backbone"])
def test_load_opens_an_import_hf_directory_as_transformers_runs_its_export(exported, name, tmp_path, capsys):
  """`visionfm_jax.load` of a ViT's or a SwinV2's tools.import_hf directory, on photo files of camera sizes: a
  classifier's logits and a backbone's pooled features equal transformers' on what export_hf writes from the same
  directory, through its AutoImageProcessor."""
  import visionfm_jax  # pylint: disable=g-import-not-at-top

  _, path = exported(name)
  imported, out = tmp_path / "imported", tmp_path / "hf"
  import_hf.convert(path, str(imported), scan=MODELS[name].scan)
  status, stdout, stderr = _export(capsys, f"--checkpoint={imported}", f"--out={out}")
  assert status == 0 and ARCHS[name] in stdout, stderr
  paths = _photo_files(tmp_path / "photos")
  model = visionfm_jax.load(str(imported), batch_size=8)
  processor = transformers.AutoImageProcessor.from_pretrained(str(out))
  pixels = processor(images=[transformers.image_utils.load_image(p) for p in paths], return_tensors="pt")
  with torch.no_grad():
    if MODELS[name].num_classes:
      hf = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
      _assert_close(model.logits(paths), hf(**pixels).logits.numpy(), f"{name} logits of photo files")
    else:
      hf_out = transformers.AutoModel.from_pretrained(str(out)).eval()(**pixels)
      _assert_close(model.features(paths), hf_out.pooler_output.numpy(), f"{name} features of photo files")
