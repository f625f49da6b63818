"""A `:small` recipe's image size, batch and steps are the machine's (config_lib/sizing.py, `fill_machine`): a GPU's
224 px, 128 and 3,000 steps (1,000 from a checkpoint); without one, 64 px and the batch and steps a CPU trains in
minutes by the model's FLOPs, each said on its line; a field given keeps its value."""

from __future__ import annotations

import math
import re

import pytest

from visionfm_jax import config_lib
from visionfm_jax.config_lib import sizing as rules
from visionfm_jax.training import sizing


def _small(spec: str, **fields):
  config = config_lib.set_paths(config_lib.load(f"configs/{spec}"), fields)
  if "num_classes" in config.model and config.model.num_classes == config_lib.SIZED:
    config.model.num_classes = 4  # the data's class count, which sizing reads first
  return config


def _sizes(config) -> tuple:
  return config.model.image_size, config.data.image_size, config.global_batch_size, config.total_steps


def test_without_a_gpu_the_vit_small_recipe_trains_minutes_of_64_px_batches_of_32():
  config = _small("vit_huge.py:small")
  lines = config_lib.fill_machine(config, None, sizing._flops_per_example)
  flops = sizing._flops_per_example(config)
  steps = math.floor(rules.CPU_SECONDS * rules.CPU_FLOPS_PER_S / (flops * 32))
  assert _sizes(config) == (64, 64, 32, steps) and 30 < steps < 300, _sizes(config)
  assert [line.split(" is ")[0] for line in lines] == [
    "config.model.image_size=-1",
    "config.data.image_size=-1",
    "config.global_batch_size=-1",
    "config.total_steps=-1",
    "config.eval_every=-1",
  ]
  assert all(": this machine has no GPU" in line for line in lines), lines
  assert re.search(rf"is {steps}: .* about 4 minutes at 20 GFLOP/s, steps of 32 examples of 2\.\d GFLOP each", lines[3])
  assert config.eval_every == -(-steps // 2), lines[4]  # two evaluations: on a CPU each takes minutes
  assert config_lib.fill_steps(config) == [
    f"config.optim.warmup_steps=-1 is {steps // 10}: a tenth of config.total_steps={steps}",
    f"config.checkpoint_every=-1 is {-(-steps // 6)}: a sixth of config.total_steps={steps}, rounded up",
  ]


@pytest.mark.parametrize("init_from, steps", [("", 3000), ("/ckpt/vit_b16_in21k", 1000)])
def test_with_a_gpu_the_small_recipes_train_224_px_batches_of_128(init_from, steps):
  config = _small("vit_huge.py:small", init_from=init_from)
  lines = config_lib.fill_machine(config, "gpu", lambda _: pytest.fail("a GPU's sizes need no FLOPs"))
  assert _sizes(config) == (224, 224, 128, steps) and len(lines) == 4 and config.eval_every == config_lib.SIZED
  assert all(": this machine has a GPU" in line for line in lines), lines


def test_a_size_given_keeps_its_value_and_the_steps_follow_it():
  config = _small("vit_huge.py:small", global_batch_size=8)
  lines = config_lib.fill_machine(config, None, sizing._flops_per_example)
  assert config.global_batch_size == 8 and len(lines) == 4
  assert config.total_steps == min(
    math.floor(rules.CPU_SECONDS * rules.CPU_FLOPS_PER_S / (sizing._flops_per_example(config) * 8)), rules.CPU_STEPS[1]
  )


def test_a_heavier_model_takes_a_smaller_cpu_batch_and_a_swin_tower_keeps_its_224_px():
  clip_vit = _small("swinv2_g_clip.py:small,vit")
  config_lib.fill_machine(clip_vit, None, sizing._flops_per_example)
  assert sizing._flops_per_example(clip_vit) * clip_vit.global_batch_size <= rules.CPU_STEP_FLOPS
  assert clip_vit.global_batch_size < rules.CPU_BATCH and clip_vit.model.image_size == 64
  swin = _small("swinv2_g_clip.py:small")
  config_lib.fill_machine(swin, None, sizing._flops_per_example)
  assert swin.model.image_size == swin.data.image_size == 224 and rules.CPU_STEPS[0] <= swin.total_steps


def test_this_suite_runs_without_a_gpu():
  assert sizing.accelerator() is None


@pytest.mark.parametrize(
  "platforms, devices, plugin, expected",
  [
    (None, ["/dev/nvidia0"], True, "gpu"),  # a CUDA device and jax's plugin for it
    (None, ["/dev/nvidia0"], False, None),  # a GPU that this jax cannot use
    ("cpu", ["/dev/nvidia0"], True, None),  # JAX_PLATFORMS=cpu
    ("cuda,cpu", [], False, "gpu"),
    (None, [], False, None),
  ],
)
def test_the_machine_is_told_without_starting_jaxs_backend(monkeypatch, platforms, devices, plugin, expected):
  """main sizes the config before jax.distributed.initialize, which must come before the backend starts."""
  monkeypatch.setattr(sizing.xla_bridge, "backends_are_initialized", lambda: False)
  monkeypatch.setattr(sizing, "jax", type("Jax", (), {"config": type("Config", (), {"jax_platforms": platforms})}))
  monkeypatch.setattr(sizing.glob, "glob", lambda pattern: devices if "nvidia" in pattern else [])
  monkeypatch.setattr(sizing.os.path, "exists", lambda path: False)
  monkeypatch.setattr(sizing, "_installed", lambda *modules: plugin)
  assert sizing.accelerator() == expected
