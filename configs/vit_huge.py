r"""ViT-Huge-Pretrain: ViT-H/14 supervised on ImageNet-21K (seed 002_c5e31c45bff2761c).

The default is the seed's recipe:

  | model        | ViT-H/14 (width 1280, depth 32, 16 heads, MLP 5120), 224 px, 21,841 classes |
  | parameters   | 658,743,121 (630,764,800 without the head)                                  |
  | data         | ImageNet-21K (fall11), random resized crop + flip + colour jitter, IN mean/std |
  | optimiser    | AdamW b1 0.9 b2 0.999, wd 0.05, peak lr 1e-3, linear warmup 10k, cosine to 0 |
  | batch        | 2048 global, bf16 compute, fp32 params, global-norm clip 1.0               |
  | parallelism  | FSDP (zero3) over all devices                                               |

The seed does not state the peak learning rate, the weight decay or the number of steps: we use the
ViT paper's ImageNet-21K values scaled to batch 2048 (lr 1e-3, wd 0.05) and 90 epochs of ImageNet-21K
(14,197,122 images / 2048 x 90 = 623,900 steps).

  python -m visionfm_jax.main --config=configs/vit_huge.py --workdir=/ckpt/vit_huge

needs ImageNet-21K prepared as described in BUILD.md ("Preparing data").

Variant `<size>/<patch>` (e.g. `S/16`): the same recipe with another ViT size (benchmarks, BENCHMARKS.md).

Variant `demo`: a ViT on the embedded procedural shapes data, on a laptop CPU:

  python -m visionfm_jax.main --config=configs/vit_huge.py:demo --workdir=/tmp/vit_demo

Expected: `eval/val/top1` >= 0.9 at the end (chance 1/8 = 0.125), in under 5 minutes on 2 CPU cores.
Measured 2026-11-23 (2 cores, jax 0.10.2, one global data stream): 0.548 / 0.874 / 0.959 at steps 600 / 1200 /
1800, 5m58s wall with the test suite running beside it (3m02s alone on 2026-11-22, 0.545 / 0.855 / 0.952; q, k and
v computed as three products since session 15 round differently, so the trajectory moved within its noise).
"""

from visionfm_jax import config_lib
from visionfm_jax.config_lib import set_fields
from visionfm_jax.errors import ConfigError


def get_config(arg: str | None = None):
  config = config_lib.base_config("vit")
  config.task = "classification"

  # model: ViT-H/14, 224 px, 21,841 classes; remat dots_saveable: bench.memory_plan's pick for 64 x 80 GB (19.4 GiB
  # per device, the fewest FLOPs of those that fit; BENCHMARKS.md "Session 11")
  set_fields(config.model, variant="H/14", num_classes=21841, image_size=224, drop_path=0.0,
             remat_policy="dots_saveable")
  # data: ImageNet-21K (fall11), random resized crop + flip + colour jitter, IN mean/std (the base's). Prepared by
  # tools.prepare_data --format=folders --input=<fall11 class tree> --output=/data/imagenet21k --holdout_per_class=5
  set_fields(config.data, source="arrayrecord:/data/imagenet21k/{split}-*.array_record", train_split="train",
             eval_split="validation", image_size=224)
  set_fields(config.data.augment, random_resized_crop=True, crop_scale=(0.08, 1.0), flip=True, color_jitter=0.4)
  # optimiser: AdamW b1 0.9 b2 0.999, wd 0.05, peak lr 1e-3, linear warmup 10k, cosine to 0, clip 1.0
  set_fields(config.optim, lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.05, warmup_steps=10_000, end_lr=0.0,
             clip_norm=1.0)
  # batch 2048 for 90 epochs, bf16 compute (fp32 params), FSDP over all devices
  set_fields(config, global_batch_size=2048, total_steps=623_900, strategy="fsdp")
  config.precision.compute_dtype = "bfloat16"
  # cadence
  set_fields(config, log_every=100, eval_every=10_000, checkpoint_every=2_000)
  # health: skip loss / gradient-norm spikes (6 std over 128 steps) and roll back past bad data (training/health.py)
  config.health.enabled = True
  # checkpoint history: the newest 3 plus one every 20k steps for good (BUILD.md "Checkpoint history" for the disk)
  config.checkpoint_keep_period = 20_000

  if arg == "demo":
    config_lib.cpu_demo(config, image_size=32, total_steps=1800, eval_every=600, warmup_steps=200)
    config.model.variant = "mu/8"  # width 96, depth 4, 3 heads, MLP 384: 17 tokens at 32 px
    config.model.num_classes = 8
    config.model.pool = "gap"
  elif arg and "/" in arg:  # another ViT size with the same recipe, e.g. 'S/16' for benchmarks
    config.model.variant = arg
  elif arg:
    raise ConfigError(f"configs/vit_huge.py: unknown variant {arg!r}; known: demo, or a ViT size like S/16")
  return config
