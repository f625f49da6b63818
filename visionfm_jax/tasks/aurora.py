"""Aurora-Vision-XL pretraining: SimMIM + image-text contrastive + captioning on image-text pairs.

  loss = w_mim * L1 on masked pixels + w_con * symmetric InfoNCE + w_cap * token cross-entropy

(`config.loss.*_weight`; each term is logged: `train/mim_loss`, `train/contrastive_loss`, `train/caption_loss`).
Masks come with the batch (`mim_mask`, drawn by the data pipeline: 32 px patches, 60%), so a batch fully
determines the loss. The caption term averages over the non-pad tokens of the whole batch (labels
text[:, 1:] against logits[:, :-1]); MIM over the masked pixels of the whole batch. Uncaptioned images (a
data mixture's image-only entries: `has_text` False, all-pad text) add to MIM only: they have no caption
tokens, and the contrastive term runs over the captioned examples. The contrastive term couples examples, so
the loss is split (`SplitLossTask`, tasks/base.py): with `grad_accum_steps` = 8 the contrastive loss still runs
over all 2048 examples of the global batch, and 8 micro-batches of B give the gradient of one batch of 8B.
Which encoder pass sees the masked image: `config.model.mim_view` (models/aurora.py).

Evaluators on held-out pairs: `retrieval` (R@1/5/10 both ways), `caption` (`perplexity`: exp of the mean
token NLL over all held-out tokens; `loss`), `mim` (`loss`: held-out L1 on masked pixels, fixed masks); and the
retrieval benchmarks of config.eval.retrieval_benchmarks (COCO / Flickr30k, every caption), as ContrastiveTask's
(both through image_text.py). Aurora has no Mixup: a config.data.augment.mixup_alpha above 0 is an error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax import data
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate import panels, sums, zeroshot
from visionfm_jax.losses import image_text as image_text_losses
from visionfm_jax.losses import pixels
from visionfm_jax.models import clip, generate
from visionfm_jax.tasks import image_text
from visionfm_jax.tasks.base import EvalContext, SplitLossTask
from visionfm_jax.token_ids import PAD_ID

PANEL_ROWS = 4


class AuroraTask(SplitLossTask):
  def __init__(self, config, mesh=None):
    super().__init__(config, mesh)
    if config.data.augment.mixup_alpha > 0:
      raise ConfigError(
        f"config.data.augment.mixup_alpha={config.data.augment.mixup_alpha}: Aurora's losses have "
        "no Mixup (its MIM target is the unmixed image); set it to 0"
      )
    self.weights = config.loss

  @functools.cached_property
  def tokenizer(self):
    """Loaded on first use (the data side), so that model-only tools (summary) need no tokenizer file."""
    return image_text.load_tokenizer(self.config)

  @functools.cached_property
  def class_embeddings(self) -> zeroshot.ClassEmbeddings:
    """The zero-shot benchmarks' class embeddings: one text-tower pass per class set and evaluation."""
    return zeroshot.ClassEmbeddings(jax.jit(self.embed_texts), self.tokenizer.encode_batch)

  def init_variables(self, rng):
    size = self.config.model.image_size
    grid = size // self.config.data.mim.mask_patch_size
    return self.model.init(
      {"params": rng},
      jnp.zeros((1, size, size, 3), jnp.float32),
      jnp.zeros((1, self.config.model.text.max_len), jnp.int32),
      jnp.zeros((1, grid, grid), jnp.float32),
      train=False,
    )

  def pixel_mask(self, batch) -> jax.Array:
    """(B, H, W) 0/1 masked pixels from the (B, gh, gw) mask-patch grid."""
    mask = batch["mim_mask"].astype(jnp.float32)
    return pixels.upsample_mask(mask, batch["image"].shape[1] // mask.shape[1])

  # -------------------------------------------------------------------------------- the split loss
  def whole_batch(self, batch, rng):
    """The captioned mask ('has_text'; None: all captioned) and the whole batch's counts: non-pad caption tokens
    (uncaptioned images have none) and masked pixels."""
    context = {
      "has_text": batch.get("has_text"),
      "tokens": jnp.sum(batch["text"][:, 1:] != PAD_ID).astype(jnp.float32),
      "masked_pixels": jnp.sum(self.pixel_mask(batch)) + pixels.MIM_EPS,
    }
    return batch, context

  def local_loss(self, params, batch, rng, context):
    images = self.train_images(batch, jnp.float32)  # also the MIM target, kept in fp32
    out = self.model.apply(
      {"params": params}, images, batch["text"], batch["mim_mask"], train=True, rngs={"dropout": rng}
    )
    caption = image_text_losses.caption_loss(
      out["caption_logits"][:, :-1], batch["text"][:, 1:], PAD_ID, normalizer=context["tokens"]
    )
    mim = pixels.mim_l1_loss(out["reconstruction"], images, self.pixel_mask(batch), normalizer=context["masked_pixels"])
    loss = self.weights.caption_weight * caption + self.weights.mim_weight * mim
    return loss, (out["image_emb"], out["text_emb"]), {"train/caption_loss": caption, "train/mim_loss": mim}

  def batch_features(self, params, batch, rng, context):
    return self.model.apply(
      {"params": params},
      self.train_images(batch, jnp.float32),
      batch["text"],
      batch["mim_mask"],
      train=True,
      rngs={"dropout": rng},
      method="contrastive_features",
    )

  def global_loss(self, params, features, context):
    """The weighted symmetric InfoNCE over the whole batch's captioned examples."""
    contrastive, aux = image_text.contrastive_loss(params, features, context, self.mesh)
    return self.weights.contrastive_weight * contrastive, aux

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
      mim=self.config.data.mim,
    )

  # ----------------------------------------------------------------------------------- evaluation
  def embed_images(self, params, images):
    return self.model.apply({"params": params}, self.normalize(images), method="embed_images")

  def embed_texts(self, params, tokens):
    return self.model.apply({"params": params}, tokens, method="embed_texts")

  def caption_stats(self, params, batch):
    """Sums over one eval batch (padding rows have no tokens): caption NLL and token count."""
    logits = self.model.apply({"params": params}, self.normalize(batch["image"]), batch["text"], method="describe")
    nll, count = image_text_losses.caption_loss_terms(logits[:, :-1], batch["text"][:, 1:], PAD_ID)
    return {"nll": nll, "tokens": count}

  def mim_stats(self, params, batch):
    """Sums over one eval batch (padding rows have no masked pixels): L1 on masked pixels and their count."""
    images = self.normalize(batch["image"])
    recon = self.model.apply({"params": params}, images, batch["mim_mask"], method="reconstruct_masked")
    pixels = self.pixel_mask(batch)
    return {"l1": jnp.sum(jnp.abs(images - recon) * pixels[..., None]) / 3.0, "pixels": jnp.sum(pixels)}

  def evaluators(self, ctx: EvalContext):
    pairs = image_text.held_out_pairs(self, ctx, mim=self.config.data.mim)
    out = {}
    if self.config.eval.retrieval:
      out["retrieval"] = image_text.retrieval_evaluator(self, pairs, ctx)
    caption = sums.SumsEvaluator(
      self.caption_stats,
      lambda t: {"perplexity": sums.perplexity(t["nll"], t["tokens"]), "loss": t["nll"] / max(t["tokens"], 1.0)},
      ctx,
    )
    mim = sums.SumsEvaluator(self.mim_stats, lambda t: {"loss": t["l1"] / (t["pixels"] + pixels.MIM_EPS)}, ctx)
    out["caption"] = lambda params: caption(params, pairs())
    out["mim"] = lambda params: mim(params, pairs())
    out.update(image_text.benchmark_evaluators(self, ctx))
    return out

  def panel(self, ctx: EvalContext):
    """PANEL_ROWS held-out images, each as the MIM input (masked patches grey), the reconstruction (the model's
    pixels in the masked patches, the image's elsewhere) and the original, with its greedy caption beside the
    true one."""
    pairs = image_text.held_out_pairs(self, ctx, mim=self.config.data.mim)

    def outputs(params, batch):
      images = self.normalize(batch["image"])
      recon = self.model.apply({"params": params}, images, batch["mim_mask"], method="reconstruct_masked")
      return recon, generate.caption_memory(self.model, params, images)

    outputs = jax.jit(outputs)

    def draw(params):
      rows = panels.first_rows(outputs, params, next(iter(pairs())), ctx, PANEL_ROWS)
      valid = np.flatnonzero(rows["mask"])
      recon, memory = (np.asarray(x)[valid] for x in rows["out"])
      tokens = generate.greedy(
        self.model, params, memory, max_len=self.model.text.max_len, pieces=self.tokenizer.vocab_size
      )
      said = generate.tokens_to_text(self.tokenizer, jax.device_get(tokens))
      true = self.tokenizer.decode(rows["text"][valid])
      images, grid = rows["image"][valid], rows["mim_mask"][valid]
      masked = np.kron(grid, np.ones((images.shape[1] // grid.shape[1],) * 2))[..., None] > 0
      cells = [
        [
          panels.Cell(np.where(m, np.uint8(128), image), ("masked input",)),
          panels.Cell(np.where(m, self.denormalize(r), image), ("reconstruction",)),
          panels.Cell(image, (panels.clipped(f"generated: {s}", 48), panels.clipped(f"true: {t}", 48))),
        ]
        for image, m, r, s, t in zip(images, masked, recon, said, true)
      ]
      return panels.render(cells, "MIM input, reconstruction, original; the greedy caption and the true one")

    return draw

  def synthetic_batch(self, batch_size, rng):
    """Full-length captions (image_text.synthetic_captions) and SimMIM masks."""
    captions = image_text.synthetic_captions(self.config.model.text, batch_size, rng)
    batch = {**super().synthetic_batch(batch_size, rng), **captions}
    mim = self.config.data.mim
    grid = self.config.data.image_size // mim.mask_patch_size
    batch["mim_mask"] = np.stack([transforms.mim_mask(grid, mim.mask_ratio, rng) for _ in range(batch_size)])
    return batch
