"""The optimizer: global-norm clipping + AdamW with a weight-decay mask, linear warmup then cosine decay.

Fine-tuning adds three rules over '/'-joined param paths (`param_rules`, the mechanism of the weight-decay mask:
a rule's regex is re.search-ed in the path, the first matching rule wins):

  layer_decay  layer-wise lr decay (BEiT, MAE): a param of layer i gets lr * decay^(L + 1 - i), see `layer_ids`
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

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from visionfm_jax.errors import ConfigError
from visionfm_jax.training.param_rules import ParamRules, named_leaves, path_str

# Params before the first block: layer 0 of the layer-wise decay (ViT and SwinV2 names).
EMBEDDING_PARAMS = ("patch_embed", "cls_token", "pos_embed", "mask_token", "patch_norm")
_BLOCKS = re.compile(r"blocks(?:_(\d+))?")
_STAGE = re.compile(r"stage_(\d+)")


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """0 -> lr linearly over warmup_steps, then cosine from lr to end_lr at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=max(total_steps, optim_cfg.warmup_steps + 1), end_value=optim_cfg.end_lr)


def decay_mask_fn(no_decay: tuple[str, ...]):
  """Decay only weight matrices ('kernel' leaves) whose path matches none of the `no_decay` regexes.

  Biases, norm scales and other 1-D params are never kernels, so they never decay; position embeddings,
  class tokens and the like are excluded by regex. Works on boxed (nn.Partitioned) and plain trees. A rule that
  matches no param is no error here: the default list names params of several model families (`param_rules`).
  """
  excluded = ParamRules.of_patterns(no_decay, field="config.optim.no_decay")

  def decays(path, _):
    name = path_str(path)
    return name.rsplit("/", 1)[-1] == "kernel" and not excluded.matches(name)

  return lambda params: jax.tree_util.tree_map_with_path(decays, params)


# ------------------------------------------------------------------------------------------ layer ids

def _block_position(name: str) -> tuple[str, int | None, str, int | None] | None:
  """(root, stage or None, 'blocks' | 'downsample', unrolled block index or None) of a param inside the blocks
  of a ViT ('<root>/blocks[_i]/...') or SwinV2 ('<root>/stage_s/blocks[_i]/...', '<root>/stage_s/downsample/...');
  None for params outside them."""
  parts = name.split("/")
  for j, part in enumerate(parts):
    root = "/".join(parts[:j])
    blocks = _BLOCKS.fullmatch(part)
    if blocks:
      return root, None, "blocks", int(blocks.group(1)) if blocks.group(1) else None
    stage = _STAGE.fullmatch(part)
    if stage and j + 1 < len(parts):
      inner = _BLOCKS.fullmatch(parts[j + 1])
      if inner:
        return root, int(stage.group(1)), "blocks", int(inner.group(1)) if inner.group(1) else None
      return root, int(stage.group(1)), parts[j + 1], None
  return None


def layer_ids(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int | np.ndarray], int]:
  """Layer id of every param, BEiT numbering, and L, the number of blocks.

  Of the one ViT or SwinV2 backbone in the tree (at its root, or under a prefix such as 'backbone'): patch
  embedding, class token, position embedding, mask token and patch norm are layer 0, block i (0-based, counted
  across SwinV2's stages) is layer i + 1, and a SwinV2 patch merging takes the id of the block before it (the
  last block of its stage, as in the official SimMIM/Swin fine-tuning code; embeddings likewise sit before
  block 0). Everything else (final norm, heads, a segmentation neck) is layer L + 1. Scanned blocks are one leaf
  with a leading depth axis: their id is the vector of their layers' ids.
  """
  positions = {name: _block_position(name) for name in shapes}
  roots = sorted({p[0] for p in positions.values() if p is not None})
  if len(roots) != 1:
    found = ", ".join(repr(r or "<top level>") for r in roots) or "none"
    raise ConfigError(f"config.optim.layer_decay needs one ViT or SwinV2 backbone ('blocks' or 'stage_<s>/blocks' "
                      f"params); block stacks found at: {found}")
  root = roots[0]
  depths: dict[int | None, int] = {}
  for name, pos in positions.items():
    if pos is not None and pos[2] == "blocks":
      depth = shapes[name][0] if pos[3] is None else pos[3] + 1
      depths[pos[1]] = max(depths.get(pos[1], 0), depth)
  starts, total = {}, 0
  for stage in sorted(depths, key=lambda s: -1 if s is None else s):
    starts[stage], total = total, total + depths[stage]

  def layer_of(name: str) -> int | np.ndarray:
    pos = positions[name]
    if pos is None:
      relative = name[len(root) + 1:] if root else name
      embedding = (name.startswith(root + "/") or not root) and relative.split("/")[0] in EMBEDDING_PARAMS
      return 0 if embedding else total + 1
    _, stage, kind, index = pos
    if kind != "blocks":  # SwinV2 patch merging: the id of its stage's last block
      return starts[stage] + depths[stage]
    if index is None:
      return starts[stage] + 1 + np.arange(shapes[name][0])
    return starts[stage] + 1 + index

  return {name: layer_of(name) for name in shapes}, total


# ------------------------------------------------------------------------------------ rules per param

def lr_multipliers(optim_cfg, shapes: dict[str, tuple[int, ...]]) -> dict[str, float | np.ndarray]:
  """The factor each param's update is scaled by: decay^(L + 1 - layer) (`layer_ids`) times the first matching
  `lr_mults` rule's multiplier. Scanned leaves get an array shaped to broadcast along their leading axis."""
  decay = float(optim_cfg.layer_decay)
  if decay <= 0:
    raise ConfigError(f"config.optim.layer_decay={decay}: must be positive (1.0 disables it)")
  rules = ParamRules(optim_cfg.lr_mults, field="config.optim.lr_mults", value_name="multiplier", convert=float)
  rules.require_matches(list(shapes))
  ids, total = layer_ids(shapes) if decay != 1.0 else ({}, 0)
  out = {}
  for name, shape in shapes.items():
    mult = rules.value(name, 1.0)
    if name in ids:
      layer_mult = decay ** (total + 1 - np.asarray(ids[name], np.float64))
      mult = layer_mult.reshape((-1,) + (1,) * (len(shape) - 1)) * mult if layer_mult.ndim else float(layer_mult) * mult
    out[name] = np.asarray(mult, np.float32) if isinstance(mult, np.ndarray) else float(mult)
  return out


def scale_by_multipliers(multipliers: Callable[[dict[str, tuple[int, ...]]], dict[str, Any]]
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
  """params -> tree of 'frozen' / 'train' labels (one per nn.Partitioned box on boxed trees, so the frozen
  params' Adam moments are absent, not empty boxes)."""
  frozen = ParamRules.of_patterns(freeze, field="config.optim.freeze")

  def labels(params):
    names = [n for n, _ in named_leaves(params)]
    frozen.require_matches(names)
    if all(frozen.matches(n) for n in names):
      raise ConfigError(f"config.optim.freeze={tuple(freeze)!r} freezes every param: nothing to train")
    label = lambda path, _: "frozen" if frozen.matches(path_str(path)) else "train"
    return jax.tree_util.tree_map_with_path(label, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))

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

def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """clip -> AdamW (masked weight decay) -> lr schedule; with fine-tuning rules: clip -> Adam -> weight decay
  (frozen params: zero instead, via optax.partition) -> per-param multipliers -> lr schedule."""
  fine_tuning = optim_cfg.layer_decay != 1.0 or optim_cfg.lr_mults or optim_cfg.freeze
  clip = [optax.clip_by_global_norm(optim_cfg.clip_norm)] if optim_cfg.clip_norm else []
  mask = decay_mask_fn(tuple(optim_cfg.no_decay))
  if not fine_tuning:
    return optax.chain(*clip, optax.adamw(schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                                          eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=mask))
  step = optax.chain(*clip, optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
                     optax.add_decayed_weights(optim_cfg.weight_decay, mask))
  if optim_cfg.freeze:
    step = optax.partition({"train": step, "frozen": optax.set_to_zero()}, freeze_labels_fn(tuple(optim_cfg.freeze)))
  return optax.chain(step, scale_by_multipliers(lambda shapes: lr_multipliers(optim_cfg, shapes)),
                     optax.scale_by_learning_rate(schedule(optim_cfg, total_steps)))
