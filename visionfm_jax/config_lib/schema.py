"""The config's sections and their defaults, one small function per section, which every model family starts
from (`base_config`, `model_config`), and the helpers config files write recipes with (`set_fields`,
`set_paths`). Configs are `ml_collections.ConfigDict`s, locked after `get_config` so that a misspelt override
(`--config.optim.lrr=1`) is an error instead of a silently ignored key."""

from __future__ import annotations

import math

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
# The contrastive losses of a CLIP model (tasks/losses.py): CLIP's softmax over the batch, SigLIP's sigmoid per pair.
CONTRASTIVE_LOSSES = ("clip", "siglip")
# What a composite model (clip, aurora) sets for its towers (models/towers.py): its own value of these fields,
# once for all towers, and no classification head. A tower's config has neither.
TOWER_SHARED_FIELDS = ("image_size", "scan", "remat_policy")
TOWER_HEADLESS = {"num_classes": 0, "head_bias_init": 0.0}
# RandAugment's largest magnitude M (data/transforms/randaugment.py): here, without Pillow and grain, for DOMAINS.
RANDAUGMENT_MAX_MAGNITUDE = 30


def model_config(name: str, *, image_tower: str = "swinv2") -> ml_collections.ConfigDict:
  """`config.model` of one family: the fields its builder reads (models/<name>.py `build`).

  'clip' nests the image tower's fields (`image_tower`: swinv2 | vit) under `image` and the text tower's under
  `text`; its top-level image_size, scan and remat_policy apply to both towers (models/clip.py).
  """
  common = dict(name=name, num_classes=1000, image_size=224, drop_path=0.0, dropout=0.0, head_bias_init=0.0,
                scan=True, remat_policy="nothing_saveable",
                # auto (cuDNN on GPUs in bf16/fp16, else softmax) | softmax (einsums, hand-written backward) |
                # cudnn (cuDNN flash attention, GPU) | jax (jax.nn.dot_product_attention choosing); kernels.ATTENTION
                attention="auto")
  if name == "vit":
    family = dict(variant="B/16", pool="cls", layer_norm_eps=1e-6, qkv_bias=True,  # pool: cls | gap
                  # CLIP's image tower: a LayerNorm before the blocks, a bias-free patch embedding; the MLP
                  # activation: gelu (exact) | quick_gelu (OpenAI's CLIP) | gelu_pytorch_tanh (a GPU candidate)
                  pre_norm=False, patch_bias=True, act="gelu",
                  token_drop=0.0)  # in training, the fraction of each image's patch tokens dropped (FLIP); none at eval
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
        # k > 1: in training every k-th patch per axis (1 - 1/k^2 dropped, a random phase per image), windows whole;
        # none at eval (models/swinv2.py; a ViT's token_drop, open_clip's patch_dropout, in a form Swin keeps)
        token_subgrid=1,
    )
  elif name == "clip":
    if image_tower not in ("swinv2", "vit"):
      raise ConfigError(f"clip image_tower={image_tower!r}: expected swinv2 or vit")
    image = _tower_config(image_tower)
    family = dict(
        embed_dim=512,  # the joint embedding both towers project to
        logit_scale_init=LOGIT_SCALE_INIT,  # log(1 / 0.07); the task clamps it to [0, log 100] after every update
        # clip: softmax over the batch | siglip: a sigmoid per pair, with a learnable bias (SigLIP; its paper starts
        # logit_scale_init at log 10, as configs/swinv2_g_clip.py:siglip does)
        contrastive_loss="clip",
        logit_bias_init=-10.0,  # siglip's learnable logit bias at init (the SigLIP paper's); clip has none
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
      # sum and the micro-batch's). ddp / zero1 / zero2 with mesh.tensor 1 (training/grads.py `per_device`). zero2
      # on a mesh with data and fsdp both above 1: each fsdp group (a node) reduce-scatters its gradients in every
      # micro-batch and each device sums its shard; the groups' sums are reduced once, after the last.
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
      # | wds:<glob of indexed img2dataset tars>[;min_similarity=X;max_pwatermark=X;max_punsafe=X] (data/sources/wds.py)
      # | dense tasks: scenes | ade20k:<ADEChallengeData2016 dir> | coco:<dir with train2017/ val2017/ annotations/>
      source="shapes",
      # ((spec, weight), ...): train on a weighted mixture of sources instead (data/loader/mixture.py; source must be
      # ''), e.g. (("arrayrecord:/d/pairs/{split}-*", 3.0), ("shapes:images", 1.0)); () = source alone
      mixture=(),
      eval_source="",  # the same forms; '' = source (with eval_split), else the mixture's first entry
      tokenizer="",  # SentencePiece model for captions (tools.train_tokenizer); '' = the shipped shapes one
      data_dir="",  # TFDS data dir; '' means $TFDS_DATA_DIR, else ~/tensorflow_datasets
      train_split="train",
      eval_split="validation",
      image_size=224,
      # grain worker processes per training process (one per node under launch/slurm.sbatch); 0 reads in the main
      # process; -1: one per CPU the process may run on, less one for the trainer, at most 32 (data/loader/pipeline.py)
      num_workers=-1,
      prefetch=2,  # batches buffered per worker
      device_prefetch=2,  # batches copied to the devices ahead of the step (training/prefetch.py); 0: none
      shuffle=True,
      eval_examples=-1,  # -1: the whole eval split
      # evaluation's resize + central crop (data/transforms/host.py EvalTransform): 'inception' = shorter side to
      # size / 0.875, bilinear (ImageNet classification); 'clip' = shorter side to size, bicubic (CLIP zero-shot)
      eval_preprocess="inception",
      max_skipped_fraction=0.02,  # stop when more of the training records read are corrupt/undecodable
      skip_check_after=1000,  # ... once this many records have been read (per process)
      shapes_train_size=1_000_000,
      shapes_eval_size=10_000,
      shapes_captions="full",  # full: size, colour, shape, position, background | short: size, colour, shape
      # Dense tasks (data/loader/dense.py). 'scenes' (split sizes: shapes_train_size / shapes_eval_size) paints
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
  """`config.data.augment`: training-time augmentations (data/transforms/host.py, data/transforms/randaugment.py)."""
  return ml_collections.ConfigDict(dict(
      random_resized_crop=True,
      crop_scale=(0.08, 1.0),
      crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
      flip=True,
      color_jitter=0.0,  # brightness/contrast/saturation strength; 0 disables
      randaugment_ops=0,  # RandAugment N (operations per image); 0 disables
      randaugment_magnitude=9,  # RandAugment M, 0..30 (M / 10 of AutoAugment's maximum strength)
      # RandAugment operations to leave out (data/transforms/randaugment.py OPS), e.g. GEOMETRIC_OPS for captions
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
      # ('flickr30k', 'flickr30k:/data/flickr30k')); specs in data/text/caption_sets.py, metrics
      # eval/<name>_retrieval/i2t_r1, ...; () = none
      retrieval_benchmarks=(),
      # ((name, spec), ...): zero-shot classification on further labelled sets with OpenAI's names and templates,
      # e.g. (('imagenet_r', 'imagenet_r:/data/imagenet-r'), ('imagenetv2', 'imagenetv2:/data/imagenetv2')); specs
      # of ImageNet's variants in data/sources/imagenet_variants.py, metrics eval/zeroshot_<name>/top1, ...; () = none
      zeroshot_benchmarks=(),
      zeroshot_benchmark_templates="imagenet",  # their prompts: OpenAI's 80; 'imagenet_simple': 8 of them
      **zeroshot_prompt_fields(family_fields),
  ))


def zeroshot_prompt_fields(family_fields: dict) -> dict:
  """A family with zero-shot (zeroshot_classes) also takes config.eval.zeroshot_templates."""
  if "zeroshot_classes" not in family_fields:
    return family_fields
  # a text file of prompt templates, one per line with '{}' for the class name; '' = the zeroshot_classes set's
  # own (OpenAI's 80 for a file of class names or 'data')
  return {"zeroshot_templates": "", **family_fields}


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
      checkpoint_digests=True,  # save the arrays' digests with each checkpoint, check them at restore; False: neither
      # A process that waits longer than this in one train step, checkpoint save or evaluation (a collective
      # that another process abandoned) dumps its threads' stacks and exits so the job can be requeued; 0: never.
      step_timeout_s=1800.0,
      # In a job of several processes, one whose peer has sent no heartbeat for this long (killed outright, its
      # node lost) prints an error line naming it and exits so the job can be requeued (training/infra/faults.py
      # PeerWatch); 0: never (JAX's own heartbeat then aborts the job after 100 s, naming no one).
      peer_timeout_s=30.0,
      # A run of the same SLURM job (a requeue) waits this long for its predecessor to release the workdir's
      # lock (training/infra/workdir.py); any other holder is refused at once.
      lock_wait_s=60.0,
      # JAX's persistent cache of compiled programs (training/infra/compile_cache.py): a requeued or resumed run loads
      # its programs instead of compiling them. '': JAX_COMPILATION_CACHE_DIR when set, else
      # <workdir>/compile_cache; 'off': none; else a folder, which runs may share.
      compile_cache="",
      progress_bar=True,
  )


TRACKERS = ("tensorboard", "wandb", "mlflow")


def tracking_fields() -> dict:
  """Where the metrics go besides metrics.jsonl, which is always written (training/infra/trackers.py)."""
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


def fields(node, prefix: str = ""):
  """(dotted path, value) of every leaf of a ConfigDict."""
  for key, value in node.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from fields(value, path + ".")
    else:
      yield path, value
