"""The task contract (`Task`, `SplitLossTask`): what the loop (training/), the benchmarks (bench/) and the tools
call on a task; and what every task shares: the model built from config, image normalisation, the evaluators'
context (eval batches per process, host -> global), and the config checks of the dense tasks.

A task supplies the model, the loss, the data loaders and the evaluators; `train.py` knows nothing else.
Every task answers (abstract: `loss`, `train_loader`, `evaluators`; the others have defaults here):
  config, mesh, dtype, model     the run's config, its mesh (None outside a run), compute dtype, the flax model
  init_variables(rng)            -> model variables (boxed with logical axis names)
  loss(params, batch, rng)       -> (scalar loss, dict of scalar metrics), on one (micro-)batch
  post_update(params)            -> params after each optimizer update (e.g. clamping CLIP's temperature)
  train_loader(batch_size, ...)  -> a checkpointable iterator of host-local numpy batches
  evaluators(ctx)                -> {name: fn(params) -> {metric: float}}, logged as eval/<name>/<metric>
  panel(ctx)                     -> fn(params) -> an HxWx3 uint8 picture of the model on fixed validation
                                    examples, drawn at every evaluation (evaluate/panels.py), or None
  train_flops_per_example()      -> analytic FLOPs of one training example (for MFU), or None
  synthetic_batch(size, rng)     -> a random host batch in the train loader's layout (benchmarks, AOT plans)
  normalize(images)              -> uint8 images as the model's evaluation input (evaluate/probe, generate)
  couples_examples, splits_loss  whether the loss couples examples, and whether it is split (below)

A loss that couples examples (a contrastive term over the batch) would change with gradient accumulation:
each micro-batch would only see its own negatives. Such tasks are `SplitLossTask`s and split the loss into
  whole_batch(batch, rng)                  -> (batch, context): once per step, before the batch is split: the
                                              whole batch's terms (token and pixel counts, the captioned mask,
                                              the Mixup lambda) and per-example fields that need other examples
                                              (Mixup partners), so that no micro-batch reaches outside itself
  local_loss(params, batch, rng, context)  -> (sum of per-example terms / the context's counts, features, aux)
  batch_features(params, batch, rng, context) -> the same features (values, shapes, dtypes), forward only
  global_loss(params, features, context)   -> (the cross-example term over the whole batch's features, aux)
and `training/grads.py` accumulates in two passes (features of the micro-batches, then the global term's gradient
w.r.t. them, then one backward per micro-batch, whose forward of the last micro-batch serves both passes
unless each device accumulates its own gradients), so that N micro-batches of B give the gradient of one batch
of N * B exactly (GradCache, Gao et al. 2021). Their `loss` is the same terms unsplit.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from visionfm_jax import config_lib, data, models, parallel
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.transforms import device_augment, naflex
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import ConfigError, DataError
from visionfm_jax.models import fp8, vit


def compute_dtype(precision_cfg):
  """The jnp dtype the model computes in: config.precision.compute_dtype ('float32', 'bfloat16', 'float16')."""
  return getattr(jnp, precision_cfg.compute_dtype)


@dataclasses.dataclass
class EvalContext:
  """What an evaluator needs from the loop: the mesh, how to place host batches on it, and what the evaluators and
  the panel built with it share (`once`): the eval sources (`open_eval_source`), the checks made on them."""

  mesh: Mesh
  batch_size: int  # global examples per eval batch
  process_index: int
  process_count: int
  made: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def once(self, key, make: Callable[[], Any]):
    """make()'s value, made at the first call with `key` and handed to every later caller of this context."""
    if key not in self.made:
      self.made[key] = make()
    return self.made[key]

  def open_eval_source(self, data_cfg, what: str | None = None):
    """`data.open_eval_source`, opened once per (source spec, split) for all who share this context: the copies
    of config.data that evaluators read differ from it in their eval source, split and counts only."""
    key = (sources.eval_source_spec(data_cfg), data_cfg.eval_split)
    return self.once(key, lambda: data.open_eval_source(data_cfg, what))

  @property
  def local_batch_size(self) -> int:
    """This process's rows of each eval batch."""
    return self.batch_size // self.process_count

  def to_global(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return parallel.host_to_global(local_batch, parallel.batch_sharding(self.mesh))


def check_dense_config(config, kind: str) -> None:
  """ConfigError unless a dense task's config (`kind`: segmentation, detection) has a `config.head` with the
  fields of config_lib.head_config(kind) and at least one class, a ViT or SwinV2 backbone without a classification
  head, and a model size equal to the training crop."""
  head_fields = tuple(config_lib.head_config(kind))
  where = f"config_lib.base_config(model, task={kind!r}) has it, with its defaults"
  if "head" not in config:
    raise ConfigError(f"config.head: the {kind} task needs it (fields {', '.join(head_fields)}); {where}")
  missing = [f for f in head_fields if f not in config.head]
  if missing:
    raise ConfigError(f"config.head lacks {missing}; {where}")
  if config.model.num_classes:
    raise ConfigError(
      f"config.model.num_classes={config.model.num_classes}: the backbone of a {kind} model has no "
      f"classification head; set it to 0 (classes: config.head.num_classes)"
    )
  if config.head.num_classes < 1:
    raise ConfigError(f"config.head.num_classes={config.head.num_classes}: must be positive")
  if config.model.image_size != config.data.image_size:
    raise ConfigError(
      f"config.model.image_size={config.model.image_size} differs from the training crop "
      f"config.data.image_size={config.data.image_size}"
    )
  if config.model.name not in ("vit", "swinv2"):
    raise ConfigError(f"config.model.name={config.model.name!r}: {kind} takes a 'vit' or 'swinv2' backbone")


def check_naflex_config(config) -> None:
  """ConfigError naming the field when config.data.naflex is on where it does not apply: another task than the
  contrastive one, an image tower other than a ViT of its patch size, or an augmentation of square images."""
  settings = naflex.settings(config.data)
  budgets = config.get("eval", {}).get("zeroshot_naflex_tokens", ())
  if settings is None:
    if budgets:
      raise ConfigError(
        f"config.eval.zeroshot_naflex_tokens={tuple(budgets)}: token budgets of NaFlex inputs; set "
        "config.data.naflex.max_tokens (configs/swinv2_g_clip.py:naflex), or ()"
      )
    return
  field = f"config.data.naflex.max_tokens={settings[1]}"
  if config.task != "contrastive" or config.model.name != "clip":
    raise ConfigError(
      f"{field}: NaFlex inputs train a contrastive (CLIP or SigLIP) model's ViT tower; this is a "
      f"{config.task} run of a {config.model.name} model"
    )
  image = config.model.image
  if image.name != "vit":
    raise ConfigError(
      f"{field}: a {image.name} tower's windows tile a fixed square; NaFlex takes a ViT image tower "
      f"(config.model.image = config_lib.model_config('clip', image_tower='vit').image)"
    )
  patch = vit.parse_variant(image.variant)["patch_size"]
  if patch != settings[0]:
    raise ConfigError(
      f"config.data.naflex.patch_size={settings[0]} differs from the tower's patch {patch} "
      f"(config.model.image.variant={image.variant!r})"
    )
  augment = config.data.augment
  for name, off in (
    ("random_resized_crop", False),
    ("color_jitter", 0.0),
    ("randaugment_ops", 0),
    ("mixup_alpha", 0.0),
  ):
    if augment[name] != off:
      raise ConfigError(
        f"config.data.augment.{name}={augment[name]!r}: NaFlex inputs take the whole image at its "
        f"aspect, resized and flipped on the host; set it to {off!r}"
      )
  if image.token_drop:
    raise ConfigError(
      f"config.model.image.token_drop={image.token_drop}: NaFlex inputs vary their tokens already; set it to 0"
    )


class Task(abc.ABC):
  """The contract of a task (module docstring); builds the model and normalises uint8 images on the device, where
  training images also get their per-pixel augmentation (data/transforms/device_augment.py) when the task's loader
  leaves it to the device."""

  # Whether train_loader's batches carry the per-example parameters of transforms.train_transforms' device part
  # (transforms.device_params_spec); tasks whose loaders augment on the host (dense tasks) set False.
  augments_on_device = True

  def __init__(self, config, mesh: Mesh | None = None):
    self.config = config
    self.mesh = mesh  # the training mesh, for losses that shard_map over it; None outside a run
    self.dtype = compute_dtype(config.precision)
    check_naflex_config(config)
    self.naflex = naflex.settings(config.data)  # (patch size, token budget) of NaFlex inputs, else None
    self.model = models.build(config.model, self.dtype, self.device().platform)
    self._mean = np.asarray(config.data.mean, np.float32) * 255.0
    self._std = np.asarray(config.data.std, np.float32) * 255.0

  def device(self):
    """The first device the model runs on: the mesh's, else this process's (a task built outside a run: tools, dry
    run)."""
    return self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]

  def check_training_devices(self) -> None:
    """ConfigError when training as configured needs what the devices lack: FP8 GEMMs on a GPU older than Hopper
    (models/fp8.py), SwinV2's Pallas window kernel off a GPU (models.check_platform). Evaluation computes in the
    compute dtype, so only what trains asks."""
    fp8.check_device(self.config.precision.gemm, self.device())
    models.check_platform(self.config.model, self.device().platform)

  def training_gemms(self):
    """The context the train step's loss and gradients are traced in: the blocks' GEMMs in FP8 when
    config.precision.gemm says so (models/fp8.py); evaluation traces outside it."""
    return fp8.gemms(self.config.precision.gemm)

  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 255]) NHWC -> (x - mean) / std in fp32 (evaluation, and host-augmented batches); with
    NaFlex, packed images -> the model's {'patches', 'grid'} (data/transforms/naflex.py)."""
    if self.naflex:
      return naflex.normalized(images, self._mean, self._std)
    return device_augment.normalize(images, self._mean, self._std)

  def denormalize(self, images) -> np.ndarray:
    """`normalize`'s inverse on the host: normalised NHWC -> uint8 (clipped), for pictures of model outputs."""
    return np.clip(np.asarray(images, np.float32) * self._std + self._mean, 0, 255).round().astype(np.uint8)

  def train_images(self, batch, dtype=None) -> jax.Array:
    """A training batch's uint8 images, colour-jittered and flipped as its per-example parameters say and
    normalised, in `dtype` (the compute dtype by default): the model's training input (NaFlex: `normalize`'s, in
    `dtype`; the host flipped them)."""
    if self.naflex:
      return naflex.normalized(batch["image"], self._mean, self._std, dtype or self.dtype)
    return device_augment.augment(batch["image"], batch, self._mean, self._std, dtype or self.dtype)

  @abc.abstractmethod
  def loss(self, params, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, {metric name: scalar}) of one (micro-)batch of `train_loader`'s layout, on the device."""

  @abc.abstractmethod
  def train_loader(self, *, batch_size: int, seed: int, process_index: int, process_count: int):
    """A checkpointable iterator of this process's host batches (`batch_size` rows each)."""

  @abc.abstractmethod
  def evaluators(self, ctx: EvalContext) -> dict[str, Callable[[Any], dict[str, float]]]:
    """{name: params -> {metric: float}}; a missing dataset fails here, at start-up."""

  def panel(self, ctx: EvalContext) -> Callable[[Any], np.ndarray] | None:
    """What the model sees and says on fixed validation examples, as a picture; None: the task draws none."""
    del ctx
    return None

  def init_variables(self, rng: jax.Array) -> Any:
    size = self.config.model.image_size
    return self.model.init({"params": rng}, jnp.zeros((1, size, size, 3), jnp.float32), train=False)

  def post_update(self, params):
    return params

  # The loss has cross-example terms (a contrastive term over the batch): unless the task `splits_loss`,
  # gradient accumulation changes it (bench.memory_plan plans no micro-batches for it).
  couples_examples = False
  splits_loss = False

  @functools.cached_property
  def class_names(self) -> list[str]:
    """The training data's class names in label order, derived once (the loader's check, the panel); DataError
    when it has none."""
    return data.train_class_names(self.config.data)

  def check_class_count(self, field: str, num_classes: int, what: str = "classes", *, exact: bool = False) -> None:
    """ConfigError when the data source names more classes than the head has (labels would index past it), or,
    `exact`, any other number than the head has (a larger head trains outputs that no label names: ImageNet-21K
    winter21's 19,167 classes under fall11's 21,841-way head); nothing when the source has no class names (or no
    data: the loader says so next). The dense tasks' heads may add classes (segmentation's background)."""
    try:
      names = self.class_names
    except DataError:
      return
    if len(names) > num_classes or exact and len(names) != num_classes:
      raise ConfigError(
        f"{field}={num_classes} but {sources.training_what(self.config.data)} has "
        f"{len(names)} {what}; set --{field}={len(names)}"
      )

  def train_flops_per_example(self) -> float | None:
    """The model's analytic count (`models.train_flops_per_example`); None for a model without one."""
    return models.train_flops_per_example(self.model)

  def synthetic_batch(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random data in the layout of `train_loader`'s batches: here uint8 images and the device augmentation's
    parameters; tasks add their fields."""
    size = self.config.data.image_size
    if self.naflex:
      return {"image": naflex.synthetic(batch_size, *self.naflex, rng)}
    batch = {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)}
    if self.augments_on_device:
      batch.update(transforms.random_device_params(self.config.data.augment, batch_size, rng))
    return batch


class SplitLossTask(Task):
  """A task whose loss couples the examples, split so that gradient accumulation leaves it unchanged (module
  docstring): the loop calls `whole_batch`, `local_loss`, `batch_features` and `global_loss` when it accumulates,
  `loss` (their sum on the whole batch) when it does not."""

  couples_examples = True
  splits_loss = True

  @abc.abstractmethod
  def whole_batch(self, batch, rng) -> tuple[dict[str, Any], dict[str, Any]]:
    """(batch, context): the whole batch's terms, once per step, before the batch is split."""

  @abc.abstractmethod
  def local_loss(self, params, batch, rng, context) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    """(sum of per-example terms / the context's counts, features for `global_loss`, metrics)."""

  @abc.abstractmethod
  def batch_features(self, params, batch, rng, context) -> Any:
    """`local_loss`'s features, forward only."""

  @abc.abstractmethod
  def global_loss(self, params, features, context) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the cross-example term over the whole batch's features, metrics)."""

  def loss(self, params, batch, rng):
    """The whole-batch loss: local terms plus the global term."""
    batch, context = self.whole_batch(batch, rng)
    local, features, aux = self.local_loss(params, batch, rng, context)
    global_, global_aux = self.global_loss(params, features, context)
    return local + global_, {**aux, **global_aux}
