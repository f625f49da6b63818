"""The rows of the sections a task adds to the config (`TASK_SECTIONS`): a dense task's `head`, Aurora's `loss`
and `data.mim`, the image-text tasks' `eval`."""

from __future__ import annotations

from visionfm_jax.config_lib.domains import (
  ALL_OR_COUNT,
  COUNT,
  FRACTION,
  NON_NEGATIVE,
  NON_NEGATIVE_INT,
  OPEN_FRACTION,
  RATE,
  Domain,
)
from visionfm_jax.config_lib.rows import Field

# config.head of a detection run (tasks/detection.py); the defaults are configs/finetune_coco.py's
DETECTION_HEAD = dict(
  num_classes=Field(80, COUNT, "object classes, no background class (COCO's 80)"),
  levels=Field(
    (8, 16, 32),
    COUNT,
    "nominal strides of the predicting levels (ViT: pyramid steps from the patch "
    "stride; SwinV2: the stages with these strides)",
  ),
  neck_channels=Field(256, COUNT, "width of the feature pyramid"),
  head_channels=Field(256, COUNT, "width of the shared head tower"),
  num_convs=Field(2, NON_NEGATIVE_INT, "3x3 conv + LayerNorm + ReLU blocks in the shared head tower"),
  prior_prob=Field(0.01, OPEN_FRACTION, "initial sigmoid score of every class (RetinaNet's focal-loss prior)"),
  class_weight=Field(2.0, NON_NEGATIVE, "matching cost and loss weight of the focal class term (OneNet)"),
  l1_weight=Field(5.0, NON_NEGATIVE, "matching cost and loss weight of the L1 box term (OneNet)"),
  giou_weight=Field(2.0, NON_NEGATIVE, "matching cost and loss weight of the GIoU box term (OneNet)"),
  focal_alpha=Field(0.25, FRACTION, "the focal loss's weight of positives"),
  focal_gamma=Field(2.0, NON_NEGATIVE, "the focal loss's focusing exponent"),
  top_k=Field(100, COUNT, "detections per image at evaluation (COCO's maxDets)"),
)

# config.head of a segmentation run (tasks/segmentation.py); the defaults are configs/finetune_ade20k.py's
SEGMENTATION_HEAD = dict(
  num_classes=Field(150, COUNT, "classes of the masks (ADE20K's 150; scenes 9, background included)"),
  neck_channels=Field(256, COUNT, "ViT: the simple feature pyramid's width"),
  neck_strides=Field((4, 8, 16, 32), COUNT, "ViT: nominal strides of the pyramid levels (SwinV2: its stages')"),
  head_channels=Field(512, COUNT, "UPerNet's width"),
  ppm_scales=Field((1, 2, 3, 6), COUNT, "UPerNet's pyramid-pooling bins"),
  dropout=Field(0.1, RATE, "before the per-pixel classifier"),
  eval_window=Field(
    0, Domain(0, integer=True, note="0: the training crop"), "sliding-window inference: the window's side in px ..."
  ),
  eval_stride=Field(341, COUNT, "... and its step; a canvas equal to the window is one whole-image pass"),
)

# config.loss of an Aurora run (tasks/aurora.py): the objectives' weights (CoCa's 1.0 and 2.0, and 1.0 for MIM)
AURORA_LOSS = dict(
  mim_weight=Field(1.0, NON_NEGATIVE, "SimMIM's L1 on the masked pixels"),
  contrastive_weight=Field(1.0, NON_NEGATIVE, "the image-text contrastive loss"),
  caption_weight=Field(2.0, NON_NEGATIVE, "the captioning cross-entropy"),
)

# config.data.mim: the masked-image-modelling masks (data/transforms/host.py); SimMIM's setting for SwinV2
MIM = dict(
  mask_patch_size=Field(32, COUNT, "side in px of a masked patch; divides data.image_size"),
  mask_ratio=Field(0.6, OPEN_FRACTION, "the fraction of the patches masked"),
)

# config.eval of the image-text tasks: the retrieval evaluators both run
EVAL = dict(
  retrieval=Field(True, doc="R@1/5/10 on the first data.eval_examples pairs of data.eval_split"),
  retrieval_benchmarks=Field(
    (),
    doc="((name, spec), ...): retrieval with every caption of each image, e.g. "
    "(('coco', 'coco_karpathy:/data/coco'), ('flickr30k', 'flickr30k:/data/flickr30k')); "
    "specs in data/text/caption_sets.py, metrics eval/<name>_retrieval/i2t_r1, ...; "
    "() = none",
  ),
  zeroshot_benchmarks=Field(
    (),
    doc="((name, spec), ...): zero-shot classification on further labelled sets with "
    "OpenAI's names and templates, e.g. (('imagenet_r', 'imagenet_r:/data/imagenet-r'), "
    "('imagenetv2', 'imagenetv2:/data/imagenetv2')); specs of ImageNet's variants in "
    "data/sources/imagenet_variants.py, metrics eval/zeroshot_<name>/top1, ...; () = none",
  ),
  zeroshot_benchmark_templates=Field("imagenet", doc="their prompts: OpenAI's 80; 'imagenet_simple': 8 of them"),
)

# ... and the contrastive task's zero-shot classification (evaluate/zeroshot.py)
ZEROSHOT = dict(
  zeroshot_templates=Field(
    "",
    doc="a text file of prompt templates, one per line with '{}' for the class name; "
    "'' = the zeroshot_classes set's own (OpenAI's 80 for a file of class names or 'data')",
  ),
  zeroshot_classes=Field(
    "imagenet",
    doc="a shipped set (evaluate/zeroshot.py ZEROSHOT_SETS; imagenet: 1000 "
    "names x 80 templates), a text file of class names, 'data' (the zero-shot data's own "
    "names); '' = no zero-shot, or with a zeroshot_source, 'data' (the run fills it: "
    "config_lib/sizing.py)",
  ),
  zeroshot_source=Field("tfds:imagenet2012", doc="labelled images for zero-shot top-1; '' = the eval source"),
  zeroshot_split=Field("validation", doc="of zeroshot_source, or of the eval source; '' = config.data.eval_split"),
  zeroshot_examples=Field(
    -1, ALL_OR_COUNT, "-1: the whole split (ImageNet's 50,000, the protocol of the SwinV2-G paper's 78.4%)"
  ),
  zeroshot_naflex_tokens=Field(
    (),
    COUNT,
    "with config.data.naflex: further token budgets at which zero-shot "
    "also runs at native aspect, metrics eval/zeroshot_<n>tok/top1, ...; () = none",
  ),
)

# task -> {dotted path of a section the task adds: its rows}
TASK_SECTIONS = {
  "contrastive": {"eval": {**EVAL, **ZEROSHOT}},
  "aurora": {"loss": AURORA_LOSS, "data.mim": MIM, "eval": EVAL},
  "detection": {"head": DETECTION_HEAD},
  "segmentation": {"head": SEGMENTATION_HEAD},
}
