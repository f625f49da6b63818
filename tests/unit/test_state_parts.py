"""The optional parts of the train state (training/state.py, `PARTS`) drive its init and its restore: a part added to
the list alone is created with the state, laid out, checkpointed, restored in its checkpoint's layout and adopted, with
no edit to the loop (training/train.py). The batch's sizes are derived once (`parallel.BatchGeometry`)."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from visionfm_jax import parallel
from visionfm_jax.training import checkpoint, resume, train
from visionfm_jax.training import state as state_lib
from visionfm_jax.training import step as step_lib
from visionfm_jax.training.state import TrainState

from conftest import tiny_vit_config


class _FourParts(TrainState):
  launches: Any = None  # the fake fourth part: how many launches trained this state


def _launches_part(calls: list[str]) -> state_lib.StatePart:
  """A part that counts the launches: 0 when created, one more at each adoption; `calls` records what ran."""

  def create(config, params):
    calls.append("create")
    return jnp.zeros((), jnp.int32)

  def checkpoint_target(target, config, saved_config):
    calls.append(f"target of a checkpoint trained for {(saved_config or {}).get('total_steps')} steps")
    return target.launches

  def adopt(state, resumed):
    calls.append(f"adopt {resumed.where.rsplit('/', 1)[-1]}")
    return jax.device_put(state.launches + 1, state.step.sharding)

  return state_lib.StatePart("launches", create, checkpoint_target, adopt)


def _restore_or_init(config, directory, init_fn, shardings):
  checkpointer = checkpoint.Checkpointer(directory, async_save=False, run_config=resume.as_json(config))
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  return checkpointer, train._restore_or_init(config, checkpointer, init_fn, abstract, shardings, None, None)


def test_a_fourth_part_in_the_list_is_created_laid_out_checkpointed_restored_and_adopted(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(state_lib, "PARTS", (*state_lib.PARTS, _launches_part(calls)))
  config = tiny_vit_config()

  def init_fn(rng):  # as step.make_init_fn makes the state, with a tiny model
    params = {"w": jax.random.normal(rng, (4,))}
    return _FourParts(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=(), **state_lib.created(config, {"params": params})
    )

  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  _, shardings, specs = step_lib.state_shardings(init_fn, mesh, config)
  assert specs.launches == P() and specs.health is None  # laid out whole on every device, as the step
  directory = str(tmp_path / "checkpoints")

  checkpointer, state = _restore_or_init(config, directory, init_fn, shardings)
  assert int(state.launches) == 0  # created (its init traced as often as JAX traces it), never adopted
  assert set(calls) == {"target of a checkpoint trained for None steps", "create"}
  checkpointer.save(3, state.replace(step=jnp.int32(3)))
  checkpointer.close()
  assert int(checkpoint.restore_on_host(tmp_path / "checkpoints" / "3" / "state")["launches"]) == 0

  calls.clear()
  checkpointer, state = _restore_or_init(config, directory, init_fn, shardings)
  checkpointer.close()
  assert (int(state.step), int(state.launches)) == (3, 1)
  assert calls == ["target of a checkpoint trained for 10 steps", "adopt 3"]


def test_each_optional_field_of_the_state_is_one_part_in_field_order():
  optional = [f.name for f in dataclasses.fields(TrainState) if f.default is None]
  assert [part.field for part in state_lib.PARTS] == optional == ["loss_scale", "health", "ema_params", "fp8_history"]


def test_the_batch_geometry_splits_the_global_batch_once():
  config = tiny_vit_config(global_batch_size=32, grad_accum_steps=2)
  batch = parallel.BatchGeometry.of(config, {"data": 2, "fsdp": 4, "tensor": 1}, 2)
  assert dataclasses.astuple(batch) == (32, 16, 16, 2, 8) and batch.micro_batch_per_device == 2
