"""A published CLIP in: a transformers CLIPModel directory with its own BPE tokenizer.json (built here with
`tokenizers`, random weights, nothing downloaded) is imported by tools.import_hf, loaded from either directory
by trained/loader.py, and filters pairs by scores equal to transformers' cosine similarities, on small
images and on photo-like JPEGs many times the model's size."""

import copy
import io
import json
import os
import pickle

import jax
import numpy as np
from PIL import Image, ImageDraw
import pytest

from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.sources import records
from visionfm_jax.data.text import tokenizer as tokenizer_lib
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.datatools import filter_clip_score as fcs
from visionfm_jax.errors import UserError
from visionfm_jax.tools import import_hf
from visionfm_jax.trained import loader

from conftest import randomize_hf_params

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB, MAX_LEN, IMAGE_SIZE = 64, 32, 24
BOS, EOS = VOCAB - 2, VOCAB - 1  # as OpenAI's: end-of-text is the last id (legacy eos_token_id=2 pools it)
CONFIG = dict(
  projection_dim=16,
  vision=dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=8,
    hidden_act="quick_gelu",
  ),
  text=dict(
    vocab_size=VOCAB,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=MAX_LEN,
    hidden_act="quick_gelu",
    eos_token_id=2,
  ),
)


def _bpe_tokenizer():
  """A CLIP-style BPE (lower-case, words end in '</w>', a few merges) with <|startoftext|> / <|endoftext|>
  around each text, as CLIPTokenizerFast's tokenizer.json; ids fill the vocabulary, end-of-text last."""
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {c: i for i, c in enumerate(LETTERS)}
  vocab.update({c + "</w>": len(LETTERS) + i for i, c in enumerate(LETTERS)})
  merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab.update({f"<unused{i}>": i for i in range(len(vocab), BOS)})
  vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, end_of_word_suffix="</w>"))
  tok.normalizer = tokenizers.normalizers.Lowercase()
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.BPEDecoder(suffix="</w>")
  tok.post_processor = tokenizers.processors.TemplateProcessing(
    single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", BOS), ("<|endoftext|>", EOS)]
  )
  return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """(a transformers CLIPModel directory with tokenizer.json, the torch model)."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.CLIPConfig(
    text_config=CONFIG["text"], vision_config=CONFIG["vision"], projection_dim=CONFIG["projection_dim"]
  )
  model = transformers.CLIPModel(cfg).eval()
  randomize_hf_params(model, seed=3)
  path = tmp_path_factory.mktemp("hf_clip")
  model.save_pretrained(path)
  _bpe_tokenizer().save(str(path / "tokenizer.json"))
  return str(path), model


def test_hf_tokenizer_rows_truncation_and_pickling(tmp_path):
  path = str(tmp_path / "tokenizer.json")
  _bpe_tokenizer().save(path)
  tok = tokenizer_lib.load(path, max_len=7)
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (BOS, EOS, EOS, VOCAB)
  red = LETTERS.index
  rows = tok.encode_batch(["Red", "a red circle"])
  merged = {"red</w>": 53, "cir": 55}
  assert rows[0].tolist() == [BOS, merged["red</w>"], EOS, EOS, EOS, EOS, EOS]
  # 'a red circle' is BOS a red cir c l e EOS: cut to 7 ids, the EOS kept
  assert rows[1].tolist() == [BOS, 26 + red("a"), merged["red</w>"], merged["cir"], red("c"), red("l"), EOS]
  assert tok.decode(rows) == ["red", "a red circl"]
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode_batch(["a red circle"]), tok.encode_batch(["a red circle"]))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(Exception, match="not a Hugging Face tokenizer.json"):
    tokenizer_lib.load(str(tmp_path / "bad.json"), 8)


def test_import_hf_clip_writes_a_loadable_directory(hf_dir, tmp_path, capsys):
  src, _ = hf_dir
  out = tmp_path / "imported"
  assert import_hf.main(["import_hf", f"--src={src}", f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert "--config=configs/swinv2_g_clip.py:vit" in printed and "--config.model.image.pre_norm=True" in printed
  assert f"--config.init_from={out}" in printed and "--config.model.text.eos_id=63" in printed
  assert os.path.exists(out / "tokenizer.json")
  imported, raw = loader.load(str(out)), loader.load(src)
  assert imported.task.config.model.to_dict() == raw.task.config.model.to_dict()
  assert (imported.step, raw.step, raw.origin) == (None, None, src)
  jax.tree.map(np.testing.assert_array_equal, imported.params, raw.params)
  with pytest.raises(UserError, match="--step=3: .* is not a training workdir"):
    loader.load(src, step=3)
  os.remove(os.path.join(out, "tokenizer.json"))
  with pytest.raises(UserError, match="no tokenizer.json"):
    loader.load(str(out))


def _shapes_pairs(count=6) -> dict[str, tuple[bytes, str]]:
  """{key: (JPEG, caption)} of shapes images at the model's size, half with another image's caption."""
  source = shapes.ShapesSource("validation", count, IMAGE_SIZE, caption_style="short")
  return {
    str(i): (
      records.encode_jpeg(source[i]["image"]),
      source[i]["caption"] if i % 2 else source[(i + 3) % count]["caption"],
    )
    for i in range(count)
  }


def _photo_jpeg(rng, width: int, height: int) -> bytes:
  """A photo-like JPEG (quality 90): smooth colour fields at three scales, a few filled shapes, pixel noise."""
  field = np.zeros((height, width, 3), np.float32)
  for cells, weight in ((4, 0.6), (16, 0.25), (64, 0.15)):
    grid = rng.integers(0, 256, (max(2, cells * height // width), cells, 3), dtype=np.uint8)
    field += weight * np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), np.float32)
  canvas = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  for shape in range(6):
    x, y, r = int(rng.integers(width)), int(rng.integers(height)), int(rng.integers(20, height // 3))
    (draw.ellipse if shape % 2 else draw.rectangle)(
      (x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3))
    )
  pixels = np.asarray(canvas, np.float32) + rng.normal(0, 6, (height, width, 3))
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _photo_pairs(count=4) -> dict[str, tuple[bytes, str]]:
  """{key: (JPEG, caption)} of 800 x 600 photo-like JPEGs: Pillow's draft mode would decode them at 1/8 scale."""
  rng = np.random.default_rng(7)
  captions = ("a red circle", "blue square", "green triangle", "a circle")
  return {f"photo{i}": (_photo_jpeg(rng, 800, 600), captions[i % len(captions)]) for i in range(count)}


def _pairs_file(directory, pairs: dict[str, tuple[bytes, str]]) -> str:
  path = directory / records.shard_name("train", 0, 1)
  with records.RecordWriter(path) as writer:
    for key, (jpeg, caption) in pairs.items():
      writer.write(records.pack_record(jpeg, caption=caption, key=key))
  return str(path)


def _transformers_scores(model, task, pairs) -> dict[str, float]:
  """transformers' cosine of each pair: the JPEG opened by Pillow and prepared by CLIPImageProcessor (shorter
  side to the model's size, bicubic, central crop, the config's mean / std), the caption as the tokenizers
  library encodes it (padded with end-of-text)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  # transformers 5 names the Pillow-only processor apart; 4's CLIPImageProcessor is it
  processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
  processor = processor_class(
    size={"shortest_edge": IMAGE_SIZE},
    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    image_mean=list(task.config.data.mean),
    image_std=list(task.config.data.std),
  )
  tok = _bpe_tokenizer()
  scores = {}
  for key, (jpeg, caption) in pairs.items():
    pixels = processor(images=Image.open(io.BytesIO(jpeg)), return_tensors="pt")["pixel_values"]
    ids = tok.encode(caption).ids
    ids = ids + [EOS] * (MAX_LEN - len(ids))
    with torch.no_grad():
      out = model(input_ids=torch.as_tensor([ids]), pixel_values=pixels)
    scores[key] = float((out.image_embeds[0] @ out.text_embeds[0]).item())
  return scores


def _filter_scores(scorer, path: str, out) -> tuple[dict, dict[str, float]]:
  """(the stats, {key: score}) of filter_file at threshold -1 (every pair kept)."""
  stats = fcs.filter_file(scorer, path, str(out / "kept"), -1.0, str(out / "kept.json"))
  kept = records.ArrayRecordSource(str(out / "kept"))
  return stats, {kept[i]["key"]: kept[i]["score"] for i in range(len(kept))}


def _max_difference(ours: dict, want: dict) -> float:
  assert sorted(ours) == sorted(want)
  return max(abs(ours[k] - want[k]) for k in want)


def test_filter_scores_equal_transformers_cosines(hf_dir, tmp_path):
  src, model = hf_dir
  pairs = _shapes_pairs()
  path = _pairs_file(tmp_path, pairs)
  scorer = fcs.load_scorer(src, None, 8)
  stats, ours = _filter_scores(scorer, path, tmp_path / "out")
  assert (stats["kept"], stats["checkpoint"], stats["step"], stats["decode"]) == (len(pairs), src, None, "full")
  assert _max_difference(ours, _transformers_scores(model, scorer.task, pairs)) < 1e-4
  assert np.ptp(list(ours.values())) > 1e-3  # the pairs score differently: the comparison can fail


def test_filter_scores_equal_transformers_cosines_on_large_jpegs(hf_dir, tmp_path):
  """Large JPEGs are decoded at full size by default; Pillow's draft mode (--draft_decode) decodes them at a
  reduced DCT scale, which moves the scores by more than the tolerance."""
  src, model = hf_dir
  pairs = _photo_pairs()
  path = _pairs_file(tmp_path, pairs)
  scorer = fcs.load_scorer(src, None, 8)
  want = _transformers_scores(model, scorer.task, pairs)
  assert _max_difference(_filter_scores(scorer, path, tmp_path / "full")[1], want) < 1e-4
  drafted = copy.copy(scorer)  # the same model and jitted scorer, decoding in draft mode
  drafted.draft_decode = True
  stats, ours = _filter_scores(drafted, path, tmp_path / "draft")
  assert stats["decode"] == "draft" and _max_difference(ours, want) > 1e-3
  assert np.ptp(list(want.values())) > 1e-3


def test_other_directories_are_refused(tmp_path):
  with pytest.raises(UserError, match="neither a training workdir"):
    loader.load(str(tmp_path))
  (tmp_path / "config.json").write_text('{"model_type": "vit"}')
  with pytest.raises(UserError, match="a transformers 'vit' directory, not a CLIPModel"):
    loader.load(str(tmp_path))


def test_import_then_export_hf_round_trips_bitwise(hf_dir, tmp_path, capsys):
  from visionfm_jax.convert import hf_files  # pylint: disable=g-import-not-at-top
  from visionfm_jax.tools import export_hf  # pylint: disable=g-import-not-at-top

  src, _ = hf_dir
  imported, exported = tmp_path / "imported", tmp_path / "exported"
  assert import_hf.main(["import_hf", f"--src={src}", f"--out={imported}", "--scan=false"]) == 0
  assert export_hf.main(["export_hf", f"--checkpoint={imported}", f"--out={exported}"]) == 0
  assert "wrote" in capsys.readouterr().out and os.path.exists(exported / "tokenizer.json")
  original, written = hf_files.read_tensors(src), hf_files.read_tensors(str(exported))
  assert sorted(original) == sorted(written)
  for key, value in original.items():
    assert written[key].shape == value.shape and np.array_equal(written[key], value), key


ZEROSHOT_FLAGS = (
  "--config.eval.zeroshot_classes=shapes",
  "--config.eval.zeroshot_source=shapes",
  "--config.eval.zeroshot_split=validation",
  "--config.eval.zeroshot_examples=16",
  "--config.eval.retrieval=false",
  "--batch_size=8",
)


def _transformers_zeroshot(model, task) -> tuple[float, float]:
  """top-1 / top-5 of transformers' CLIPModel on the first 16 shapes validation images: class embeddings are
  the renormalised means of the prompts' (tokenised by the tokenizers library)."""
  import torch  # pylint: disable=g-import-not-at-top

  from visionfm_jax import data  # pylint: disable=g-import-not-at-top
  from visionfm_jax.evaluate import zeroshot  # pylint: disable=g-import-not-at-top
  from visionfm_jax.tasks import contrastive  # pylint: disable=g-import-not-at-top

  names, templates = zeroshot.class_names_and_templates("shapes")
  tok = _bpe_tokenizer()
  ids = [e.ids + [EOS] * (MAX_LEN - len(e.ids)) for e in tok.encode_batch(zeroshot.prompts(names, templates))]
  source = data.open_eval_source(contrastive.zeroshot_data_config(task.config.data, task.config.eval))
  mean, std = np.asarray(task.config.data.mean), np.asarray(task.config.data.std)
  pixels = np.stack(
    [
      (
        (transforms.EvalTransform(IMAGE_SIZE, "clip").map({"image": source[i]["image"]})["image"] / 255.0 - mean) / std
      ).transpose(2, 0, 1)
      for i in range(16)
    ]
  ).astype(np.float32)
  labels = np.array([source[i]["label"] for i in range(16)])
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels))
  text = out.text_embeds.numpy().astype(np.float64).reshape(len(names), len(templates), -1).mean(1)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  ranks = np.argsort(-(out.image_embeds.numpy().astype(np.float64) @ text.T), axis=1)
  return float(np.mean(ranks[:, 0] == labels)), float(np.mean((ranks[:, :5] == labels[:, None]).any(1)))


def test_evaluate_runs_the_zeroshot_evaluator_as_transformers_scores(hf_dir, tmp_path, capsys):
  from visionfm_jax.tools import evaluate  # pylint: disable=g-import-not-at-top

  src, model = hf_dir
  out = tmp_path / "results.json"
  assert evaluate.main(["evaluate", f"--checkpoint={src}", *ZEROSHOT_FLAGS, f"--out={out}"]) == 0
  printed = capsys.readouterr().out.strip().splitlines()
  results = json.loads(out.read_text())
  assert json.loads(printed[-1]) == results and "eval/zeroshot/count=16" in printed
  assert (results["eval/zeroshot/count"], results["step"]) == (16, None)
  task = loader.load(src).task
  task.config.eval.zeroshot_classes, task.config.eval.zeroshot_source = "shapes", "shapes"
  task.config.eval.zeroshot_split, task.config.eval.zeroshot_examples = "validation", 16
  assert (results["eval/zeroshot/top1"], results["eval/zeroshot/top5"]) == pytest.approx(
    _transformers_zeroshot(model, task)
  )
  assert evaluate.main(["evaluate", f"--checkpoint={src}", "--config.eval.no_such_field=1"]) == 2
  assert "no_such_field" in capsys.readouterr().err
