"""ImageNet's variants as zero-shot benchmarks (ImageNet-A, -R, -Sketch, V2): the 200-class subsets and the
1000 WordNet ids equal the copies CLIP_benchmark ships (its `clip_benchmark` wheel, a test dependency, read as
text: its package imports torch modules it does not declare), the readers of each released layout give each
image the index within its set's own class list and OpenAI's name of that ImageNet class, and
`tools.evaluate` runs them on a tiny CLIP workdir."""

import ast
import importlib.metadata
import io
import json

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

from visionfm_jax import parallel, param_rules, tasks
from visionfm_jax.data.sources import imagenet_variants
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import ConfigError, DataError
from visionfm_jax.evaluate import zeroshot
from visionfm_jax.tasks import image_text
from visionfm_jax.tasks.base import EvalContext
from visionfm_jax.training import checkpoint

from conftest import random_params, tiny_aurora_config, tiny_clip_config

BUILDER, CLASSNAMES, TEMPLATES = (
  "clip_benchmark/datasets/builder.py",
  "clip_benchmark/datasets/en_classnames.json",
  "clip_benchmark/datasets/en_zeroshot_classification_templates.json",
)


@pytest.fixture(scope="module")
def clip_benchmark():
  """{'all_imagenet_wordnet_ids': [...], 'imagenet_a_wnids': [...], 'imagenet_r_wnids': {...}, 'classnames':
  [...] (its imagenet1k names), 'templates': [...]} from the installed wheel's files."""
  try:
    files = {str(f).replace("\\", "/"): f for f in importlib.metadata.files("clip_benchmark") or []}
  except importlib.metadata.PackageNotFoundError:
    pytest.skip(
      "clip_benchmark is not installed (pip install --no-deps 'clip_benchmark>=1.6,<2'): it holds the "
      "ImageNet-A / -R subsets to compare with"
    )
  wanted = ("all_imagenet_wordnet_ids", "imagenet_a_wnids", "imagenet_r_wnids")
  out = {}
  for node in ast.walk(ast.parse(files[BUILDER].read_text(encoding="utf-8"))):
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], "id", None) in wanted:
      out[node.targets[0].id] = ast.literal_eval(node.value)
  assert sorted(out) == sorted(wanted)
  out["classnames"] = json.loads(files[CLASSNAMES].read_text(encoding="utf-8"))["imagenet1k"]
  out["templates"] = [
    t.replace("{c}", "{}") for t in json.loads(files[TEMPLATES].read_text(encoding="utf-8"))["imagenet1k"]
  ]
  return out


def test_imagenet_wnids_and_subsets_equal_clip_benchmarks(clip_benchmark):
  all_wnids = clip_benchmark["all_imagenet_wordnet_ids"]
  assert list(imagenet_variants.imagenet_wnids()) == all_wnids and len(all_wnids) == 1000
  assert (all_wnids[0], all_wnids[-1]) == ("n01440764", "n15075141")
  # the zero-shot names file carries the same ids in its first column
  assert [line.split("\t")[0] for line in zeroshot.read_lines("imagenet_classes.txt")] == all_wnids
  for kind, theirs in (
    ("imagenet_a", clip_benchmark["imagenet_a_wnids"]),
    ("imagenet_r", clip_benchmark["imagenet_r_wnids"]),
  ):
    ours = imagenet_variants.class_wnids(kind)
    assert len(ours) == len(set(theirs)) == 200 and set(ours) == set(theirs)
    # clip_benchmark's class names of the set: ImageNet's, masked in class-index order
    names = [name for wnid, name in zip(all_wnids, clip_benchmark["classnames"]) if wnid in set(theirs)]
    assert zeroshot.imagenet_class_names(ours, kind) == names
  assert list(imagenet_variants.class_wnids("imagenet_a")) == clip_benchmark["imagenet_a_wnids"]  # a sorted list
  assert list(imagenet_variants.class_wnids("imagenet_sketch")) == all_wnids
  assert list(imagenet_variants.class_wnids("imagenetv2")) == all_wnids


def test_openai_names_and_templates_equal_clip_benchmarks(clip_benchmark):
  names, templates = zeroshot.class_names_and_templates("imagenet")
  assert names == clip_benchmark["classnames"] and templates == clip_benchmark["templates"]


# ------------------------------------------------------------------------------------------ readers


def _jpeg(seed: int, size: int = 20) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG")
  return buffer.getvalue()


LAYOUTS = {  # kind: (the folder its release unpacks to, image suffix, folders named by class index)
  "imagenet_a": ("imagenet-a", ".jpg", False),
  "imagenet_r": ("imagenet-r", ".jpg", False),
  "imagenet_sketch": ("sketch", ".JPEG", False),
  "imagenetv2": ("imagenetv2-matched-frequency-format-val", ".jpeg", True),
}


def write_release(parent, kind: str, extra=()):
  """A fake release of `kind` under `parent`, as its archive unpacks: one image per class folder (the same
  bytes), and for each ImageNet class index in `extra` one more, distinct image; a README beside the folders
  and a non-image file in one of them, as downloads have. Returns the root."""
  folder, suffix, by_index = LAYOUTS[kind]
  root = parent / folder
  index = {w: i for i, w in enumerate(imagenet_variants.imagenet_wnids())}
  common = _jpeg(0)
  for wnid in imagenet_variants.class_wnids(kind):
    class_dir = root / (str(index[wnid]) if by_index else wnid)
    class_dir.mkdir(parents=True)
    (class_dir / f"{wnid}_0{suffix}").write_bytes(common)
    if index[wnid] in extra:
      (class_dir / f"{wnid}_1{suffix}").write_bytes(_jpeg(1 + index[wnid]))
  (root / "README.txt").write_text("release notes")
  (class_dir / "Thumbs.db").write_bytes(b"not an image")
  return root


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_reader_labels_within_the_sets_classes_and_openai_names(tmp_path, kind):
  stingray, ostrich = 6, 9  # ImageNet class indices (n01498041, n01518878); stingray is in A and R
  root = write_release(tmp_path, kind, extra=(stingray, ostrich))
  spec = f"{kind}:{root}"
  source = sources.build_source(spec, "validation", tiny_clip_config().data)
  wnids = imagenet_variants.class_wnids(kind)
  assert len(wnids) == (200 if kind in ("imagenet_a", "imagenet_r") else 1000)
  with_ostrich = "n01518878" in wnids  # in R, not in A
  assert len(source) == len(wnids) + 1 + with_ostrich
  names = zeroshot.imagenet_class_names(sources.class_names(spec, tiny_clip_config().data), spec)
  openai_names, _ = zeroshot.class_names_and_templates("imagenet")
  assert names == [openai_names[imagenet_variants.imagenet_wnids().index(w)] for w in wnids]
  labels = [int(source[i]["label"]) for i in range(len(source))]
  assert labels == sorted(labels) and set(labels) == set(range(len(wnids)))
  for imagenet_index in (stingray, ostrich)[: 1 + with_ostrich]:
    label = wnids.index(imagenet_variants.imagenet_wnids()[imagenet_index])
    records = [source[i] for i in range(len(source)) if labels[i] == label]
    assert [r["image"] for r in records] == [_jpeg(0), _jpeg(1 + imagenet_index)]  # file-name order
    assert names[label] == openai_names[imagenet_index]
  assert names[wnids.index("n01498041")] == "stingray"
  if kind in ("imagenet_a", "imagenet_r"):
    assert labels[-1] == 199 and wnids.index("n01498041") == (0 if kind == "imagenet_a" else 3)


def test_reader_errors_name_the_folder(tmp_path):
  data_cfg = tiny_clip_config().data
  root = write_release(tmp_path, "imagenet_r")
  what = "config.eval.zeroshot_benchmarks 'r'"
  with pytest.raises(DataError, match=f"^{what}: no folder {tmp_path / 'nowhere'}; see docs/data_preparation.md"):
    sources.build_source(f"imagenet_r:{tmp_path / 'nowhere'}", "validation", data_cfg, what=what)
  (root / "n01443537" / "n01443537_0.jpg").unlink()
  with pytest.raises(DataError, match=f"class folder {root / 'n01443537'} has no images"):
    sources.build_source(f"imagenet_r:{root}", "validation", data_cfg)
  (root / "n01443537").rmdir()
  with pytest.raises(DataError, match="lacks 1 of the 200 class folders of imagenet_r: n01443537; "):
    sources.build_source(f"imagenet_r:{root}", "validation", data_cfg)
  with pytest.raises(DataError, match="lacks 200 of the 200 class folders of imagenet_a: n01498041, n01531178, "):
    sources.build_source(f"imagenet_a:{tmp_path}", "validation", data_cfg)  # the parent, not the set's folder
  (root / "n01443537").mkdir()
  (root / "n01443537" / "a.png").write_bytes(_jpeg(3))
  (root / "n01440764").mkdir()  # tench: an ImageNet class, not one of ImageNet-R's
  with pytest.raises(DataError, match="holds 1 folders that are not classes of imagenet_r: n01440764"):
    sources.build_source(f"imagenet_r:{root}", "validation", data_cfg)


def test_label_names_must_be_imagenet_wnids():
  with pytest.raises(DataError, match="^shapes: its label names must be ImageNet-1k WordNet ids .* e.g. 'circle'"):
    zeroshot.imagenet_class_names(sources.class_names("shapes", tiny_clip_config().data), "shapes")


# ------------------------------------------------------------------------------------------ end to end


def _clip_workdir(path, config):
  """A tiny CLIP training workdir: its config.json and a checkpoint of random params (drawn from the init's
  shapes, no compile)."""
  task = tasks.build(config)
  abstract = nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0))["params"])
  rng = np.random.default_rng(0)

  def draw(key_path, leaf):
    name = param_rules.path_str(key_path)
    if name.endswith("scale"):
      return np.ones(leaf.shape, leaf.dtype)
    if name.endswith("bias"):
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = leaf.shape[-2] if leaf.ndim > 1 else 1
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  params = jax.tree_util.tree_map_with_path(draw, abstract)
  path.mkdir()
  (path / "config.json").write_text(config.to_json_best_effort())
  ckpt = checkpoint.Checkpointer(str(path / "checkpoints"), async_save=False)
  ckpt.save(4, {"params": params, "step": np.int32(4)})
  ckpt.close()
  return task, params


def _reference_top1(task, params, root) -> tuple[float, int]:
  """top-1 written plainly: each decodable image's cosine with the renormalised mean of its prompts'
  embeddings (OpenAI's 8 simple templates) for each of ImageNet-R's 200 classes (OpenAI's names), argmax
  against the label."""
  source = imagenet_variants.open_variant("imagenet_r", str(root))
  names = zeroshot.imagenet_class_names(imagenet_variants.class_wnids("imagenet_r"), "r")
  templates = zeroshot.class_names_and_templates("imagenet_simple")[1]
  tokens = task.tokenizer.encode_batch([t.format(n) for n in names for t in templates])
  embed_texts = jax.jit(task.embed_texts)
  text = np.concatenate(
    [np.asarray(embed_texts(params, tokens[i : i + 2000]), np.float64) for i in range(0, len(tokens), 2000)]
  )  # one call
  text = (text / np.linalg.norm(text, axis=-1, keepdims=True)).reshape(len(names), len(templates), -1).mean(1)
  size, preprocess = task.config.data.image_size, task.config.data.eval_preprocess
  images, labels = [], []
  for i in range(len(source)):
    try:
      image = transforms.decode_image(source[i]["image"])
    except Exception:  # pylint: disable=broad-except
      continue
    images.append(transforms.EvalTransform(size, preprocess).map({"image": image})["image"])
    labels.append(int(source[i]["label"]))
  image_emb = np.asarray(jax.jit(task.embed_images)(params, np.stack(images)), np.float64)
  predictions = np.argmax(image_emb @ (text / np.linalg.norm(text, axis=-1, keepdims=True)).T, axis=1)
  return float(np.mean(predictions == np.array(labels))), len(labels)


def test_evaluate_tool_runs_the_zeroshot_benchmarks(tmp_path, capsys):
  from visionfm_jax.tools import evaluate  # pylint: disable=g-import-not-at-top

  config = tiny_clip_config(**{"data.num_workers": 0})
  task, params = _clip_workdir(tmp_path / "clip", config)
  root = write_release(tmp_path / "r", "imagenet_r", extra=range(0, 1000, 7))
  (root / "n01443537" / "n01443537_9.jpg").write_bytes(b"not an image")  # counted, left out
  # the same set twice: its prompts go through the text tower once, and both share one top-k program
  benchmarks = (
    f"--config.eval.zeroshot_benchmarks=(('imagenet_r', 'imagenet_r:{root}'), "
    f"('imagenet_r_again', 'imagenet_r:{root}'))"
  )
  flags = [
    "--config.eval.zeroshot_classes=",
    "--config.eval.retrieval=false",
    "--batch_size=64",
    "--config.eval.zeroshot_benchmark_templates=imagenet_simple",
  ]  # 1,600 prompts, not 16,000
  out = tmp_path / "results.json"
  compiled = []
  listen = lambda event, _, fun_name="", **__: (
    compiled.append(fun_name) if event.endswith("backend_compile_duration") else None
  )
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    assert evaluate.main(["evaluate", f"--checkpoint={tmp_path / 'clip'}", benchmarks, *flags, f"--out={out}"]) == 0
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiled.count("jit(counts)") == compiled.count("jit(embed_texts)") == 1, compiled
  printed = capsys.readouterr().out.strip().splitlines()
  results = json.loads(out.read_text())
  again = {k.replace("imagenet_r_again", "imagenet_r"): v for k, v in results.items() if "again" in k}
  assert again == {k: v for k, v in results.items() if "imagenet_r/" in k}
  assert sorted(results) == sorted(again) + [
    "eval/zeroshot_imagenet_r_again/count",
    "eval/zeroshot_imagenet_r_again/top1",
    "eval/zeroshot_imagenet_r_again/top5",
    "step",
  ]
  top1, count = _reference_top1(task, params, root)
  sevens = sum(
    imagenet_variants.imagenet_wnids().index(w) % 7 == 0 for w in imagenet_variants.class_wnids("imagenet_r")
  )
  assert count == 200 + sevens == results["eval/zeroshot_imagenet_r/count"] and sevens > 10
  assert f"eval/zeroshot_imagenet_r/count={count}" in printed and results["step"] == 4
  assert results["eval/zeroshot_imagenet_r/top1"] == pytest.approx(top1, abs=1e-6)

  missing = tmp_path / "imagenet-a"
  assert (
    evaluate.main(
      [
        "evaluate",
        f"--checkpoint={tmp_path / 'clip'}",
        *flags,
        f"--config.eval.zeroshot_benchmarks=(('imagenet_a', 'imagenet_a:{missing}'),)",
      ]
    )
    == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert (
    len(err) == 1
    and err[0].startswith("error: config.eval.zeroshot_benchmarks 'imagenet_a'=")
    and f"no folder {missing}" in err[0]
  )


def test_aurora_scores_the_zeroshot_benchmarks_as_written_plainly(tmp_path):
  """Aurora's contrastive towers score config.eval.zeroshot_benchmarks through the same evaluators as CLIP's: the
  top-1 equals the plain computation's, with random params."""
  root = write_release(tmp_path, "imagenet_r", extra=range(0, 1000, 7))
  config = tiny_aurora_config(
    **{
      "eval.zeroshot_benchmarks": (("imagenet_r", f"imagenet_r:{root}"),),
      "eval.zeroshot_benchmark_templates": "imagenet_simple",
      "data.num_workers": 0,
    }
  )
  task = tasks.build(config)
  params = random_params(task)
  evaluators = image_text.benchmark_evaluators(task, EvalContext(parallel.make_mesh(config.mesh), 64, 0, 1))
  results = evaluators["zeroshot_imagenet_r"](params)
  top1, count = _reference_top1(task, params, root)
  assert results["count"] == count and results["top1"] == pytest.approx(top1, abs=1e-6)


def test_zeroshot_benchmarks_field_is_checked():
  for bad in (("r", "imagenet_r:/x"), (("r", "imagenet_r:/x", 1),), (("r", "a"), ("r", "b")), (("r r", "a"),)):
    task = tasks.build(tiny_clip_config(**{"eval.zeroshot_benchmarks": bad}))
    with pytest.raises(ConfigError, match="config.eval.zeroshot_benchmarks"):
      image_text.benchmark_evaluators(task, EvalContext(parallel.make_mesh(task.config.mesh), 8, 0, 1))
  task = tasks.build(
    tiny_clip_config(
      **{"eval.zeroshot_benchmarks": (("r", "imagenet_r:/x"),), "eval.zeroshot_benchmark_templates": "imagenet_80"}
    )
  )
  with pytest.raises(ConfigError, match="^config.eval.zeroshot_benchmark_templates='imagenet_80': expected"):
    image_text.benchmark_evaluators(task, EvalContext(parallel.make_mesh(task.config.mesh), 8, 0, 1))


def test_a_200_class_variant_as_the_main_zeroshot_source_is_refused(tmp_path):
  """Its labels index its own 200 classes: against the 1000 names of config.eval.zeroshot_classes they would
  name the wrong classes."""
  root = write_release(tmp_path, "imagenet_a")
  task = tasks.build(
    tiny_clip_config(
      **{"eval.zeroshot_classes": "imagenet", "eval.zeroshot_source": f"imagenet_a:{root}", "eval.retrieval": False}
    )
  )
  with pytest.raises(ConfigError, match=r"within its own 200 classes.*config.eval.zeroshot_benchmarks="):
    task.evaluators(EvalContext(parallel.make_mesh(task.config.mesh), 8, 0, 1))
