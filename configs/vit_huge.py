r"""ViT-Huge-Pretrain: ViT-H/14 supervised on ImageNet-21K.

The default is the paper's recipe. `source` says, for every setting, whether the paper states it or we chose it
(`ours:` and the reason); the ViT paper is Dosovitskiy et al. 2021 (Table 3 and section 4.1):

  | setting        | value                                              | source                                   |
  | -------------- | -------------------------------------------------- | ---------------------------------------- |
  | model          | ViT-Huge, patch 14 x 14                            | paper                                    |
  | sizes          | width 1280, depth 32, 16 heads, MLP 5120: 630.8M   | ours: the ViT paper's ViT-H              |
  | classes        | 21,841 (658.7M parameters with the head)           | paper                                    |
  | pooling        | the class token                                    | ours: the ViT paper's                    |
  | resolution     | 224 px                                             | ours: the ViT paper's training size      |
  | data           | ImageNet-21K (fall11), ~14M images                 | paper                                    |
  | evaluation     | top-1 on 5 held-out images per class               | ours: fall11 has no validation split     |
  | augmentation   | random resized crops, flips, colour jittering      | paper                                    |
  | crop scale     | (0.08, 1)                                          | ours: the Inception crop's               |
  | jitter         | 0.4 (brightness, contrast, saturation)             | ours: timm's and DeiT's strength         |
  | normalisation  | ImageNet mean and std                              | paper                                    |
  | optimiser      | AdamW                                              | paper                                    |
  | betas          | 0.9, 0.999                                         | ours: the ViT paper's Adam               |
  | weight decay   | 0.03                                               | ours: the ViT paper's ImageNet-21k rows  |
  |                |                                                    | (ViT-B and ViT-L)                        |
  | peak rate      | 1e-3                                               | ours: the ViT paper's ImageNet-21k peak  |
  |                |                                                    | at batch 4096, not scaled to 2048 (its   |
  |                |                                                    | ViT-H trained on JFT only)               |
  | warmup         | linear, 10,000 steps                               | paper                                    |
  | decay          | cosine to 0                                        | paper                                    |
  | gradient clip  | global norm 1.0                                    | paper                                    |
  | batch          | 2048                                               | paper                                    |
  | precision      | bf16 compute                                       | paper                                    |
  | master weights | fp32 params and optimizer state                    | ours: standard mixed precision           |
  | schedule       | 90 epochs: 14,197,122 / 2048 x 90 = 623,900 steps  | ours: the ViT paper's ImageNet-21k       |
  |                |                                                    | epochs; the paper gives no step count    |
  | regularisation | no dropout, no stochastic depth                    | ours: the paper names none (the ViT      |
  |                |                                                    | paper's ImageNet-21k rows: dropout 0.1,  |
  |                |                                                    | `--config.model.dropout=0.1`)            |
  | parallelism    | FSDP over all devices                              | paper                                    |
  | remat          | none                                               | ours: bench.memory_plan's pick for 64    |
  |                |                                                    | H100s with the stack straight-line       |
  |                |                                                    | (BENCHMARKS.md)                          |
  | stack form     | straight-line (`model.scan_unroll=0`): no loop     | ours: the same pick; the params stay     |
  |                | over the 32 blocks                                 | stacked as a scan stacks them            |
  | cluster        | H100s                                              | paper                                    |
  | GPU count      | 64 (docs/runbooks/vit_h14.md)                      | ours: the paper states none              |
  | health         | loss / gradient-norm spike skipping (6 std over    | ours: guards a long run                  |
  |                | 128 steps), rollback past bad data                 |                                          |
  |                | (training/health.py)                               |                                          |

Wall clock: the paper trained for approximately 3 weeks on H100s without saying how many. For this config on 64
H100s BENCHMARKS.md ("The recipes on their clusters") predicts 0.9 days, a roofline prediction, and less with the
runbook's `--config.mesh.fsdp=8 --config.mesh.data=-1`; its stack's form and memory plans: "The stack's form and
FP8, planned".

  python -m visionfm_jax.main --config=configs/vit_huge.py --workdir=/ckpt/vit_huge

needs ImageNet-21K prepared as docs/runbooks/vit_h14.md prepares it.

Variant `<size>/<patch>` (e.g. `S/16`): the same recipe with another ViT size (benchmarks, BENCHMARKS.md).

Variant `demo`: a ViT on the embedded procedural shapes data, on a laptop CPU:

  python -m visionfm_jax.main --config=configs/vit_huge.py:demo --workdir=/tmp/vit_demo

Expected: `eval/val/top1` >= 0.9 at the end (chance 1/8 = 0.125), in under 5 minutes on 2 CPU cores: about
0.561 / 0.876 / 0.966 at steps 600 / 1200 / 1800.

Variant `small`: your own few thousand labelled photos (`datatools.prepare_data --format=folders --holdout_per_class=K`
into /data/my_photos, or `--config.data.source=` elsewhere), ViT-S/16 with augmentation on, at the machine's sizes:
224 px and 3,000 steps of 128 with a GPU, 64 px and a few minutes' batches and steps on a CPU (config_lib.small_data
says what and why); as many classes as the data's dataset.json names, warmup and cadence in proportion to
`--config.total_steps` (config_lib/sizing.py). docs/your_data.md runs it, from scratch
and fine-tuned from a Hugging Face ViT.
"""

from visionfm_jax import config_lib
from visionfm_jax.config_lib import set_fields
from visionfm_jax.errors import ConfigError


def get_config(arg: str | None = None):
  config = config_lib.base_config("vit")

  # model: ViT-H/14, 224 px, 21,841 classes; no remat and the blocks as straight-line code: bench.memory_plan's
  # pick for the runbook's 64 H100s (the shortest predicted step of those that fit; BENCHMARKS.md, "The stack's
  # form and FP8, planned")
  set_fields(
    config.model, variant="H/14", num_classes=21841, image_size=224, drop_path=0.0, remat_policy="none", scan_unroll=0
  )
  # data: ImageNet-21K (fall11), random resized crop + flip + colour jitter, IN mean/std (the base's). Prepared by
  # datatools.prepare_data --format=folders --input=<fall11 class tree> --output=/data/imagenet21k --holdout_per_class=5
  set_fields(
    config.data,
    source="arrayrecord:/data/imagenet21k/{split}-*.array_record",
    train_split="train",
    eval_split="validation",
    image_size=224,
  )
  set_fields(config.data.augment, random_resized_crop=True, crop_scale=(0.08, 1.0), flip=True, color_jitter=0.4)
  # optimiser: AdamW b1 0.9 b2 0.999, wd 0.03, peak lr 1e-3, linear warmup 10k, cosine to 0, clip 1.0
  set_fields(config.optim, lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.03, warmup_steps=10_000, end_lr=0.0, clip_norm=1.0)
  # batch 2048 for 90 epochs, bf16 compute (fp32 params), FSDP over all devices
  set_fields(config, global_batch_size=2048, total_steps=623_900, strategy="fsdp")
  config.precision.compute_dtype = "bfloat16"
  # cadence
  set_fields(config, log_every=100, eval_every=10_000, checkpoint_every=2_000)
  # health guard and a checkpoint kept every 20k steps
  config_lib.full_scale_run(config)

  if arg == "demo":
    config_lib.cpu_demo(config, image_size=32, total_steps=1800, eval_every=600, warmup_steps=200)
    config.model.variant = "mu/8"  # width 96, depth 4, 3 heads, MLP 384: 17 tokens at 32 px
    config.model.num_classes = 8
    config.model.pool = "gap"
  elif arg == "small":  # your own few thousand photos (docs/your_data.md), as many classes as they have
    config_lib.small_data(config, source="arrayrecord:/data/my_photos/{split}-*.array_record", lr=5e-4)
    config.model.variant = "S/16"  # width 384, depth 12, 6 heads: 22M parameters
    config.model.num_classes = config_lib.SIZED  # the class folders' count, from the data's dataset.json
  elif arg and "/" in arg:  # another ViT size with the same recipe, e.g. 'S/16' for benchmarks
    config.model.variant = arg
  elif arg:
    raise ConfigError(f"configs/vit_huge.py: unknown variant {arg!r}; known: demo, small, or a ViT size like S/16")
  return config
