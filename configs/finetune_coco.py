r"""COCO object detection: fine-tunes a pretrained backbone as a OneNet-style dense set predictor
(tasks/detection.py: one-to-one Hungarian matching, focal + L1 + GIoU, no NMS) on ViTDet's simple feature pyramid.

The default follows ViTDet's ViT-H recipe (Li et al. 2022; detectron2's mask_rcnn_vitdet_h_75ep config) with
our detector head in place of Mask R-CNN:

  | backbone     | ViT-H/14 from a ViT-Huge-Pretrain workdir (configs/vit_huge.py), pos_embed resized 16x16 -> 72x72 |
  |              | by init_from; drop_path 0.5 (ViTDet's value for H); global attention in every block           |
  | neck, head   | simple feature pyramid at strides 7, 14, 28 (nominal 8, 16, 32), 256 channels; a shared       |
  |              | 2-conv tower predicting 80 sigmoid classes and one box per location                           |
  | data         | COCO train2017 / val2017, 1008 px (72 x 72 patches of 14; ViTDet: 1024 px at patch 16),       |
  |              | large-scale jitter: long side to 1008 * U(0.1, 2.0) then a 1008 x 1008 crop / pad, flip     |
  | optimiser    | AdamW b1 0.9 b2 0.999, lr 1e-4, wd 0.1, layer-wise lr decay 0.9 over the 32 blocks, 250 warmup |
  |              | steps, cosine to 0 (ViTDet: step decay), clip 1.0                                            |
  | schedule     | 90k steps at batch 64 (~50 epochs of train2017's 117k images; ViTDet trains H for 75 epochs,  |
  |              | ~138k steps), bf16 compute, fp32 params, fsdp                                                |
  | matching     | cost = loss weights: focal (alpha 0.25, gamma 2) x 2, L1 x 5, GIoU x 2 (OneNet); top 100 kept   |

  python -m visionfm_jax.main --config=configs/finetune_coco.py --workdir=/ckpt/coco_vith \
      --config.data.source=coco:/data/coco --config.init_from=/ckpt/vit_huge

`coco:<root>` needs <root>/train2017/, val2017/ and annotations/instances_{train,val}2017.json
(docs/data_preparation.md). `eval/det/map` is COCO box AP@[.5:.95] on val2017 (pycocotools); ViTDet-H (Cascade Mask
R-CNN, MAE ImageNet-1K pretraining) reports about 60 box AP; we have not run this recipe and expect less with this head.

Variant `swinv2`: the same detector on a SwinV2-B FPN over the stages of strides 8, 16, 32 (LayerNorm on each
stage output), 1024 px, window 16 with the position bias carried over from a 224 px / window-14
classification run (configs/swinv2_cls.py:B; `pretrained_window_sizes` 14, 14, 14, 7, which init_from checks
against its config.json), drop_path 0.5, layer decay 0.9 over its 24 blocks; the rest as above. Another size:
--config.model.variant=L; or G from the SwinV2-G CLIP run's image tower (--config.init_from_subtree=image; its
224 px windows are the same).

  python -m visionfm_jax.main --config=configs/finetune_coco.py:swinv2 --workdir=/ckpt/coco_swinv2 \
      --config.data.source=coco:/data/coco --config.init_from=/ckpt/swinv2_b_224

Variant `demo`: from scratch on the embedded 'scenes' (8 shape kinds, 1-4 per image, 64 px), a small ViT
(mu/8: width 96, 4 blocks) with the pyramid at strides 8, 16, 32, on a laptop CPU:

  python -m visionfm_jax.main --config=configs/finetune_coco.py:demo --workdir=/tmp/det_demo \
      --config.progress_bar=False

Expected: `eval/det/map` about 0.220 / 0.357 / 0.408 at steps 400 / 800 / 1200 (ap50 0.398 / 0.552 / 0.602; ap75 0.469
and ar100 0.667 at the end) on the first 500 validation scenes; train/loss 3.63 (step 25) -> 1.24. Trivial predictors
scored by the same evaluate.detection.coco_map on those 500 images: one whole-image box per class at a constant score:
map 0.000 (no object covers > 25% of the image, so no IoU reaches 0.5); 100 random object-sized boxes per image with
random classes and scores: map 0.0007, ap50 0.004. Its time on 2 CPU cores: BENCHMARKS.md, "Time outside the
step and trackers (CPU demo)".
"""

from visionfm_jax import config_lib
from visionfm_jax.config_lib import set_fields
from visionfm_jax.errors import ConfigError

COCO_CLASSES = 80


def _vit_h(config):
  config_lib.finetune_backbone(
    config, "vit", init_from="/ckpt/vit_huge", variant="H/14", image_size=1008, drop_path=0.5
  )


def _swinv2(config):
  config_lib.finetune_backbone(
    config, "swinv2", init_from="/ckpt/swinv2_b_224", variant="B", image_size=1024, drop_path=0.5, window_size=16
  )  # maps 256, 128, 64, 32
  config.model.pretrained_window_sizes = (14, 14, 14, 7)  # the 224 px / window-14 run's (maps 56, 28, 14, 7)


def get_config(arg: str | None = None):
  if arg not in (None, "", "swinv2", "demo"):
    raise ConfigError(f"configs/finetune_coco.py: unknown variant {arg!r}; known: swinv2, demo")
  config = config_lib.base_config("vit", task="detection")
  _swinv2(config) if arg == "swinv2" else _vit_h(config)

  # data: COCO train2017 / val2017, ViTDet's large-scale jitter (long side to size * U(0.1, 2.0)), flip
  set_fields(
    config.data,
    source="coco:/data/coco",
    train_split="train",
    eval_split="validation",
    det_scale_range=(0.1, 2.0),
    max_boxes=100,
    eval_examples=-1,
  )
  config.data.augment.flip = True
  # optimiser: AdamW b1 0.9 b2 0.999, lr 1e-4, wd 0.1, layer decay 0.9, 250 warmup steps, cosine to 0, clip 1.0
  set_fields(
    config.optim,
    lr=1e-4,
    b1=0.9,
    b2=0.999,
    weight_decay=0.1,
    layer_decay=0.9,
    warmup_steps=250,
    end_lr=0.0,
    clip_norm=1.0,
  )
  # schedule: 90k steps at batch 64, bf16 compute, fsdp
  set_fields(config, global_batch_size=64, total_steps=90_000, strategy="fsdp")
  config.precision.compute_dtype = "bfloat16"
  # cadence
  set_fields(config, log_every=100, eval_every=10_000, checkpoint_every=2_000)
  # neck, head: 80 classes, levels at strides 8, 16, 32 of 256 channels, a 2-conv tower from the focal-loss prior;
  # matching cost = loss weights (OneNet: focal x 2 with alpha 0.25, gamma 2; L1 x 5; GIoU x 2); 100 kept per image
  set_fields(
    config.head,
    num_classes=COCO_CLASSES,
    levels=(8, 16, 32),
    neck_channels=256,
    head_channels=256,
    num_convs=2,
    prior_prob=0.01,
    class_weight=2.0,
    l1_weight=5.0,
    giou_weight=2.0,
    focal_alpha=0.25,
    focal_gamma=2.0,
    top_k=100,
  )

  if arg == "demo":
    config_lib.cpu_demo(config, source="scenes", image_size=64, total_steps=1200, eval_every=400)
    config.model.variant = "mu/8"
    config.data.det_scale_range = (0.75, 1.25)
    config.data.max_boxes = 8
    set_fields(config.head, num_classes=8, neck_channels=64, head_channels=64)
  return config
