"""CLIP-style contrastive pretraining on image-text pairs (SwinV2-G-CLIP).

loss: both towers embed the batch (L2-normalised), logits = s * I @ T^T with s = exp(logit_scale), the
symmetric cross-entropy over the global batch's captioned examples, computed sharded (each device's rows against
the gathered columns) when training on a mesh. Optional Mixup of the pairs: images are mixed with their
predecessor in the global batch by lam ~ Beta(alpha, alpha) and the targets become soft (losses.py). The loss
is split (`splits_loss`, tasks/base.py), so with `grad_accum_steps` the negatives and the Mixup partners are
still the whole global batch's. After every update the temperature parameter is clamped to [0, log 100].

Evaluators: `zeroshot` (class names x prompt templates; `eval/zeroshot/top1`, `top5`) on a labelled split,
`retrieval` (R@1/5/10 both ways: `eval/retrieval/i2t_r1`, ...) on held-out pairs, and `<name>_retrieval` for
each (name, spec) of config.eval.retrieval_benchmarks: COCO / Flickr30k with every caption of each image
(data/caption_sets.py; `eval/coco_retrieval/i2t_r1`, ..., `count` images, `captions`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax import data


from visionfm_jax.tasks import losses
from visionfm_jax.data import caption_sets, tokenizer as tokenizer_lib, transforms
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate import retrieval, zeroshot
from visionfm_jax.models import clip
from visionfm_jax.tasks.base import EvalContext, Task


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


class ContrastiveTask(Task):
  couples_examples = True  # each example's negatives are the batch's other examples
  mim_masks = None  # data.mim (mask_patch_size, mask_ratio) when batches carry SimMIM masks ('mim_mask')

  @functools.cached_property
  def tokenizer(self) -> tokenizer_lib.Tokenizer | tokenizer_lib.HFTokenizer:
    """Loaded on first use (the data side), so that model-only tools (summary) need no tokenizer file; a
    tokenizer.json (an imported CLIP's) must end its texts with the text tower's eos_id."""
    path = self.config.data.tokenizer or tokenizer_lib.shapes_tokenizer_path()
    tok = tokenizer_lib.load(path, max_len=self.config.model.text.max_len)
    if tok.eos_id != self.config.model.text.eos_id:
      raise ConfigError(f"config.data.tokenizer={path!r} ends texts with id {tok.eos_id}, the text tower pools "
                        f"config.model.text.eos_id={self.config.model.text.eos_id}")
    if tok.vocab_size > self.config.model.text.vocab_size:
      raise ConfigError(f"config.data.tokenizer={path!r} has {tok.vocab_size} pieces, more than "
                        f"config.model.text.vocab_size={self.config.model.text.vocab_size}")
    return tok

  splits_loss = True  # the contrastive term runs over the whole global batch, micro-batches or not

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
    out = self.model.apply({"params": params}, self.mixed_images(batch, context), batch["text"], train=True,
                           rngs={"dropout": rng})
    return out["image_emb"], out["text_emb"]

  contrastive_weight = 1.0

  def global_loss(self, params, features, context):
    """The symmetric InfoNCE over the whole batch's captioned examples (sharded over the mesh in training)."""
    image_emb, text_emb = features
    scale = jnp.exp(params["logit_scale"].astype(jnp.float32))
    terms = dict(mix=context.get("mix"), valid=context["has_text"])
    if self.mesh is not None:
      contrastive = losses.sharded_clip_loss(image_emb, text_emb, scale, self.mesh, **terms)
    else:
      contrastive = losses.clip_loss(image_emb, text_emb, scale, **terms)
    return self.contrastive_weight * contrastive, {"train/contrastive_loss": contrastive, "train/logit_scale": scale}

  def loss(self, params, batch, rng):
    return self.split_loss(params, batch, rng)

  def post_update(self, params):
    return clip.clamp_logit_scale(params)

  def train_loader(self, *, batch_size: int, seed: int, process_index: int, process_count: int):
    return data.make_pair_train_loader(self.config.data, self.tokenizer, batch_size=batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count,
                                       mim=self.mim_masks)

  def embed_images(self, params, images):
    return self.model.apply({"params": params}, self.normalize(images), method="embed_images")

  def embed_texts(self, params, tokens):
    return self.model.apply({"params": params}, tokens, method="embed_texts")

  def evaluators(self, ctx: EvalContext):
    eval_cfg = self.config.eval
    out = {}
    if eval_cfg.zeroshot_classes:
      names, templates = zeroshot.class_names_and_templates(eval_cfg.zeroshot_classes)
      tokens = self.tokenizer.encode_batch(zeroshot.prompts(names, templates))
      zs = zeroshot.ZeroShotEvaluator(self.embed_images, self.embed_texts, tokens, len(names), ctx)
      data_cfg = zeroshot_data_config(self.config.data, eval_cfg)
      zeroshot.check_zeroshot_source(data_cfg)
      source = data.open_eval_source(data_cfg)

      def run_zeroshot(params):
        batches = data.make_eval_iterator(data_cfg, batch_size=ctx.local_batch_size,
                                          process_index=ctx.process_index, process_count=ctx.process_count,
                                          source=source)
        return zs(params, batches)
      out["zeroshot"] = run_zeroshot

    if eval_cfg.retrieval:
      out["retrieval"] = self.retrieval_evaluator(ctx)
    out.update(self.benchmark_evaluators(ctx))
    return out

  def benchmark_evaluators(self, ctx: EvalContext):
    """{'<name>_retrieval': evaluator} for each (name, spec) of config.eval.retrieval_benchmarks and
    {'zeroshot_<name>': evaluator} for each of config.eval.zeroshot_benchmarks (evaluate/zeroshot.py); the sets
    are opened (and their texts tokenised) now, so that a missing dataset stops the run at start-up."""
    benchmarks = self.config.eval.retrieval_benchmarks
    field = "config.eval.retrieval_benchmarks"
    if not all(isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(x, str) for x in b)
               for b in benchmarks):
      raise ConfigError(f"{field}={benchmarks!r}: expected ((name, spec), ...), e.g. "
                        f"(('coco', 'coco_karpathy:/data/coco'),)")
    names = [name for name, _ in benchmarks]
    if len(set(names)) < len(names) or not all(name.isidentifier() for name in names):
      raise ConfigError(f"{field}: names {names} must be distinct identifiers (metrics eval/<name>_retrieval/...)")
    shards = dict(batch_size=ctx.local_batch_size, process_index=ctx.process_index, process_count=ctx.process_count)
    embed_images, embed_texts = jax.jit(self.embed_images), jax.jit(self.embed_texts)  # shared by the benchmarks
    out = {}
    for name, spec in benchmarks:
      captioned = caption_sets.open_caption_set(spec)
      tokens = self.tokenizer.encode_batch(captioned.captions)
      out[f"{name}_retrieval"] = retrieval.CaptionRetrievalEvaluator(
          embed_images, embed_texts, captioned.caption_image,
          functools.partial(caption_sets.image_batches, captioned, self.config.data, **shards),
          functools.partial(caption_sets.caption_batches, tokens, **shards), ctx)
    out.update(zeroshot.benchmark_evaluators(self.config.eval, self.config.data, self.tokenizer.encode_batch,
                                             embed_images, embed_texts, ctx))
    return out

  @functools.cached_property
  def eval_pair_source(self):
    """The held-out pairs' source (data.eval_source or data.source, data.eval_split), opened once; the evaluators
    touch it when they are built, so that a missing dataset stops the run at start-up."""
    return data.open_eval_source(self.config.data)

  def eval_pairs(self, ctx: EvalContext):
    """This process's batches of held-out pairs (data.eval_split, the first data.eval_examples)."""
    return data.make_pair_eval_iterator(self.config.data, self.tokenizer, batch_size=ctx.local_batch_size,
                                        process_index=ctx.process_index, process_count=ctx.process_count,
                                        mim=self.mim_masks, source=self.eval_pair_source)

  def retrieval_evaluator(self, ctx: EvalContext):
    def embed_pairs(params, images, texts):
      return self.embed_images(params, images), self.embed_texts(params, texts)
    ret = retrieval.RetrievalEvaluator(embed_pairs, ctx)
    _ = self.eval_pair_source  # opens it now: a missing dataset stops the run before any step
    return lambda params: ret(params, self.eval_pairs(ctx))

  def synthetic_batch(self, batch_size, rng):
    """Captions that fill the context (BOS, random pieces, EOS), the text towers' most expensive case; SimMIM
    masks when the task trains on them."""
    text_cfg = self.config.model.text
    first_piece = max(*tokenizer_lib.SPECIAL_IDS, text_cfg.eos_id) + 1
    text = rng.integers(first_piece, text_cfg.vocab_size, (batch_size, text_cfg.max_len), dtype=np.int32)
    text[:, 0], text[:, -1] = tokenizer_lib.BOS_ID, text_cfg.eos_id
    batch = {**super().synthetic_batch(batch_size, rng), "text": text, "has_text": np.ones(batch_size, bool)}
    if self.mim_masks is not None:
      grid = self.config.data.image_size // self.mim_masks.mask_patch_size
      batch["mim_mask"] = np.stack([transforms.mim_mask(grid, self.mim_masks.mask_ratio, rng)
                                    for _ in range(batch_size)])
    return batch


