"""The CPU demo of a recipe: what every demo shares (`cpu_demo`); the config file then picks its tiny model. And a
recipe on a small real data set (`small_data`), its `:small` variant, which leaves its warmup and cadence to the
run (config_lib/sizing.py)."""

from __future__ import annotations

import ml_collections

from visionfm_jax.config_lib.domains import SIZED
from visionfm_jax.config_lib.schema import set_fields
from visionfm_jax.errors import ConfigError

# Per embedded set: (global batch, eval examples). Scenes feed dense heads that cost more per image.
DEMO_DATA = {"shapes": (64, 1000), "scenes": (32, 500)}


def cpu_demo(
  config: ml_collections.ConfigDict,
  *,
  image_size: int,
  total_steps: int,
  eval_every: int,
  source: str = "shapes",
  lr: float = 1e-3,
  warmup_steps: int = 100,
) -> None:
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
  config.model.scan_unroll = 1  # a GPU recipe's stack form; the demos' figures are of the rolled loop

  config.data.source = source
  config.data.num_workers = 0
  config.global_batch_size, config.data.eval_examples = DEMO_DATA[source]
  config.grad_accum_steps = 1
  if source == "shapes":
    set_fields(config.data.augment, random_resized_crop=False, color_jitter=0.0, randaugment_ops=0, mixup_alpha=0.0)
  config.init_from = config.init_from_prefix = ""

  config.total_steps = total_steps
  set_fields(
    config.optim, lr=lr, warmup_steps=warmup_steps, end_lr=0.0, weight_decay=0.05, layer_decay=1.0, clip_norm=1.0
  )
  config.precision.compute_dtype = "float32"
  config.health.enabled = False
  config.strategy = "ddp"
  config.log_every = 50
  config.eval_every = config.checkpoint_every = eval_every
  config.checkpoint_keep_period = 0


def small_data(config: ml_collections.ConfigDict, *, source: str, lr: float, sized_image: bool = True) -> None:
  """Turns a recipe into a run on a researcher's own small data set in place: a few thousand real images or
  pairs, converted by datatools.prepare_data with a held-out split (`source`, an `arrayrecord:...{split}...` spec;
  its `train` and `validation` splits), on one GPU or a CPU; the caller then picks its small model.

  The sizes are the machine's (config_lib/sizing.py, `fill_machine`): with a GPU, 224 px, 3,000 steps (1,000 from a
  checkpoint) of 128; without one, 64 px and the batch and steps a CPU trains in a few minutes; the image size
  only where `sized_image` (else the recipe's). Augmentation is on, where the demos switch it off: the demos'
  procedural shapes are drawn afresh at every step, real photos repeat every epoch (3,000 steps of 128 pass over
  5,000 images about 75 times), and a model memorises a few thousand repeated images without random resized crops
  (scale 0.25 to 1), colour jitter 0.4 and RandAugment (2 operations at magnitude 9); stochastic depth 0.1; flips
  and Mixup as the recipe has them. The batch in one micro-batch, fp32 (`--config.precision.compute_dtype=bfloat16`
  on a GPU), ddp, no remat, no health guard; AdamW with weight decay 0.05, global-norm clip 1.0, no layer-wise
  decay, linear warmup to `lr` over a tenth of the steps, cosine to 0 at the last; an evaluation on the whole
  held-out split and a checkpoint every sixth of the steps (300 and 500 of 3,000; without a GPU, two evaluations a
  run), a log line every 50. Warmup and
  cadence are left to the run too, so that `--config.total_steps=` alone keeps them in proportion. Fine-tuning
  from a published checkpoint (`--config.init_from=`) takes a lower `lr`.
  """
  if sized_image:
    config.model.image_size = config.data.image_size = SIZED
  for node in (config.model, *(v for v in config.model.values() if isinstance(v, ml_collections.ConfigDict))):
    if "drop_path" in node:
      node.drop_path = 0.1
  config.model.remat_policy = "none"
  set_fields(config.data, source=source, eval_source="", train_split="train", eval_split="validation", eval_examples=-1)
  set_fields(
    config.data.augment,
    random_resized_crop=True,
    crop_scale=(0.25, 1.0),
    color_jitter=0.4,
    randaugment_ops=2,
    randaugment_magnitude=9,
  )
  set_fields(
    config,
    global_batch_size=SIZED,
    grad_accum_steps=1,
    total_steps=SIZED,
    strategy="ddp",
    log_every=50,
    eval_every=SIZED,
    checkpoint_every=SIZED,
    checkpoint_keep_period=0,
  )
  set_fields(config.optim, lr=lr, warmup_steps=SIZED, end_lr=0.0, weight_decay=0.05, layer_decay=1.0, clip_norm=1.0)
  config.precision.compute_dtype = "float32"
  config.health.enabled = False
