"""The base config every model family starts from (one small function per section), the helpers config files
write recipes with (`set_fields`, `cpu_demo`), loading a config file, the fields' domains and the resume rules.

Configs are `ml_collections.ConfigDict`s, locked after `get_config` so that a misspelt override
(`--config.optim.lrr=1`) is an error instead of a silently ignored key. Every field with a domain (a numeric
range, or a set of names) has it in one table, `DOMAINS`, which `check` checks; every numeric domain is finite
(inf is never a value). This module is data: it imports nothing of the package but its errors. The checks
between fields live with their owners (data/checks.py, parallel/checks.py, training/optim.py), and
training/checks.py `validate` runs them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re

import ml_collections

from visionfm_jax.errors import ConfigError

# The ZeRO stages 0 (ddp) to 3, each sharding more of the train state (parallel/sharding.py), and other names
# for them: `fsdp` is zero3.
ZERO_STAGES = ("ddp", "zero1", "zero2", "zero3")
STRATEGY_ALIASES = {"fsdp": "zero3"}
STRATEGIES = ZERO_STAGES + tuple(STRATEGY_ALIASES)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Names of jax.checkpoint_policies (models/layers.py maps them to the policies) plus 'none' (no remat); here,
# so that config_lib itself needs no jax.
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07 (2.659260); Aurora's too
# What a composite model (clip, aurora) sets for its towers (models/towers.py): its own value of these fields,
# once for all towers, and no classification head. A tower's config has neither.
TOWER_SHARED_FIELDS = ("image_size", "scan", "remat_policy")
TOWER_HEADLESS = {"num_classes": 0, "head_bias_init": 0.0}
# RandAugment's largest magnitude M (data/randaugment.py): here, without Pillow and grain, for DOMAINS.
RANDAUGMENT_MAX_MAGNITUDE = 30


def model_config(name: str, *, image_tower: str = "swinv2") -> ml_collections.ConfigDict:
  """`config.model` of one family: the fields its builder reads (models/<name>.py `build`).

  'clip' nests the image tower's fields (`image_tower`: swinv2 | vit) under `image` and the text tower's under
  `text`; its top-level image_size, scan and remat_policy apply to both towers (models/clip.py).
  """
  common = dict(name=name, num_classes=1000, image_size=224, drop_path=0.0, dropout=0.0, head_bias_init=0.0,
                scan=True, remat_policy="nothing_saveable",
                # auto (cuDNN on GPUs in bf16/fp16, else softmax) | softmax (einsums, hand-written backward) |
                # cudnn (cuDNN flash attention, GPU) | jax (jax.nn.dot_product_attention choosing); layers.ATTENTION
                attention="auto")
  if name == "vit":
    family = dict(variant="B/16", pool="cls", layer_norm_eps=1e-6, qkv_bias=True,  # pool: cls | gap
                  # CLIP's image tower: a LayerNorm before the blocks, a bias-free patch embedding; the MLP
                  # activation: gelu (exact) | quick_gelu (OpenAI's CLIP) | gelu_pytorch_tanh (a GPU candidate)
                  pre_norm=False, patch_bias=True, act="gelu")
  elif name == "swinv2":
    family = dict(
        variant="T",  # T | S | B | L | H | G (models/swinv2.py SIZES)
        patch_size=4,
        window_size=14,  # every stage; a stage whose map is not larger becomes one unshifted window
        # Windows the weights were trained with, per stage, when they differ (224/w14 -> 640/w40:
        # (14, 14, 14, 7), see swinv2.pretrained_windows); () means the init_from checkpoint's (its model
        # fields, training/init_from.py), else the windows themselves.
        pretrained_window_sizes=(),
        layer_norm_eps=1e-5,
        extra_norm_period=-1,  # main-branch LayerNorm every N blocks; 0: none; -1: the size's default (6 for H and G)
        extra_norm_scope="stage",  # stage | global: count blocks within each stage or across the network
    )
  elif name == "clip":
    if image_tower not in ("swinv2", "vit"):
      raise ConfigError(f"clip image_tower={image_tower!r}: expected swinv2 or vit")
    image = _tower_config(image_tower)
    family = dict(
        embed_dim=512,  # the joint embedding both towers project to
        logit_scale_init=LOGIT_SCALE_INIT,  # log(1 / 0.07); the task clamps it to [0, log 100] after every update
        image=image,  # the image tower's own fields (drop_path, variant, ...); its pooled features are projected
        text=ml_collections.ConfigDict(dict(
            variant="B",  # a key of models/text.py SIZES (B: width 512, 12 layers, 8 heads)
            vocab_size=32000,  # at least the tokenizer's pieces (pad 0, unk 1, bos 2, eos 3)
            max_len=77,  # tokens per caption, BOS and EOS included
            eos_id=3,  # pooled position: the first eos_id of each row (pool='eos')
            pool="eos",  # eos: EOS features (CLIP) | cls: a learned token appended after the caption (CoCa)
            layer_norm_eps=1e-5,
            attention="auto",  # auto | softmax | cudnn | jax (causal)
            act="gelu",  # the MLP activation: gelu (exact) | quick_gelu (OpenAI's CLIP)
        )),
    )
  elif name == "aurora":
    encoder = _tower_config("swinv2", "name")  # always a SwinV2
    text = model_config("clip").text
    text.pool = "cls"
    family = dict(
        embed_dim=1024,  # the contrastive embedding both sides project to
        logit_scale_init=LOGIT_SCALE_INIT,  # log(1 / 0.07); clamped to [0, log 100] after every update
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
  if name in ("clip", "aurora"):
    common = {k: common[k] for k in ("name", *TOWER_SHARED_FIELDS)}  # the others are each tower's own
  return ml_collections.ConfigDict(dict(common, **family))


def _tower_config(name: str, *also: str) -> ml_collections.ConfigDict:
  """`model_config(name)` without the fields the composite model sets for it (TOWER_SHARED_FIELDS,
  TOWER_HEADLESS) and `also`."""
  tower = model_config(name)
  for key in (*TOWER_SHARED_FIELDS, *TOWER_HEADLESS, *also):
    del tower[key]
  return tower


def base_config(model: str = "vit") -> ml_collections.ConfigDict:
  """Defaults shared by every recipe, one section after another; `model` picks the family whose
  `config.model` fields it carries."""
  return ml_collections.ConfigDict(dict(
      **run_fields(),
      **parallel_fields(),
      model=model_config(model),
      optim=optim_config(),
      precision=precision_config(),
      health=health_config(),
      data=data_config(),
      **init_from_fields(),
      probe=probe_config(),
      **loop_fields(),
      **tracking_fields(),
      resume=resume_config(),
  ))


def run_fields() -> dict:
  """What is trained, on how many examples a step, for how many steps."""
  return dict(
      seed=0,
      task="classification",
      total_steps=1000,
      global_batch_size=256,
      grad_accum_steps=1,  # the global batch is split into this many micro-batches, scanned in one step
      # With micro-batches: each device sums its own gradients over them, unreduced, and the step reduces them
      # once, after the last, instead of once per micro-batch; costs two fp32 copies of the params per device (the
      # sum and the micro-batch's). ddp / zero1 / zero2 with mesh.tensor 1 (training/train.py `per_device`).
      accumulate_unreduced=False,
  )


def parallel_fields() -> dict:
  """The ZeRO strategy and the device mesh."""
  return dict(
      strategy="fsdp",  # ddp | zero1 | zero2 | zero3 (= fsdp)
      # Mesh axis sizes; -1 takes the devices left. data x fsdp devices share the batch; the ZeRO strategies
      # shard state over `fsdp` (put it within a node); `tensor` shards matmul widths (Megatron style).
      mesh=ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)),
  )


def optim_config() -> ml_collections.ConfigDict:
  """`config.optim`: AdamW with linear warmup and cosine decay to end_lr, plus the fine-tuning param rules."""
  return ml_collections.ConfigDict(dict(
      lr=1e-3,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.05,
      # Only kernels decay (optim.decay_mask_fn): biases, norms, embeddings, tokens and logit scales never do.
      # Regexes over '/'-joined param paths whose kernels do not decay either: SwinV2's position-bias MLP
      # ('cpb_mlp'), as the official recipe has it.
      no_decay=("cpb_mlp",),
      warmup_steps=1000,
      end_lr=0.0,
      clip_norm=1.0,  # global norm; 0 disables
      # Fine-tuning (optim.py): layer-wise lr decay (lr of layer i: lr * layer_decay^(L + 1 - i); 1.0 = off,
      # ~0.65 for ViT-B), lr multipliers ((regex, multiplier), ...; the first matching rule wins) and frozen
      # params (regexes: no update, no weight decay, no Adam moments), all over '/'-joined param paths.
      layer_decay=1.0,
      lr_mults=(),
      freeze=(),
      # An EMA of the params, ema = d * ema + (1 - d) * params after every applied update (training/ema.py),
      # evaluated beside them (eval/ema/...); its horizon is 1 / (1 - d) steps (NeMo's CLIP: 0.9999). 0: none.
      ema_decay=0.0,
  ))


def precision_config() -> ml_collections.ConfigDict:
  """`config.precision`: the compute dtype and fp16's dynamic loss scaling (params stay fp32)."""
  return ml_collections.ConfigDict(dict(
      compute_dtype="bfloat16",  # float32 | bfloat16 | float16 (dynamic loss scaling)
      loss_scale_init=2.0**15,
      loss_scale_period=2000,  # good steps before the scale doubles
      loss_scale_min=1.0,
      max_consecutive_skips=100,  # overflowing steps in a row at loss_scale_min before the run stops
  ))


def health_config() -> ml_collections.ConfigDict:
  """`config.health`: loss-spike skipping in the step and rollback past bad data (training/health.py)."""
  return ml_collections.ConfigDict(dict(
      enabled=False,
      # a spike: loss or gradient norm above the mean + z standard deviations of the last `window` applied
      # steps, tested once `warmup` steps have been applied; its update is not applied (MaxText's 128 and 6.0)
      window=128,
      z=6.0,
      warmup=128,
      # what skipping does not absorb sets off a rollback: burst_skips skips within burst_window steps (0: never),
      # the window's mean loss above rise x its lowest (0: never), a non-finite loss, the fp16 minimum-scale stall
      burst_skips=5,
      burst_window=128,
      rise=1.5,
      rollback=True,  # False: those stop the run instead, naming the last good checkpoint
      restore_before=100,  # restore the newest checkpoint at least this many steps before the trigger
      skip_margin=100,  # and skip the data read since it plus this many batches
      max_rollbacks=3,  # more rollbacks than this within max_rollbacks_window steps stop the run
      max_rollbacks_window=20_000,
  ))


def data_config() -> ml_collections.ConfigDict:
  """`config.data`: sources and splits, the input pipeline, the embedded sets and the augmentations."""
  return ml_collections.ConfigDict(dict(
      # shapes | shapes:images (uncaptioned) | tfds:<name>[:<version>][:<split>]
      # | arrayrecord:<glob, '{split}' = the split> (tools.prepare_data)
      # | wds:<glob of indexed img2dataset tars>[;min_similarity=X;max_pwatermark=X;max_punsafe=X] (data/wds.py)
      # | dense tasks: scenes | ade20k:<ADEChallengeData2016 dir> | coco:<dir with train2017/ val2017/ annotations/>
      source="shapes",
      # ((spec, weight), ...): train on a weighted mixture of sources instead (data/mixture.py; source must be
      # ''), e.g. (("arrayrecord:/d/pairs/{split}-*", 3.0), ("shapes:images", 1.0)); () = source alone
      mixture=(),
      eval_source="",  # the same forms; '' = source (with eval_split), else the mixture's first entry
      tokenizer="",  # SentencePiece model for captions (tools.train_tokenizer); '' = the shipped shapes one
      data_dir="",  # TFDS data dir; '' means $TFDS_DATA_DIR, else ~/tensorflow_datasets
      train_split="train",
      eval_split="validation",
      image_size=224,
      # grain worker processes per training process (one per node under launch/slurm.sbatch); 0 reads in the main
      # process; -1: one per CPU the process may run on, less one for the trainer, at most 32 (data/pipeline.py)
      num_workers=-1,
      prefetch=2,  # batches buffered per worker
      device_prefetch=2,  # batches copied to the devices ahead of the step (training/prefetch.py); 0: none
      shuffle=True,
      eval_examples=-1,  # -1: the whole eval split
      # evaluation's resize + central crop (data/transforms.py EvalTransform): 'inception' = shorter side to
      # size / 0.875, bilinear (ImageNet classification); 'clip' = shorter side to size, bicubic (CLIP zero-shot)
      eval_preprocess="inception",
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
      augment=augment_config(),
  ))


def augment_config() -> ml_collections.ConfigDict:
  """`config.data.augment`: training-time augmentations (data/transforms.py, data/randaugment.py)."""
  return ml_collections.ConfigDict(dict(
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
  ))


def init_from_fields() -> dict:
  """Initialising a fresh run from another run's (or an imported) checkpoint."""
  return dict(
      init_from="",  # checkpoint dir (tools.import_hf or a workdir) whose params initialise a fresh run
      init_from_skip="",  # regex of (model) param paths to keep freshly initialised (e.g. 'head' for new classes)
      init_from_subtree="",  # the checkpoint's params to take, e.g. 'image' (CLIP's image tower); '' = all
      init_from_prefix="",  # where they go in the model, e.g. 'backbone'; params outside it stay fresh
      init_from_ema=False,  # take a training checkpoint's EMA of the params (config.optim.ema_decay) instead
  )


def probe_config() -> ml_collections.ConfigDict:
  """`config.probe`: frozen-backbone evaluators (evaluate/probe.py; classification runs, and tools.probe on any
  run's backbone)."""
  return ml_collections.ConfigDict(dict(
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


def eval_config(**family_fields) -> ml_collections.ConfigDict:
  """`config.eval` of the image-text families (contrastive, aurora): the retrieval evaluators both run, plus a
  family's own fields (CLIP's zero-shot)."""
  return ml_collections.ConfigDict(dict(
      retrieval=True,  # R@1/5/10 on the first data.eval_examples pairs of data.eval_split
      # ((name, spec), ...): retrieval with every caption of each image, e.g. (('coco', 'coco_karpathy:/data/coco'),
      # ('flickr30k', 'flickr30k:/data/flickr30k')); specs in data/caption_sets.py, metrics
      # eval/<name>_retrieval/i2t_r1, ...; () = none
      retrieval_benchmarks=(),
      # ((name, spec), ...): zero-shot classification on further labelled sets with OpenAI's names and templates,
      # e.g. (('imagenet_r', 'imagenet_r:/data/imagenet-r'), ('imagenetv2', 'imagenetv2:/data/imagenetv2')); specs
      # of ImageNet's variants in data/imagenet_variants.py, metrics eval/zeroshot_<name>/top1, ...; () = none
      zeroshot_benchmarks=(),
      zeroshot_benchmark_templates="imagenet",  # their prompts: OpenAI's 80; 'imagenet_simple': 8 of them
      **family_fields,
  ))


def loop_fields() -> dict:
  """The loop's cadence (logging, evaluation, checkpoints), its watchdog and its console."""
  return dict(
      log_every=50,
      eval_every=1000,
      checkpoint_every=1000,
      keep_checkpoints=3,
      # Besides the newest keep_checkpoints, keep every checkpoint whose step is a multiple of this for good (a
      # history to roll back to and to analyse; a multiple of checkpoint_every). 0: none. A resume that changes it
      # needs resume.allow_changes: the kept checkpoints off the new period would be deleted.
      checkpoint_keep_period=0,
      # A process that waits longer than this in one train step, checkpoint save or evaluation (a collective
      # that another process abandoned) dumps its threads' stacks and exits so the job can be requeued; 0: never.
      step_timeout_s=1800.0,
      # In a job of several processes, one whose peer has sent no heartbeat for this long (killed outright, its
      # node lost) prints an error line naming it and exits so the job can be requeued (training/faults.py
      # PeerWatch); 0: never (JAX's own heartbeat then aborts the job after 100 s, naming no one).
      peer_timeout_s=30.0,
      # A run of the same SLURM job (a requeue) waits this long for its predecessor to release the workdir's
      # lock (training/workdir.py); any other holder is refused at once.
      lock_wait_s=60.0,
      # JAX's persistent cache of compiled programs (training/compile_cache.py): a requeued or resumed run loads
      # its programs instead of compiling them. '': JAX_COMPILATION_CACHE_DIR when set, else
      # <workdir>/compile_cache; 'off': none; else a folder, which runs may share.
      compile_cache="",
      progress_bar=True,
  )


TRACKERS = ("tensorboard", "wandb", "mlflow")


def tracking_fields() -> dict:
  """Where the metrics go besides metrics.jsonl, which is always written (training/trackers.py)."""
  return dict(
      # Comma-separated trackers: tensorboard, wandb, mlflow (each but tensorboard an extra: pip install -e
      # '.[wandb]'); 'none': metrics.jsonl alone.
      report_to="tensorboard",
      # W&B's project, entity, run name ('' = the workdir's name) and tags; WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME
      # and WANDB_TAGS win, WANDB_MODE=offline keeps the run on disk for `wandb sync`.
      wandb=ml_collections.ConfigDict(dict(project="visionfm_jax", entity="", name="", tags=())),
      # The MLflow experiment; the tracking URI is MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db.
      mlflow=ml_collections.ConfigDict(dict(experiment="visionfm_jax")),
  )


def report_to(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.report_to as tracker names (() for 'none'); ConfigError naming an unknown one."""
  names = tuple(dict.fromkeys(name.strip() for name in config.report_to.split(",") if name.strip()))
  if names == ("none",):
    return ()
  unknown = [name for name in names if name not in TRACKERS]
  if unknown or not names:
    raise ConfigError(f"config.report_to={config.report_to!r}: expected a comma-separated list of "
                      f"{', '.join(TRACKERS)}, or 'none'")
  return names


def resume_config() -> ml_collections.ConfigDict:
  """`config.resume`: which changes a resumed run accepts (RESUME_RULES)."""
  return ml_collections.ConfigDict(dict(
      # Comma-separated dotted fields ('total_steps,optim.lr') whose change from the checkpoint's config a resume
      # accepts; other schedule and optimiser changes stop it, naming them.
      allow_changes="",
  ))


def set_fields(node: ml_collections.ConfigDict, **values) -> None:
  """Sets fields that `node` already has, one keyword each, so that a recipe's section reads as one row of its
  table; ConfigError naming a field `node` lacks (a typo would otherwise add a key nothing reads)."""
  unknown = [key for key in values if key not in node]
  if unknown:
    raise ConfigError(f"set_fields: no field {', '.join(map(repr, unknown))} here; its fields: {', '.join(node)}")
  for key, value in values.items():
    node[key] = value


def set_paths(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Sets dotted fields in place and returns `config`: set_paths(config, {"optim.lr": 1e-3})."""
  for path, value in values.items():
    node = config
    *parents, leaf = path.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


# ---------------------------------------------------------------------------------------- CPU demos

# Per embedded set: (global batch, eval examples). Scenes feed dense heads that cost more per image.
DEMO_DATA = {"shapes": (64, 1000), "scenes": (32, 500)}


def cpu_demo(config: ml_collections.ConfigDict, *, image_size: int, total_steps: int, eval_every: int,
             source: str = "shapes", lr: float = 1e-3, warmup_steps: int = 100) -> None:
  """Turns a recipe into a CPU demo in place: what every demo shares; the caller then picks its tiny model.

  Every demo trains from scratch (no init_from) on an embedded set (`source`: shapes, or scenes for the dense
  tasks) at `image_size` px, rendered in the main process (cheaper than a worker for such small images), with
  the batch and eval examples of DEMO_DATA in one micro-batch; fp32 compute, ddp, no remat, no stochastic
  depth; no health guard (`config.health`: a demo runs minutes, watched); AdamW with weight decay 0.05,
  global-norm clip 1.0, no layer-wise decay, `warmup_steps` of linear warmup to `lr`, cosine to 0
  at `total_steps`; a log line every 50 steps and an evaluation and a checkpoint every `eval_every` (no kept
  history beyond the newest checkpoints). The
  procedural shapes never repeat, so a demo on them needs no crop, colour jitter, RandAugment or Mixup to
  generalise (flips stay as the recipe has them).
  """
  if source not in DEMO_DATA:
    raise ConfigError(f"cpu_demo source={source!r}: expected one of {list(DEMO_DATA)}")
  config.model.image_size = config.data.image_size = image_size
  for node in (config.model, *(v for v in config.model.values() if isinstance(v, ml_collections.ConfigDict))):
    if "drop_path" in node:  # the backbone's, at the top (vit, swinv2) or in its tower (clip, aurora)
      node.drop_path = 0.0
  config.model.remat_policy = "none"

  config.data.source = source
  config.data.num_workers = 0
  config.global_batch_size, config.data.eval_examples = DEMO_DATA[source]
  config.grad_accum_steps = 1
  if source == "shapes":
    set_fields(config.data.augment, random_resized_crop=False, color_jitter=0.0, randaugment_ops=0, mixup_alpha=0.0)
  config.init_from = config.init_from_prefix = ""

  config.total_steps = total_steps
  set_fields(config.optim, lr=lr, warmup_steps=warmup_steps, end_lr=0.0, weight_decay=0.05, layer_decay=1.0,
             clip_norm=1.0)
  config.precision.compute_dtype = "float32"
  config.health.enabled = False
  config.strategy = "ddp"
  config.log_every = 50
  config.eval_every = config.checkpoint_every = eval_every
  config.checkpoint_keep_period = 0


# ------------------------------------------------------------------------------------------ loading

def load(spec: str) -> ml_collections.ConfigDict:
  """The config of `spec` = 'path/to/config.py[:variant]': the file's get_config(variant), as
  `--config=spec` loads it. ConfigError when the file does not exist, has no get_config, or rejects the
  variant (configs raise ConfigError for an unknown variant)."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config={spec}: no config file {path!r} (from {os.getcwd()})")
  module_spec = importlib.util.spec_from_file_location("visionfm_jax_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"--config={spec}: {path} line {e.lineno}: {e.msg}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config={spec}: {path} defines no get_config()")
  return module.get_config(variant) if variant else module.get_config()


def check_override(config: ml_collections.ConfigDict, flag: str) -> None:
  """ConfigError when `flag` ('--config.optim.lr=...' or 'config.optim.lr') names no field of `config`,
  with the closest field names as suggestions."""
  name = flag.lstrip("-").split("=", 1)[0]
  node, parts = config, name.split(".")[1:]
  for depth, key in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
      parent = ".".join(["config", *parts[:depth]])
      known = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      close = difflib.get_close_matches(key, known, n=3)
      hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else (
          f"; its fields: {', '.join(known)}" if known else f"; {parent} is a {type(node).__name__}, not a group")
      raise ConfigError(f"--{name}: {parent} has no field {key!r}{hint}")
    node = node[key]


# --------------------------------------------------------------------------------------- domains

@dataclasses.dataclass(frozen=True)
class Domain:
  """The values a numeric field may take: a range (ends open or closed), integer or real, plus `extra` values
  with a meaning of their own (e.g. -1 for 'all'). A tuple field is checked element by element."""
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False
  extra: tuple = ()
  note: str = ""

  def contains(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if value in self.extra:
      return True
    if not math.isfinite(value):  # inf passes a one-sided range and breaks training later (NaN, or no learning)
      return False
    if self.integer and value != int(value):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def __str__(self) -> str:
    kind = "an integer" if self.integer else "a number"
    if self.low > -math.inf and self.high < math.inf:
      text = f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
    elif self.low > -math.inf:
      text = f"{kind if self.integer else 'a finite number'} {'>' if self.low_open else '>='} {self.low:g}"
    else:
      text = f"{kind if self.integer else 'a finite number'} {'<' if self.high_open else '<='} {self.high:g}"
    if self.extra:
      text += ", or " + " or ".join(str(v) for v in self.extra)
    return text + (f" ({self.note})" if self.note else "")


@dataclasses.dataclass(frozen=True)
class Choices:
  """The names a string field may take."""
  names: tuple

  def contains(self, value) -> bool:
    return isinstance(value, str) and value in self.names

  def __str__(self) -> str:
    return "one of " + ", ".join(self.names)


POSITIVE = Domain(0, low_open=True)
NON_NEGATIVE = Domain(0)
COUNT = Domain(1, integer=True)  # sizes, steps, counts
NON_NEGATIVE_INT = Domain(0, integer=True)
FRACTION = Domain(0, 1)
RATE = Domain(0, 1, high_open=True)  # drop rates, Adam betas
ALL_OR_COUNT = Domain(1, integer=True, extra=(-1,), note="-1: all")

# (regex over the dotted field path, domain): the first rule whose regex matches the whole path applies.
DOMAINS: tuple[tuple[str, Domain | Choices], ...] = (
    (r"strategy", Choices(STRATEGIES)),
    (r"precision\.compute_dtype", Choices(COMPUTE_DTYPES)),
    (r"model\.remat_policy", Choices(REMAT_POLICIES)),
    (r"total_steps|global_batch_size|grad_accum_steps|log_every|eval_every|checkpoint_every|keep_checkpoints",
     COUNT),
    (r"step_timeout_s|peer_timeout_s", Domain(0, note="0: no timeout")),
    (r"checkpoint_keep_period", Domain(0, integer=True, note="0: none")),
    (r"lock_wait_s", NON_NEGATIVE),
    (r"mesh\.(data|fsdp|tensor)", Domain(1, integer=True, extra=(-1,), note="-1: the devices left")),
    (r"optim\.lr", POSITIVE),
    (r"optim\.b[12]", RATE),
    (r"optim\.eps", Domain(0, low_open=True, note="Adam divides by sqrt(nu) + eps, and nu is 0 for unused params")),
    (r"optim\.(weight_decay|end_lr)", NON_NEGATIVE),
    (r"optim\.clip_norm", Domain(0, note="0: no clipping")),
    (r"optim\.warmup_steps", NON_NEGATIVE_INT),
    (r"optim\.layer_decay", Domain(0, 1, low_open=True, note="1: off")),
    (r"optim\.ema_decay", Domain(0, 1, high_open=True, note="0: no EMA")),
    (r"precision\.(loss_scale_init|loss_scale_min)", POSITIVE),
    (r"precision\.(loss_scale_period|max_consecutive_skips)", COUNT),
    (r"health\.(window|warmup|burst_window|max_rollbacks_window)", COUNT),
    (r"health\.(burst_skips|restore_before|skip_margin|max_rollbacks)", NON_NEGATIVE_INT),
    (r"health\.z", POSITIVE),
    (r"health\.rise", Domain(1, low_open=True, extra=(0,), note="0: off")),
    (r"(.+\.)?(drop_path|dropout)", RATE),
    (r"(.+\.)?layer_norm_eps", POSITIVE),
    (r"(.+\.)?(image_size|patch_size|window_size|mask_patch_size)", COUNT),
    (r"(.+\.)?pretrained_window_sizes", Domain(0, integer=True, note="0: the stage's own window")),
    (r"model\.num_classes", Domain(0, integer=True, note="0: no head")),
    (r"model\.(embed_dim|caption_queries|decoder_depth)|model\.text\.(max_len|vocab_size)", COUNT),
    (r"(.+\.)?extra_norm_period", Domain(0, integer=True, extra=(-1,), note="0: none; -1: the size's default")),
    (r"(.+\.)?eos_id", NON_NEGATIVE_INT),
    (r"data\.num_workers", Domain(0, integer=True, extra=(-1,), note="-1: from the CPUs of the process")),
    (r"data\.(device_prefetch|skip_check_after|seg_eval_width)", NON_NEGATIVE_INT),
    (r"data\.(prefetch|shapes_train_size|shapes_eval_size|scenes_max_objects|max_boxes)", COUNT),
    (r"data\.max_skipped_fraction", FRACTION),
    (r"data\.eval_examples|probe\.(train_examples|eval_examples)|eval\.zeroshot_examples", ALL_OR_COUNT),
    (r"data\.std|data\.augment\.crop_ratio|data\.(seg|det)_scale_range", POSITIVE),
    (r"data\.mean", FRACTION),
    (r"data\.augment\.crop_scale", Domain(0, 1, low_open=True)),
    (r"data\.augment\.(color_jitter|mixup_alpha)", NON_NEGATIVE),
    (r"data\.augment\.randaugment_ops", NON_NEGATIVE_INT),
    (r"data\.augment\.randaugment_magnitude", Domain(0, RANDAUGMENT_MAX_MAGNITUDE)),
    (r"data\.mim\.mask_ratio", Domain(0, 1, low_open=True, high_open=True)),
    (r"probe\.(knn_k|linear_steps)", COUNT),
    (r"probe\.knn_temperature", POSITIVE),
    (r"probe\.linear_l2", NON_NEGATIVE),
    (r"loss\.\w+_weight|head\.(class_weight|l1_weight|giou_weight|focal_gamma)", NON_NEGATIVE),
    (r"head\.focal_alpha", FRACTION),
    (r"head\.prior_prob", Domain(0, 1, low_open=True, high_open=True)),
    (r"head\.num_convs", NON_NEGATIVE_INT),
    (r"head\.(num_classes|head_channels|neck_channels|top_k|eval_stride|levels|neck_strides|ppm_scales)", COUNT),
)
_COMPILED_DOMAINS = tuple((re.compile(pattern), (pattern, domain)) for pattern, domain in DOMAINS)
# Fields holding (low, high): low must not exceed high.
ORDERED_PAIRS = ("data.augment.crop_scale", "data.augment.crop_ratio", "data.seg_scale_range",
                 "data.det_scale_range")


def fields(node, prefix: str = ""):
  """(dotted path, value) of every leaf of a ConfigDict."""
  for key, value in node.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from fields(value, path + ".")
    else:
      yield path, value


def rule_of(path: str) -> tuple[str, Domain | Choices] | None:
  """The DOMAINS rule of a dotted field path (the first whose regex matches it whole), None when none does."""
  for compiled, rule in _COMPILED_DOMAINS:
    if compiled.fullmatch(path):
      return rule
  return None


def check_domains(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first field whose value lies outside its DOMAINS entry, or an ORDERED_PAIRS field
  whose low end exceeds its high end."""
  for path, value in fields(config):
    rule = rule_of(path)
    if rule is None:
      continue
    domain = rule[1]
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not all(domain.contains(v) for v in values):
      each = "each element " if isinstance(value, (tuple, list)) else ""
      raise ConfigError(f"config.{path}={value!r}: {each}must be {domain}")
    if path in ORDERED_PAIRS and (len(values) != 2 or values[0] > values[1]):
      raise ConfigError(f"config.{path}={value!r}: expected (low, high) with low <= high")


def check(config: ml_collections.ConfigDict) -> None:
  """What the config checks alone, without jax: every field in its DOMAINS entry, and the resume's
  allow_changes naming fields. ConfigError naming the field."""
  check_domains(config)
  allowed_changes(config)
  report_to(config)


# ------------------------------------------------------------------------------------------ resuming

# What a change of a field from the checkpoint's config means for a resume (the first regex matching the dotted
# path whole): 'refused' (another model, task, precision or data: the checkpoint does not continue it),
# 'free' (how the run is laid out, logged or evaluated), else 'opt_in' (the schedule and the optimiser:
# accepted only when named in config.resume.allow_changes).
REFUSED, OPT_IN, FREE = "refused", "opt_in", "free"
RESUME_RULES: tuple[tuple[str, str], ...] = (
    # how a model computes, not what: its attention implementation and remat policy (same params, same numbers
    # up to rounding), e.g. a run moved from the CPU to GPUs or to a policy that fits another batch
    (r"model\.(\w+\.)?(attention|remat_policy)", FREE),
    (r"model\..+|task|head\..+|precision\.compute_dtype|optim\.freeze", REFUSED),
    (r"data\.(source|mixture|train_split|tokenizer|image_size|shapes_train_size|shapes_captions|mean|std)", REFUSED),
    (r"log_every|eval_every|checkpoint_every|keep_checkpoints|step_timeout_s|peer_timeout_s|lock_wait_s|"
     r"compile_cache|progress_bar|report_to|wandb\..+|mlflow\..+", FREE),
    (r"health\..+", FREE),  # how the run is guarded; a new window starts its statistics afresh
    (r"strategy|mesh\..+|grad_accum_steps|accumulate_unreduced|resume\..+|init_from\w*|probe\..+|eval\..+", FREE),
    # evaluated and exported weights only: a resume starts or drops the EMA as needed (training/ema.py)
    (r"optim\.ema_decay", FREE),
    (r"data\.(eval_\w+|data_dir|num_workers|prefetch|device_prefetch|max_skipped_fraction|skip_check_after)", FREE),
    (r"data\.(shapes_eval_size|seg_eval_width)", FREE),
)
_COMPILED_RESUME_RULES = tuple((re.compile(pattern), kind) for pattern, kind in RESUME_RULES)


def resume_kind(path: str) -> str:
  for compiled, kind in _COMPILED_RESUME_RULES:
    if compiled.fullmatch(path):
      return kind
  return OPT_IN


def resume_changes(saved: dict, current: dict) -> dict[str, list[tuple[str, object, object]]]:
  """{kind: [(dotted path, saved value, current value)]} of the fields whose value differs between two configs
  as JSON dicts (a field only one of them has, from another version of the code, is left out)."""
  old, new = dict(fields(saved)), dict(fields(current))
  changes = {REFUSED: [], OPT_IN: [], FREE: []}
  for path in sorted(old.keys() & new.keys()):
    if old[path] != new[path]:
      changes[resume_kind(path)].append((path, old[path], new[path]))
  return changes


def allowed_changes(config: ml_collections.ConfigDict) -> list[str]:
  """config.resume.allow_changes as dotted paths; ConfigError naming one that is no field of `config`."""
  names = [name.strip() for name in config.resume.allow_changes.split(",") if name.strip()]
  known = {path for path, _ in fields(config)}
  for name in names:
    if name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=3)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      raise ConfigError(f"config.resume.allow_changes={config.resume.allow_changes!r}: {name!r} is no field{hint}")
  return names
