r"""SwinV2-G-CLIP: a 3B SwinV2-G image tower trained with CLIP on filtered LAION.

The default is the paper's recipe at 224 px. `source` says, for every setting, whether the paper states it or we
chose it (`ours:` and the reason):

  | setting          | value                                                   | source                               |
  | ---------------- | ------------------------------------------------------- | ------------------------------------ |
  | image tower      | SwinV2: res-post-norm, cosine attention, ~3B parameters | paper                                |
  | tower size       | SwinV2-G: C 512, depths 2,2,42,4, heads 16..128         | ours: the SwinV2 paper's 3B model    |
  | resolution       | 224 px                                                  | paper                                |
  | window           | 14 (maps 56, 28, 14, 7)                                 | ours: tiles every 224 px stage       |
  | stochastic depth | 0.2                                                     | paper                                |
  | text tower       | 24 layers, width 1024, 16 heads, 77 tokens, EOS pooling | ours: the paper names none; the size |
  |                  |                                                         | of OpenCLIP ViT-H/14's text tower    |
  | tokenizer        | SentencePiece, 32k pieces trained on the captions       | ours: the paper names none           |
  |                  | (datatools.train_tokenizer)                             |                                      |
  | embedding        | 1024-d; learned temperature from 1/0.07, clamped at 100 | ours: CLIP's                         |
  | contrastive loss | CLIP's softmax over the global batch (`siglip`: below)  | paper: CLIP's                        |
  | data             | LAION-5B filtered by CLIP score to 1.2B pairs           | paper                                |
  | filter           | the 1.2B LAION-2B-en pairs of highest OpenAI CLIP       | ours: the score LAION filtered with; |
  |                  | ViT-B/32 cosine (index_tars --keep=1.2e9)               | threshold from the scores            |
  | normalisation    | CLIP's mean and std                                     | ours: CLIP's                         |
  | crop             | random resized crop, scale (0.5, 1), no flips           | ours: keep what captions describe;   |
  |                  |                                                         | captions say "left" and "right"      |
  | RandAugment      | on                                                      | paper                                |
  | RandAugment N, M | 2 operations, magnitude 9                               | ours: timm's rand-m9 (2 ops)         |
  | Mixup            | on                                                      | paper                                |
  | Mixup alpha      | 0.8, mixed pairs as soft contrastive targets            | ours: DeiT's ImageNet alpha          |
  | optimiser        | AdamW b1 0.9, b2 0.98, weight decay 0.05                | paper                                |
  | learning rate    | peak 5e-4 after 10,000 warmup steps, cosine             | paper                                |
  | warmup shape     | linear                                                  | ours: the paper names none           |
  | cosine end       | 0                                                       | ours: the paper names none           |
  | gradient clip    | global norm 1.0                                         | paper                                |
  | precision        | FP16 compute, dynamic loss scaling                      | paper                                |
  | loss scale       | from 2^16, doubled after 2,000 good steps               | ours: PyTorch GradScaler's defaults  |
  | master weights   | fp32 params and optimizer state                         | ours: standard mixed precision       |
  | batch            | 32,768 pairs; the contrastive loss spans all of them    | ours: CLIP's; the paper states none  |
  | micro-batches    | 2 of 16,384, remat dots_with_no_batch_dims_saveable     | ours: fits A100 80GB (BENCHMARKS.md) |
  | parallelism      | ZeRO-3 over all devices                                 | paper                                |
  | cluster          | 128 A100 80GB                                           | paper                                |
  | schedule         | 366,000 steps = 10 passes over the 1.2B pairs           | ours: the paper gives no step count; |
  |                  |                                                         | sized for its 4 weeks at an assumed  |
  |                  |                                                         | 40% MFU (below)                      |
  | final stage      | 640 px                                                  | paper; its settings: `ft640` below   |
  | evaluation       | ImageNet-1K zero-shot top-1 (the paper: 78.4%)          | paper                                |
  | prompts          | OpenAI's 1000 class names and 80 templates              | ours: OpenAI's protocol              |
  | retrieval        | COCO 5k and Flickr30k 1k test, R@1/5/10                 | ours: the papers' usual protocol     |
  | health           | loss / gradient-norm spike skipping (6 std over 128     | ours: guards a 3B fp16 run beyond    |
  |                  | steps), rollback past bad data (training/health.py)     | the paper's clipping and scaling     |

Memory and wall clock: the paper trained for 4 weeks on its 128 A100s, the 640 px stage included. For this
config's 224 px stage BENCHMARKS.md ("The recipes on their clusters") predicts 36.4 days, a roofline prediction,
and gives the plan per GPU, the step and the runbook's layout (ZeRO-3 within each node, the nodes data-parallel:
`--config.mesh.fsdp=8 --config.mesh.data=-1`; docs/runbooks/swinv2_g_clip.md). The step
count was sized for the paper's 4 weeks at an assumed 40% MFU (~1.2e10 samples of SwinV2-G and this text tower).

  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py --workdir=/ckpt/swinv2_g_clip

Evaluation: ImageNet zero-shot top-1 (`eval/zeroshot/top1`, all 50,000 validation images, 80 templates), and
retrieval R@1/5/10 as papers report it, on COCO's Karpathy 5k test split and Flickr30k's 1k test split with every
caption of each image (`eval/coco_retrieval/*`, `eval/flickr30k_retrieval/*`; the files as
docs/data_preparation.md places them under /data/coco and /data/flickr30k;
`--config.eval.retrieval_benchmarks="()"` leaves them out).

Variant `vit`: a ViT image tower in place of SwinV2-G (B/16; tools.import_hf prints the fields of an imported
OpenAI or LAION CLIP over it, with `--config.init_from=` the imported directory).

Variant `siglip`: SigLIP's sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training") in place
of CLIP's softmax, the rest of the recipe unchanged; composes with the others (`demo,siglip`, `vit,siglip`).

  | setting          | value                                                   | source                               |
  | ---------------- | ------------------------------------------------------- | ------------------------------------ |
  | loss             | -(1/B) sum_ij log sigmoid(z_ij (t x_i . y_j + b)) over  | ours: the SigLIP paper's             |
  |                  | every pair of the global batch, z_ij = +1 / -1          |                                      |
  | scale and bias   | learned, t = exp(t'), t' from log 10, b from -10        | ours: the SigLIP paper's init        |
  | scale clamp      | t <= 100 after every update, as CLIP's                  | ours: open_clip clamps its SigLIP    |
  | many devices     | a ring: texts pass device to device, B_local x B_local  | ours: the SigLIP paper's chunked     |
  |                  | logits a hop; exact under micro-batches                 | form                                 |
  | Mixup            | kept (0.8): a mixed image's pairs get labels lam and    | ours: the SwinV2-G paper's; SigLIP's |
  |                  | 1 - lam, binary cross-entropy                           | has none (big_vision refuses it)     |

Variants `flip` and `flip_tune` (with `vit`): FLIP's masked image tower (Li et al. 2023, "Scaling Language-Image
Pre-training via Masking"): `vit,flip` drops half of each image's patch tokens while training
(`model.image.token_drop=0.5`; evaluation sees whole images), `vit,flip_tune` is its unmasked tuning stage, a short
run from the masked run's params (`--config.init_from=`). The demo pair and its unmasked baseline at the same steps:

  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo,vit,flip --workdir=/tmp/flip_demo
  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo,vit,flip_tune --workdir=/tmp/flip_tune \
      --config.init_from=/tmp/flip_demo
  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo,vit --workdir=/tmp/vit_clip_demo

Expected: masked, zero-shot top-1 0.204 / 0.214 / 0.328 at steps 400 / 800 / 1200 (unmasked 0.185 / 0.354 /
0.411), t2i R@10 0.503 (0.687); after 200 unmasked tuning steps 0.406 and 0.586: the unmasked run's zero-shot,
its retrieval not reached (the time each takes: BENCHMARKS.md, "Time outside the step and trackers (CPU demo)").

Variants `swin_mask` and `swin_mask_tune` (SwinV2 tower): the masked form that keeps the windows whole. `swin_mask`
trains on every 2nd patch along each axis of each image, from a random phase of its own (`model.image.token_subgrid=2`,
3/4 of the tokens dropped; models/swinv2.py): the tower sees a smaller whole map, with the full map's windows holding
a quarter of their tokens and the position bias at the kept tokens' true offsets, and evaluation sees whole images.
`swin_mask_tune` is its unmasked tuning stage, as `flip_tune`. Measured on the demo it falls far short of the
unmasked run at the same steps, tuning included (docs/tried_and_dropped.md), so no recipe uses it:

  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo,swin_mask --workdir=/tmp/swin_mask
  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo,swin_mask_tune --workdir=/tmp/swin_mask_tune \
      --config.init_from=/tmp/swin_mask

Variant `naflex` (implies `vit` and `siglip`; composes with `demo`): SigLIP 2's NaFlex tower (Tschannen et al.
2025, "SigLIP 2"): every image at its own aspect ratio, a patch grid within a token budget, the position
embeddings resized per image (docs/models.md, "NaFlex"); zero-shot at native aspect at the training budget and at
further ones.

  | setting          | value                                                   | source                               |
  | ---------------- | ------------------------------------------------------- | ------------------------------------ |
  | image tower      | ViT-B/16, no class token, MAP head, tanh GELU           | ours: SigLIP 2's B/16 tower          |
  | position grid    | 16 x 16 learned, resized bilinearly (antialiased) to    | ours: SigLIP 2's NaFlex              |
  |                  | each image's grid                                       |                                      |
  | token budget     | 256 patches an image in training; zero-shot also at 64  | ours: SigLIP 2 reports 64, 256, 576  |
  |                  | and 576                                                 |                                      |
  | resize           | the largest grid of the image's aspect within the       | ours: SigLIP 2's rule                |
  |                  | budget, bilinear; no crop, no RandAugment, no Mixup     |                                      |
  | loss             | SigLIP's sigmoid loss (the `siglip` variant)            | ours: SigLIP 2's                     |

  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo,naflex --workdir=/tmp/naflex_demo

The demo: the `vit` demo's mu/4 tower at 32 px (an 8 x 8 position grid), 64 patches of 4 px an image, on the
shapes widened or heightened to aspects from 1:2 to 2:1 (`shapes:mixed_aspect`), zero-shot at 64 and at 16 patches
an image (`eval/zeroshot_16tok/top1`). Expected (time: BENCHMARKS.md, "Time outside the step and trackers (CPU
demo)"): zero-shot top-1 0.125 / 0.212 / 0.212 at steps 400 / 800 / 1200, 0.188 at 16 patches; i2t R@10 0.198. A ViT
tower learns slowly with SigLIP's loss on this demo whatever its input: `demo,vit,siglip` on square shapes reaches
0.152 at step 1200; at lr 1e-3 the mixed-aspect shapes cropped to central squares (`demo,vit,siglip
--config.data.source=shapes:mixed_aspect`) reach 0.240 and NaFlex 0.191. With CLIP's loss
(`--config.model.contrastive_loss=clip --config.model.logit_scale_init=2.659`) NaFlex reaches 0.334 and the cropped
squares' ViT (`demo,vit` on shapes:mixed_aspect, a class token) 0.430: on shapes that a central square mostly holds
whole, native aspect does not pay in 1200 steps; the demo shows the mechanism, not its gain.

Variant `ft640`: the paper's final stage at 640 px, window 40, from a 224 px run (`--config.init_from=` its
workdir). It takes that run's params only: init_from loads no train state, so the AdamW moments start at zero and
the fp16 loss scale at 2^16. The stage is a new run with another resolution, batch and learning-rate schedule:
the 224 px run's moments track that run's gradients (224 px, 32,768 pairs) at the end of its decay to 0, and the
loss scale must find its level for 640 px activations afresh; the 1,000 warmup steps let the new moments settle
before the peak rate. Every weight carries over; the position bias is recomputed through pretrained_window_sizes
(14, 14, 14, 7), the 224 px run's windows, which the variant states and init_from checks against that workdir's
config.json (a run from a 224 px run of other windows is refused, naming the value to set).

  | setting          | value                                                   | source                               |
  | ---------------- | ------------------------------------------------------- | ------------------------------------ |
  | resolution       | 640 px                                                  | paper                                |
  | window           | 40 (maps 160, 80, 40, 20)                               | ours: the SwinV2 paper's at 640 px   |
  | position bias    | offsets normalised by the 224 px run's windows (14, 14, | ours: the SwinV2 paper's transfer    |
  |                  | 14, 7): pretrained_window_sizes                         |                                      |
  | batch            | 8,192 pairs                                             | ours: the paper states none          |
  | learning rate    | peak 5e-5, 1,000 warmup steps, cosine to 0              | ours: the paper states none          |
  | schedule         | 20,000 steps (164M pairs, 14% of one pass)              | ours: the paper states none          |
  | data order       | config.seed 1                                           | ours: a stream of its own (below)    |
  | micro-batches    | 8 of 1,024                                              | ours: the GPU compiler's A100 plan   |
  | remat            | dots_with_no_batch_dims_and_attention_saveable: the     | ours: the GPU compiler's A100 plan   |
  |                  | weight matmuls' outputs and cuDNN attention's kept      |                                      |

Data order: the stream's order and its augmentations are a pure function of config.seed (data/loader/mixture.py,
data/loader/pipeline.py; there is no separate data seed), so at the 224 px run's seed 0 this stage would begin with
the very pairs that run began with. Seed 1 gives it a fresh order of the same pairs (and fresh stochastic depth
and Mixup draws); a 224 px run launched with `--config.seed=1` needs another seed here.

Memory and days, in both layouts: BENCHMARKS.md ("The recipes on their clusters"), the SwinV2-G-CLIP 640 rows.

Variant `demo`: a small SwinV2 + text tower on the embedded shapes pairs on a CPU:

  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo --workdir=/tmp/clip_demo
  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo,ft640 --workdir=/tmp/clip_demo_640 \
      --config.init_from=/tmp/clip_demo

Expected: `eval/zeroshot/top1` >= 0.5 on the 8 shape classes (chance 0.125) and the retrieval metrics
(`eval/retrieval/i2t_r1`, ...) at the end, in under 10 minutes on 2 CPU cores: zero-shot top-1 0.324 / 0.678 /
0.765 at steps 400 / 800 / 1200, top-5 0.995; retrieval over 1000 pairs i2t R@1/5/10 0.092 / 0.449 / 0.807 (the
short captions repeat: ~10 eval pairs share each caption, so R@1 cannot exceed ~0.1). The demo's `ft640` doubles
the resolution (32 -> 64 px, window 4 -> 8), as 224 -> 640 does at full scale, with the demo's windows (4, 4, 2)
as pretrained_window_sizes.

  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo,siglip --workdir=/tmp/siglip_demo

The demo with SigLIP's loss, at the CLIP demo's learning rate. Expected, beside a CLIP demo run on the same
machine: zero-shot top-1 0.245 / 0.616 / 0.705 at steps 400 / 800 / 1200 (CLIP 0.284 / 0.637 / 0.744), top-5
0.980 (0.996); retrieval i2t R@1/5/10 0.083 / 0.436 / 0.784 (0.087 / 0.443 / 0.793); the learned t rises from 10
to about 11.2 and b from -10 to about -10.6.

Variant `small`: your own few thousand image-text pairs (`datatools.prepare_data --format=caption_files` or
`caption_table` with --holdout_examples, into /data/my_pairs with a tokenizer trained on them, or
`--config.data.source=` and `--config.data.tokenizer=` elsewhere): SwinV2-T at 224 px (window 7) and CLIP's text
tower, augmentation on, 3,000 steps of 128 with a GPU, a few minutes' batches and steps on a CPU (`small,vit`: at
224 px or 64; config_lib.small_data says what and why), retrieval on the held-out
pairs, zero-shot only on labelled images given (`--config.eval.zeroshot_source=`), with the class names of their
dataset.json or of a file (`--config.eval.zeroshot_classes=`). `small,vit` fine-tunes an imported CLIP
(`--config.init_from=` it, with the fields tools.import_hf prints). docs/your_data.md runs both.
"""

import math

from visionfm_jax import config_lib
from visionfm_jax.config_lib import set_fields
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import swinv2

FT640_SEED = 1  # the 224 px stage runs at the base config's seed 0


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  if set(parts) - {
    "demo",
    "ft640",
    "vit",
    "siglip",
    "flip",
    "flip_tune",
    "swin_mask",
    "swin_mask_tune",
    "small",
    "naflex",
  }:
    raise ConfigError(
      f"configs/swinv2_g_clip.py: unknown variant {arg!r}; known: demo, ft640, vit, siglip, flip, "
      "flip_tune, swin_mask, swin_mask_tune, small, naflex and their combinations (demo,ft640, "
      "demo,siglip, vit,flip, demo,swin_mask, demo,naflex, ...)"
    )
  if "naflex" in parts and set(parts) - {"demo", "naflex", "vit", "siglip"}:
    raise ConfigError(
      f"configs/swinv2_g_clip.py:{arg}: naflex is SigLIP 2's NaFlex ViT tower (vit and siglip "
      "implied); it composes with demo only"
    )
  if {"flip", "flip_tune"} & set(parts) and "vit" not in parts:
    raise ConfigError(
      f"configs/swinv2_g_clip.py:{arg}: flip and flip_tune mask a ViT image tower (model.token_drop); "
      f"add vit ({','.join(['vit', *parts])})"
    )
  if {"swin_mask", "swin_mask_tune"} & set(parts) and "vit" in parts:
    raise ConfigError(
      f"configs/swinv2_g_clip.py:{arg}: swin_mask and swin_mask_tune mask the SwinV2 image tower "
      "(model.image.token_subgrid); a ViT tower's form is flip"
    )
  config = config_lib.base_config("clip", task="contrastive")

  # image tower: SwinV2-G, 224 px, window 14, stochastic depth 0.2; embedding: 1024-d
  # remat keeping the weight matmuls' outputs, and 2 micro-batches of 16,384 (the loss still spans all 32,768):
  # it fits 128 A100 80GB in XLA's GPU plan with cuDNN attention (BENCHMARKS.md, "The recipes on their clusters")
  set_fields(config.model, image_size=224, embed_dim=1024, remat_policy="dots_with_no_batch_dims_saveable")
  set_fields(config.model.image, variant="G", window_size=14, drop_path=0.2)
  # text tower: 'H' (24 layers, width 1024, 16 heads), 77 tokens, SentencePiece 32k
  set_fields(config.model.text, variant="H", vocab_size=32000, max_len=77)
  # data: filtered LAION pairs at 224 px, CLIP's mean/std, crop, RandAugment (2 ops, magnitude 9), Mixup 0.8;
  # no flips: captions may say "left" and "right"; evaluation images as CLIP's (shorter side to 224 bicubic,
  # central crop)
  set_fields(
    config.data,
    source="arrayrecord:/data/laion/{split}-*.array_record",
    train_split="train",
    eval_split="validation",
    tokenizer="/data/laion/tokenizer_32k.model",
    image_size=224,
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
    eval_examples=5000,
    eval_preprocess="clip",
  )
  set_fields(
    config.data.augment,
    random_resized_crop=True,
    crop_scale=(0.5, 1.0),
    flip=False,
    randaugment_ops=2,
    randaugment_magnitude=9,
    mixup_alpha=0.8,
  )
  # evaluation: ImageNet zero-shot top-1 on the whole validation split (1000 names x 80 templates), retrieval on
  # held-out pairs and on the papers' benchmarks
  set_fields(
    config.eval,
    zeroshot_classes="imagenet",
    zeroshot_source="tfds:imagenet2012",
    zeroshot_split="validation",
    zeroshot_examples=-1,
  )
  # the papers' retrieval protocol: COCO Karpathy 5k test and Flickr30k 1k test, every caption
  # (docs/data_preparation.md)
  config.eval.retrieval_benchmarks = (("coco", "coco_karpathy:/data/coco"), ("flickr30k", "flickr30k:/data/flickr30k"))
  # ImageNet-V2 / Sketch / R / A (config.eval.zeroshot_benchmarks) stay off: placed by hand
  # (docs/data_preparation.md, "Zero-shot benchmarks"), a missing folder would stop the run at start-up
  # optimiser: AdamW b1 0.9 b2 0.98, wd 0.05, peak lr 5e-4, linear warmup 10k, cosine to 0, clip 1.0
  set_fields(config.optim, lr=5e-4, b1=0.9, b2=0.98, weight_decay=0.05, warmup_steps=10_000, end_lr=0.0, clip_norm=1.0)
  # precision: FP16 compute with dynamic loss scaling
  set_fields(config.precision, compute_dtype="float16", loss_scale_init=2.0**16, loss_scale_period=2000)
  # batch 32,768 pairs in 2 micro-batches (above), ZeRO-3, 366k steps (10 passes over the 1.2B pairs)
  set_fields(config, global_batch_size=32768, grad_accum_steps=2, strategy="zero3", total_steps=366_000)
  # cadence
  set_fields(config, log_every=100, eval_every=10_000, checkpoint_every=2_000)
  # health guard and a checkpoint kept every 20k steps
  config_lib.full_scale_run(config)

  if "vit" in parts or "naflex" in parts:
    # a ViT image tower (B/16 unless overridden): what tools.import_hf's flags for a published CLIP start from
    config.model.image = config_lib.model_config("clip", image_tower="vit").image
  if "siglip" in parts or "naflex" in parts:
    _siglip(config)
  if "flip" in parts:
    config.model.image.token_drop = 0.5  # FLIP: half of each image's patch tokens dropped in training
  if "swin_mask" in parts:
    config.model.image.token_subgrid = 2  # every 2nd patch per axis in training: 3/4 of the tokens dropped
  if "small" in parts:
    _small(config)
  if "demo" in parts:
    _demo(config)
  if {"flip_tune", "swin_mask_tune"} & set(parts):
    _flip_tune(config, demo="demo" in parts)
  if "ft640" in parts:
    _ft640(config, demo="demo" in parts)
  if "naflex" in parts:
    _naflex(config, demo="demo" in parts)
  return config


def _naflex(config, demo: bool):
  # SigLIP 2's NaFlex B/16: no class token, a MAP head, tanh GELU, a 16 x 16 grid of position embeddings resized
  # to each image's grid; 256 patches an image at its own aspect in training, zero-shot also at 64 and 576
  set_fields(config.model.image, class_token=False, pool="map", act="gelu_pytorch_tanh")
  config.model.image_size = 256
  set_fields(config.data.augment, random_resized_crop=False, randaugment_ops=0, mixup_alpha=0.0)
  set_fields(config.data.naflex, max_tokens=256, patch_size=16)
  config.eval.zeroshot_naflex_tokens = (64, 576)
  if demo:
    # the demo's mu/4 at 32 px: an 8 x 8 grid; 64 patches of 4 px an image, zero-shot also at 16; the shapes
    # widened or heightened to aspects from 1:2 to 2:1
    config.model.image_size = config.data.image_size = 32
    set_fields(config.data.naflex, max_tokens=64, patch_size=4)
    config.data.source = "shapes:mixed_aspect"
    config.eval.zeroshot_naflex_tokens = (16,)


def _siglip(config):
  # the sigmoid loss per pair with a learnable bias; the paper's init: t' = log 10, b = -10
  set_fields(config.model, contrastive_loss="siglip", logit_scale_init=math.log(10.0), logit_bias_init=-10.0)


def _demo(config):
  # lr: 1e-3 reached zero-shot 0.41 in 1200 steps, 2e-3 reached 0.71 in 1000
  config_lib.cpu_demo(config, image_size=32, total_steps=1200, eval_every=400, lr=2e-3)
  config.model.embed_dim = 64
  if config.model.image.name == "vit":
    config.model.image.variant = "mu/4"  # width 96, depth 4, 3 heads; 64 patches of 4 px
  else:
    config.model.image.variant = "mu"  # C 48, depths 2,2,2, heads 3,6,12
    config.model.image.window_size = 4  # maps 8, 4, 2
  config.model.text.variant = "mu"
  config.model.text.vocab_size = 512
  config.model.text.max_len = 24
  config.model.scan = False
  # 'a small red circle': with position and background words, a batch of 64 is told apart by colour, place
  # and background alone and CLIP never needs the shape; without them it must learn it.
  config.data.shapes_captions = "short"
  config.data.tokenizer = ""  # the shipped shapes tokenizer
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  config.eval.zeroshot_classes = "shapes"
  config.eval.retrieval_benchmarks = ()  # no COCO / Flickr30k on a laptop
  config.eval.zeroshot_source = config.eval.zeroshot_split = ""  # the eval source and split
  config.eval.zeroshot_examples = config.data.get_ref("eval_examples")  # the demo's eval count, as overridden


def _small(config):
  # your own few thousand pairs (docs/your_data.md): SwinV2-T (or the vit variant's B/16) and CLIP's text tower,
  # the tokenizer trained on the captions, retrieval on the held-out pairs; zero-shot only on labelled images given
  # (zeroshot_source), named by their dataset.json unless zeroshot_classes names a file
  # SwinV2-T's windows of 7 take 224 px (7 x 32) alone; a ViT tower takes the machine's size
  config_lib.small_data(
    config,
    source="arrayrecord:/data/my_pairs/{split}-*.array_record",
    lr=5e-4,
    sized_image=config.model.image.name == "vit",
  )
  config.model.embed_dim = 512
  if config.model.image.name == "swinv2":
    set_fields(config.model.image, variant="T", window_size=7)
  set_fields(config.model.text, variant="B", vocab_size=8192)
  config.data.tokenizer = "/data/my_pairs/tokenizer.model"
  set_fields(config.eval, zeroshot_classes="", zeroshot_source="", zeroshot_split="", retrieval_benchmarks=())


def _flip_tune(config, demo: bool):
  # FLIP's last stage: the masked run's params (--config.init_from=) trained a little with every token
  if config.model.image.name == "vit":
    config.model.image.token_drop = 0.0
  else:
    config.model.image.token_subgrid = 1
  if demo:
    set_fields(config, total_steps=200, eval_every=200, checkpoint_every=200)
    set_fields(config.optim, lr=5e-4, warmup_steps=20)


def _trained_windows(config) -> tuple[int, ...]:
  """The per-stage windows of the SwinV2 image tower as configured so far: those of the run ft640 starts from."""
  image = config.model.image
  stages = len(swinv2.parse_variant(image.variant)["depths"])
  return swinv2.pretrained_windows(config.model.image_size, image.window_size, stages, image.patch_size)


def _ft640(config, demo: bool):
  if config.model.image.name == "swinv2":
    # the position bias normalised as in the 224 px run: (14, 14, 14, 7); the demo's 32 px run: (4, 4, 2)
    set_fields(config.model.image, pretrained_window_sizes=_trained_windows(config), window_size=8 if demo else 40)
  if demo:
    config.model.image_size = config.data.image_size = 64
    config.total_steps = 200
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 20
    config.eval_every = config.checkpoint_every = 100
  else:
    config.model.image_size = config.data.image_size = 640
    config.global_batch_size = 8192
    # 8 micro-batches of 1024 (8 images per device; the contrastive loss and Mixup still span all 8192,
    # tasks/contrastive.py) and remat keeping the weight matmuls' and cuDNN attention's outputs (the backward
    # does not run the window-40 attention's forward again): it fits an A100 in the GPU compiler's plan
    # (BENCHMARKS.md, "The recipes on their clusters"), against 357 GiB unsplit in the CPU compiler's
    config.grad_accum_steps = 8
    config.model.remat_policy = "dots_with_no_batch_dims_and_attention_saveable"
    config.total_steps = 20_000
    config.optim.lr = 5e-5
    config.optim.warmup_steps = 1_000
  # the data order is a function of config.seed alone: a stream of its own, not the 224 px run's start again
  config.seed = FT640_SEED
  config.init_from = ""  # set --config.init_from=<the 224 px workdir>
