"""Retrieval with several captions per image (COCO, Flickr30k as papers report them): the metric against a
brute-force reference, the readers of the released layouts, and the evaluator end to end with a tiny CLIP."""

import itertools
import json
import pathlib
import re

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image
import pytest

from visionfm_jax import parallel, tasks
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.text import caption_sets
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import ConfigError, DataError
from visionfm_jax.evaluate import retrieval
from visionfm_jax.tasks import image_text
from visionfm_jax.tasks.base import EvalContext

from conftest import tiny_aurora_config, tiny_clip_config

KS = (1, 5, 10)


def brute_force_recall(image_emb, text_emb, caption_image, ks=KS):
  """The protocol written plainly: every query's candidates sorted by decreasing score, equal scores in index
  order; image -> text hits when any of its captions is among the first k, text -> image when its image is."""
  image_emb, text_emb = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
  num_images, num_captions = len(image_emb), len(text_emb)
  score = [[float(np.dot(image_emb[i], text_emb[c])) for c in range(num_captions)] for i in range(num_images)]
  i2t, t2i = [], []
  for i in range(num_images):
    order = sorted(range(num_captions), key=lambda c: (-score[i][c], c))
    i2t.append(min(position for position, c in enumerate(order) if caption_image[c] == i))
  for c in range(num_captions):
    order = sorted(range(num_images), key=lambda j: (-score[j][c], j))
    t2i.append(order.index(caption_image[c]))
  out = {}
  for name, found in (("i2t", i2t), ("t2i", t2i)):
    out.update({f"{name}_r{k}": sum(r < k for r in found) / len(found) for k in ks})
  return out


@pytest.mark.parametrize("counts", ["one", "five", "mixed"])
def test_recall_with_several_captions_is_the_brute_force_reference(counts):
  rng = np.random.default_rng({"one": 0, "five": 1, "mixed": 2}[counts])
  num_images = 23
  per_image = {
    "one": np.ones(num_images, int),
    "five": np.full(num_images, 5),
    "mixed": rng.integers(1, 8, num_images),
  }[counts]
  caption_image = rng.permutation(np.repeat(np.arange(num_images), per_image))  # captions in any order
  # Entries in {-1, 0, 1} and 3 dimensions: exact float scores with many ties.
  image_emb = rng.integers(-1, 2, (num_images, 3)).astype(np.float32)
  text_emb = rng.integers(-1, 2, (len(caption_image), 3)).astype(np.float32)
  got = retrieval.recall_at_k(image_emb, text_emb, caption_image)
  assert got == brute_force_recall(image_emb, text_emb, caption_image)
  # A constant scorer gets chance, not 100%.
  zeros = retrieval.recall_at_k(np.zeros_like(image_emb), np.zeros_like(text_emb), caption_image)
  assert zeros == brute_force_recall(np.zeros_like(image_emb), np.zeros_like(text_emb), caption_image)
  assert zeros["t2i_r1"] < 0.1
  if counts == "one":  # pairs: the special case, caption_image=None (row i of each is pair i)
    pairs = text_emb[np.argsort(caption_image)]
    assert retrieval.recall_at_k(image_emb, pairs) == brute_force_recall(image_emb, pairs, np.arange(num_images))


def test_recall_rejects_captions_without_an_image_and_images_without_a_caption():
  emb = np.eye(3)
  with pytest.raises(ValueError, match="image index in"):
    retrieval.recall_at_k(emb, emb, np.array([0, 1, 3]))
  with pytest.raises(ValueError, match="1 of the 3 images have no caption"):
    retrieval.recall_at_k(emb, emb, np.array([0, 1, 1]))


# --------------------------------------------------------------------------------- fake released layouts


def _captions(count, start):
  """Distinct captions in the shapes grammar (the shipped tokenizer's), so that their tokens differ."""
  grammar = itertools.product(("large", "small"), shapes.COLOUR_NAMES, shapes.SHAPE_NAMES)
  return [f"a {size} {colour} {shape}" for size, colour, shape in itertools.islice(grammar, start, start + count)]


def _write_image(path, seed, size=(16, 16)):
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


def write_coco_karpathy(root, test_captions=(5, 6, 5, 5, 7, 5, 5, 5, 4, 5)):
  """dataset_coco.json with train/restval/val entries (never read) and test images with these caption counts,
  images under val2014/ (PNG and JPEG, one not square)."""
  images, start = [], 0
  for split, counts in (("train", (5,)), ("restval", (5,)), ("val", (5, 5)), ("test", test_captions)):
    for i, count in enumerate(counts):
      name = f"COCO_val2014_{split}{i:06d}.{'png' if i % 2 else 'jpg'}"
      images.append(
        {
          "filepath": "val2014",
          "filename": name,
          "split": split,
          "cocoid": len(images),
          "sentences": [{"raw": c + " ", "tokens": c.split()} for c in _captions(count, start)],
        }
      )
      _write_image(root / "val2014" / name, len(images), (16, 16) if i != 2 else (24, 20))
      start += count
  (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
  return [im for im in images if im["split"] == "test"]


def write_flickr_tokens(root, num_images=6, test=(4, 1, 2)):
  """results_20130124.token (5 captions an image), flickr30k-images/, and a test list naming images `test`."""
  names = [f"{1000 + i}.jpg" for i in range(num_images)]
  lines = [f"{name}#{n}\t{caption}" for i, name in enumerate(names) for n, caption in enumerate(_captions(5, 5 * i))]
  root.mkdir(parents=True)
  (root / caption_sets.FLICKR_TOKENS).write_text("\n".join(lines) + "\n")
  for i, name in enumerate(names):
    _write_image(root / caption_sets.FLICKR_IMAGES / name, 100 + i)
  (root / "test.txt").write_text("".join(f"{names[i]}\n" for i in test))
  return [names[i] for i in test]


def test_readers_of_the_released_layouts(tmp_path):
  test = write_coco_karpathy(tmp_path / "coco")
  coco = caption_sets.open_caption_set(f"coco_karpathy:{tmp_path / 'coco'}")
  assert len(coco) == 10 and len(coco.captions) == 52  # all captions of each image, 4 to 7
  assert [p.name for p in coco.image_paths] == [im["filename"] for im in test]
  raw = [s["raw"] for im in test for s in im["sentences"]]
  assert coco.captions == tuple(c.strip() for c in raw) and raw[0].endswith(" ")  # stripped, in file order
  np.testing.assert_array_equal(np.bincount(coco.caption_image), [5, 6, 5, 5, 7, 5, 5, 5, 4, 5])
  assert len(caption_sets.open_caption_set(f"coco_karpathy:{tmp_path / 'coco'}:val")) == 2
  record = coco[3]
  assert record["index"] == 3 and record["image"] == coco.image_paths[3].read_bytes()

  # The COCO captions file of a 2017 folder: images in id order, annotations grouped by image.
  root = tmp_path / "coco2017"
  (root / "annotations").mkdir(parents=True)
  files = {7: "000000000007.jpg", 3: "000000000003.jpg", 5: "000000000005.jpg"}
  for image_id, name in files.items():
    _write_image(root / "val2017" / name, image_id)
  annotations = [
    {"id": 10 + n, "image_id": image_id, "caption": f"caption {n} of {image_id}"}
    for n, image_id in enumerate((7, 3, 7, 5, 3, 3))
  ]
  (root / "annotations" / "captions_val2017.json").write_text(
    json.dumps({"images": [{"id": i, "file_name": name} for i, name in files.items()], "annotations": annotations})
  )
  captions = caption_sets.open_caption_set(f"coco_captions:{root}")
  assert [p.name for p in captions.image_paths] == [files[3], files[5], files[7]]
  assert captions.captions == (
    "caption 1 of 3",
    "caption 4 of 3",
    "caption 5 of 3",
    "caption 3 of 5",
    "caption 0 of 7",
    "caption 2 of 7",
  )
  np.testing.assert_array_equal(captions.caption_image, [0, 0, 0, 1, 2, 2])

  # Flickr30k: the token file with a test list, or all of it; Karpathy's JSON (split 'test').
  flickr = tmp_path / "flickr"
  chosen = write_flickr_tokens(flickr)
  tokens = caption_sets.open_caption_set(f"flickr30k_tokens:{flickr}:test.txt")
  assert [p.name for p in tokens.image_paths] == chosen and len(tokens.captions) == 15
  assert tokens.captions[:5] == tuple(_captions(5, 20))  # image 1004's
  assert len(caption_sets.open_caption_set(f"flickr30k_tokens:{flickr}")) == 6
  (flickr / "dataset_flickr30k.json").write_text(
    json.dumps(
      {
        "images": [
          {"filename": f"{1000 + i}.jpg", "split": split, "sentences": [{"raw": c} for c in _captions(5, 5 * i)]}
          for i, split in enumerate(("train", "test", "val", "test", "train", "train"))
        ]
      }
    )
  )
  karpathy = caption_sets.open_caption_set(f"flickr30k:{flickr}")
  assert [p.name for p in karpathy.image_paths] == ["1001.jpg", "1003.jpg"] and len(karpathy.captions) == 10


def test_a_missing_or_malformed_benchmark_is_a_data_error_naming_it(tmp_path):
  write_coco_karpathy(tmp_path / "coco")
  flickr = tmp_path / "flickr"
  write_flickr_tokens(flickr)
  cases = [
    (f"coco_karpathy:{tmp_path / 'nowhere'}", f"no folder {tmp_path / 'nowhere'}"),
    (f"coco_karpathy:{flickr}", f"no file {flickr / 'dataset_coco.json'}"),
    (f"coco_karpathy:{tmp_path / 'coco'}:testing", "unknown split 'testing'"),
    (f"flickr30k:{flickr}", f"no file {flickr / 'dataset_flickr30k.json'}"),
    (f"flickr30k_tokens:{flickr}:karpathy_test.txt", f"no file {flickr / 'karpathy_test.txt'}"),
    (f"coco_captions:{tmp_path / 'coco'}", f"no file {tmp_path / 'coco' / 'annotations' / 'captions_val2017.json'}"),
    ("flickr8k:/data/flickr8k", "expected one of coco_karpathy:<root>"),
    ("coco_karpathy:", "expected one of"),
  ]
  for spec, message in cases:
    with pytest.raises(DataError, match=re.escape(message)) as info:
      caption_sets.open_caption_set(spec)
    assert repr(spec) in str(info.value)
  with pytest.raises(DataError) as info:
    caption_sets.open_caption_set(cases[0][0])
  section = re.search(r"see docs/data_preparation.md, '([^']+)'", str(info.value)).group(1)
  doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "data_preparation.md").read_text()
  assert f"\n## {section}\n" in doc, section  # the hint names a heading that exists
  missing = tmp_path / "coco" / "val2014" / "COCO_val2014_test000003.png"
  missing.unlink()
  with pytest.raises(DataError, match=f"1 of its 10 images are missing: {missing}"):
    caption_sets.open_caption_set(f"coco_karpathy:{tmp_path / 'coco'}")
  (flickr / caption_sets.FLICKR_TOKENS).write_text("1000.jpg#0\ta caption\n1000.jpg a caption without a tab\n")
  with pytest.raises(DataError, match=f"{flickr / caption_sets.FLICKR_TOKENS} line 2"):
    caption_sets.open_caption_set(f"flickr30k_tokens:{flickr}")
  (flickr / caption_sets.FLICKR_TOKENS).write_text("1000.jpg#0\ta caption\n")
  with pytest.raises(DataError, match=r"names 3 images that .* has no captions for: 1004.jpg, 1001.jpg, 1002.jpg"):
    caption_sets.open_caption_set(f"flickr30k_tokens:{flickr}:test.txt")


# ------------------------------------------------------------------------------------------ end to end


def test_benchmark_evaluators_end_to_end_with_a_tiny_clip(tmp_path):
  """Two benchmarks through ContrastiveTask.evaluators on 8 devices (batches of 8 images: several batches,
  padding): each gives exactly the reference's numbers on the embeddings it computed, and those are the
  towers' embeddings of each image (decoded and cropped) and caption, by index. A corrupt image is left out."""
  write_coco_karpathy(tmp_path / "coco")
  (tmp_path / "coco" / "val2014" / "COCO_val2014_test000005.png").write_bytes(b"not an image")
  write_flickr_tokens(tmp_path / "flickr")
  benchmarks = (
    ("coco", f"coco_karpathy:{tmp_path / 'coco'}"),
    ("flickr30k", f"flickr30k_tokens:{tmp_path / 'flickr'}:test.txt"),
  )
  config = tiny_clip_config(
    **{
      "eval.retrieval_benchmarks": benchmarks,
      "eval.retrieval": False,
      "eval.zeroshot_classes": "",
      "data.num_workers": 0,
    }
  )
  task = tasks.build(config)
  mesh = parallel.make_mesh(config.mesh)
  params = jax.device_put(nn.unbox(jax.jit(task.init_variables)(jax.random.key(0))["params"]), NamedSharding(mesh, P()))
  evaluators = task.evaluators(EvalContext(mesh, 8, 0, 1))
  assert sorted(evaluators) == ["coco_retrieval", "flickr30k_retrieval"]

  for name, spec in benchmarks:
    evaluator = evaluators[f"{name}_retrieval"]
    image_emb, text_emb, caption_image = evaluator.embeddings(params)
    metrics = evaluator(params)
    assert {k: metrics[k] for k in brute_force_recall(image_emb, text_emb, caption_image)} == brute_force_recall(
      image_emb, text_emb, caption_image
    )

    captioned = caption_sets.open_caption_set(spec)
    decodable = [i for i, path in enumerate(captioned.image_paths) if path.read_bytes() != b"not an image"]
    assert metrics["count"] == len(decodable) == (9 if name == "coco" else 3)
    keep = np.isin(captioned.caption_image, decodable)
    assert metrics["captions"] == keep.sum() == (47 if name == "coco" else 15)
    tokens = task.tokenizer.encode_batch(captioned.captions)
    assert len(np.unique(tokens, axis=0)) == len(tokens)
    # The first 8 of each, through the evaluator's own (compiled) functions on one batch of 8.
    np.testing.assert_allclose(text_emb[:8], evaluator.embed_texts(params, tokens[keep][:8]), atol=1e-5)
    pixels = np.stack(
      [
        transforms.EvalTransform(config.data.image_size, config.data.eval_preprocess).map(
          {"image": transforms.decode_image(captioned.image_paths[i].read_bytes())}
        )["image"]
        for i in decodable
      ]
    )
    pixels = np.concatenate([pixels, np.zeros_like(pixels)])[:8]
    np.testing.assert_allclose(image_emb[:8], evaluator.embed_images(params, pixels)[: len(decodable)], atol=1e-5)
    np.testing.assert_array_equal(caption_image, np.searchsorted(decodable, captioned.caption_image[keep]))


def test_benchmarks_config_field_and_aurora(tmp_path):
  write_flickr_tokens(tmp_path / "flickr")
  spec = f"flickr30k_tokens:{tmp_path / 'flickr'}"
  for bad in (
    ("flickr30k", spec),
    (("flickr30k", spec, 1),),
    (("flickr30k", spec), ("flickr30k", spec)),
    (("flickr 30k", spec),),
  ):
    task = tasks.build(tiny_clip_config(**{"eval.retrieval_benchmarks": bad}))
    with pytest.raises(ConfigError, match="config.eval.retrieval_benchmarks"):
      image_text.benchmark_evaluators(task, EvalContext(parallel.make_mesh(task.config.mesh), 8, 0, 1))
  # Aurora evaluates the benchmarks as the contrastive task does (tasks/image_text.py).
  config = tiny_aurora_config(**{"eval.retrieval_benchmarks": (("flickr30k", spec),)})
  task = tasks.build(config)
  evaluators = task.evaluators(EvalContext(parallel.make_mesh(config.mesh), 8, 0, 1))
  assert sorted(evaluators) == ["caption", "flickr30k_retrieval", "mim", "retrieval"]
  assert isinstance(evaluators["flickr30k_retrieval"], retrieval.CaptionRetrievalEvaluator)
