r"""SwinV2 image classification: trains the SwinV2 backbone (T ... G) on its own.

The argument after ':' is a comma-separated list: a size (T, S, B, L, H, G; default T), optionally `640`, or
`demo`.

  | `<size>`     | ImageNet-1K at 224 px, window 14: AdamW (0.9, 0.999), wd 0.05, lr 1e-3 at batch 1024, 20 warmup  |
  |              | epochs, cosine over 300 epochs, clip 5.0, stochastic depth by size, bf16, fsdp                    |
  | `<size>,640` | resolution transfer: 640 px, window 40, initialised from a 224/window-14 run                     |
  |              | (`--config.init_from=<workdir or tools.import_hf dir>`); every weight carries over and the       |
  |              | position bias is recomputed for the new windows through pretrained_window_sizes (14,14,14,7),    |
  |              | which init_from reads from the checkpoint's model fields                                         |
  |              | 30 epochs, lr 2e-5, wd 1e-8, 5 warmup epochs                                                     |
  | `demo`       | a small SwinV2 (C 48, depths 2,2,2) on the embedded shapes data, 32 px, window 4, laptop CPU    |

  python -m visionfm_jax.main --config=configs/swinv2_cls.py:G --workdir=/ckpt/swinv2_g_224
  python -m visionfm_jax.main --config=configs/swinv2_cls.py:G,640 --config.init_from=/ckpt/swinv2_g_224 \
      --workdir=/ckpt/swinv2_g_640
  python -m visionfm_jax.main --config=configs/swinv2_cls.py:demo --workdir=/tmp/swin_demo

Demo, measured 2026-11-23 on 2 CPU cores shared with other jobs (jax 0.10.2): `eval/val/top1` 0.515 / 0.892 /
0.945 at steps 300 / 600 / 900 (chance 0.125), in 5m13s.

Parameters (`python -m visionfm_jax.tools.summary --config=configs/swinv2_cls.py:<size>`): T 28,347,154 and
H 657,883,256 with the 1000-class head; G 2,997,815,008 without it (`--config.model.num_classes=0`).
"""

from visionfm_jax import config_lib
from visionfm_jax.config_lib import set_fields
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import swinv2

IMAGENET_TRAIN = 1_281_167
DROP_PATH = {"T": 0.2, "S": 0.3, "B": 0.5, "L": 0.2, "H": 0.2, "G": 0.2}


def _epochs(epochs: float, batch: int) -> int:
  return round(epochs * IMAGENET_TRAIN / batch)


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  unknown = [p for p in parts if p not in swinv2.SIZES and p not in ("640", "demo")]
  if unknown:
    raise ConfigError(f"configs/swinv2_cls.py: unknown parts {unknown}; expected a size in {list(swinv2.SIZES)}, "
                     "'640' or 'demo'")
  size = next((p for p in parts if p in swinv2.SIZES), "T")

  config = config_lib.base_config("swinv2")
  config.task = "classification"

  # model: SwinV2-<size>, 224 px, window 14, 1000 classes, stochastic depth by size
  set_fields(config.model, variant=size, num_classes=1000, image_size=224, window_size=14,
             drop_path=DROP_PATH.get(size, 0.1), remat_policy="nothing_saveable")
  # data: ImageNet-1K, random resized crop + flip + colour jitter 0.4
  set_fields(config.data, source="tfds:imagenet2012", train_split="train", eval_split="validation", image_size=224)
  set_fields(config.data.augment, random_resized_crop=True, flip=True, color_jitter=0.4)
  # optimiser: AdamW (0.9, 0.999), wd 0.05, lr 1e-3, 20 warmup epochs, cosine over 300 epochs, clip 5.0
  set_fields(config.optim, lr=1e-3, weight_decay=0.05, warmup_steps=_epochs(20, 1024), clip_norm=5.0)
  # batch 1024 for 300 epochs, bf16 compute, fsdp
  set_fields(config, global_batch_size=1024, total_steps=_epochs(300, 1024), strategy="fsdp")
  config.precision.compute_dtype = "bfloat16"
  # cadence
  set_fields(config, log_every=100, eval_every=5_000, checkpoint_every=2_000)

  if "640" in parts:
    config.model.image_size = 640
    config.data.image_size = 640
    config.model.window_size = 40
    config.total_steps = _epochs(30, 1024)
    config.optim.lr = 2e-5
    config.optim.weight_decay = 1e-8
    config.optim.warmup_steps = _epochs(5, 1024)

  if "demo" in parts:
    config_lib.cpu_demo(config, image_size=32, total_steps=900, eval_every=300)
    config.model.variant = "mu"  # C 48, depths 2,2,2, heads 3,6,12
    config.model.num_classes = 8
    config.model.window_size = 4  # maps 8, 4, 2: windows (4, shift 2), then one unshifted window per stage
    config.model.scan = False  # three 2-block stages: unrolled runs faster on CPU
  return config
