r"""ADE20K semantic segmentation: fine-tunes a pretrained backbone with UPerNet (tasks/segmentation.py).

The default is the usual ViT + UPerNet recipe on ADE20K (mmseg's 160k schedule; MAE / BEiT fine-tuning
hyperparameters) on the ViT-H/14 of ViT-Huge-Pretrain:

  | backbone     | ViT-H/14 from a ViT-Huge-Pretrain workdir (configs/vit_huge.py) under 'backbone', its          |
  |              | 224 px pos_embed resized 16x16 -> 37x37 by init_from; drop_path 0.3 (ViT-Adapter / BEiT use     |
  |              | 0.3-0.4 for L-size models)                                                                     |
  | neck, head   | simple feature pyramid from the last block at strides 3.5, 7, 14, 28 (nominal 4, 8, 16, 32),  |
  |              | 256 channels; UPerNet (pyramid pooling 1, 2, 3, 6; 512 channels), dropout 0.1, 150 classes    |
  | data         | ADEChallengeData2016, 518 px crops (37 x 37 patches of 14; mmseg's 512 is no multiple of 14): |
  |              | short side to 518 * U(0.5, 2.0), random 518 x 518 crop (pad: ignore), flip                    |
  | loss         | per-pixel cross-entropy, label 0 ('other') and padding ignored (255)                          |
  | optimiser    | AdamW b1 0.9 b2 0.999, lr 1e-4, wd 0.05, layer-wise lr decay 0.9 over the 32 blocks, 1500      |
  |              | warmup steps, cosine to 0 (mmseg: poly), clip 1.0                                             |
  | schedule     | 160k steps at batch 16, bf16 compute, fp32 params, fsdp                                       |
  | evaluation   | eval/seg/miou on the 2000 validation images: short side 518 on a 518 x 1036 canvas (up to 2:1 |
  |              | aspect ratio kept whole), sliding 518 windows at stride 345 (mmseg: 512 / 341)               |

Layer decay: MAE fine-tunes ViT-L/H classification with 0.75 and BEiT's ADE20K ViT-L runs use 0.9-0.95; deeper
models want a decay nearer 1 (with 0.9 the patch embedding of 32 blocks still gets 0.9^33 = 3% of the peak lr).
We have not tuned these values or run this recipe at scale; BEiT-L + UPerNet reports 56.7 mIoU (single scale).

  python -m visionfm_jax.main --config=configs/finetune_ade20k.py --workdir=/ckpt/ade20k_vith \
      --config.data.source=ade20k:/data/ADEChallengeData2016 --config.init_from=/ckpt/vit_huge

`ade20k:<root>` is the unpacked ADEChallengeData2016 folder (images/, annotations/; docs/data_preparation.md).

Variant `swinv2`: UPerNet on the four stages of a SwinV2-B (a LayerNorm on each stage output), 512 px crops,
window 16 (maps 128, 64, 32, 16), the position bias carried over from a 224 px / window-14 classification run
(configs/swinv2_cls.py:B; pretrained_window_sizes 14, 14, 14, 7, which init_from checks against its config.json),
with Swin's UPerNet recipe: AdamW lr 6e-5, wd 0.01, drop_path 0.3, 1500 warmup steps, 160k steps at batch 16;
layer decay 0.9 over its 24 blocks (ours).
Sliding 512 windows at stride 341 on a 512 x 1024 canvas. SwinV2-G (the SwinV2-G-CLIP image tower):
--config.model.variant=G --config.init_from_subtree=image --config.init_from=<configs/swinv2_g_clip.py workdir>.

  python -m visionfm_jax.main --config=configs/finetune_ade20k.py:swinv2 --workdir=/ckpt/ade20k_swinv2 \
      --config.data.source=ade20k:/data/ADEChallengeData2016 --config.init_from=/ckpt/swinv2_b_224

Variant `demo`: from scratch on the embedded 'scenes' (1-4 shapes of 8 kinds per image; 9 classes with the
background), 32 px, a small ViT (mu/4: width 96, 4 blocks, 8 x 8 patches) with the pyramid at strides 2, 4, 8, 16,
on a laptop CPU:

  python -m visionfm_jax.main --config=configs/finetune_ade20k.py:demo --workdir=/tmp/seg_demo \
      --config.progress_bar=False

Expected: eval/seg/miou ~0.5 at step 1000 on the first 500 eval scenes; predicting background everywhere gives
mIoU 0.097 and pixel accuracy 0.877 (background is 88% of the labelled pixels at 32 px). A run gives about
eval/seg/miou 0.316 / 0.528, pixel_acc 0.928 / 0.956, mean_acc 0.438 / 0.663 at steps 500 / 1000; its time on
2 CPU cores: BENCHMARKS.md, "Time outside the step and trackers (CPU demo)".
"""

from visionfm_jax import config_lib
from visionfm_jax.config_lib import set_fields
from visionfm_jax.errors import ConfigError

ADE20K_CLASSES = 150


def _vit_h(config):
  config_lib.finetune_backbone(config, "vit", init_from="/ckpt/vit_huge", variant="H/14", image_size=518, drop_path=0.3)
  config.data.seg_eval_width = 1036


def _swinv2(config):
  config_lib.finetune_backbone(
    config, "swinv2", init_from="/ckpt/swinv2_b_224", variant="B", image_size=512, drop_path=0.3, window_size=16
  )  # maps 128, 64, 32, 16
  config.model.pretrained_window_sizes = (14, 14, 14, 7)  # the 224 px / window-14 run's (maps 56, 28, 14, 7)
  config.data.seg_eval_width = 1024


def _demo(config):
  config_lib.cpu_demo(config, source="scenes", image_size=32, total_steps=1000, eval_every=500)
  config.model.variant = "mu/4"
  config.data.seg_eval_width = 0
  config.data.seg_scale_range = (0.75, 1.5)
  config.head = config_lib.head_config("segmentation")
  # 9 classes; a small neck and head from the stride-4 tokens: 16 x 16 down to 2 x 2
  set_fields(config.head, num_classes=9, neck_channels=64, neck_strides=(2, 4, 8, 16), head_channels=64, dropout=0.0)


def get_config(arg: str | None = None):
  if arg not in (None, "", "swinv2", "demo"):
    raise ConfigError(f"configs/finetune_ade20k.py: unknown variant {arg!r}; known: swinv2, demo")
  config = config_lib.base_config("vit", task="segmentation")
  _swinv2(config) if arg == "swinv2" else _vit_h(config)

  # data: ADEChallengeData2016, short side to crop * U(0.5, 2.0), random crop, flip; all 2000 validation images
  set_fields(
    config.data,
    source="ade20k:/data/ADEChallengeData2016",
    train_split="train",
    eval_split="validation",
    seg_scale_range=(0.5, 2.0),
    eval_examples=-1,
  )
  config.data.augment.flip = True
  # optimiser: AdamW b1 0.9 b2 0.999, lr 1e-4, wd 0.05, layer decay 0.9, 1500 warmup steps, cosine to 0, clip 1.0
  set_fields(
    config.optim,
    lr=1e-4,
    b1=0.9,
    b2=0.999,
    weight_decay=0.05,
    layer_decay=0.9,
    warmup_steps=1500,
    end_lr=0.0,
    clip_norm=1.0,
  )
  # schedule: 160k steps at batch 16, bf16 compute, fsdp
  set_fields(config, global_batch_size=16, total_steps=160_000, strategy="fsdp")
  config.precision.compute_dtype = "bfloat16"
  # cadence
  set_fields(config, log_every=100, eval_every=16_000, checkpoint_every=4_000)
  # neck, head: a simple feature pyramid of 256 channels, UPerNet of 512 (pooling 1, 2, 3, 6), dropout 0.1, 150
  # classes; sliding windows at 2/3 of the 518 window, as mmseg's 341 of 512
  set_fields(
    config.head,
    num_classes=ADE20K_CLASSES,
    neck_channels=256,
    neck_strides=(4, 8, 16, 32),
    head_channels=512,
    ppm_scales=(1, 2, 3, 6),
    dropout=0.1,
    eval_stride=345,
  )

  if arg == "swinv2":
    set_fields(config.optim, lr=6e-5, weight_decay=0.01)
    config.head.eval_stride = 341
  if arg == "demo":
    _demo(config)
  return config
