"""`python -m visionfm_jax.bench.roofline` with a GPU target, in a process of its own as a user runs it: one error
line without XLA's CUDA compiler, and the deviceless H100 plan of ViT-H/14 against its measured peak with it."""

import collections
import json
import re
import subprocess
import sys

import pytest

from visionfm_jax.bench import hlo_cost

from test_gpu_plan import HAS_GPU_COMPILER, ROOT


@pytest.mark.skipif(HAS_GPU_COMPILER, reason="checks the error printed where XLA's CUDA compiler is absent")
def test_a_gpu_target_without_the_cuda_compiler_is_one_error_line():
  proc = subprocess.run(
    [sys.executable, "-m", "visionfm_jax.bench.roofline", "--config=configs/vit_huge.py:demo", "--target=h100"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "pip install -e '.[gpu-aot]'" in lines[0], proc.stderr[-2000:]


def test_a_calibration_that_frees_an_unknown_price_is_one_error_line():
  proc = subprocess.run(
    [sys.executable, "-m", "visionfm_jax.bench.roofline", "--calibrate", "--free=gemm_fp8,gemm8"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
    "error: --free: no price gemm8 (the prices: gemm, attention, memory, launch_us, gemm_fp8)"
  ], proc.stderr


@pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs XLA's CUDA compiler: pip install -e '.[gpu-aot]'")
def test_the_deviceless_h100_plan_of_vit_h14_matches_the_measured_peak():
  """BENCHMARKS.md ("GPU (H100 / H200): MFU") measured 14.5 GiB for ViT-H/14 at batch 128 (nothing_saveable, cuDNN)
  on an H100."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "visionfm_jax.bench.roofline",
      "--config=configs/vit_huge.py",
      "--target=h100",
      "--config.global_batch_size=128",
      "--config.strategy=ddp",
      "--config.model.remat_policy=nothing_saveable",
      "--config.model.attention=cudnn",
      "--config.model.scan_unroll=1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["plan_gib"] == pytest.approx(14.5, rel=0.02)


@pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs XLA's CUDA compiler: pip install -e '.[gpu-aot]'")
@pytest.mark.parametrize("recipe", ["fp8", "fp8_bf16_wgrad"])
@pytest.mark.parametrize(
  "layout",
  [
    ["--config.strategy=ddp", "--config.global_batch_size=4"],
    ["--devices=8", "--config.mesh.fsdp=8", "--config.global_batch_size=8"],
  ],
  ids=["one_gpu", "fsdp_over_8"],
)
def test_every_block_gemm_of_an_fp8_vit_is_an_fp8_gemm_on_an_h100(recipe, layout, tmp_path):
  """XLA's GPU compiler turns each block product into a cuBLASLt FP8 GEMM, q, k and v's included: the forward and
  the input gradient always (its output gradient e5m2 in 'fp8', e4m3 by rows in 'fp8_bf16_wgrad'), the weight gradient
  in 'fp8' only; in the recipe's straight-line form with the weights sharded (fsdp) too, where XLA otherwise runs the
  input gradient in bf16 on a gathered dequantized shard."""
  dump = tmp_path / "step.hlo"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "visionfm_jax.bench.roofline",
      "--config=configs/vit_huge.py",
      "--target=h100",
      "--config.model.variant=pico/8",
      f"--config.precision.gemm={recipe}",
      f"--dump_hlo={dump}",
      *layout,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  gemms = [k for k in hlo_cost.Program(dump.read_text()).kernels if k.kind == "gemm" and "blocks/" in k.label]
  parts = ("attn/qkv", "attn/out", "mlp/fc1", "mlp/fc2")
  for part in parts:
    dtypes = collections.Counter(k.dtype for k in gemms if part in k.label)
    per_layer = ["f8e4m3fn", "f8e4m3fn", "f8e5m2"] if recipe == "fp8" else ["bf16", "f8e4m3fn", "f8e4m3fn"]
    layers = sum(dtypes.values()) // 3
    assert layers and dtypes == collections.Counter(per_layer * layers), (part, dtypes)


def test_the_account_of_a_dumped_program_names_its_optimizer_update_by_the_state_it_writes():
  """`--hlo`: the pico ViT's AdamW updates (params, mu and nu of a tensor in one fusion each, its root an `add`)
  are one row under the state they write; no compiler needed."""
  proc = subprocess.run(
    [sys.executable, "-m", "visionfm_jax.bench.roofline", "--hlo=tests/data/pico_vit_h100.hlo.gz", "--top=100"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [line.split(None, 6) for line in proc.stdout.splitlines() if line.startswith(("elementwise ", "reduction "))]
  ops = {row[6] for row in rows if len(row) == 7}
  assert "update: state.opt_state, state.params" in ops and "add" not in ops, proc.stdout[-3000:]


@pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs XLA's CUDA compiler: pip install -e '.[gpu-aot]'")
@pytest.mark.parametrize(
  "policy,forwards_per_backward",
  [("dots_with_no_batch_dims_saveable", 2), ("dots_with_no_batch_dims_and_attention_saveable", 1)],
)
def test_kept_cudnn_attention_outputs_spare_the_backward_a_second_forward(policy, forwards_per_backward, tmp_path):
  """Under remat the backward of a cuDNN attention reads its forward's outputs: recomputed under
  dots_with_no_batch_dims_saveable (a second forward kernel a block), kept under its attention-saving form."""
  dump = tmp_path / "step.hlo"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "visionfm_jax.bench.roofline",
      "--config=configs/vit_huge.py",
      "--target=h100",
      "--config.model.variant=pico/8",
      "--config.strategy=ddp",
      "--config.global_batch_size=4",
      f"--config.model.remat_policy={policy}",
      "--config.model.attention=cudnn",
      f"--dump_hlo={dump}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  targets = collections.Counter(re.findall(r'custom_call_target="__cudnn\$(fmha\w+)"', dump.read_text()))
  forwards = sum(n for name, n in targets.items() if not name.endswith("Backward"))
  backwards = sum(n for name, n in targets.items() if name.endswith("Backward"))
  assert backwards and forwards == forwards_per_backward * backwards, targets
