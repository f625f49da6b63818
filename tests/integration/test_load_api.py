"""`visionfm_jax.load(path)` (trained/model.py): a CLIP workdir's image and text embeddings equal the task's
own (as the tools compute them) on images of another size, viewed as its evaluation views them; zero-shot ranks the
given class names by those embeddings, embedding a class set once; a classifier's classes are its logits' argmax as
tools.evaluate computes them, and its logits the task's; a call is padded to the smallest batch bucket that holds
it; a NaFlex SigLIP's images go in as its evaluation packs them, at native aspect within its training token budget
or the one given to `load`; EMA params on request; one clear error for a bad path or a question the task cannot
answer; the module's notebook example runs as written; `dir(visionfm_jax)` offers `load` before JAX is imported;
bench.notebook times it."""

import builtins
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

import visionfm_jax
from visionfm_jax import tasks
from visionfm_jax.bench import notebook
from visionfm_jax.convert import hf_clip, tensors
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.data.transforms import naflex
from visionfm_jax.errors import UserError
from visionfm_jax.evaluate import zeroshot
from visionfm_jax.models import generate
from visionfm_jax.trained import loader
from visionfm_jax.trained import model as trained_model
from visionfm_jax.training import checkpoint, ema

from conftest import ROOT, override, tiny_aurora_config, tiny_clip_config, tiny_vit_config
from test_clip_checkpoint import hf_dir  # noqa: F401  pylint: disable=unused-import

STEP = 2


def _random_params(task, seed):
  """Random numpy params in the model's shapes (no init compile): kernels N(0, 1 / first dim), the rest N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    std = leaf.shape[0] ** -0.5 if path[-1].key == "kernel" else 0.1
    return rng.normal(0.0, std, leaf.shape).astype(leaf.dtype)

  shapes_only = jax.eval_shape(lambda: nn.unbox(task.init_variables(jax.random.key(0))["params"]))
  return jax.tree_util.tree_map_with_path(draw, shapes_only)


def _workdir(directory, config, with_ema=False):
  """(workdir, task, params, ema params or None): a training workdir of `config` whose checkpoint STEP holds random
  params (and a random EMA of them)."""
  task = tasks.build(config)
  params, ema_params = _random_params(task, 0), _random_params(task, 1) if with_ema else None
  ckpt = checkpoint.Checkpointer(str(directory / "checkpoints"), async_save=False)
  ckpt.save(STEP, {"params": params, **({ema.SUBTREE: ema_params} if with_ema else {})})
  ckpt.close()
  (directory / "config.json").write_text(config.to_json_best_effort(indent=2))
  return str(directory), task, params, ema_params


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  return _workdir(tmp_path_factory.mktemp("clip"), tiny_clip_config())


@pytest.fixture(scope="module")
def clip_model(clip):
  """`load(clip)` at its defaults, shared: each load jits its forwards afresh (a compile per bucket)."""
  return visionfm_jax.load(clip[0])


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
  return _workdir(tmp_path_factory.mktemp("vit"), tiny_vit_config(), with_ema=True)


@pytest.fixture(scope="module")
def naflex_siglip(tmp_path_factory):
  """A SigLIP of a NaFlex ViT tower (configs/swinv2_g_clip.py:demo,naflex) at test_naflex_siglip2's size."""
  from configs import swinv2_g_clip  # pylint: disable=g-import-not-at-top

  config = override(
    swinv2_g_clip.get_config("demo,naflex"),
    **{
      "model.image.variant": "32x1x64x2/4",
      "model.text.variant": "32x1x128x2",
      "model.embed_dim": 32,
      "model.image_size": 16,
      "data.image_size": 16,
      "data.naflex.max_tokens": 24,
    },
  )
  return _workdir(tmp_path_factory.mktemp("naflex"), config)


def _shapes_images(count, size=24):
  source = shapes.ShapesSource("validation", count, size, seed=shapes.SEED)
  return [source[i]["image"] for i in range(count)]


def _eval_view(task, images):
  """The images as the tools view them (tools/caption.py's load_images): the run's EvalTransform."""
  data_cfg = task.config.data
  transform = transforms.EvalTransform(data_cfg.image_size, data_cfg.get("eval_preprocess", "inception"))
  return np.stack([transform.map({"image": image})["image"] for image in images])


def test_clip_embeddings_equal_the_tasks_own(clip):
  path, task, params, _ = clip
  model = visionfm_jax.load(path, batch_size=4)  # 8 devices: batches of 8, the last of the 11 images padded
  assert (model.step, model.path, model.batch_size) == (STEP, path, 8)
  images = _shapes_images(11)
  expected = np.asarray(jax.jit(task.embed_images)(params, _eval_view(task, images)))
  image_emb = model.encode_image(images)
  np.testing.assert_allclose(image_emb, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1.0, rtol=1e-5)
  # one array, an NHWC batch and PIL images are the same images
  np.testing.assert_allclose(model.encode_image(images[0]), expected[:1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.encode_image(np.stack(images[:3])), expected[:3], rtol=1e-5, atol=1e-5)
  pil = [Image.fromarray(image) for image in images[:2]]
  np.testing.assert_allclose(model.encode_image(pil), expected[:2], rtol=1e-5, atol=1e-5)

  texts = ["a large red circle", "a small blue square", "a green triangle"]
  expected_text = np.asarray(jax.jit(task.embed_texts)(params, task.tokenizer.encode_batch(texts)))
  np.testing.assert_allclose(model.encode_text(texts), expected_text, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.encode_text(texts[1]), expected_text[1:2], rtol=1e-5, atol=1e-5)


def test_zero_shot_ranks_the_given_class_names(clip, clip_model, monkeypatch):
  _, _, params, _ = clip
  model = clip_model
  embedded = []  # the class sets that went through the text tower
  monkeypatch.setattr(
    zeroshot, "class_embeddings", lambda *args, real=zeroshot.class_embeddings: embedded.append(args[3]) or real(*args)
  )
  images, names = _shapes_images(5), ["circle", "square", "triangle", "star"]
  image_emb, text_emb = model.encode_image(images), model.encode_text(names)
  cosines = image_emb @ text_emb.T  # one template '{}': each class is its name's embedding
  ranked = model.zero_shot(images, names, templates=["{}"], top_k=3)
  for row, top in zip(cosines, ranked):
    assert [name for name, _ in top] == [names[j] for j in np.argsort(-row)[:3]]
    np.testing.assert_allclose([c for _, c in top], np.sort(row)[::-1][:3], rtol=1e-5, atol=1e-5)
  # the class embeddings are held: the same set again, or a subset of it, is not embedded again
  assert model.zero_shot(images, names, templates=["{}"], top_k=3) == ranked
  np.testing.assert_allclose(model.class_embeddings(names[:2], "{}"), text_emb[:2], rtol=1e-5, atol=1e-5)
  logits = model.logits(images, names, ["{}"])  # as the loss scores pairs: exp(logit_scale) * cosine
  np.testing.assert_allclose(logits, np.exp(params["logit_scale"]) * cosines, rtol=1e-5, atol=1e-5)
  assert embedded == [4]
  default = model.zero_shot(images, names)  # OpenAI's 80 templates
  assert [len(top) for top in default] == [4] * 5 and {n for n, _ in default[0]} == set(names)
  assert model.class_embeddings(names).shape == (4, text_emb.shape[1]) and embedded == [4, 4]
  assert model.features(images).shape[0] == 5  # the image tower's pooled features, before its projection
  with pytest.raises(UserError, match="classify: the model at .* is a 'contrastive' model"):
    model.classify(images)
  with pytest.raises(UserError, match="templates with '{}'"):
    model.zero_shot(images, names, templates=["a photo"])
  with pytest.raises(UserError, match="logits: .* give class_names"):
    model.logits(images)


def test_a_classifier_classifies_as_tools_evaluate_scores(vit, monkeypatch):
  path, task, params, ema_params = vit
  model = visionfm_jax.load(path, batch_size=16)  # 8 devices: batches of 8 or 16
  traced = []  # the batch sizes the head compiles for
  monkeypatch.setattr(
    model.task, "logits", lambda p, x, real=model.task.logits, **kw: traced.append(len(x)) or real(p, x, **kw)
  )
  images = _shapes_images(9)
  reference = jax.jit(lambda p, x: task.logits(p, task.normalize(x), train=False))  # for the params and the EMA
  view = _eval_view(task, images)
  logits = np.asarray(reference(params, view))
  top = model.classify(images[:6], top_k=3)
  assert model.class_names == list(shapes.SHAPE_NAMES)[: len(model.class_names)]
  assert [row[0][0] for row in top] == [model.class_names[i] for i in np.argmax(logits[:6], -1)]
  shifted = np.exp(logits[:6] - np.max(logits[:6], -1, keepdims=True))  # the softmax's largest probability
  np.testing.assert_allclose([row[0][1] for row in top], 1 / np.sum(shifted, -1), rtol=1e-5)
  np.testing.assert_allclose(model.logits(images), logits, rtol=1e-5, atol=1e-5)
  assert (model.buckets, traced) == ((8, 16), [8, 16])  # 6 images run a batch of 8, 9 one of 16
  features = model.encode_image(images)  # pooled backbone features, before the head
  assert features.ndim == 2 and len(features) == 9
  np.testing.assert_array_equal(model.features(images), features)
  with pytest.raises(UserError, match="encode_text: .* is a 'classification' model"):
    model.encode_text(["a circle"])
  with pytest.raises(UserError, match="logits: a classifier's logits are over its own classes"):
    model.logits(images, ["a circle"])

  averaged = visionfm_jax.load(path, ema=True, batch_size=8)
  expected = reference(ema_params, view)
  assert [row[0][0] for row in averaged.classify(images)] == [averaged.class_names[i] for i in np.argmax(expected, -1)]


def test_a_naflex_siglip_sees_images_at_their_aspect_within_a_token_budget(naflex_siglip, clip):
  path, task, params, _ = naflex_siglip
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 50), (44, 17), (16, 16))]
  model = visionfm_jax.load(path, batch_size=8)
  assert model.max_tokens == 24  # the run's training budget
  packed = np.stack([naflex.pack(image, 4, 24) for image in images])  # as its zero-shot evaluation packs them
  np.testing.assert_array_equal(model.preprocess(images), packed)
  expected = jax.jit(task.embed_images)(params, packed)
  np.testing.assert_allclose(model.encode_image(images), expected, rtol=1e-5, atol=1e-5)
  names = ["circle", "square"]
  cosines = expected @ model.class_embeddings(names, ["{}"]).T
  top = model.zero_shot(images, names, templates=["{}"], top_k=1)
  assert [row[0][0] for row in top] == [names[j] for j in np.argmax(cosines, -1)]
  scale, bias = float(np.exp(params["logit_scale"])), float(params["logit_bias"])
  np.testing.assert_allclose(model.logits(images, names, ["{}"]), cosines * scale + bias, rtol=1e-5, atol=1e-5)
  assert model.features(images).shape == (3, 32)

  small = visionfm_jax.load(path, max_tokens=6)  # another budget: fewer patches, each image still at its aspect
  assert naflex.grids(small.preprocess(images)).tolist() == [[2, 3], [3, 2], [2, 2]]
  np.testing.assert_allclose(
    small.encode_image(images[:1]), jax.jit(task.embed_images)(params, naflex.pack(images[0], 4, 6)[None]), atol=1e-5
  )
  for budget in (0, 2**16):
    with pytest.raises(UserError, match=f"^max_tokens={budget}: expected 1 .. 65535"):
      visionfm_jax.load(path, max_tokens=budget)
  with pytest.raises(UserError, match="max_tokens=6: .* takes square images"):
    visionfm_jax.load(clip[0], max_tokens=6)


def test_a_transformers_clip_directory_loads_as_the_tools_load_it(hf_dir):  # noqa: F811
  src, _ = hf_dir
  model, loaded = visionfm_jax.load(src), loader.load(src)
  assert model.step is None and model.config.model.to_dict() == loaded.task.config.model.to_dict()
  images = _shapes_images(3, size=40)
  expected = jax.jit(loaded.task.embed_images)(loaded.params, _eval_view(loaded.task, images))
  np.testing.assert_allclose(model.encode_image(images), expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match="^ema: .* is not a training workdir"):
    visionfm_jax.load(src, ema=True)


def test_a_transformers_clip_loads_reading_its_config_once_and_building_once(hf_dir, monkeypatch):  # noqa: F811
  src, _ = hf_dir
  config_file, reads, builds, traces = os.path.join(src, "config.json"), [], [], []
  real_open, real_build, real_check = builtins.open, hf_clip.build_model, tensors.check_model

  def counted_open(file, *args, **kwargs):
    if os.path.abspath(os.fspath(file)) == config_file:
      reads.append(file)
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", counted_open)
  monkeypatch.setattr(hf_clip, "build_model", lambda *a, **k: builds.append(a) or real_build(*a, **k))
  monkeypatch.setattr(hf_clip, "check_model", lambda *a, **k: traces.append(a) or real_check(*a, **k))
  model = visionfm_jax.load(src)
  assert (len(reads), len(builds), len(traces)) == (1, 1, 0)
  assert model.step is None


@pytest.mark.slow
def test_aurora_captions_as_tools_caption(tmp_path):
  path, task, params, _ = _workdir(tmp_path, tiny_aurora_config())
  model = visionfm_jax.load(path, batch_size=8)
  jax.tree.map(np.testing.assert_array_equal, model.params, params)
  images = _shapes_images(3)
  # The captions of the loaded params and of the images as the tools view them, padded as the model pads a call
  # (a batch of 8 on 8 devices; each row's caption is its own): the same programs, compiled once.
  view = np.concatenate([_eval_view(task, images), np.zeros((5, 16, 16, 3), np.uint8)])
  expected = generate.caption_images(task, model.params, view, max_len=6)[:3]
  assert model.caption(images, max_len=6) == expected
  assert model.encode_image(images).shape[0] == 3 and model.encode_text(["a circle"]).shape[0] == 1


def test_bad_paths_give_one_error_naming_them(tmp_path, clip, clip_model):
  missing = tmp_path / "nowhere"
  with pytest.raises(UserError, match=re.escape(str(missing))):
    visionfm_jax.load(str(missing))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match=re.escape(str(tmp_path / "empty"))):
    visionfm_jax.load(str(tmp_path / "empty"))
  with pytest.raises(UserError, match="^step=7: no such checkpoint"):
    visionfm_jax.load(clip[0], step=7)
  with pytest.raises(UserError, match="^ema: .*"):
    visionfm_jax.load(clip[0], ema=True)
  (tmp_path / "bert").mkdir()  # a transformers folder of another model: the error names load's own argument
  (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(UserError, match=f"^path={re.escape(str(tmp_path / 'bert'))}: a transformers 'bert' directory"):
    visionfm_jax.load(str(tmp_path / "bert"))
  model = clip_model
  with pytest.raises(UserError, match="expected uint8 HxWx3"):
    model.encode_image(np.zeros((4, 16, 16), np.float32))
  image = _shapes_images(1)[0]
  Image.fromarray(image).save(tmp_path / "shape.png")
  np.testing.assert_allclose(model.encode_image(str(tmp_path / "shape.png")), model.encode_image(image), atol=1e-6)
  (tmp_path / "notes.png").write_text("not an image")
  with pytest.raises(UserError, match=f"cannot decode {re.escape(str(tmp_path / 'notes.png'))}"):
    model.encode_image([str(tmp_path / "notes.png")])


def _with_fields_dropped(workdir, directory, *paths):
  """A copy of `workdir` in `directory` whose config.json lacks the dotted `paths`."""
  shutil.copytree(workdir, directory)
  fields = json.loads((directory / "config.json").read_text())
  for path in paths:
    *parents, leaf = path.split(".")
    node = fields
    for parent in parents:
      node = node[parent]
    del node[leaf]
  (directory / "config.json").write_text(json.dumps(fields))
  return str(directory)


def test_a_config_saved_before_its_fields_existed_loads_at_their_defaults(tmp_path, clip, clip_model, caplog):
  dropped = ("model.scan_unroll", "model.contrastive_loss", "eval.zeroshot_templates", "data.naflex")
  old = _with_fields_dropped(clip[0], tmp_path / "old", *dropped)
  caplog.set_level(logging.INFO)
  image = _shapes_images(1)[0]
  np.testing.assert_allclose(visionfm_jax.load(old).encode_image(image), clip_model.encode_image(image), atol=1e-6)
  filled = [r.getMessage() for r in caplog.records if "written before they existed" in r.getMessage()]
  assert len(filled) == 1 and all(path in filled[0] for path in dropped), filled
  nameless = _with_fields_dropped(clip[0], tmp_path / "nameless", "model.name")
  with pytest.raises(UserError, match=re.escape(f"{nameless}/config.json: no model.name")):
    visionfm_jax.load(nameless)


def _example_lines() -> str:
  """The module docstring's example, dedented."""
  doc = trained_model.__doc__
  block = doc[doc.index("Example") :].split("\n\n", 1)[1]
  return "\n".join(line[2:] for line in block.splitlines())


def test_the_docstring_example_runs(clip, capsys):
  exec(compile(_example_lines(), "trained_model example", "exec"), {"WORKDIR": clip[0]})  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  assert printed.count("[('") == 4, printed


def test_importing_the_package_stays_cheap():
  """`import visionfm_jax` loads no JAX, yet completion offers `load`: it is imported on first use."""
  code = (
    "import sys, visionfm_jax; assert 'load' in dir(visionfm_jax) and visionfm_jax.__all__ == ['load']; "
    "assert 'jax' not in sys.modules; assert callable(visionfm_jax.load)"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_the_notebook_benchmark_times_each_size(vit, capsys):
  """bench.notebook: a first call and the next ones per size, and one `error:` line for bad sizes."""
  assert notebook.main(["notebook", f"--workdir={vit[0]}", "--sizes=3,5", "--repeats=2", "--image_side=20"]) == 0
  printed = capsys.readouterr().out
  result = json.loads(printed.splitlines()[-1])[0]
  assert (result["task"], result["buckets"], [row["images"] for row in result["sizes"]]) == (
    "classification",
    [8, 64],
    [3, 5],
  )
  assert all(row["next_s"] > 0 and row["img_per_s"] > 0 for row in result["sizes"]), printed
  assert notebook.main(["notebook", f"--workdir={vit[0]}", "--sizes=0"]) == 2
  assert capsys.readouterr().err.strip() == "error: --sizes=0: expected positive integers"
