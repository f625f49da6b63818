"""The PyTorch twin of a classification config: the same architecture as HF `transformers` (ViT or Swinv2,
built from our model through `convert`'s config mapping), batch, dtype, loss, clipping and AdamW, on the same
machine. Only the benchmark imports torch; it is a test dependency, not a run-time one.

On CPU it runs in fp32 with torch's intra-op threads = the cores JAX uses; on GPU in the config's compute dtype
under `torch.autocast` (fp32 master weights, as ours). Attention is PyTorch's fused `sdpa` where transformers
supports it for the architecture (ViT), else its `eager` implementation (Swinv2 in transformers 5).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from visionfm_jax import convert
from visionfm_jax.errors import ConfigError, UserError
from visionfm_jax.training import optim as optim_lib


def hf_config_dict(model) -> dict:
  """transformers' config of `model`, from the converter the model names (`convert.converter`)."""
  module = convert.converter(model)
  if module is None:
    raise ConfigError(
      f"--compare=torch: a {type(model).__name__} has no transformers twin; ViT and SwinV2 classifiers do"
    )
  if getattr(model, "pool", "cls") != "cls":
    raise ConfigError(
      f"--compare=torch: config.model.pool={model.pool!r}; transformers' ViT classifier pools the "
      f"class token (use pool='cls')"
    )
  return module.hf_config(model)


def twin_architecture(config, model) -> tuple[str, dict]:
  """(transformers class name, its config fields) of `model`'s twin; a ConfigError when it has none. Cheap:
  the benchmark calls it before compiling anything."""
  if config.task != "classification" or not config.model.get("num_classes"):
    raise ConfigError("--compare=torch: only classification configs (a ViT or SwinV2 with a head) have a twin")
  fields = hf_config_dict(model)
  arch = fields.pop("architectures")[0]
  if not arch.endswith("ForImageClassification"):
    raise ConfigError(f"--compare=torch: the twin of this model is a {arch} without a classifier")
  return arch, fields


class TorchStep:
  """One training step of the twin: forward, cross-entropy, backward, global-norm clipping, AdamW at our
  learning-rate schedule."""

  def __init__(self, config, model, batch: dict[str, np.ndarray]):
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError(f"--compare=torch needs torch and transformers installed ({e})") from e
    arch, fields = twin_architecture(config, model)
    self.torch = torch
    platform = jax.devices()[0].platform
    self.device = torch.device("cuda" if platform == "gpu" else "cpu")
    if self.device.type == "cpu":
      torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores XLA's CPU thread pool uses
    self.model, self.attention = _build(transformers, arch, fields)
    self.model = self.model.to(self.device).train()
    optim = config.optim
    self.optimizer = torch.optim.AdamW(
      self.model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps, weight_decay=optim.weight_decay
    )
    self.clip_norm = optim.clip_norm
    self.schedule = optim_lib.schedule(optim, config.total_steps)  # ours: warmup then cosine
    self.step = 0
    images = np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    self.images = torch.from_numpy(images).to(self.device)
    self.labels = torch.from_numpy(batch["label"].astype(np.int64)).to(self.device)
    self.autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.precision.compute_dtype)
    if self.autocast is not None and self.device.type == "cpu":
      raise ConfigError(
        f"--compare=torch on CPU compares fp32 steps; set "
        f"--config.precision.compute_dtype=float32 (not {config.precision.compute_dtype})"
      )
    self.scaler = torch.amp.GradScaler("cuda") if self.autocast == torch.float16 else None

  def _step(self):
    torch = self.torch
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
      logits = self.model(pixel_values=self.images).logits
      loss = torch.nn.functional.cross_entropy(logits.float(), self.labels)
    if self.scaler is not None:
      self.scaler.scale(loss).backward()
      self.scaler.unscale_(self.optimizer)
    else:
      loss.backward()
    if self.clip_norm:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    if self.scaler is not None:
      self.scaler.step(self.optimizer)
      self.scaler.update()
    else:
      self.optimizer.step()
    return loss

  def _next_lr(self):
    """Sets the learning rate of the coming step from our schedule (outside the timed region)."""
    lr = float(self.schedule(self.step))
    for group in self.optimizer.param_groups:
      group["lr"] = lr
    self.step += 1

  def timed_step(self) -> tuple[float, float]:
    self._next_lr()
    wall, cpu = time.perf_counter(), time.process_time()
    self._step()
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu

  def loss(self) -> float:
    self._next_lr()
    return float(self._step().detach())


def _build(transformers, arch: str, fields: dict):
  """(model, attention implementation): sdpa where transformers has it for `arch`, else eager."""
  fields = dict(fields)
  model_type = fields.pop("model_type")

  def make(attention):
    config = transformers.AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = attention  # pylint: disable=protected-access
    return getattr(transformers, arch)(config)

  try:
    return make("sdpa"), "sdpa"
  except ValueError:  # transformers raises for architectures without an sdpa path
    return make("eager"), "eager"
