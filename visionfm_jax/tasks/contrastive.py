"""CLIP-style contrastive pretraining on image-text pairs (SwinV2-G-CLIP).

loss: both towers embed the batch (L2-normalised), logits = s * I @ T^T with s = exp(logit_scale), the
symmetric cross-entropy over the global batch's captioned examples, computed sharded (each device's rows against
the gathered columns) when training on a mesh. Optional Mixup of the pairs: images are mixed with their
predecessor in the global batch by lam ~ Beta(alpha, alpha) and the targets become soft (losses/image_text.py).
The loss is split (`SplitLossTask`, tasks/base.py), so with `grad_accum_steps` the negatives and the Mixup partners are
still the whole global batch's. After every update the temperature parameter is clamped to [0, log 100].

With config.model.contrastive_loss='siglip' the loss is SigLIP's instead (Zhai et al. 2023): a sigmoid per
(image, text) pair of the global batch with a learnable bias, computed on a mesh as a ring that passes the texts
from device to device (B_local x B_local logits a hop); split and clamped as CLIP's.

Evaluators: `zeroshot` (class names x prompt templates: a shipped set, the user's file or the data's own names,
evaluate/zeroshot.py; `eval/zeroshot/top1`, `top5`) on a labelled split, checked for labels when built (with
NaFlex inputs also `zeroshot_<n>tok` at each further token budget n of config.eval.zeroshot_naflex_tokens),
`retrieval` (R@1/5/10 both ways: `eval/retrieval/i2t_r1`, ...) on held-out pairs, and `<name>_retrieval` for
each (name, spec) of config.eval.retrieval_benchmarks: COCO / Flickr30k with every caption of each image
(data/text/caption_sets.py; `eval/coco_retrieval/i2t_r1`, ..., `count` images, `captions`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from visionfm_jax import data
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.evaluate import zeroshot
from visionfm_jax.models import clip
from visionfm_jax.tasks import image_text
from visionfm_jax.tasks.base import EvalContext, SplitLossTask

MIXUP_PARTNER = "mixup_partner"  # the batch field (added by whole_batch) of each example's Mixup partner


def zeroshot_data_config(data_cfg, eval_cfg):
  """A copy of config.data whose eval source is the zero-shot one: config.eval.zeroshot_source ('' = the eval
  source), split config.eval.zeroshot_split ('' = config.data.eval_split), config.eval.zeroshot_examples
  records (-1: the whole split)."""
  data_cfg = data_cfg.copy_and_resolve_references()
  with data_cfg.unlocked():
    if eval_cfg.zeroshot_source:
      data_cfg.eval_source = eval_cfg.zeroshot_source
    if eval_cfg.zeroshot_split:
      data_cfg.eval_split = eval_cfg.zeroshot_split
    data_cfg.eval_examples = eval_cfg.zeroshot_examples
  return data_cfg


def naflex_budget(data_cfg, tokens: int):
  """A copy of config.data whose NaFlex images take `tokens` patches."""
  data_cfg = data_cfg.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.naflex.max_tokens = tokens
  return data_cfg


def _zeroshot_run(evaluator, data_cfg, source, ctx):
  """params -> `evaluator`'s metrics over this process's share of `source`'s batches as `data_cfg` makes them."""

  def run(params):
    batches = data.make_eval_iterator(
      data_cfg,
      batch_size=ctx.local_batch_size,
      process_index=ctx.process_index,
      process_count=ctx.process_count,
      source=source,
    )
    return evaluator(params, batches)

  return run


class ContrastiveTask(SplitLossTask):
  """The contrastive term runs over the whole global batch, micro-batches or not (each example's negatives are
  the batch's other examples)."""

  @functools.cached_property
  def tokenizer(self):
    """Loaded on first use (the data side), so that model-only tools (summary) need no tokenizer file."""
    return image_text.load_tokenizer(self.config)

  @functools.cached_property
  def zeroshot_classes(self) -> tuple[list[str], list[str]] | None:
    """(class names, prompt templates) of config.eval.zeroshot_classes, shared by the evaluator and the panel."""
    return zeroshot.zeroshot_classes(self.config.eval, zeroshot_data_config(self.config.data, self.config.eval))

  @functools.cached_property
  def class_embeddings(self) -> zeroshot.ClassEmbeddings:
    """Shared by the zero-shot evaluators and the panel: one text-tower pass per class set and evaluation."""
    return zeroshot.ClassEmbeddings(jax.jit(self.embed_texts), self.tokenizer.encode_batch)

  def whole_batch(self, batch, rng):
    """The captioned mask ('has_text'; None: all captioned) and, with Mixup, its lambda ~ Beta(alpha, alpha)
    and each example's partner, its predecessor in the global batch (rolled before the batch is split, so that
    micro-batches mix exactly as the whole batch does)."""
    context = {"has_text": batch.get("has_text")}
    alpha = self.config.data.augment.mixup_alpha
    if alpha > 0:
      context["mix"] = jax.random.beta(jax.random.fold_in(rng, 1), alpha, alpha)
      partner = {k: v for k, v in batch.items() if k == "image" or k in transforms.DEVICE_KEYS}
      batch = {**batch, MIXUP_PARTNER: jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), partner)}
    return batch, context

  def mixed_images(self, batch, context):
    """The training images, mixed with their partners' by the context's lambda when Mixup is on."""
    images = self.train_images(batch)
    if "mix" not in context:
      return images
    lam = context["mix"].astype(images.dtype)
    return lam * images + (1 - lam) * self.train_images(batch[MIXUP_PARTNER])

  def local_loss(self, params, batch, rng, context):
    """CLIP has no per-example term: the features of the (micro-)batch, for the global term."""
    return jnp.float32(0.0), self.batch_features(params, batch, rng, context), {}

  def batch_features(self, params, batch, rng, context):
    """The towers' embeddings; in the backward the text tower's comes first (`image_text.backward_after`)."""

    def embed(p, method, inputs):
      return self.model.apply({"params": p}, inputs, train=True, rngs={"dropout": rng}, method=method)

    image_emb = embed(params, "embed_images", self.mixed_images(batch, context))
    text_params, image_emb = image_text.backward_after(params["text"], image_emb)
    return image_emb, embed({**params, "text": text_params}, "embed_texts", batch["text"])

  def global_loss(self, params, features, context):
    """The symmetric InfoNCE (or SigLIP's sigmoid loss) over the whole batch's captioned examples (sharded over
    the mesh in training)."""
    return image_text.contrastive_loss(params, features, context, self.mesh, siglip=clip.uses_siglip(self.config.model))

  def post_update(self, params):
    return clip.clamp_logit_scale(params)

  def train_loader(self, *, batch_size: int, seed: int, process_index: int, process_count: int):
    return data.make_pair_train_loader(
      self.config.data,
      self.tokenizer,
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
    )

  def embed_images(self, params, images):
    return self.model.apply({"params": params}, self.normalize(images), method="embed_images")

  def embed_texts(self, params, tokens):
    return self.model.apply({"params": params}, tokens, method="embed_texts")

  def evaluators(self, ctx: EvalContext):
    eval_cfg = self.config.eval
    out, score = {}, zeroshot.scorer(self.embed_images, ctx)  # one program for the zero-shot sets of a class count
    if eval_cfg.zeroshot_classes:
      data_cfg = zeroshot_data_config(self.config.data, eval_cfg)
      source = zeroshot.open_zeroshot_source(eval_cfg, data_cfg, ctx.open_eval_source)  # labelled, or it stops
      names, templates = self.zeroshot_classes
      zs = zeroshot.ZeroShotEvaluator(score, self.class_embeddings, names, templates)
      out["zeroshot"] = _zeroshot_run(zs, data_cfg, source, ctx)
      for tokens in eval_cfg.get("zeroshot_naflex_tokens", ()) if self.naflex else ():
        # the same images at native aspect within another token budget: one program of their own
        out[f"zeroshot_{tokens}tok"] = _zeroshot_run(
          zeroshot.ZeroShotEvaluator(zeroshot.scorer(self.embed_images, ctx), self.class_embeddings, names, templates),
          naflex_budget(data_cfg, tokens),
          source,
          ctx,
        )

    if eval_cfg.retrieval:
      out["retrieval"] = image_text.retrieval_evaluator(self, image_text.held_out_pairs(self, ctx), ctx)
    out.update(image_text.benchmark_evaluators(self, ctx, score))
    return out

  def panel(self, ctx: EvalContext):
    """The first held-out pairs: each image with its 3 nearest zero-shot classes (config.eval.zeroshot_classes), and
    4 captions with the 3 images that they retrieve among them."""
    return image_text.pairs_panel(self, image_text.held_out_pairs(self, ctx), ctx, self.zeroshot_classes)

  def synthetic_batch(self, batch_size, rng):
    captions = image_text.synthetic_captions(self.config.model.text, batch_size, rng)
    return {**super().synthetic_batch(batch_size, rng), **captions}
