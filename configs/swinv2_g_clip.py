r"""SwinV2-G-CLIP: a 3B SwinV2-G image tower trained with CLIP on filtered LAION (seed 000_56f9bf2bb09a4641).

The default is the seed's recipe:

  | image tower  | SwinV2-G (C 512, depths 2,2,42,4, heads 16..128), 224 px, window 14, stochastic depth 0.2     |
  | text tower   | our choice (the seed names none): 24 layers, width 1024, 16 heads, 77 tokens, SentencePiece |
  |              | 32k vocabulary trained on the captions (tools.train_tokenizer), EOS pooling                 |
  | embedding    | 1024-d, learned temperature from 1/0.07, clamped at 100                                    |
  | data         | LAION-5B filtered by CLIP score to 1.2B pairs (ArrayRecord, see BUILD.md), RandAugment      |
  |              | (2 ops, magnitude 9), Mixup of pairs (alpha 0.8, soft contrastive targets)                 |
  | optimiser    | AdamW b1 0.9 b2 0.98, wd 0.05, peak lr 5e-4, linear warmup 10k, cosine to 0, clip 1.0       |
  | precision    | FP16 compute with dynamic loss scaling (fp32 params and optimizer state)                    |
  | batch        | 32,768 pairs, sharded contrastive loss (B_local x B_global logits per device)              |
  | parallelism  | ZeRO-3 over all devices; to fit 80 GB: 2 micro-batches (the loss still spans the batch) and |
  |              | remat dots_with_no_batch_dims_saveable (not the seed's: our memory plan, BENCHMARKS.md)     |
  | schedule     | 366,000 steps = 10 passes over the 1.2B pairs (the seed gives 4 weeks on 128 A100s, which   |
  |              | at ~40% MFU is ~1.2e10 samples of SwinV2-G + this text tower; the seed gives no step count) |

  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py --workdir=/ckpt/swinv2_g_clip

Evaluation: ImageNet zero-shot top-1 (`eval/zeroshot/top1`, all 50,000 validation images, 80 templates), and
retrieval R@1/5/10 as papers report it, on COCO's Karpathy 5k test split and Flickr30k's 1k test split with every
caption of each image (`eval/coco_retrieval/*`, `eval/flickr30k_retrieval/*`; the files as BUILD.md prepares them
under /data/coco and /data/flickr30k; `--config.eval.retrieval_benchmarks="()"` leaves them out).

Variant `vit`: a ViT image tower in place of SwinV2-G (B/16; tools.import_hf prints the fields of an imported
OpenAI or LAION CLIP over it, with `--config.init_from=` the imported directory).

Variant `ft640`: the final stage at 640 px, window 40, initialised from a 224 px run (`--config.init_from=`
its workdir); every weight carries over, the position bias is recomputed through pretrained_window_sizes
(14, 14, 14, 7), which init_from reads from that workdir's config.json. Variant `demo`: a small SwinV2 + text
tower on the embedded shapes pairs on a CPU:

  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo --workdir=/tmp/clip_demo
  python -m visionfm_jax.main --config=configs/swinv2_g_clip.py:demo,ft640 --workdir=/tmp/clip_demo_640 \
      --config.init_from=/tmp/clip_demo

Expected: `eval/zeroshot/top1` >= 0.5 on the 8 shape classes (chance 0.125) and the retrieval metrics
(`eval/retrieval/i2t_r1`, ...) at the end, in under 10 minutes on 2 CPU cores. Measured 2026-11-21 (2 cores,
jax 0.10.2): zero-shot top-1 0.324 / 0.678 / 0.765 at steps 400 / 800 / 1200, top-5 0.995, 393 s wall;
retrieval over 1000 pairs i2t R@1/5/10 0.092 / 0.449 / 0.807 (the short captions repeat: ~10 eval pairs
share each caption, so R@1 cannot exceed ~0.1). The demo's `ft640` doubles
the resolution (32 -> 64 px, window 4 -> 8), as 224 -> 640 does at full scale.
"""

from visionfm_jax import config_lib
from visionfm_jax.config_lib import set_fields
from visionfm_jax.errors import ConfigError


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  if set(parts) - {"demo", "ft640", "vit"}:
    raise ConfigError(f"configs/swinv2_g_clip.py: unknown variant {arg!r}; known: demo, ft640, demo,ft640, vit")
  config = config_lib.base_config("clip")
  config.task = "contrastive"

  # image tower: SwinV2-G, 224 px, window 14, stochastic depth 0.2; embedding: 1024-d
  # remat keeping the weight matmuls' outputs, and 2 micro-batches of 16,384 (the loss still spans all 32,768):
  # 70.0 GiB per device on 128 x 80 GB (BENCHMARKS.md, memory plans, session 12)
  set_fields(config.model, image_size=224, embed_dim=1024, remat_policy="dots_with_no_batch_dims_saveable")
  set_fields(config.model.image, variant="G", window_size=14, drop_path=0.2)
  # text tower: 'H' (24 layers, width 1024, 16 heads), 77 tokens, SentencePiece 32k
  set_fields(config.model.text, variant="H", vocab_size=32000, max_len=77)
  # data: filtered LAION pairs at 224 px, CLIP's mean/std, crop, RandAugment (2 ops, magnitude 9), Mixup 0.8;
  # no flips: captions may say "left" and "right"; evaluation images as CLIP's (shorter side to 224 bicubic,
  # central crop)
  set_fields(config.data, source="arrayrecord:/data/laion_filtered/{split}-*.array_record", train_split="train",
             eval_split="validation", tokenizer="/data/laion_filtered/tokenizer_32k.model", image_size=224,
             mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
             eval_examples=5000, eval_preprocess="clip")
  set_fields(config.data.augment, random_resized_crop=True, crop_scale=(0.5, 1.0), flip=False, randaugment_ops=2,
             randaugment_magnitude=9, mixup_alpha=0.8)
  # evaluation: ImageNet zero-shot top-1, retrieval on held-out pairs and on the papers' benchmarks
  config.eval = config_lib.eval_config(
      zeroshot_classes="imagenet",  # evaluate.zeroshot.class_names_and_templates: 1000 names x 80 templates
      zeroshot_source="tfds:imagenet2012",  # labelled images for zero-shot top-1; '' = the eval source
      zeroshot_split="validation",  # of zeroshot_source, or of the eval source; '' = config.data.eval_split
      zeroshot_examples=-1,  # -1: the whole split (ImageNet's 50,000, the protocol of the seed's 78.4%)
  )
  # the papers' retrieval protocol: COCO Karpathy 5k test and Flickr30k 1k test, every caption (BUILD.md)
  config.eval.retrieval_benchmarks = (("coco", "coco_karpathy:/data/coco"), ("flickr30k", "flickr30k:/data/flickr30k"))
  # ImageNet-V2 / Sketch / R / A (config.eval.zeroshot_benchmarks) stay off: placed by hand (BUILD.md, "Zero-shot
  # benchmarks"), a missing folder would stop the run at start-up
  # optimiser: AdamW b1 0.9 b2 0.98, wd 0.05, peak lr 5e-4, linear warmup 10k, cosine to 0, clip 1.0
  set_fields(config.optim, lr=5e-4, b1=0.9, b2=0.98, weight_decay=0.05, warmup_steps=10_000, end_lr=0.0,
             clip_norm=1.0)
  # precision: FP16 compute with dynamic loss scaling
  set_fields(config.precision, compute_dtype="float16", loss_scale_init=2.0**16, loss_scale_period=2000)
  # batch 32,768 pairs, ZeRO-3, 366k steps (10 passes over the 1.2B pairs)
  set_fields(config, global_batch_size=32768, grad_accum_steps=2, strategy="zero3", total_steps=366_000)
  # cadence
  set_fields(config, log_every=100, eval_every=10_000, checkpoint_every=2_000)
  # health: skip loss / gradient-norm spikes (6 std over 128 steps) and roll back past bad data (training/health.py)
  config.health.enabled = True
  # checkpoint history: the newest 3 plus one every 20k steps for good (BUILD.md "Checkpoint history" for the disk)
  config.checkpoint_keep_period = 20_000

  if "vit" in parts:
    # a ViT image tower (B/16 unless overridden): what tools.import_hf's flags for a published CLIP start from
    config.model.image = config_lib.model_config("clip", image_tower="vit").image
  if "demo" in parts:
    _demo(config)
  if "ft640" in parts:
    _ft640(config, demo="demo" in parts)
  return config


def _demo(config):
  # lr: 1e-3 reached zero-shot 0.41 in 1200 steps, 2e-3 reached 0.71 in 1000
  config_lib.cpu_demo(config, image_size=32, total_steps=1200, eval_every=400, lr=2e-3)
  config.model.embed_dim = 64
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


def _ft640(config, demo: bool):
  image = config.model.image
  if demo:
    config.model.image_size = config.data.image_size = 64
    image.window_size = 8
    config.total_steps = 200
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 20
    config.eval_every = config.checkpoint_every = 100
  else:
    config.model.image_size = config.data.image_size = 640
    image.window_size = 40
    config.global_batch_size = 8192
    # fits 80 GB per device on 128 (BENCHMARKS.md, memory plans, session 12): 8 micro-batches of 1024 (8 images
    # per device; the contrastive loss and Mixup still span all 8192, tasks/contrastive.py) and remat keeping
    # the weight matmuls' outputs: 51.6 GiB planned with the einsum attention, against 357 GiB unsplit
    config.grad_accum_steps = 8
    config.model.remat_policy = "dots_with_no_batch_dims_saveable"
    config.total_steps = 20_000
    config.optim.lr = 5e-5
    config.optim.warmup_steps = 1_000
  config.init_from = ""  # set --config.init_from=<the 224 px workdir>
