r"""Aurora-Vision-XL: SwinV2-G encoder + CoCa-style text encoder/decoder, MIM + contrastive + captioning.

The default is the paper's recipe. `source` says, for every setting, whether the paper states it or we chose it
(`ours:` and the reason):

  | setting          | value                                                 | source                                 |
  | ---------------- | ----------------------------------------------------- | -------------------------------------- |
  | architecture     | hierarchical encoder, cross-attention text decoder,   | paper                                  |
  |                  | multimodal projection heads                           |                                        |
  | encoder          | SwinV2-G: C 512, depths 2,2,42,4, heads 16..128, mask | ours: Swin-inspired as the paper says; |
  |                  | token: 2,998M                                         | G holds 81% of the 3.7B                |
  | resolution       | 448 px                                                | paper                                  |
  | window           | 14 (maps 112, 56, 28, 14)                             | ours: tiles every 448 px stage         |
  | stochastic depth | 0.2                                                   | ours: the CLIP recipe's for SwinV2-G   |
  | poolers          | attentional, width 1024: 1 query (contrastive), 256   | ours: CoCa's                           |
  |                  | queries (decoder memory): 21.3M                       |                                        |
  | text encoder     | 16 causal layers, width 1024, 16 heads: 235.4M        | ours: CoCa's shape, sized to the 3.7B  |
  | decoder          | causal self-attention + cross-attention to the image  | paper                                  |
  | decoder size     | 16 layers (each with its MLP), vocab 32k: 435.8M      | ours: CoCa's equal depths              |
  | heads            | SimMIM 1x1 conv 4096 -> 32*32*3 (12.6M), image        | ours: SimMIM's head; CoCa's projection |
  |                  | projection 1024 -> 1024 (1.0M)                        |                                        |
  | parameters       | 3,704,005,857 (tools.summary)                         | paper (3.7B)                           |
  | objectives       | MIM + image-text contrastive + captioning             | paper                                  |
  | loss weights     | 1.0 MIM, 1.0 contrastive, 2.0 captioning              | ours: CoCa's defaults (1.0, 2.0) and   |
  |                  |                                                       | 1.0 for MIM                            |
  | MIM              | SimMIM L1 on pixels, 32 px patches, 60% masked        | ours: SimMIM's setting for SwinV2      |
  | data             | 1.5B pairs (LAION-5B, COCO, Visual Genome, internal)  | paper                                  |
  |                  | and 500M uncaptioned images                           |                                        |
  | mixture          | LAION-style 0.71, COCO 0.02, VG regions 0.02,         | ours: the paper gives no proportions   |
  |                  | uncaptioned 0.25 (ArrayRecord under /data)            | (reasons at the data fields below)     |
  | augmentation     | random crop + horizontal flip                         | paper                                  |
  | crop scale       | (0.5, 1)                                              | ours: the CLIP recipe's                |
  | tokenizer        | SentencePiece, 32k pieces                             | paper                                  |
  | text length      | 77 tokens + CLS, BOS first                            | ours: CLIP's length                    |
  | optimiser        | AdamW, peak 1.5e-4, linear warmup 5,000 steps, cosine | paper                                  |
  |                  | to 1e-6                                               |                                        |
  | betas            | 0.9, 0.98                                             | ours: CLIP's and CoCa's                |
  | weight decay     | 0.05                                                  | ours: the CLIP recipe's                |
  | gradient clip    | global norm 1.0                                       | ours: as the other two recipes         |
  | batch            | 2048 = 8 accumulation steps of 256; the contrastive   | paper (2048 in 8 steps)                |
  |                  | loss still spans all 2048 (tasks/base.py)             |                                        |
  | precision        | bf16 compute                                          | paper                                  |
  | master weights   | fp32 params and optimizer state                       | ours: standard mixed precision         |
  | parallelism      | ZeRO-2: optimizer state and gradients sharded over    | paper (DDP + ZeRO-2)                   |
  |                  | the data-parallel devices                             |                                        |
  | accumulation     | each GPU sums its micro-batches' gradients, reduced   | ours: 1 reduction a step, not 8, for   |
  |                  | once a step (accumulate_unreduced)                    | more memory (BENCHMARKS.md)            |
  | layout (runbook) | ZeRO-2 within each node, nodes data-parallel          | ours: a node sums its gradient shards  |
  |                  | (--config.mesh.fsdp=8 --config.mesh.data=-1)          | over NVLink: faster, in less memory    |
  | remat            | dots_with_no_batch_dims_and_attention_saveable: the   | ours: bench.memory_plan's pick at 90%  |
  |                  | weight matmuls' and cuDNN attention's outputs kept    | of 80 GB (BENCHMARKS.md)               |
  | cluster          | 64 A100 80GB                                          | paper                                  |
  | schedule         | 250,000 steps = 512M samples                          | ours: the paper gives no step count;   |
  |                  |                                                       | sized for its 4 weeks at an assumed    |
  |                  |                                                       | 26% MFU (below)                        |
  | evaluation       | retrieval R@K, held-out perplexity                    | paper; what perplexity: below          |
  | health           | loss / gradient-norm spike skipping (6 std over 128   | ours: guards a long run; the paper     |
  |                  | steps), rollback past bad data (training/health.py)   | names no such guard                    |

The paper names neither the text side nor the loss weights: the widths follow CoCa (text encoder and decoder of
equal depth, decoder memory of 256 queries), the weights are CoCa's public defaults (1.0, 2.0) plus 1.0 for
MIM, and the sizes were chosen to make the total the paper's 3.7B with the encoder holding 81% of it.

Memory and wall clock: the paper trained for approximately 4 weeks on its 64 A100s ("over 10,000 GPU-hours").
For this config on 64 A100s BENCHMARKS.md ("The recipes on their clusters") predicts 27.2 days, a roofline
prediction; ZeRO-2 within each node with the nodes data-parallel (`--config.mesh.fsdp=8 --config.mesh.data=-1`,
what docs/runbooks/aurora_xl.md launches) is faster (the table's rows). The step count was sized for the paper's 4
weeks at an assumed 26% MFU, with 2.47e13 training FLOPs per sample (the encoder's two views at 448 px).

  python -m visionfm_jax.main --config=configs/aurora_xl.py --workdir=/ckpt/aurora_xl

Evaluation. The paper reports retrieval R@K and "masked language modeling perplexity on held-out validation sets".
The model has no masked-language-modelling head: its text side is a causal encoder and a causal decoder, and its
only masked objective is MIM on pixels. We read that metric as the perplexity of held-out captions under the
decoder, conditioned on the image (`eval/caption/perplexity`, teacher-forced, padding excluded), because that is
the language-modelling loss the model trains. The figure is therefore not comparable with a BERT-style MLM
perplexity, which predicts masked tokens from both sides. Retrieval R@1/5/10 is also reported as papers do, on
COCO's Karpathy 5k test split and Flickr30k's 1k test split with every caption of each image
(`eval/coco_retrieval/*`, `eval/flickr30k_retrieval/*`; the files as docs/data_preparation.md places them under
/data/coco and /data/flickr30k; `--config.eval.retrieval_benchmarks="()"` leaves them out).

Variant `demo`: a small SwinV2 + text encoder/decoder on the recipe's mixture in small: the embedded shapes pairs
('a small red circle') 0.75 and uncaptioned shapes images (`shapes:images`) 0.25, in batches of 84 (63 captioned
on average, as the 64 of the pairs-only demo), on a CPU; metrics `eval/retrieval/*`, `eval/caption/perplexity`,
`eval/mim/loss` on held-out pairs:

  python -m visionfm_jax.main --config=configs/aurora_xl.py:demo --workdir=/tmp/aurora_demo
  python -m visionfm_jax.tools.caption --checkpoint=/tmp/aurora_demo --images=shapes:0-7

Expected at the end: caption perplexity far below the unigram perplexity of the training captions (12.4, from
`evaluate.sums.unigram_perplexity` over 3,200 of them), retrieval R@5 far above chance (0.005 for 1000 pairs;
the short captions repeat, ~10 eval pairs share each, so R@1 cannot exceed ~0.1), held-out MIM loss falling,
in about 15 minutes on 2 CPU cores; in brackets the same code on pairs only (`--config.data.mixture="()"
--config.data.source=shapes --config.global_batch_size=64`):

  | step | caption perplexity | i2t R@5       | t2i R@5       | i2t R@10      | MIM loss      |
  | 250  | 1.520 (1.546)      | 0.119 (0.110) | 0.136 (0.122) | 0.234 (0.213) | 0.461 (0.425) |
  | 500  | 1.339 (1.329)      | 0.222 (0.224) | 0.250 (0.239) | 0.426 (0.431) | 0.393 (0.387) |
  | 750  | 1.203 (1.203)      | 0.318 (0.316) | 0.340 (0.344) | 0.582 (0.577) | 0.354 (0.354) |
  | 1000 | 1.152 (1.164)      | 0.350 (0.340) | 0.378 (0.382) | 0.634 (0.627) | 0.347 (0.348) |

The mixture learns as the pairs do: every figure at step 1000 within 0.012 of the pairs-only run. With the
mixture in batches of 64 (48 captioned) step 1000 gave R@5 0.295 / 0.309, perplexity 1.247, MIM 0.353: fewer
captioned pairs per step, so the batch grows with the uncaptioned share. Greedy captions of validation records
0-7 ('a small yellow crescent', 'a large green diamond', ...) match the true captions exactly for 7 of 8.
"""

from visionfm_jax import config_lib
from visionfm_jax.config_lib import set_fields
from visionfm_jax.errors import ConfigError


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  if set(parts) - {"demo"}:
    raise ConfigError(f"configs/aurora_xl.py: unknown variant {arg!r}; known: demo")
  config = config_lib.base_config("aurora", task="aurora")

  # encoder: SwinV2-G, 448 px, window 14 (stages 112/56/28/14 -> windows 14, 14, 14, 14, the last unshifted)
  # remat keeping the weight matmuls' outputs, with 8 micro-batches: bench.memory_plan's pick for 64 x 80 GB with
  # 10% headroom, of fewer FLOPs than nothing_saveable (the CPU compiler's plan: BENCHMARKS.md, "The planner picks
  # the cheapest setup that fits"), and cuDNN attention's outputs, so that the backward does not run the attention
  # again (XLA's GPU plan for 64 A100s, with and without the unreduced accumulation below: "The recipes on their
  # clusters")
  set_fields(config.model, image_size=448, remat_policy="dots_with_no_batch_dims_and_attention_saveable")
  set_fields(config.model.encoder, variant="G", window_size=14, drop_path=0.2)
  # poolers and decoder: a 1024-d contrastive embedding, 256 caption queries, 16 decoder layers
  set_fields(config.model, embed_dim=1024, caption_queries=256, decoder_depth=16, mim_view="separate")
  # text encoder: 'XL' (16 layers, width 1024, 16 heads), 77 tokens + CLS, SentencePiece 32k
  set_fields(config.model.text, variant="XL", vocab_size=32000, max_len=77)
  # loss: 1.0 * SimMIM L1 + 1.0 * contrastive + 2.0 * captioning CE
  set_fields(config.loss, mim_weight=1.0, contrastive_weight=1.0, caption_weight=2.0)
  # data: 1.5B image-text pairs and 0.5B uncaptioned images, sampled 0.75 / 0.25 (data/loader/mixture.py; the
  # uncaptioned ones train MIM only), at 448 px, random crop + horizontal flip; held-out pairs for evaluation;
  # the tokenizer from datatools.train_tokenizer --vocab_size=32000; SimMIM masks 60% of 32 px patches (14x14
  # grid, 118 masked). The paper names LAION-5B, COCO and Visual Genome among the pairs without proportions: by
  # size COCO (0.6M pairs) and VG (at most 5.4M region crops) would be under 0.4% of 1.5B; at 0.02 each the 512M
  # samples of the schedule see each COCO caption 17-19 times and each VG region ~2 or more (BLIP-style
  # exposure of the curated sets), the LAION-style pairs a third of once.
  set_fields(
    config.data,
    source="",
    mixture=(
      ("arrayrecord:/data/laion/{split}-*.array_record", 0.71),
      ("arrayrecord:/data/aurora_pairs/coco/{split}-*.array_record", 0.02),
      ("arrayrecord:/data/aurora_pairs/vg/{split}-*.array_record", 0.02),
      ("arrayrecord:/data/aurora_images/{split}-*.array_record", 0.25),
    ),
    eval_source="arrayrecord:/data/laion/{split}-*.array_record",
    train_split="train",
    eval_split="validation",
    tokenizer="/data/aurora_pairs/tokenizer_32k.model",
    image_size=448,
    eval_examples=5000,
    eval_preprocess="clip",
  )
  set_fields(config.data.augment, random_resized_crop=True, crop_scale=(0.5, 1.0), flip=True)
  set_fields(config.data.mim, mask_patch_size=32, mask_ratio=0.6)
  # evaluation: retrieval on held-out pairs and, the papers' protocol, COCO Karpathy 5k test and Flickr30k 1k
  # test with every caption (docs/data_preparation.md); caption perplexity, MIM loss
  config.eval.retrieval_benchmarks = (("coco", "coco_karpathy:/data/coco"), ("flickr30k", "flickr30k:/data/flickr30k"))
  # optimiser: AdamW b1 0.9 b2 0.98 wd 0.05, peak lr 1.5e-4, linear warmup 5k, cosine to 1e-6, clip 1.0
  set_fields(
    config.optim, lr=1.5e-4, b1=0.9, b2=0.98, weight_decay=0.05, warmup_steps=5_000, end_lr=1e-6, clip_norm=1.0
  )
  # batch 2048 = 8 accumulation steps of 256, bf16 compute, ZeRO-2, 250k steps; each GPU sums its own gradients
  # over the 8 micro-batches (fp32, unreduced) and the step reduce-scatters them once, not in every micro-batch:
  # a shorter predicted step and fewer exposed collectives for more memory per A100 (BENCHMARKS.md, "The recipes on
  # their clusters", the rows with and without --config.accumulate_unreduced=False)
  set_fields(
    config, global_batch_size=2048, grad_accum_steps=8, strategy="zero2", total_steps=250_000, accumulate_unreduced=True
  )
  config.precision.compute_dtype = "bfloat16"
  # cadence
  set_fields(config, log_every=100, eval_every=5_000, checkpoint_every=2_000)
  # health guard and a checkpoint kept every 20k steps
  config_lib.full_scale_run(config)

  if "demo" in parts:
    _demo(config)
  return config


def _demo(config):
  config_lib.cpu_demo(config, image_size=32, total_steps=1000, eval_every=250, lr=2e-3)
  config.grad_accum_steps = 2
  config.model.embed_dim = 64
  config.model.caption_queries = 16
  config.model.decoder_depth = 2
  config.model.encoder.variant = "mu"  # C 48, depths 2,2,2, heads 3,6,12: stride 16, final map 2x2
  config.model.encoder.window_size = 4
  config.model.text.variant = "mu"
  config.model.text.vocab_size = 512
  config.model.text.max_len = 16
  config.model.scan = False
  config.data.shapes_captions = "short"  # 'a small red circle': the caption names size, colour and shape
  # the recipe's mixture in small: shapes pairs and uncaptioned shapes images, 0.75 / 0.25; the batch grows by
  # 1 / 0.75 so that its captioned examples stay the 64 of the other demos (84 x 0.75 = 63)
  set_fields(config.data, source="", mixture=(("shapes", 0.75), ("shapes:images", 0.25)), eval_source="shapes")
  config.global_batch_size = 84
  config.eval.retrieval_benchmarks = ()  # no COCO / Flickr30k on a laptop
  config.data.tokenizer = ""  # the shipped shapes tokenizer
  config.data.mim.mask_patch_size = 8  # 4x4 grid, 10 of 16 masked
