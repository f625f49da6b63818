"""The config's schema: every field a row (default, domain, doc; rows.py), one table per section, which every
model family starts from (`base_config`, `model_config`), and the helpers config files write recipes with
(`set_fields`, `set_paths`). Configs are `ml_collections.ConfigDict`s, locked after `get_config` so that a misspelt
override (`--config.optim.lrr=1`) is an error instead of a silently ignored key."""

from __future__ import annotations

import ml_collections

from visionfm_jax.config_lib.domains import (
  ALL_OR_COUNT,
  COUNT,
  FRACTION,
  NON_NEGATIVE,
  NON_NEGATIVE_INT,
  POSITIVE,
  RATE,
  SIZED,
  SIZED_COUNT,
  Choices,
  Domain,
)
from visionfm_jax.config_lib.model_schema import model_rows, rows_of_model
from visionfm_jax.config_lib.rows import Field, Rows, defaults, nest
from visionfm_jax.config_lib.task_schema import TASK_SECTIONS
from visionfm_jax.errors import ConfigError

# The ZeRO stages 0 (ddp) to 3, each sharding more of the train state (parallel/sharding.py), and other names
# for them: `fsdp` is zero3.
ZERO_STAGES = ("ddp", "zero1", "zero2", "zero3")
STRATEGY_ALIASES = {"fsdp": "zero3"}
STRATEGIES = ZERO_STAGES + tuple(STRATEGY_ALIASES)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# RandAugment's largest magnitude M (data/transforms/randaugment.py): here, without Pillow and grain, for its domain.
RANDAUGMENT_MAX_MAGNITUDE = 30
TRACKERS = ("tensorboard", "wandb", "mlflow")
POSITIVE_PAIR = Domain(0, low_open=True, ordered=True)

# What is trained, on how many examples a step, for how many steps.
RUN = dict(
  seed=Field(0, doc="the params' init, the data order and the augmentations are a function of it"),
  task=Field("classification", doc="classification | contrastive | aurora | segmentation | detection (tasks/)"),
  total_steps=Field(1000, SIZED_COUNT, "optimizer steps of the run"),
  global_batch_size=Field(256, SIZED_COUNT, "examples per step, over all devices"),
  grad_accum_steps=Field(1, COUNT, "the global batch is split into this many micro-batches, scanned in one step"),
  accumulate_unreduced=Field(
    False,
    doc=(
      "With micro-batches: each device sums its own gradients over them, unreduced, and the step reduces them "
      "once, after the last, instead of once per micro-batch; costs two fp32 copies of the params per device (the "
      "sum and the micro-batch's). ddp / zero1 / zero2 with mesh.tensor 1 (training/grads.py `per_device`). zero2 "
      "on a mesh with data and fsdp both above 1: each fsdp group (a node) reduce-scatters its gradients in every "
      "micro-batch and each device sums its shard; the groups' sums are reduced once, after the last."
    ),
  ),
)

MESH_AXIS = Domain(1, integer=True, extra=(-1,), note="-1: the devices left")
# The ZeRO strategy and the device mesh.
PARALLEL: Rows = dict(
  strategy=Field("fsdp", Choices(STRATEGIES), "ddp | zero1 | zero2 | zero3 (= fsdp)"),
  optimizer_over_data=Field(
    False,
    doc=(
      "zero1-3 with mesh.data > 1: the optimizer state (and the params' EMA) split over data x fsdp, not fsdp "
      "alone, as ZeRO-1 across the fsdp groups (the nodes) under the strategy within each; a device holds "
      "1/data of the state it would, and each step all-gathers its updated params' shard over data"
    ),
  ),
  # One parameter's layout, decided by the recipe (parallel/sharding.py `Overrides`).
  sharding=dict(
    overrides=Field(
      (),
      doc=(
        "((regex over '/'-joined param paths, layout), ...), the first matching rule wins: the matched params "
        "laid out so instead of by the strategy and the logical-axis table. A layout: 'replicated' (whole on "
        "every device); mesh axes, one per dim (('fsdp', None): that dim split over fsdp); or logical axes, "
        "one per dim (('embed', 'mlp')), which the table reads instead of the model's. The gradient, optimizer "
        "state and EMA of a param given its own layout stay as the strategy lays them out; logical axes apply "
        "to them too. A rule that matches no param, or a layout that does not fit its params' dims, stops "
        "the run at start-up naming it"
      ),
    ),
  ),
  # Mesh axis sizes; -1 takes the devices left. data x fsdp devices share the batch.
  mesh=dict(
    data=Field(1, MESH_AXIS, "data-parallel replicas of the sharded state"),
    fsdp=Field(-1, MESH_AXIS, "the devices the ZeRO strategies shard state over (put it within a node)"),
    tensor=Field(1, MESH_AXIS, "the devices that shard matmul widths (Megatron style)"),
  ),
)

# config.optim: AdamW with linear warmup and cosine decay to end_lr, plus the fine-tuning param rules (optim.py).
OPTIM = dict(
  lr=Field(1e-3, POSITIVE, "the peak learning rate, reached after warmup_steps"),
  b1=Field(0.9, RATE, "Adam's beta1"),
  b2=Field(0.999, RATE, "Adam's beta2"),
  eps=Field(
    1e-8,
    Domain(0, low_open=True, note="Adam divides by sqrt(nu) + eps, and nu is 0 for unused params"),
    "Adam's epsilon",
  ),
  weight_decay=Field(
    0.05,
    NON_NEGATIVE,
    "AdamW's decoupled weight decay, of kernels only (optim.decay_mask_fn): "
    "biases, norms, embeddings, tokens and logit scales never decay",
  ),
  no_decay=Field(
    ("cpb_mlp",),
    doc="regexes over '/'-joined param paths whose kernels do not decay either: "
    "SwinV2's position-bias MLP ('cpb_mlp'), as the official recipe has it",
  ),
  warmup_steps=Field(
    1000, Domain(0, integer=True, extra=(SIZED,), note=SIZED_COUNT.note), "linear warmup from 0 to lr"
  ),
  end_lr=Field(0.0, NON_NEGATIVE, "the cosine decay's end, at total_steps"),
  clip_norm=Field(1.0, Domain(0, note="0: no clipping"), "global-norm gradient clipping"),
  layer_decay=Field(
    1.0,
    Domain(0, 1, low_open=True, note="1: off"),
    "layer-wise lr decay: lr of layer i is lr * layer_decay^(L + 1 - i) (~0.65 for ViT-B)",
  ),
  lr_mults=Field((), doc="((regex, multiplier), ...) over '/'-joined param paths; the first matching rule wins"),
  freeze=Field((), doc="regexes over '/'-joined param paths: no update, no weight decay, no Adam moments"),
  ema_decay=Field(
    0.0,
    Domain(0, 1, high_open=True, note="0: no EMA"),
    "an EMA of the params, ema = d * ema + (1 - d) * params after every applied update "
    "(training/ema.py), evaluated beside them (eval/ema/...); its horizon is 1 / (1 - d) steps "
    "(NeMo's CLIP: 0.9999)",
  ),
)

# config.precision: the compute dtype, the blocks' GEMMs and fp16's dynamic loss scaling (params stay fp32).
PRECISION = dict(
  compute_dtype=Field("bfloat16", Choices(COMPUTE_DTYPES), "float16 scales the loss dynamically"),
  gemm=Field(
    "compute_dtype",
    Choices(("compute_dtype", "fp8", "fp8_bf16_wgrad", "fp8_delayed")),
    "the transformer blocks' GEMMs in training: in the compute dtype; fp8 (all three in FP8: e4m3 "
    "forward, e5m2 gradients, Transformer Engine's recipe); fp8_bf16_wgrad (the weight gradient in the "
    "compute dtype, the others e4m3 scaled row by row, DINOv3's), both scaled from each call's values; "
    "fp8_delayed (fp8's GEMMs with inputs and gradients scaled from an amax history kept in the train "
    "state, Transformer Engine's DelayedScaling; no micro-batches). GPUs of compute capability 8.9+, "
    "emulated on a CPU (models/fp8.py). Evaluation computes in the compute dtype; params are the same "
    "either way",
  ),
  loss_scale_init=Field(2.0**15, POSITIVE, "fp16's first loss scale"),
  loss_scale_period=Field(2000, COUNT, "good steps before the scale doubles"),
  loss_scale_min=Field(1.0, POSITIVE, "the scale never halves below this"),
  max_consecutive_skips=Field(100, COUNT, "overflowing steps in a row at loss_scale_min before the run stops"),
)

# config.health: loss-spike skipping in the step and rollback past bad data (training/health.py). A spike: loss or
# gradient norm above the mean + z standard deviations of the last `window` applied steps, tested once `warmup`
# steps have been applied; its update is not applied (MaxText's 128 and 6.0). What skipping does not absorb sets
# off a rollback: burst_skips skips within burst_window steps, the window's mean loss above rise x its lowest, a
# non-finite loss, the fp16 minimum-scale stall.
HEALTH = dict(
  enabled=Field(False, doc="the guard on; a full-scale recipe turns it on (config_lib.full_scale_run)"),
  window=Field(128, COUNT, "applied steps whose statistics a spike is measured against"),
  z=Field(6.0, POSITIVE, "standard deviations above the mean that make a spike"),
  warmup=Field(128, COUNT, "applied steps before spikes are tested"),
  burst_skips=Field(5, NON_NEGATIVE_INT, "skips within burst_window steps that set off a rollback; 0: never"),
  burst_window=Field(128, COUNT, "steps over which burst_skips are counted"),
  rise=Field(
    1.5,
    Domain(1, low_open=True, extra=(0,), note="0: off"),
    "a rollback when the window's mean loss exceeds rise x its lowest",
  ),
  rollback=Field(True, doc="False: the triggers stop the run instead, naming the last good checkpoint"),
  restore_before=Field(
    100, NON_NEGATIVE_INT, "restore the newest checkpoint at least this many steps before the trigger"
  ),
  skip_margin=Field(100, NON_NEGATIVE_INT, "and skip the data read since it plus this many batches"),
  max_rollbacks=Field(3, NON_NEGATIVE_INT, "more rollbacks than this within max_rollbacks_window steps stop the run"),
  max_rollbacks_window=Field(20_000, COUNT, "steps over which max_rollbacks are counted"),
)

# config.data.augment: training-time augmentations (data/transforms/host.py, data/transforms/randaugment.py).
AUGMENT = dict(
  random_resized_crop=Field(
    True, doc="Inception's crop of crop_scale of the area at crop_ratio; False: the whole image resized"
  ),
  crop_scale=Field((0.08, 1.0), Domain(0, 1, low_open=True, ordered=True), "(low, high) fraction of the area"),
  crop_ratio=Field((3.0 / 4.0, 4.0 / 3.0), POSITIVE_PAIR, "(low, high) aspect ratio"),
  flip=Field(True, doc="random horizontal flips"),
  color_jitter=Field(0.0, NON_NEGATIVE, "brightness/contrast/saturation strength; 0 disables"),
  randaugment_ops=Field(0, NON_NEGATIVE_INT, "RandAugment N (operations per image); 0 disables"),
  randaugment_magnitude=Field(
    9, Domain(0, RANDAUGMENT_MAX_MAGNITUDE), "RandAugment M, 0..30 (M / 10 of AutoAugment's maximum strength)"
  ),
  randaugment_exclude=Field(
    (),
    doc="RandAugment operations to leave out (data/transforms/randaugment.py OPS), "
    "e.g. GEOMETRIC_OPS for captions that name positions",
  ),
  mixup_alpha=Field(0.0, NON_NEGATIVE, "image-text Mixup (contrastive task): lam ~ Beta(alpha, alpha); 0 disables"),
)

# config.data.naflex: images at their own aspect ratio, as patch grids within a token budget (SigLIP 2's NaFlex;
# data/transforms/naflex.py): a contrastive run's ViT tower (models/vit.py) takes them in training and evaluation.
NAFLEX = dict(
  max_tokens=Field(
    0,
    NON_NEGATIVE_INT,
    "patches an image may take: each image resized to the largest grid of "
    "its aspect within it; 0: square images of image_size (no NaFlex)",
  ),
  patch_size=Field(16, COUNT, "the side in px of a patch: the image tower's"),
)

# config.data: sources and splits, the input pipeline, the embedded sets and the augmentations.
DATA: Rows = dict(
  source=Field(
    "shapes",
    doc=(
      "shapes | shapes:images (uncaptioned) | tfds:<name>[:<version>][:<split>] | arrayrecord:<glob, '{split}' = "
      "the split> (datatools.prepare_data) | wds:<glob of indexed img2dataset tars>[;min_similarity=X;"
      "max_pwatermark=X;max_punsafe=X] (data/sources/wds.py) | dense tasks: scenes | ade20k:<ADEChallengeData2016 "
      "dir> | coco:<dir with train2017/ val2017/ annotations/>"
    ),
  ),
  mixture=Field(
    (),
    doc="((spec, weight), ...): train on a weighted mixture of sources instead "
    "(data/loader/mixture.py; source must be ''), e.g. ((\"arrayrecord:/d/pairs/{split}-*\", 3.0), "
    '("shapes:images", 1.0)); () = source alone',
  ),
  eval_source=Field("", doc="the same forms; '' = source (with eval_split), else the mixture's first entry"),
  tokenizer=Field("", doc="SentencePiece model for captions (datatools.train_tokenizer); '' = the shipped shapes one"),
  data_dir=Field("", doc="TFDS data dir; '' means $TFDS_DATA_DIR, else ~/tensorflow_datasets"),
  train_split=Field("train", doc="the split of source (or of each mixture entry) that trains"),
  eval_split=Field("validation", doc="the split of eval_source that evaluates"),
  image_size=Field(224, SIZED_COUNT, "the training crop's side in px"),
  num_workers=Field(
    -1,
    Domain(0, integer=True, extra=(-1,), note="-1: from the CPUs of the process"),
    "grain worker processes per training process (one per node under launch/slurm.sbatch); 0 reads "
    "in the main process; -1: one per CPU the process may run on, less one for the trainer, at most "
    "32 (data/loader/pipeline.py)",
  ),
  prefetch=Field(2, COUNT, "batches buffered per worker"),
  device_prefetch=Field(
    2, NON_NEGATIVE_INT, "batches copied to the devices ahead of the step (training/prefetch.py); 0: none"
  ),
  shuffle=Field(True, doc="shuffle the training records (deterministically, by config.seed)"),
  eval_examples=Field(-1, ALL_OR_COUNT, "-1: the whole eval split"),
  eval_preprocess=Field(
    "inception",
    doc=(
      "evaluation's resize + central crop (data/transforms/host.py EvalTransform): 'inception' = shorter side to "
      "size / 0.875, bilinear (ImageNet classification); 'clip' = shorter side to size, bicubic (CLIP zero-shot)"
    ),
  ),
  max_skipped_fraction=Field(0.02, FRACTION, "stop when more of the training records read are corrupt/undecodable"),
  skip_check_after=Field(1000, NON_NEGATIVE_INT, "... once this many records have been read (per process)"),
  shapes_train_size=Field(1_000_000, COUNT, "records of the embedded sets' train split"),
  shapes_eval_size=Field(10_000, COUNT, "records of the embedded sets' eval split"),
  shapes_captions=Field("full", doc="full: size, colour, shape, position, background | short: size, colour, shape"),
  # Dense tasks (data/loader/dense.py).
  scenes_max_objects=Field(4, COUNT, "'scenes' paints 1..scenes_max_objects shapes per image"),
  seg_scale_range=Field(
    (0.5, 2.0), POSITIVE_PAIR, "segmentation training: short side to image_size * r, r ~ U(range); crop"
  ),
  seg_eval_width=Field(0, NON_NEGATIVE_INT, "segmentation eval canvas: image_size high, this wide (0: image_size)"),
  det_scale_range=Field(
    (0.5, 1.0), POSITIVE_PAIR, "detection training: long side to image_size * r, r ~ U(range); r > 1 crops"
  ),
  max_boxes=Field(100, COUNT, "detection: boxes per image in a batch; extra objects are dropped and counted"),
  mean=Field((0.485, 0.456, 0.406), FRACTION, "per-channel mean of the pixels in [0, 1] (ImageNet's)"),
  std=Field((0.229, 0.224, 0.225), POSITIVE, "per-channel standard deviation (ImageNet's)"),
  augment=AUGMENT,
  naflex=NAFLEX,
)

# Initialising a fresh run from another run's (or an imported) checkpoint.
INIT_FROM = dict(
  init_from=Field("", doc="checkpoint dir (tools.import_hf or a workdir) whose params initialise a fresh run"),
  init_from_skip=Field(
    "", doc="regex of (model) param paths to keep freshly initialised (e.g. 'head' for new classes)"
  ),
  init_from_subtree=Field("", doc="the checkpoint's params to take, e.g. 'image' (CLIP's image tower); '' = all"),
  init_from_prefix=Field("", doc="where they go in the model, e.g. 'backbone'; params outside it stay fresh"),
  init_from_ema=Field(False, doc="take a training checkpoint's EMA of the params (config.optim.ema_decay) instead"),
)

# config.probe: frozen-backbone evaluators (evaluate/probe.py; classification runs, and tools.probe on any run's
# backbone).
PROBE = dict(
  knn=Field(False, doc="eval/knn/top1: weighted k-NN on the pooled features (DINO)"),
  linear=Field(False, doc="eval/linear_probe/top1: softmax regression on the standardised features (L-BFGS)"),
  source=Field("", doc="labelled source of both splits; '' = config.data.source (train), the eval source (eval)"),
  train_split=Field("", doc="'' = config.data.train_split; the eval split is config.data.eval_split"),
  train_examples=Field(10_000, ALL_OR_COUNT, "the first N train records fit the probes; -1: the whole split"),
  eval_examples=Field(-1, ALL_OR_COUNT, "the first N eval records score them; -1: config.data.eval_examples"),
  knn_k=Field(20, COUNT, "neighbours of the k-NN vote"),
  knn_temperature=Field(0.07, POSITIVE, "the k-NN vote's weights: exp(similarity / temperature)"),
  linear_steps=Field(100, COUNT, "L-BFGS iterations"),
  linear_l2=Field(1e-4, NON_NEGATIVE, "penalty l2 / 2 * |W|^2 on the probe's weights"),
)

# The loop's cadence (logging, evaluation, checkpoints), its watchdog and its console.
LOOP = dict(
  log_every=Field(50, COUNT, "steps between metric lines"),
  eval_every=Field(1000, SIZED_COUNT, "steps between evaluations"),
  checkpoint_every=Field(1000, SIZED_COUNT, "steps between checkpoints"),
  keep_checkpoints=Field(3, COUNT, "the newest checkpoints kept"),
  checkpoint_keep_period=Field(
    0,
    Domain(0, integer=True, note="0: none"),
    (
      "Besides the newest keep_checkpoints, keep every checkpoint whose step is a multiple of this for good (a "
      "history to roll back to and to analyse; a multiple of checkpoint_every). A resume that changes it needs "
      "resume.allow_changes: the kept checkpoints off the new period would be deleted."
    ),
  ),
  checkpoint_digests=Field(
    True, doc="save the arrays' digests with each checkpoint, check them at restore; False: neither"
  ),
  step_timeout_s=Field(
    1800.0,
    Domain(0, note="0: no timeout"),
    (
      "A process that waits longer than this in one train step, checkpoint save or evaluation (a collective that "
      "another process abandoned) dumps its threads' stacks and exits so the job can be requeued"
    ),
  ),
  peer_timeout_s=Field(
    30.0,
    Domain(0, note="0: no timeout"),
    (
      "In a job of several processes, one whose peer has sent no heartbeat for this long (killed outright, its node "
      "lost) prints an error line naming it and exits so the job can be requeued (training/infra/faults.py "
      "PeerWatch); 0: JAX's own heartbeat then aborts the job after 100 s, naming no one"
    ),
  ),
  lock_wait_s=Field(
    60.0,
    NON_NEGATIVE,
    (
      "A run of the same SLURM job (a requeue) waits this long for its predecessor to release the workdir's lock "
      "(training/infra/workdir.py); any other holder is refused at once"
    ),
  ),
  compile_cache=Field(
    "",
    doc=(
      "JAX's persistent cache of compiled programs (training/infra/compile_cache.py): a requeued or resumed run "
      "loads its programs instead of compiling them. '': JAX_COMPILATION_CACHE_DIR when set, else "
      "<workdir>/compile_cache; 'off': none; else a folder, which runs may share"
    ),
  ),
  progress_bar=Field(True, doc="a progress bar on the console between metric lines"),
)

# Where the metrics go besides metrics.jsonl, which is always written (training/infra/trackers.py).
TRACKING: Rows = dict(
  report_to=Field(
    "tensorboard",
    doc="comma-separated trackers: tensorboard, wandb, mlflow (each but tensorboard "
    "an extra: pip install -e '.[wandb]'); 'none': metrics.jsonl alone",
  ),
  # WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME and WANDB_TAGS win, WANDB_MODE=offline keeps the run on disk for
  # `wandb sync`.
  wandb=dict(
    project=Field("visionfm_jax", doc="W&B's project"),
    entity=Field("", doc="W&B's entity; '' = the account's default"),
    name=Field("", doc="the run's name; '' = the workdir's name"),
    tags=Field((), doc="the run's tags"),
  ),
  # The tracking URI is MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db.
  mlflow=dict(experiment=Field("visionfm_jax", doc="the MLflow experiment")),
)

# config.resume: which changes a resumed run accepts (RESUME_RULES).
RESUME = dict(
  allow_changes=Field(
    "",
    doc="comma-separated dotted fields ('total_steps,optim.lr') whose change from the "
    "checkpoint's config a resume accepts; other schedule and optimiser changes stop it, naming "
    "them; 'missing_config' resumes a checkpoint without its config, unchecked",
  ),
)


def config_rows(model: dict, task: str) -> dict:
  """The rows of a whole config: the sections every run has, with `model`'s rows, and those its `task` adds."""
  rows: dict[str, Field | Rows] = dict(
    **RUN,
    **PARALLEL,
    model=model,
    optim=OPTIM,
    precision=PRECISION,
    health=HEALTH,
    data=DATA,
    **INIT_FROM,
    probe=PROBE,
    **LOOP,
    **TRACKING,
    resume=RESUME,
  )
  for path, section in TASK_SECTIONS.get(task, {}).items():
    rows = nest(rows, path, section)
  return rows


def schema_of(config) -> dict:
  """The rows of `config`'s own family and task: its model's (and towers') by config.model.name, the sections
  its config.task adds."""
  return config_rows(rows_of_model(config["model"]), config.get("task", RUN["task"].default))


def complete(config: ml_collections.ConfigDict) -> list[str]:
  """Fills, in place, every field of `config`'s schema (`schema_of`) that `config` lacks (a config saved before the
  field existed) with its row's default; the dotted paths filled, a whole missing section by its own path."""
  return _fill(config, defaults(schema_of(config)), "")


def _fill(node: ml_collections.ConfigDict, default: ml_collections.ConfigDict, prefix: str) -> list[str]:
  filled = []
  for key, value in default.items():
    if key not in node:
      node[key] = value
      filled.append(prefix + key)
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(node[key], ml_collections.ConfigDict):
      filled += _fill(node[key], value, f"{prefix}{key}.")
  return filled


def base_config(model: str = "vit", task: str = RUN["task"].default) -> ml_collections.ConfigDict:
  """Defaults shared by every recipe, one section after another; `model` picks the family whose `config.model`
  fields it carries, `task` the task and the sections it adds (TASK_SECTIONS: a dense task's head, Aurora's loss
  and data.mim, the image-text tasks' eval)."""
  config = defaults(config_rows(model_rows(model), task))
  config.task = task
  return config


def model_config(name: str, *, image_tower: str = "swinv2") -> ml_collections.ConfigDict:
  """`config.model` of one family: the fields its builder reads (models/<name>.py `build`). 'clip' nests the
  image tower's fields (`image_tower`: swinv2 | vit) under `image` and the text tower's under `text`."""
  return defaults(model_rows(name, image_tower=image_tower))


def head_config(task: str) -> ml_collections.ConfigDict:
  """`config.head` of a dense task (detection | segmentation) with its defaults (TASK_SECTIONS);
  base_config(model, task) has it."""
  headed = [name for name, sections in TASK_SECTIONS.items() if "head" in sections]
  if task not in headed:
    raise ConfigError(f"head_config: {task!r} has no head; expected {' or '.join(headed)}")
  return defaults(TASK_SECTIONS[task]["head"])


def report_to(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.report_to as tracker names (() for 'none'); ConfigError naming an unknown one."""
  names = tuple(dict.fromkeys(name.strip() for name in config.report_to.split(",") if name.strip()))
  if names == ("none",):
    return ()
  unknown = [name for name in names if name not in TRACKERS]
  if unknown or not names:
    raise ConfigError(
      f"config.report_to={config.report_to!r}: expected a comma-separated list of {', '.join(TRACKERS)}, or 'none'"
    )
  return names


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
