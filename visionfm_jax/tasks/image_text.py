"""What the image-text tasks (contrastive.py's CLIP, aurora.py) share, as functions of a task rather than a base
class: the tokenizer, the contrastive term of their split losses, the held-out pairs and the evaluators over them
(retrieval, the retrieval benchmarks), their panel, synthetic captions. A task passed here answers `config`,
`tokenizer`, `embed_images(params, uint8 images)` and `embed_texts(params, tokens)` (unit embeddings).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax import data
from visionfm_jax.data.sources.registry import eval_source_spec
from visionfm_jax.data.text import caption_sets
from visionfm_jax.data.text import tokenizer as tokenizer_lib
from visionfm_jax.data.transforms import naflex
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate import panels, retrieval, zeroshot
from visionfm_jax.losses import image_text as image_text_losses
from visionfm_jax.tasks.base import EvalContext


def load_tokenizer(config) -> tokenizer_lib.Tokenizer | tokenizer_lib.HFTokenizer:
  """config.data.tokenizer (the demo's when empty) for config.model.text: a tokenizer.json (an imported CLIP's)
  must end its texts with the text tower's eos_id and fit its vocabulary."""
  text_cfg = config.model.text
  path = config.data.tokenizer or tokenizer_lib.shapes_tokenizer_path()
  tok = tokenizer_lib.load(path, max_len=text_cfg.max_len)
  if tok.eos_id != text_cfg.eos_id:
    raise ConfigError(
      f"config.data.tokenizer={path!r} ends texts with id {tok.eos_id}, the text tower pools "
      f"config.model.text.eos_id={text_cfg.eos_id}"
    )
  if tok.vocab_size > text_cfg.vocab_size:
    raise ConfigError(
      f"config.data.tokenizer={path!r} has {tok.vocab_size} pieces, more than "
      f"config.model.text.vocab_size={text_cfg.vocab_size}"
    )
  return tok


# A tokenizer trained on captions of the data's language splits them into about 1.1 to 1.4 pieces a word (BPE or
# SentencePiece on English); one trained on other text (the demos' shapes tokenizer) spells the words it never saw
# letter by letter, 2.5 to 3 pieces a word on English captions. Above this bound, on a sample of the held-out
# captions, a run warns.
PIECES_PER_WORD_BOUND = 2.0
PIECES_SAMPLE = 256  # held-out captions the bound is measured on: the first ones, read at start-up


def pieces_per_word_warning(tokenizer, captions: Sequence[str], path: str, records: str = "") -> str:
  """The warning for a tokenizer (`path`: config.data.tokenizer, '' the demos') that splits `captions` into more
  than PIECES_PER_WORD_BOUND pieces per word (words: split at white space), else ''; `records`, the glob of the
  training shards, goes into the command it gives."""
  words = sum(len(caption.split()) for caption in captions)
  pieces = sum(len(tokenizer.pieces(caption)) for caption in captions)
  if not words or pieces <= PIECES_PER_WORD_BOUND * words:
    return ""
  name = f"{path!r}" if path else "'' (the shapes demos' tokenizer)"
  return (
    f"config.data.tokenizer={name} splits the data's captions into {pieces / words:.1f} pieces a word (on "
    f"{len(captions)} held-out captions; above {PIECES_PER_WORD_BOUND}): it was trained on other text. Train "
    f"one on these captions: python -m visionfm_jax.datatools.train_tokenizer "
    f"--records='{records or '<your pair shards>'}' --vocab_size=8000 --out=PATH, then "
    f"--config.data.tokenizer=PATH.model"
  )


def _sample_captions(source, count: int) -> list[str]:
  """The captions of the first `count` records of `source` (images not decoded)."""
  captions = []
  for i in range(min(count, len(source))):
    caption = source[i].get("caption")
    if isinstance(caption, str) and caption.strip():
      captions.append(caption)
  return captions


@functools.cache
def _warn_once(message: str) -> None:
  logging.warning("%s", message)


def check_tokenizer_fits_captions(task, source) -> None:
  """Warns (once a process) when task.tokenizer splits the first PIECES_SAMPLE captions of the held-out `source`
  into more than PIECES_PER_WORD_BOUND pieces a word; the embedded shapes are the demos' tokenizer's own."""
  data_cfg = task.config.data
  spec = eval_source_spec(data_cfg)
  if spec.startswith("shapes"):
    return
  records = spec.removeprefix("arrayrecord:").replace("{split}", data_cfg.get("train_split", "train"))
  message = pieces_per_word_warning(
    task.tokenizer,
    _sample_captions(source, PIECES_SAMPLE),
    data_cfg.tokenizer,
    records if spec.startswith("arrayrecord:") else "",
  )
  if message:
    _warn_once(message)


@jax.custom_vjp
def backward_after(first, then):
  """(first, then) themselves, whose backward hands `then` its cotangent only once `first`'s is complete: passed
  a tower's params as `first` and another tower's output as `then`, the other tower's backward waits for this
  tower's whole backward, so the two towers' saved activations are not all held at once. XLA otherwise may run
  the image tower's backward first while the text tower's activations wait beside the image tower's deepest stage
  (SwinV2-G-CLIP's plan: BENCHMARKS.md, "The recipes on their clusters")."""
  return first, then


backward_after.defvjp(
  lambda first, then: ((first, then), None), lambda _, cotangents: jax.lax.optimization_barrier(cotangents)
)


def contrastive_loss(params, features, context, mesh, siglip: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The symmetric InfoNCE (or with `siglip`, SigLIP's sigmoid loss with params['logit_bias']) of the whole batch's
  (image_emb, text_emb) `features` over its captioned examples (context['has_text']; a Mixup context['mix'] makes
  the targets soft), sharded over `mesh` in training; with the metrics train/contrastive_loss and
  train/logit_scale (and train/logit_bias)."""
  image_emb, text_emb = features
  scale = jnp.exp(params["logit_scale"].astype(jnp.float32))
  terms = dict(mix=context.get("mix"), valid=context["has_text"])
  if siglip:
    bias = params["logit_bias"].astype(jnp.float32)
    if mesh is not None:
      contrastive = image_text_losses.sharded_siglip_loss(image_emb, text_emb, scale, bias, mesh, **terms)
    else:
      contrastive = image_text_losses.siglip_loss(image_emb, text_emb, scale, bias, **terms)
    return contrastive, {"train/contrastive_loss": contrastive, "train/logit_scale": scale, "train/logit_bias": bias}
  if mesh is not None:
    contrastive = image_text_losses.sharded_clip_loss(image_emb, text_emb, scale, mesh, **terms)
  else:
    contrastive = image_text_losses.clip_loss(image_emb, text_emb, scale, **terms)
  return contrastive, {"train/contrastive_loss": contrastive, "train/logit_scale": scale}


def held_out_pairs(task, ctx: EvalContext, mim=None) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
  """() -> this process's batches of the held-out pairs (data.eval_source or data.source, data.eval_split, the
  first data.eval_examples; SimMIM masks with `mim`). The source is opened now, so that a missing dataset stops
  the run at start-up, and its first captions checked against the tokenizer (`check_tokenizer_fits_captions`),
  each once for the evaluators and the panel of `ctx`."""
  source = ctx.open_eval_source(task.config.data)
  ctx.once(("tokenizer fits", id(source)), lambda: check_tokenizer_fits_captions(task, source))
  return lambda: data.make_pair_eval_iterator(
    task.config.data,
    task.tokenizer,
    batch_size=ctx.local_batch_size,
    process_index=ctx.process_index,
    process_count=ctx.process_count,
    mim=mim,
    source=source,
  )


def retrieval_evaluator(task, pairs: Callable[[], Iterator], ctx: EvalContext) -> Callable[[Any], dict[str, float]]:
  """R@1/5/10 both ways over the held-out `pairs` (`held_out_pairs`)."""

  def embed_pairs(params, images, texts):
    return task.embed_images(params, images), task.embed_texts(params, texts)

  ret = retrieval.RetrievalEvaluator(embed_pairs, ctx)
  return lambda params: ret(params, pairs())


PANEL_IMAGES, PANEL_CAPTIONS, PANEL_TOP = 8, 4, 3


def pairs_panel(task, pairs: Callable[[], Iterator], ctx: EvalContext, classes=None) -> Callable[[Any], np.ndarray]:
  """The panel of an image-text model (evaluate/panels.py) on the first PANEL_IMAGES held-out `pairs`: a row of the
  images, each with its caption's start and, with `classes` ((names, templates): the zero-shot set), its
  PANEL_TOP nearest zero-shot classes by cosine; then PANEL_CAPTIONS rows of a caption and the images it retrieves
  among them (cosine; '= its own' marks the caption's image)."""
  embed = jax.jit(
    lambda params, batch: (task.embed_images(params, batch["image"]), task.embed_texts(params, batch["text"]))
  )

  def draw(params):
    rows = panels.first_rows(embed, params, next(iter(pairs())), ctx, PANEL_IMAGES)
    valid = np.flatnonzero(rows["mask"])
    images, captions = rows["image"][valid], task.tokenizer.decode(rows["text"][valid])
    if task.naflex:  # packed: each image at its grid, as the model saw it
      images = [naflex.unpacked_image(image, task.naflex[0]) for image in images]
    image_emb, text_emb = (np.asarray(e, np.float32)[valid] for e in rows["out"])
    lines = [(panels.clipped(caption),) for caption in captions]
    if classes is not None:
      names, templates = classes
      class_emb = np.asarray(task.class_embeddings(params, names, templates))
      lines = [line + panels.top_k(cosines, names, PANEL_TOP) for line, cosines in zip(lines, image_emb @ class_emb.T)]
    grid = [[panels.Cell(image, line) for image, line in zip(images, lines)]]
    for i in range(min(PANEL_CAPTIONS, len(valid))):
      cosines = image_emb @ text_emb[i]
      best = np.argsort(-cosines)[:PANEL_TOP]
      grid.append(
        [
          panels.Cell(
            images[j],
            ((panels.clipped(captions[i]),) if rank == 0 else ("",))
            + (f"#{rank + 1} {cosines[j]:.2f}{' = its own' if j == i else ''}",),
          )
          for rank, j in enumerate(best)
        ]
      )
    title = (
      "caption (start)"
      + ("; nearest zero-shot classes (cosine)" if classes is not None else "")
      + "; below: captions and the images they retrieve"
    )
    return panels.render(grid, title)

  return draw


def benchmark_evaluators(task, ctx: EvalContext, zeroshot_score=None) -> dict[str, Callable[[Any], dict[str, float]]]:
  """{'<name>_retrieval': evaluator} for each (name, spec) of config.eval.retrieval_benchmarks and
  {'zeroshot_<name>': evaluator} for each of config.eval.zeroshot_benchmarks (evaluate/zeroshot.py), these scored
  by `zeroshot_score` (`zeroshot.scorer`'s; one of their own when None); the sets are opened (and the retrieval
  captions tokenised) now, so that a missing dataset stops the run at start-up."""
  benchmarks = task.config.eval.retrieval_benchmarks
  field = "config.eval.retrieval_benchmarks"
  if not all(isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(x, str) for x in b) for b in benchmarks):
    raise ConfigError(
      f"{field}={benchmarks!r}: expected ((name, spec), ...), e.g. (('coco', 'coco_karpathy:/data/coco'),)"
    )
  names = [name for name, _ in benchmarks]
  if len(set(names)) < len(names) or not all(name.isidentifier() for name in names):
    raise ConfigError(f"{field}: names {names} must be distinct identifiers (metrics eval/<name>_retrieval/...)")
  shards = dict(batch_size=ctx.local_batch_size, process_index=ctx.process_index, process_count=ctx.process_count)
  embed_images, embed_texts = jax.jit(task.embed_images), jax.jit(task.embed_texts)  # shared by the benchmarks
  out = {}
  for name, spec in benchmarks:
    captioned = caption_sets.open_caption_set(spec)
    tokens = task.tokenizer.encode_batch(captioned.captions)
    out[f"{name}_retrieval"] = retrieval.CaptionRetrievalEvaluator(
      embed_images,
      embed_texts,
      captioned.caption_image,
      functools.partial(caption_sets.image_batches, captioned, task.config.data, **shards),
      functools.partial(caption_sets.caption_batches, tokens, **shards),
      ctx,
    )
  score = zeroshot_score or zeroshot.scorer(embed_images, ctx)
  out.update(zeroshot.benchmark_evaluators(task.config.eval, task.config.data, score, task.class_embeddings, ctx))
  return out


def synthetic_captions(text_cfg, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Captions that fill the context (BOS, random pieces, EOS), the text towers' most expensive case."""
  first_piece = max(*tokenizer_lib.SPECIAL_IDS, text_cfg.eos_id) + 1
  text = rng.integers(first_piece, text_cfg.vocab_size, (batch_size, text_cfg.max_len), dtype=np.int32)
  text[:, 0], text[:, -1] = tokenizer_lib.BOS_ID, text_cfg.eos_id
  return {"text": text, "has_text": np.ones(batch_size, bool)}
