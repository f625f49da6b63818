"""`config.sharding.overrides` through what a user runs, on the 8 simulated devices: the compiled train step of a
SwinV2 CLIP under ZeRO-3 (SwinV2-G's recipe) with one block's position-bias MLP kept whole, the memory planner's
state bytes, and `main --dry_run` stopping at a rule that fits no param."""

import json
import math
import re

import jax
import numpy as np
import pytest

from visionfm_jax import parallel, tasks
from visionfm_jax.bench import memory_plan
from visionfm_jax.training import step as step_lib

from conftest import tiny_clip_config, tiny_vit_config
from test_bad_input import run_main_in_process

CPB_FC1 = "image/stage_0/blocks_{}/attn/cpb_mlp/fc1/kernel"  # (2, 512): the MLP's input to its hidden width


def _entry_parameters(hlo: str) -> dict[str, tuple[str, str]]:
  """{JAX name of an argument leaf ("state.params['image']..."): (its per-device shape, its sharding)} of the
  compiled module's entry computation."""
  entry = hlo[hlo.index("\nENTRY") :]
  found = re.findall(
    r"= (f32\[[\d,]*\])\S* parameter\(\d+\), sharding=(\{[^}]*\}), metadata=\{op_name=\"([^\"]+)\"", entry
  )
  return {name.replace("\\'", "'"): (shape, sharding) for shape, sharding, name in found}


def _jax_name(part: str, path: str) -> str:
  return part + "".join(f"['{key}']" for key in path.split("/"))


@pytest.mark.slow  # one compile of a CLIP train step: ~10 CPU s
def test_one_swinv2_blocks_position_bias_mlp_stays_whole_in_the_compiled_zero3_step():
  """ZeRO-3 splits every CPB MLP kernel's hidden width over the 8 devices; the override keeps block 0's whole on
  each device (an f32[2,512] argument, replicated) while block 1's stays split (f32[2,64]) and block 0's Adam
  moments stay split as ZeRO-3 has them."""
  moved, kept = CPB_FC1.format(0), CPB_FC1.format(1)
  config = tiny_clip_config(strategy="zero3", **{"sharding.overrides": ((f"^{moved}$", "replicated"),)})
  mesh = parallel.make_mesh(config.mesh, jax.devices())
  task = tasks.build(config, mesh)
  batch = task.synthetic_batch(config.global_batch_size, np.random.default_rng(0))
  arguments = _entry_parameters(step_lib.compile_train_step(config, mesh, batch, task).as_text())
  assert arguments[_jax_name("state.params", moved)] == ("f32[2,512]", "{replicated}")
  assert arguments[_jax_name("state.params", kept)] == ("f32[2,64]", "{devices=[1,8]<=[8]}")
  moment = [
    (name, value)
    for name, value in arguments.items()
    if name.startswith("state.opt_state") and name.endswith(_jax_name(".mu", moved))
  ]
  assert [value for _, value in moment] == [("f32[2,64]", "{devices=[1,8]<=[8]}")], moment


def test_the_memory_planner_plans_the_moved_param(capsys):
  """Under ddp every param is whole; the override splits the patch embedding's kernel (4, 4, 3, 32) over fsdp: the
  plan's params bytes are a 1/8 of it less 7/8, and the compiled step takes exactly that state (its arguments: the
  state's planned bytes plus the step counter and the batch, as test_memory_plan's zero3 row)."""
  from test_memory_plan import TINY  # pylint: disable=g-import-not-at-top

  code = memory_plan.main(
    [
      "memory_plan",
      *TINY,
      "--fit=1",
      "--remat=nothing_saveable",
      "--micro_batches=1",
      "--attention=softmax",
      "--config.strategy=ddp",
      "--config.sharding.overrides=(('^patch_embed/kernel$', (None, None, None, 'fsdp')),)",
    ]
  )
  out, err = capsys.readouterr()
  assert code == 2 and "error: no candidate fits --fit=1" in err
  (row,) = json.loads(out.strip().splitlines()[-1])["candidates"]
  params = sum(
    math.prod(x.shape)
    for x in jax.tree.leaves(jax.eval_shape(tasks.build(tiny_vit_config()).init_variables, jax.random.key(0))["params"])
  )  # TINY's model
  kernel = 4 * 4 * 3 * 32 * 4
  assert row["state_params_bytes"] == params * 4 - kernel * 7 // 8
  batch = 2 * (16 * 16 * 3 + 4 + 1)  # 2 examples per device: uint8 images, int32 labels, uint8 flip bits
  assert row["argument_bytes"] == row["state_params_bytes"] + row["state_opt_bytes"] + 4 + batch


@pytest.mark.parametrize(
  "rule,culprit",
  [
    (
      "('^image/stage_0/blocks_9/attn/cpb_mlp', 'replicated')",
      "config.sharding.overrides: '^image/stage_0/blocks_9/attn/cpb_mlp' matches no param",
    ),
    (
      "('patch_embed/kernel$', (None, None, 'fsdp', None))",
      "config.sharding.overrides: param image/patch_embed/kernel of shape (2, 2, 3, 16): its dim of 3 does not "
      "divide over mesh axes 'fsdp'",
    ),
    (
      "('patch_embed/kernel$', ('embed', 'heads', 'lenght', None))",
      "('patch_embed/kernel$', ('embed', 'heads', 'lenght', None)) has no valid layout ('lenght' is neither a "
      "logical axis",
    ),
  ],
)
def test_main_dry_run_stops_at_a_rule_that_fits_no_param_with_one_error_line(
  rule, culprit, tmp_path, monkeypatch, capsys
):
  """The SwinV2-G CLIP recipe's demo planned for 8 devices under ZeRO-3: a rule matching nothing, a layout its
  param's dims refuse, a misspelt axis: exit 2, one `error:` line naming the rule or the param."""
  status, _, stderr = run_main_in_process(
    (
      "--config=configs/swinv2_g_clip.py:demo",
      f"--workdir={tmp_path / 'run'}",
      "--dry_run",
      "--config.strategy=zero3",
      "--config.model.image.variant=femto",
      "--config.model.image.patch_size=2",
      f"--config.sharding.overrides=({rule},)",
    ),
    monkeypatch,
    capsys,
  )
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert culprit in errors[0], errors[0]
  assert not (tmp_path / "run").exists()
