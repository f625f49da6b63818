"""parallel/checks.py: the global batch against its micro-batches, the mesh and the processes."""

import re

import pytest

from visionfm_jax import config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.parallel import checks


def test_the_batch_must_split_into_its_micro_batches():
  config = config_lib.base_config()
  config.update(global_batch_size=12, grad_accum_steps=5)
  with pytest.raises(ConfigError, match="config.global_batch_size=12 is not divisible by config.grad_accum_steps=5"):
    checks.check_batch(config)
  config.grad_accum_steps = 4
  checks.check_batch(config)


def test_a_micro_batch_must_divide_over_the_data_parallel_devices():
  config = config_lib.base_config()
  config.update(global_batch_size=24, grad_accum_steps=2)
  assert checks.check_mesh(config, 4) == {"data": 1, "fsdp": 4, "tensor": 1}
  with pytest.raises(ConfigError, match=r"= 12 examples per micro-batch do not divide over the 8 data-parallel"):
    checks.check_mesh(config, 8)


def test_batch_axes_must_divide_over_the_processes():
  """Each process loads global_batch_size / P rows: right only when the data x fsdp shards split over them."""
  config = config_lib.base_config()
  config.global_batch_size = 8
  config.mesh.update(data=1, fsdp=-1, tensor=2)
  checks.check_mesh(config, num_devices=4, num_processes=2)  # fsdp 2: one batch shard per process
  with pytest.raises(
    ConfigError,
    match=r"config.mesh=.*data x fsdp = 1 batch shards do not divide over the 2 "
    r"processes",
  ):
    checks.check_mesh(config, num_devices=2, num_processes=2)  # launch/local.sh 2 --config.mesh.tensor=2
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  checks.check_mesh(config, num_devices=2, num_processes=2)


@pytest.mark.parametrize(
  "fields,culprit",
  [
    ({"strategy": "zero3"}, "config.strategy='zero3'"),
    ({"strategy": "fsdp"}, "config.strategy='fsdp'"),
    ({"strategy": "zero2", "mesh.tensor": 2}, "config.mesh.tensor=2"),
  ],
)
def test_unreduced_accumulation_needs_whole_params_and_whole_rows_on_each_device(fields, culprit):
  config = config_lib.set_paths(config_lib.base_config(), {"accumulate_unreduced": True, **fields})
  with pytest.raises(ConfigError, match=re.escape(culprit)):
    checks.check_batch(config)
  config.strategy, config.mesh.tensor = "zero2", 1
  checks.check_batch(config)
