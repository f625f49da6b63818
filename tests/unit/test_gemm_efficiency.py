"""The roofline's GEMM efficiency by shape (bench/gemm_efficiency.py): the published figures it is read from, the
(M, N, K) of every GEMM a program holds, and an A100 priced from prices fitted on the H100's rows."""

import dataclasses
import gzip
import json
import os
import subprocess
import sys

import pytest

from visionfm_jax.bench import gemm_efficiency, gpu_target, hlo_cost, pricing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data")

# one bf16 cuBLAS GEMM of a ViT-H MLP's shape (M = 8192 tokens, N = 1280, K = 5120): bound by its FLOPs on any GPU
DIMS = json.dumps(
  {
    "gemm_backend_config": {
      "dot_dimension_numbers": {
        "lhs_contracting_dimensions": ["1"],
        "rhs_contracting_dimensions": ["0"],
        "lhs_batch_dimensions": [],
        "rhs_batch_dimensions": [],
      }
    }
  },
  separators=(",", ":"),
)
BIG_GEMM = f"""HloModule big_gemm

ENTRY %main (a: bf16[8192,5120], b: bf16[5120,1280]) -> bf16[8192,1280] {{
  %a = bf16[8192,5120]{{1,0}} parameter(0)
  %b = bf16[5120,1280]{{1,0}} parameter(1)
  ROOT %gemm = bf16[8192,1280]{{1,0}} custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={DIMS}
}}
"""


@pytest.mark.parametrize("name", ["pico_vit_h100.hlo.gz", "pico_vit_zero3_16xh100.hlo.gz"])
def test_every_gemm_of_a_gpu_program_has_the_shape_of_its_flops(name):
  with gzip.open(os.path.join(DATA, name), "rt", encoding="utf-8") as f:
    gemms = [k for k in hlo_cost.Program(f.read()).kernels if k.kind == "gemm"]
  assert gemms and all(len(k.shape) == 3 and 2 * k.shape[0] * k.shape[1] * k.shape[2] == k.flops for k in gemms)


def test_each_target_reaches_its_published_rate_at_the_shape_it_was_found_at():
  """The table's figures are reproduced where they were measured, and every target of gpu_target has them."""
  table = gemm_efficiency.table()
  assert set(table["targets"]) == set(gpu_target.TARGETS)
  for name, spec in table["targets"].items():
    assert spec["peak_tflops"] * 1e12 == gpu_target.TARGETS[name].peak_flops_16bit
    assert gemm_efficiency.efficiency(name, tuple(spec["mamf_shape"])) == pytest.approx(
      spec["mamf_tflops"] / spec["peak_tflops"]
    )
    assert gemm_efficiency.relative_rate(name, name, (4096, 4096, 4096)) == 1.0
  # the H200 has the H100's die at its power: the H100's row (its measured rows are no faster than the H100 fit)
  for shape in [(8224, 1280, 5120), (25088, 2048, 8192), (1280, 5120, 8224)]:
    assert gemm_efficiency.relative_rate("h200", "h100", shape) == pytest.approx(1.0)


def test_a_last_wave_one_tile_long_halves_the_utilisation():
  """109 tiles of 256 x 128 on the A100's 108 SMs run in two waves: 109 / 216 of them busy; on the H100's 132, one."""
  tiles = [[256, 128]]
  assert gemm_efficiency.utilisation(256 * 109, 128, 108, tiles) == pytest.approx(109 / 216)
  assert gemm_efficiency.utilisation(256 * 109, 128, 132, tiles) == pytest.approx(109 / 132)
  assert gemm_efficiency.utilisation(256 * 108, 128 * 3, 108, tiles) == 1.0


def test_prices_fitted_on_the_h100_price_the_a100s_16_bit_gemms_at_its_rate_for_their_shape():
  program = hlo_cost.Program(BIG_GEMM)
  [gemm] = program.kernels
  assert gemm.shape == (8192, 1280, 5120)
  a100, prices = gpu_target.get("a100"), pricing.Prices(gemm=0.5, memory=0.9, launch_us=0.0)
  rate = gemm_efficiency.relative_rate("a100", "h100", gemm.shape)
  assert (
    rate
    == pytest.approx(gemm_efficiency.efficiency("a100", gemm.shape) / gemm_efficiency.efficiency("h100", gemm.shape))
    and rate != 1.0
  )
  as_fitted = pricing.predict(program, a100, prices)["step_s"]  # the H100's efficiency as it is
  assert as_fitted == pytest.approx(gemm.flops / (312e12 * 0.5))
  assert pricing.predict(program, a100, prices, "h100")["step_s"] == pytest.approx(as_fitted / rate)
  # the fitted GPU itself, and GEMMs not in 16 bits, keep the fitted efficiency
  h100 = gpu_target.get("h100")
  assert pricing.predict(program, h100, prices, "h100")["step_s"] == pricing.predict(program, h100, prices)["step_s"]
  fp32 = type("P", (), {"kernels": [dataclasses.replace(gemm, dtype="f32")]})()
  assert pricing.predict(fp32, a100, prices, "h100")["step_s"] == pricing.predict(fp32, a100, prices)["step_s"]


def test_the_roofline_prices_an_a100_program_from_the_calibrations_gpu(tmp_path):
  """`bench.roofline --target=a100` on a dumped program: its GEMMs at the calibration's efficiency times the
  A100's rate relative to the GPU the calibration was fitted on."""
  path = tmp_path / "big_gemm.hlo"
  path.write_text(BIG_GEMM)
  run = subprocess.run(
    [sys.executable, "-m", "visionfm_jax.bench.roofline", f"--hlo={path}", "--target=a100"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    check=True,
  )
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  prices, record = pricing.load_prices()
  program = hlo_cost.Program(BIG_GEMM)
  expected = pricing.predict(program, gpu_target.get("a100"), prices, record["target"])["step_s"] * 1e3
  assert summary["predicted_step_ms"] == pytest.approx(expected)
  assert summary["predicted_step_ms"] != pytest.approx(
    pricing.predict(program, gpu_target.get("a100"), prices)["step_s"] * 1e3
  )
