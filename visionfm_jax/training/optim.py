"""The optimizer: global-norm clipping + AdamW with a weight-decay mask, linear warmup then cosine decay.

Fine-tuning adds three rules over '/'-joined param paths (`param_rules`, the mechanism of the weight-decay mask:
a rule's regex is re.search-ed in the path, the first matching rule wins):

  layer_decay  layer-wise lr decay (BEiT, MAE): a param of layer i gets lr * decay^(L + 1 - i); the model numbers
               its layers (`layer_ids`, models/backbone.py)
  lr_mults     ((regex, multiplier), ...): the first rule whose regex matches a param scales its lr
  freeze       (regex, ...): matching params get zero updates, no weight decay and no Adam moments

A param's multiplier (layer decay x lr rule) scales its whole AdamW step, the Adam direction and the decoupled
weight decay alike, as BEiT's per-group lr scale does. Scanned blocks are one leaf with a leading `layers`
axis, so their multiplier is a vector along that axis. Global-norm clipping, and the logged
`train/grad_norm`, see only the trainable gradients: the train step zeroes the frozen ones where they are made
(`zero_frozen_grads_fn`), so XLA does not compute them.
With none of the three set, the optimizer (and its state) is the plain one, so older checkpoints restore.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from visionfm_jax import models
from visionfm_jax.errors import ConfigError
from visionfm_jax.parallel.sharding import Partitioned
from visionfm_jax.param_rules import ParamRules, named_leaves, path_str


def check_schedule(optim_cfg, total_steps: int) -> None:
  """ConfigError when the schedule cannot be drawn: end_lr above lr (it decays from lr to end_lr), or a warmup
  longer than the run."""
  if optim_cfg.end_lr > optim_cfg.lr:
    raise ConfigError(
      f"config.optim.end_lr={optim_cfg.end_lr} exceeds config.optim.lr={optim_cfg.lr}: the "
      f"schedule decays from lr to end_lr"
    )
  if optim_cfg.warmup_steps > total_steps:
    raise ConfigError(f"config.optim.warmup_steps={optim_cfg.warmup_steps} exceeds config.total_steps={total_steps}")


class Anchor(NamedTuple):
  """Where the schedule of a resumed run decays from: the step and the rate the run had reached there
  (training/resume.py sets one when a resume changes the schedule's length)."""

  step: int
  lr: float


def schedule(optim_cfg, total_steps: int, anchor: Anchor | None = None) -> optax.Schedule:
  """0 -> lr linearly over warmup_steps, then cosine from lr to end_lr at total_steps.

  From `anchor.step` on, a cosine from `anchor.lr` to end_lr at total_steps: the rate goes on from where it was
  instead of jumping to the new schedule's value at that step."""
  base = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim_cfg.lr,
    warmup_steps=optim_cfg.warmup_steps,
    decay_steps=max(total_steps, optim_cfg.warmup_steps + 1),
    end_value=optim_cfg.end_lr,
  )
  if anchor is None:
    return base
  start, start_lr, end_lr = anchor.step, anchor.lr, optim_cfg.end_lr
  length = max(total_steps - start, 1)

  def resumed(count):
    fraction = jnp.clip((count - start) / length, 0.0, 1.0)
    cosine = end_lr + (start_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))
    return jnp.where(count < start, base(count), cosine)

  return resumed


def decay_mask_fn(no_decay: tuple[str, ...]):
  """Decay only 'kernel' leaves whose path matches none of the `no_decay` regexes.

  No other leaf decays, whatever its rank: biases, norm scales, embedding tables, position embeddings, class
  and mask tokens, learned queries, logit scales. So `no_decay` only exempts kernels under matching paths (e.g.
  SwinV2's 'cpb_mlp'). Works on boxed (Partitioned) and plain trees. A rule that matches no param is no error
  here: the default list serves several model families (`param_rules`).
  """
  excluded = ParamRules.of_patterns(no_decay, field="config.optim.no_decay")

  def decays(path, _):
    name = path_str(path)
    return name.rsplit("/", 1)[-1] == "kernel" and not excluded.matches(name)

  return lambda params: jax.tree_util.tree_map_with_path(decays, params)


# ------------------------------------------------------------------------------------------ layer ids


def layer_ids(model, names) -> tuple[dict[str, int | np.ndarray], int]:
  """{name: layer id} of the params `names` as the model numbers them (models/backbone.py: BEiT's numbering,
  embeddings 0, block i i + 1, final norm and heads L + 1) and L, the number of blocks. ConfigError for a model
  without layer ids (one that has no backbone, or several towers of blocks: CLIP, Aurora)."""
  numbered = models.layer_ids(model, names)
  if numbered is None:
    raise ConfigError(
      f"config.optim.layer_decay needs a model with one ViT or SwinV2 backbone; a "
      f"{type(model).__name__} has no layer ids"
    )
  return numbered


# ------------------------------------------------------------------------------------ rules per param


def lr_multipliers(optim_cfg, shapes: dict[str, tuple[int, ...]], model=None) -> dict[str, float | np.ndarray]:
  """The factor each param's update is scaled by: decay^(L + 1 - layer) (`layer_ids` of `model`) times the first
  matching `lr_mults` rule's multiplier. Scanned leaves get an array shaped to broadcast along their leading
  axis. `model` is needed only with layer decay, whose range (0, 1] config_lib.check checks."""
  decay = float(optim_cfg.layer_decay)
  rules = ParamRules(optim_cfg.lr_mults, field="config.optim.lr_mults", value_name="multiplier", convert=float)
  rules.require_matches(list(shapes))
  ids, total = layer_ids(model, shapes) if decay != 1.0 else ({}, 0)
  out: dict[str, float | np.ndarray] = {}
  for name, shape in shapes.items():
    mult: float | np.ndarray = rules.value(name, 1.0)
    if name in ids:
      layer_mult = decay ** (total + 1 - np.asarray(ids[name], np.float64))
      mult = layer_mult.reshape((-1,) + (1,) * (len(shape) - 1)) * mult if layer_mult.ndim else float(layer_mult) * mult
    out[name] = np.asarray(mult, np.float32) if isinstance(mult, np.ndarray) else float(mult)
  return out


def scale_by_multipliers(
  multipliers: Callable[[dict[str, tuple[int, ...]]], dict[str, Any]],
) -> optax.GradientTransformation:
  """Multiplies each update by `multipliers({path: shape})[path]` (a float, or an array that broadcasts)."""

  def init(params):
    multipliers({n: tuple(np.shape(x)) for n, x in named_leaves(params)})  # config errors at state creation
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    names = [path_str(p) for p, _ in flat]
    mults = multipliers({n: tuple(u.shape) for n, (_, u) in zip(names, flat)})

    def scale(name, u):
      m = mults[name]
      return u if isinstance(m, float) and m == 1.0 else u * np.asarray(m, u.dtype)

    return jax.tree_util.tree_unflatten(treedef, [scale(n, u) for n, (_, u) in zip(names, flat)]), state

  return optax.GradientTransformation(init, update)


def freeze_labels_fn(freeze: tuple[str, ...]):
  """params -> tree of 'frozen' / 'train' labels (one per Partitioned box on boxed trees, so the frozen
  params' Adam moments are absent, not empty boxes)."""
  frozen = ParamRules.of_patterns(freeze, field="config.optim.freeze")

  def labels(params):
    names = [n for n, _ in named_leaves(params)]
    frozen.require_matches(names)
    if all(frozen.matches(n) for n in names):
      raise ConfigError(f"config.optim.freeze={tuple(freeze)!r} freezes every param: nothing to train")
    label = lambda path, _: "frozen" if frozen.matches(path_str(path)) else "train"
    return jax.tree_util.tree_map_with_path(label, params, is_leaf=lambda x: isinstance(x, Partitioned))

  return labels


def zero_frozen_grads_fn(freeze: tuple[str, ...]):
  """grads -> grads with the frozen params' entries replaced by zeros (the identity when nothing is frozen).

  The optimizer ignores those entries anyway; zeroing them where they are made lets XLA drop their computation
  (a frozen backbone's weight gradients; all of its backward when only the head trains) and keeps them out of
  the logged `train/grad_norm` and the fp16 finiteness check, which then see what clipping sees."""
  if not freeze:
    return lambda grads: grads
  labels_fn = freeze_labels_fn(tuple(freeze))

  def zero_frozen(grads):
    return jax.tree.map(lambda label, g: g if label == "train" else jnp.zeros_like(g), labels_fn(grads), grads)

  return zero_frozen


# ---------------------------------------------------------------------------------------- the optimizer


def fresh_optimizer(config, model=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, its schedule) of a run from step 0, without a resume anchor: what the benchmarks, plans and
  summaries compile (a training run takes its schedule from its run plan)."""
  lr_schedule = schedule(config.optim, config.total_steps)
  return make_optimizer(config.optim, lr_schedule, model), lr_schedule


def make_optimizer(optim_cfg, lr_schedule: optax.Schedule, model=None) -> optax.GradientTransformation:
  """clip -> AdamW (masked weight decay) -> `lr_schedule` (`schedule`'s); with fine-tuning rules: clip -> Adam ->
  weight decay (frozen params: zero instead, via optax.partition) -> per-param multipliers -> `lr_schedule`.
  `model` (the task's) numbers the layers of layer-wise decay."""
  fine_tuning = optim_cfg.layer_decay != 1.0 or optim_cfg.lr_mults or optim_cfg.freeze
  clip = [optax.clip_by_global_norm(optim_cfg.clip_norm)] if optim_cfg.clip_norm else []
  mask = decay_mask_fn(tuple(optim_cfg.no_decay))
  if not fine_tuning:
    return optax.chain(
      *clip,
      optax.adamw(
        lr_schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=mask
      ),
    )
  step = optax.chain(
    *clip,
    optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
    optax.add_decayed_weights(optim_cfg.weight_decay, mask),
  )
  if optim_cfg.freeze:
    step = optax.partition({"train": step, "frozen": optax.set_to_zero()}, freeze_labels_fn(tuple(optim_cfg.freeze)))
  return optax.chain(
    step,
    scale_by_multipliers(lambda shapes: lr_multipliers(optim_cfg, shapes, model)),
    optax.scale_by_learning_rate(lr_schedule),
  )


def learning_rate(lr_schedule: optax.Schedule, opt_state) -> jax.Array:
  """The rate the optimizer's next update applies: `lr_schedule` at the count its schedule state keeps (a step
  that the guards skip leaves the optimizer state, and so the count, where it was)."""
  is_schedule_state = lambda x: isinstance(x, optax.ScaleByScheduleState)
  (schedule_state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule_state) if is_schedule_state(s)]
  return lr_schedule(schedule_state.count)
