"""The AOT planner (`python -m visionfm_jax.bench.memory_plan`) on the 8 simulated test devices."""

import json

import pytest

from visionfm_jax import tasks
from visionfm_jax.bench import gpu_target, memory_plan
from visionfm_jax.errors import ConfigError, UserError

from conftest import tiny_aurora_config, tiny_clip_config, tiny_vit_config

TINY = [
  "--config=configs/vit_huge.py:demo",
  "--devices=8",
  "--config.model.variant=pico/4",
  "--config.model.image_size=16",
  "--config.data.image_size=16",
  "--config.global_batch_size=16",
]


def run_plan(capsys, *args):
  code = memory_plan.main(["memory_plan", *TINY, *args])
  out, err = capsys.readouterr()
  return code, out, err, json.loads(out.strip().splitlines()[-1])


def test_a_candidate_is_the_state_shard_plus_batch_shard_plus_temporaries(capsys):
  code, out, err, result = run_plan(
    capsys, "--fit=1", "--remat=nothing_saveable", "--micro_batches=1", "--attention=softmax", "--config.strategy=zero3"
  )
  assert code == 2 and "error: no candidate fits --fit=1" in err
  (row,) = result["candidates"]
  assert row["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and row["strategy"] == "zero3"
  per_device = 16 // 8
  batch = per_device * (16 * 16 * 3 + 4 + 1)  # uint8 images, int32 labels, uint8 flip bits (device_augment)
  step = 4  # the int32 step counter
  # What the compiled step takes per device is exactly the analytic zero3 shard of the state plus the batch.
  assert row["argument_bytes"] == row["state_params_bytes"] + row["state_opt_bytes"] + step + batch
  assert row["alias_bytes"] > 0 and row["temp_bytes"] > 0  # the donated state is reused for the new one
  assert row["total_bytes"] == row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
  assert row["fits"] is False and result["chosen"] is None and result["fit_bytes"] == 1
  assert row["flops"] >= row["xla_flops"] > 0  # the scanned layers' bodies counted once per layer


def test_the_planner_picks_a_setup_a_smaller_budget_rejects_and_a_bigger_one_accepts(capsys, monkeypatch):
  plans, compile_once = {}, memory_plan.plan  # the three budgets plan the same two programs: compile them once

  def plan(config, devices, target=""):
    key = (config.to_json_best_effort(), devices, target)
    plans[key] = plans.get(key) or compile_once(config, devices, target)
    return plans[key]

  monkeypatch.setattr(memory_plan, "plan", plan)
  grid = ["--remat=none,nothing_saveable", "--micro_batches=1", "--attention=softmax,cudnn"]
  code, out, err, roomy = run_plan(capsys, "--fit=1GB", *grid)
  assert code == 0, err
  assert "skipped --attention=cudnn: GPU only" in out
  none, nothing = roomy["candidates"]
  assert none["flops"] < nothing["flops"]  # remat recomputes the forward pass in the backward one
  assert none["total_bytes"] > nothing["total_bytes"]  # and saves no activations
  assert roomy["chosen"] == none
  flags = "--config.model.remat_policy=none --config.grad_accum_steps=1 --config.model.attention=softmax"
  assert none["flags"] == flags and f"  {flags}\n" in out

  _, _, err, tight = run_plan(capsys, f"--fit={none['total_bytes'] - 1}", *grid)
  assert [c["fits"] for c in tight["candidates"]] == [False, True]
  assert tight["chosen"]["setting"]["model.remat_policy"] == "nothing_saveable"

  _, _, _, exact = run_plan(capsys, f"--fit={none['total_bytes']}", "--first_fit", *grid)
  assert len(exact["candidates"]) == 1 and exact["chosen"]["flags"] == flags
  assert len(plans) == 2


def test_micro_batch_counts_are_loop_corrected_and_the_undividable_ones_skipped(capsys):
  code, out, err, result = run_plan(
    capsys, "--fit=1GB", "--remat=nothing_saveable", "--micro_batches=2,1,4", "--attention=jax"
  )
  assert code == 0, err
  assert "skipped --micro_batches=4: config.global_batch_size=16 / config.grad_accum_steps=4" in out
  one, two = result["candidates"]
  assert (one["grad_accum_steps"], two["grad_accum_steps"]) == (1, 2)
  # XLA counts the micro-batch loop's body once, half the step; the planner counts both micro-batches
  assert two["xla_flops"] < 0.7 * one["xla_flops"] and two["flops"] >= 0.95 * one["flops"]
  assert result["chosen"] == one  # as many FLOPs or fewer, and fewer micro-batches


def test_loop_flops_count_each_nested_scan_body_per_trip():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def step(x):
    def inner(c, _):
      return c @ c, None

    def outer(c, _):
      return jax.lax.scan(inner, c, None, length=3)[0] @ c, None

    return jax.lax.scan(outer, x, None, length=4)[0] + jnp.sin(x) @ x

  compiled = jax.jit(step).lower(jnp.ones((64, 64))).compile()
  matmul = 2 * 64**3
  assert memory_plan.xla_flops(compiled) < 3.1 * matmul  # each loop body once: 3 matmuls
  # 4 x (3 + 1) matmuls in the loops, 1 after them; elementwise ops add a few thousand
  assert 17 * matmul <= memory_plan.loop_flops(compiled.as_text(), jax.devices()[0].client) < 17.1 * matmul


@pytest.mark.parametrize(
  "text, size",
  [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("40e9", 40 * 10**9), ("1.5 TiB", int(1.5 * 2**40)), ("512", 512)],
)
def test_fit_sizes(text, size):
  assert memory_plan.parse_size(text) == size


@pytest.mark.parametrize("text", ["80 GB!", "eighty", "-1GB", "0", "80PB"])
def test_a_bad_fit_names_the_flag(text):
  with pytest.raises(ConfigError, match="--fit="):
    memory_plan.parse_size(text)


def test_micro_batches_that_would_change_a_coupled_loss_are_not_planned(monkeypatch):
  # CLIP's and Aurora's losses are split (two passes): their micro-batches give the whole batch's gradient
  for config in (tiny_clip_config(), tiny_aurora_config()):
    grid, skipped = memory_plan.candidate_settings(config, 8, ["nothing_saveable"], ["1", "2"], ["softmax"])
    assert [s["grad_accum_steps"] for s in grid] == [1, 2] and not skipped
  # a task whose examples meet in an unsplit loss would change under micro-batches
  monkeypatch.setattr(tasks.ContrastiveTask, "splits_loss", False)
  grid, skipped = memory_plan.candidate_settings(tiny_clip_config(), 8, ["nothing_saveable"], ["1", "2"], ["softmax"])
  assert [s["grad_accum_steps"] for s in grid] == [1]
  assert "its loss couples the examples" in skipped["--micro_batches=2"]


def test_a_tower_with_remat_by_stage_is_not_swept_by_remat():
  """--remat sets model.remat_policy, which a tower's stage_remat_policies overrides: refused, naming the field."""
  config = tiny_aurora_config(**{"model.encoder.stage_remat_policies": ("none", "nothing_saveable")})
  field = r"config\.model\.encoder\.stage_remat_policies="
  with pytest.raises(ConfigError, match=field + r"\('none', 'nothing_saveable'\): .* --" + field + r"\(\)"):
    memory_plan.candidate_settings(config, 8, ["nothing_saveable"], ["1"], ["softmax"])


def test_every_remat_policy_has_its_place_in_the_sweep_order():
  from visionfm_jax import config_lib  # pylint: disable=g-import-not-at-top

  assert sorted(memory_plan.REMAT_BY_RECOMPUTE) == sorted(config_lib.REMAT_POLICIES)


def test_attention_fields_are_found_in_every_tower():
  from configs import aurora_xl, swinv2_g_clip, vit_huge  # pylint: disable=g-import-not-at-top

  assert memory_plan.attention_fields(vit_huge.get_config().model) == ["model.attention"]
  assert memory_plan.attention_fields(swinv2_g_clip.get_config().model) == [
    "model.image.attention",
    "model.text.attention",
  ]
  assert memory_plan.attention_fields(aurora_xl.get_config().model) == [
    "model.encoder.attention",
    "model.text.attention",
  ]


def test_bad_sweep_values_name_the_flag(capsys):
  for flag in ("--remat=nothing", "--micro_batches=0", "--attention=flash", "--fit=lots"):
    code = memory_plan.main(["memory_plan", *TINY, flag])
    assert code == 2 and f"error: {flag}" in capsys.readouterr().err


@pytest.mark.slow
def test_the_window_kernel_is_a_swinv2_attention_name_and_no_vit_one(capsys):
  # a SwinV2's attention field takes 'pallas' (its window kernel): GPU only, so skipped on the simulated CPU devices
  swin = [
    "--config=configs/swinv2_cls.py:demo",
    "--devices=8",
    "--config.model.variant=pico",
    "--config.global_batch_size=16",
    "--fit=1GB",
    "--remat=nothing_saveable",
    "--micro_batches=1",
  ]
  code = memory_plan.main(["memory_plan", *swin, "--attention=pallas,softmax"])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert "skipped --attention=pallas: GPU only" in out
  assert [c["setting"]["model.attention"] for c in result["candidates"]] == ["softmax"]
  # a ViT's does not
  code = memory_plan.main(["memory_plan", *TINY, "--attention=pallas"])
  err = capsys.readouterr().err
  assert code == 2 and "error: --attention=pallas: ['pallas'] not in" in err and "config.model.attention" in err


def test_layouts_are_planned_as_meshes_and_those_the_devices_refuse_skipped(capsys):
  code, out, err, result = run_plan(
    capsys,
    "--fit=1GB",
    "--remat=nothing_saveable",
    "--micro_batches=1",
    "--attention=softmax",
    "--fsdp=all,2,3",
    "--config.strategy=zero3",
  )
  assert code == 0, err
  assert "skipped --fsdp=3: config.mesh=" in out  # 3 does not divide the 8 devices
  every, hybrid = result["candidates"]
  assert every["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert hybrid["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
  assert hybrid["flags"].endswith("--config.mesh.fsdp=2 --config.mesh.data=-1")
  # the state is split 2 ways instead of 8: four times the shard
  assert hybrid["state_opt_bytes"] == pytest.approx(4 * every["state_opt_bytes"], rel=0.05)
  assert "fsdp 2 x data" in out and "fsdp all" in out
  assert result["chosen"] == every  # no GPU target: the fewest FLOPs, then bytes


def test_on_a_gpu_target_the_shortest_predicted_step_is_chosen():
  def row(step, flops, fits=True):
    return {"predicted_step_s": step, "flops": flops, "grad_accum_steps": 4, "total_bytes": 1, "fits": fits}

  fast, cheap, too_big = row(9.2, 2.0), row(11.0, 1.0), row(5.0, 1.0, fits=False)
  assert memory_plan.choose([cheap, too_big, fast]) is fast


def test_on_a_gpu_target_the_default_fit_is_what_the_launch_flags_let_a_job_allocate(tmp_path, monkeypatch):
  """XLA_PYTHON_CLIENT_MEM_FRACTION in the target's launch script (or one it sources) scales what the GPU reports;
  a script that sets it twice or never is refused by name."""
  a100 = gpu_target.get("a100")
  assert memory_plan.default_fit_bytes("a100") == int(0.92 * a100.memory_bytes)
  assert memory_plan.default_fit_bytes("") == memory_plan.parse_size("80GB")
  monkeypatch.setattr(gpu_target, "REPO", str(tmp_path))
  (tmp_path / "launch").mkdir()
  fraction = "export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}\n"
  (tmp_path / "launch" / "xla_flags_h100.sh").write_text(fraction)
  (tmp_path / "launch" / "xla_flags_a100.sh").write_text('source "$(dirname "$0")/xla_flags_h100.sh"\n')
  assert memory_plan.default_fit_bytes("a100") == int(0.5 * a100.memory_bytes)
  (tmp_path / "launch" / "xla_flags_h100.sh").write_text("export NCCL_IB_SL=1\n")
  with pytest.raises(UserError, match="xla_flags_a100.sh and the scripts it sources set .* default 0 times"):
    memory_plan.default_fit_bytes("a100")


def test_a_swinv2_form_stage_by_stage_is_a_candidate_of_the_sweep():
  """--unroll=1,0/1 plans the rolled loop, and Aurora's pico encoder with its first stage straight-line and its
  second a rolled loop (stage_scan_unrolls), with flags a shell passes as they are; a model without a SwinV2 tower
  refuses a form by stage."""
  config = tiny_aurora_config()
  grid, _ = memory_plan.candidate_settings(config, 8, ["nothing_saveable"], ["1"], ["softmax"], unrolls=["1", "0/1"])
  assert [{k: v for k, v in s.items() if "unroll" in k} for s in grid] == [
    {"model.scan_unroll": 1},
    {"model.encoder.stage_scan_unrolls": (0, 1)},
  ]
  assert "--config.model.encoder.stage_scan_unrolls=(0,1)" in memory_plan.as_flags(grid[1])
  assert "unroll 0/1" in memory_plan.describe(grid[1])
  assert memory_plan.apply(config, grid[1]).model.encoder.stage_scan_unrolls == (0, 1)
  with pytest.raises(ConfigError, match=r"--unroll=0/-1: expected"):
    memory_plan.parse_unrolls(["0/-1"])
  with pytest.raises(ConfigError, match=r"--unroll=0/0: a form stage by stage is a SwinV2 tower's"):
    memory_plan.unroll_setting(tiny_vit_config().model, (0, 0))
