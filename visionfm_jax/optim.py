"""The optimizer: global-norm clipping + AdamW with a weight-decay mask, linear warmup then cosine decay."""

from __future__ import annotations

import re

import jax
import optax


def path_str(path) -> str:
  """'/'-joined dict keys of a tree path ('blocks/attn/qkv/kernel'); box/attribute keys are dropped."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """0 -> lr linearly over warmup_steps, then cosine from lr to end_lr at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=max(total_steps, optim_cfg.warmup_steps + 1), end_value=optim_cfg.end_lr)


def decay_mask_fn(no_decay: tuple[str, ...]):
  """Decay only weight matrices ('kernel' leaves) whose path matches none of the `no_decay` regexes.

  Biases, norm scales and other 1-D params are never kernels, so they never decay; position embeddings,
  class tokens and the like are excluded by regex. Works on boxed (nn.Partitioned) and plain trees.
  """
  patterns = [re.compile(p) for p in no_decay]

  def decays(path, _):
    name = path_str(path)
    return name.rsplit("/", 1)[-1] == "kernel" and not any(p.search(name) for p in patterns)

  return lambda params: jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if optim_cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  parts.append(optax.adamw(schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask_fn(tuple(optim_cfg.no_decay))))
  return optax.chain(*parts)
