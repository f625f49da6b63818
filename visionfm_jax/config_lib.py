"""The base config every model family starts from, and its validation.

Configs are `ml_collections.ConfigDict`s, locked after `get_config` so that a misspelt override
(`--config.optim.lrr=1`) is an error instead of a silently ignored key.
"""

from __future__ import annotations

import ml_collections

from visionfm_jax.errors import ConfigError

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def model_config(name: str, *, image_tower: str = "swinv2") -> ml_collections.ConfigDict:
  """`config.model` of one family: the fields its builder reads (models/<name>.py `build`).

  'clip' nests the image tower's fields (`image_tower`: swinv2 | vit) under `image` and the text tower's under
  `text`; its top-level image_size, scan and remat_policy apply to both towers (models/clip.py).
  """
  common = dict(name=name, num_classes=1000, image_size=224, drop_path=0.0, dropout=0.0, head_bias_init=0.0,
                scan=True, remat_policy="nothing_saveable",
                attention="xla")  # xla | cudnn | auto (jax.nn.dot_product_attention; cuDNN flash attention on GPU)
  if name == "vit":
    family = dict(variant="B/16", pool="cls", layer_norm_eps=1e-6, qkv_bias=True)  # pool: cls | gap
  elif name == "swinv2":
    family = dict(
        variant="T",  # T | S | B | L | H | G (models/swinv2.py SIZES)
        patch_size=4,
        window_size=14,  # every stage; a stage whose map is not larger becomes one unshifted window
        # Windows the weights were trained with, per stage, when they differ (224/w14 -> 640/w40:
        # (14, 14, 14, 7), see swinv2.pretrained_windows); () means the windows themselves.
        pretrained_window_sizes=(),
        layer_norm_eps=1e-5,
        extra_norm_period=-1,  # main-branch LayerNorm every N blocks; -1: the size's default (6 for H and G)
        extra_norm_scope="stage",  # stage | global: count blocks within each stage or across the network
    )
  elif name == "clip":
    if image_tower not in ("swinv2", "vit"):
      raise ConfigError(f"clip image_tower={image_tower!r}: expected swinv2 or vit")
    image = model_config(image_tower)
    for key in ("image_size", "scan", "remat_policy", "num_classes", "head_bias_init"):  # set by CLIP
      del image[key]
    common = {k: common[k] for k in ("name", "image_size", "scan", "remat_policy")}
    family = dict(
        embed_dim=512,  # the joint embedding both towers project to
        logit_scale_init=2.6592600369327779,  # log(1 / 0.07); the task clamps it to [0, log 100] after every update
        image=image,  # the image tower's own fields (drop_path, variant, ...); its pooled features are projected
        text=ml_collections.ConfigDict(dict(
            variant="B",  # pico | mu | B | L | H (models/text.py SIZES; H: width 1024, 24 layers, 16 heads)
            vocab_size=32000,  # must match the tokenizer (pad 0, unk 1, bos 2, eos 3)
            max_len=77,  # tokens per caption, BOS and EOS included
            eos_id=3,  # pooled position: the first eos_id of each row (pool='eos')
            pool="eos",  # eos: EOS features (CLIP) | cls: a learned token appended after the caption (CoCa)
            layer_norm_eps=1e-5,
            attention="xla",  # xla | cudnn | auto (causal)
        )),
    )
  elif name == "aurora":
    encoder = model_config("swinv2")
    for key in ("name", "image_size", "scan", "remat_policy", "num_classes", "head_bias_init"):  # set by Aurora
      del encoder[key]
    text = model_config("clip").text
    text.pool = "cls"
    common = {k: common[k] for k in ("name", "image_size", "scan", "remat_policy")}
    family = dict(
        embed_dim=1024,  # the contrastive embedding both sides project to
        logit_scale_init=2.6592600369327779,  # log(1 / 0.07); clamped to [0, log 100] after every update
        caption_queries=256,  # learned queries of the captioning pooler: the decoder's cross-attention memory
        decoder_depth=12,  # multimodal decoder layers (width, heads and MLP of the text encoder)
        # separate: contrastive + captioning see the clean image, a second encoder pass the masked one (MIM);
        # shared: one masked pass feeds all heads (models/aurora.py)
        mim_view="separate",
        encoder=encoder,  # SwinV2 fields (variant, window_size, drop_path, ...); a mask token is added
        text=text,  # the unimodal causal text encoder (pool='cls'); the decoder shares its width
    )
  else:
    raise ConfigError(f"model {name!r}: known families are vit, swinv2, clip, aurora")
  return ml_collections.ConfigDict(dict(common, **family))


def base_config(model: str = "vit") -> ml_collections.ConfigDict:
  """Defaults shared by every recipe; `model` picks the family whose `config.model` fields it carries."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "classification"
  c.total_steps = 1000
  c.global_batch_size = 256
  c.grad_accum_steps = 1  # the global batch is split into this many micro-batches, scanned in one step
  c.strategy = "fsdp"  # ddp | zero1 | zero2 | zero3 (= fsdp)
  # Mesh axis sizes; -1 takes the devices left. data x fsdp devices share the batch; the ZeRO strategies
  # shard state over `fsdp` (put it within a node); `tensor` shards matmul widths (Megatron style).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.model = model_config(model)

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.05,
      # Regexes over '/'-joined param paths that get no weight decay; 1-D params (biases, norms) never do.
      # SwinV2's position-bias MLP ('cpb_mlp') and logit scales do not decay either (the official recipe).
      no_decay=("pos_embed", "cls_token", "cpb_mlp"),
      warmup_steps=1000,
      end_lr=0.0,
      clip_norm=1.0,  # global norm; 0 disables
      # Fine-tuning (optim.py): layer-wise lr decay (lr of layer i: lr * layer_decay^(L + 1 - i); 1.0 = off,
      # ~0.65 for ViT-B), lr multipliers ((regex, multiplier), ...; the first matching rule wins) and frozen
      # params (regexes: no update, no weight decay, no Adam moments), all over '/'-joined param paths.
      layer_decay=1.0,
      lr_mults=(),
      freeze=(),
  ))

  c.precision = ml_collections.ConfigDict(dict(
      compute_dtype="bfloat16",  # float32 | bfloat16 | float16 (dynamic loss scaling)
      loss_scale_init=2.0**15,
      loss_scale_period=2000,  # good steps before the scale doubles
      loss_scale_min=1.0,
  ))

  c.data = ml_collections.ConfigDict(dict(
      # shapes | tfds:<name>[:<version>][:<split>] | arrayrecord:<glob, '{split}' = the split> (tools.prepare_data)
      # | dense tasks: scenes | ade20k:<ADEChallengeData2016 dir> | coco:<dir with train2017/ val2017/ annotations/>
      source="shapes",
      eval_source="",  # the same forms; '' = source (with eval_split)
      tokenizer="",  # SentencePiece model for captions (tools.train_tokenizer); '' = the shipped shapes one
      data_dir="",  # TFDS data dir; '' means $TFDS_DATA_DIR, else ~/tensorflow_datasets
      train_split="train",
      eval_split="validation",
      image_size=224,
      num_workers=4,  # grain worker processes per host; 0 reads in the main process
      prefetch=2,  # batches buffered per worker
      shuffle=True,
      eval_examples=-1,  # -1: the whole eval split
      max_skipped_fraction=0.02,  # stop when more of the training records read are corrupt/undecodable
      skip_check_after=1000,  # ... once this many records have been read (per process)
      shapes_train_size=1_000_000,
      shapes_eval_size=10_000,
      shapes_captions="full",  # full: size, colour, shape, position, background | short: size, colour, shape
      # Dense tasks (data/dense.py). 'scenes' (split sizes: shapes_train_size / shapes_eval_size) paints
      # 1..scenes_max_objects shapes per image.
      scenes_max_objects=4,
      seg_scale_range=(0.5, 2.0),  # segmentation training: short side to image_size * r, r ~ U(range); crop
      seg_eval_width=0,  # segmentation eval canvas: image_size high, this wide (0: image_size)
      det_scale_range=(0.5, 1.0),  # detection training: long side to image_size * r, r ~ U(range); r > 1 crops
      max_boxes=100,  # detection: boxes per image in a batch; extra objects are dropped and counted
      mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225),
      augment=ml_collections.ConfigDict(dict(
          random_resized_crop=True,
          crop_scale=(0.08, 1.0),
          crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
          flip=True,
          color_jitter=0.0,  # brightness/contrast/saturation strength; 0 disables
          randaugment_ops=0,  # RandAugment N (operations per image); 0 disables
          randaugment_magnitude=9,  # RandAugment M, 0..30 (M / 10 of AutoAugment's maximum strength)
          # RandAugment operations to leave out (data/randaugment.py OPS), e.g. GEOMETRIC_OPS for captions
          # that name positions
          randaugment_exclude=(),
          mixup_alpha=0.0,  # image-text Mixup (contrastive task): lam ~ Beta(alpha, alpha); 0 disables
      )),
  ))

  c.init_from = ""  # checkpoint dir (tools.import_hf or a workdir) whose params initialise a fresh run
  c.init_from_skip = ""  # regex of (model) param paths to keep freshly initialised (e.g. 'head' for new classes)
  c.init_from_subtree = ""  # the checkpoint's params to take, e.g. 'image' (CLIP's image tower); '' = all
  c.init_from_prefix = ""  # where they go in the model, e.g. 'backbone'; params outside it stay fresh

  # Frozen-backbone evaluators (evaluate/probe.py; classification runs, and tools.probe on any run's backbone).
  c.probe = ml_collections.ConfigDict(dict(
      knn=False,  # eval/knn/top1: weighted k-NN on the pooled features (DINO)
      linear=False,  # eval/linear_probe/top1: softmax regression on the standardised features (L-BFGS)
      source="",  # labelled source of both splits; '' = config.data.source (train), the eval source (eval)
      train_split="",  # '' = config.data.train_split; the eval split is config.data.eval_split
      train_examples=10_000,  # the first N train records fit the probes; -1: the whole split
      eval_examples=-1,  # the first N eval records score them; -1: config.data.eval_examples
      knn_k=20,
      knn_temperature=0.07,
      linear_steps=100,  # L-BFGS iterations
      linear_l2=1e-4,  # penalty l2 / 2 * |W|^2 on the probe's weights
  ))

  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.progress_bar = True
  return c


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks a config for consistency; raises ConfigError naming the field."""
  if config.strategy not in STRATEGIES:
    raise ConfigError(f"config.strategy={config.strategy!r}: expected one of {STRATEGIES}")
  if config.precision.compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"config.precision.compute_dtype={config.precision.compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
  if config.model.remat_policy not in REMAT_POLICIES:
    raise ConfigError(f"config.model.remat_policy={config.model.remat_policy!r}: expected one of {REMAT_POLICIES}")
  for field in ("total_steps", "global_batch_size", "grad_accum_steps", "log_every", "eval_every", "checkpoint_every"):
    if int(config[field]) <= 0:
      raise ConfigError(f"config.{field}={config[field]}: must be positive")
  if config.optim.warmup_steps > config.total_steps:
    raise ConfigError(f"config.optim.warmup_steps={config.optim.warmup_steps} exceeds config.total_steps={config.total_steps}")
  if not 0 <= float(config.data.max_skipped_fraction) <= 1:
    raise ConfigError(f"config.data.max_skipped_fraction={config.data.max_skipped_fraction}: expected a fraction "
                      f"in [0, 1]")
  if config.global_batch_size % config.grad_accum_steps:
    raise ConfigError(f"config.global_batch_size={config.global_batch_size} is not divisible by "
                      f"config.grad_accum_steps={config.grad_accum_steps}")
  if num_devices is not None:
    from visionfm_jax.parallel import mesh_shape  # pylint: disable=g-import-not-at-top
    shape = mesh_shape(config.mesh, num_devices)
    data_parallel = shape["data"] * shape["fsdp"]
    micro = config.global_batch_size // config.grad_accum_steps
    if micro % data_parallel:
      raise ConfigError(
          f"config.global_batch_size={config.global_batch_size} / config.grad_accum_steps={config.grad_accum_steps} "
          f"= {micro} examples per micro-batch do not divide over the {data_parallel} data-parallel devices "
          f"(mesh {shape})")
