"""launch/gpu_next.sh, the next lent GPU's call, on the CPU: its rehearsal (`--rehearse`: tiny models, 4 steps)
runs every stage it can here and reports each one's figures; with a stand-in for the Python processes, a failed
stage leaves the later ones running, a spent budget skips them, and `--only` names known stages."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax.bench import gpu_next, window_attention
from visionfm_jax.config_lib import schema
from visionfm_jax.models import swinv2

from conftest import ROOT, compilation_cache_env, cpu_env

RECIPES = schema.PRECISION["gemm"].domain.names
GPU_ONLY = {"swin_step_pallas", "swin_step_cudnn"}


def run_script(*args: str, python: str = sys.executable, warm=None, **env) -> subprocess.CompletedProcess:
  env = warm.env(cpu_env(1, PYTHON=warm.python, **env)) if warm else cpu_env(1, PYTHON=python, **env)
  return subprocess.run(
    ["bash", "launch/gpu_next.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )


def results(report: pathlib.Path) -> dict:
  return {r["stage"]: r for r in map(json.loads, (report / "results.jsonl").read_text().splitlines())}


def test_the_stages_cover_every_gemm_recipe_the_schema_names_at_both_batches():
  names = [s.name for s in gpu_next.stages("python", "out", gpu_next.GPU_SIZES)]
  vit = [n for n in names if n.startswith("vit_")]
  assert vit == [f"vit_{b}_{g}" for b in ("b32", "b64") for g in gpu_next.gemm_recipes()]
  assert sorted(gpu_next.gemm_recipes()) == sorted(RECIPES) and gpu_next.gemm_recipes()[0] == "compute_dtype"
  delayed = [g for g in RECIPES if "delayed" in g]
  assert gpu_next.gemm_recipes()[1 : 1 + len(delayed)] == delayed  # the new recipe first among the FP8 ones
  assert names[len(vit) :] == [
    "attention_w7",
    "attention_w40",
    "swin_step_pallas",
    "swin_step_cudnn",
    "swin_step_softmax",
    "swin_form_grouped",
    "swin_form_unroll7",
  ]


def harness_flags(argv) -> dict:
  fv = window_attention.make_flags()
  fv(["window_attention", *argv])
  return dict(side=fv.window, windows=fv.windows, heads=fv.heads, head_dim=fv.head_dim, shifted=fv.shifted)


@pytest.mark.parametrize(
  "sizes,variant,image_size,window_size",
  [
    (gpu_next.GPU_SIZES, "G", 224, 7),
    (gpu_next.GPU_SIZES, "G", 640, 40),
    (gpu_next.REHEARSAL_SIZES, "pico", 32, 4),
    (gpu_next.REHEARSAL_SIZES, "pico", 32, 8),
  ],
)
def test_the_attention_stages_time_the_models_windows(sizes, variant, image_size, window_size):
  """Each attention stage's shape is the SwinV2 stage's (G: its 42-block stage 2; pico: stage 0), and the harness
  computes what WindowAttention does: its softmax path and the kernel (Pallas's interpreter here) against
  models/swinv2.py's own on that shape's windows."""
  embed_dim, depths, heads = swinv2.SIZES[variant]
  stage = 2 if variant == "G" else 0
  feature, side, shift = swinv2.stage_windows(image_size, window_size, len(depths))[stage]
  name = "attention_w7" if window_size in (7, 4) else "attention_w40"
  shape = harness_flags(dict(sizes.attention)[name])
  assert shape == dict(
    side=side,
    windows=(feature // side) ** 2,
    heads=heads[stage],
    head_dim=embed_dim * 2**stage // heads[stage],
    shifted=bool(shift),
  )
  if variant == "G":
    return
  assert window_attention.MASK_VALUE == swinv2.MASK_VALUE and window_attention.MAX_LOGIT_SCALE == swinv2.MAX_LOGIT_SCALE
  (q, k, v, logit_scale, table, _), regions = window_attention.inputs(shape, 2, jnp.float32)
  want_regions = swinv2.shift_regions(feature, feature, side, shift) if shift else None
  assert (regions is None) == (want_regions is None)
  if shift:
    np.testing.assert_array_equal(regions, want_regions)
  mask = None if regions is None else jnp.where(regions[:, :, None] == regions[:, None, :], 0.0, swinv2.MASK_VALUE)
  scale = jnp.exp(jnp.minimum(logit_scale, swinv2.MAX_LOGIT_SCALE))
  want = swinv2.window_attention(q, k, v, scale, swinv2.bias_of_offsets(table, side), mask)
  for implementation in ("softmax", "pallas"):
    got = window_attention.attend(implementation, side, regions)(q, k, v, logit_scale, table)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=implementation)


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_and_reports_its_figures(tmp_path, warm_python, compilation_cache):
  report = tmp_path / "report"
  proc = run_script(
    "--rehearse",
    f"--out={tmp_path / 'out'}",
    f"--report={report}",
    warm=warm_python,
    **compilation_cache_env(compilation_cache),
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = results(report)
  assert list(rows) == [s.name for s in gpu_next.stages("python", "out", gpu_next.REHEARSAL_SIZES)]
  for name, row in rows.items():
    if name in GPU_ONLY or (name == "swin_form_grouped" and not gpu_next.has_stage_forms()):
      assert row["status"] == "skipped", row
    elif name == "swin_form_unroll7" and rows["swin_form_grouped"]["status"] == "ok":
      assert row["status"] == "skipped" and "earlier swin_form" in row["why"]
    else:
      assert row["status"] == "ok", row
  for gemm in RECIPES:
    for label in ("b32", "b64"):
      row = rows[f"vit_{label}_{gemm}"]
      assert row["steps_per_sec"] > 0 and row["steps_timed"] == 2 and row["first_window_excess_s"] is not None
      assert f"--config.precision.gemm={gemm}" in row["command"]
  for name in ("attention_w7", "attention_w40"):
    implementations = rows[name]["implementations"]
    assert set(implementations) == {"pallas", "softmax"}
    assert all(f["fwd_bwd_ms"] > 0 and f["compile_s"] > 0 for f in implementations.values())
  assert rows["attention_w7"]["shape"]["shifted"] and not rows["attention_w40"]["shape"]["shifted"]
  assert rows["swin_step_softmax"]["img_per_sec"] > 0 and rows["swin_step_softmax"]["compile_s"] > 0
  table = (report / "table.txt").read_text()
  assert table in proc.stdout and all(f"  {name} " in table for name in rows)
  assert (report / "failures.txt").read_text() == ""


def stand_in_python(tmp_path: pathlib.Path) -> str:
  """A PYTHON whose main fails with the first FP8 recipe and otherwise writes its metric rows and then hangs, whose
  bench and window harness print a figure at once, and which runs everything else (the device check) with this
  interpreter."""
  path = tmp_path / "python"
  path.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *"-m visionfm_jax.main "*gemm={gpu_next.gemm_recipes()[1]}" "*) echo "error: a stand-in failure" >&2; exit 2 ;;
  *"-m visionfm_jax.main "*)
    for arg in "$@"; do [[ $arg == --workdir=* ]] && mkdir -p "${{arg#*=}}" && workdir=${{arg#*=}}; done
    for step in 2 4; do
      echo '{{"step": '$step', "train/img_per_sec": 100, "train/data_wait_fraction": 0.0, "train/loss": 1.0}}'
    done >"$workdir/metrics.jsonl"
    exec sleep 600 ;;  # the final checkpoint and evaluation: the script ends main once its last row is written
  *"-m visionfm_jax.bench.window_attention "*) echo '{{"implementation": "pallas", "window": 4, "tokens": 16, \
"windows": 4, "heads": 2, "head_dim": 8, "batch": 2, "shifted": true, "fwd_bwd_ms": 1.0, "compile_s": 1.0}}' ;;
  *"-m visionfm_jax.bench "*) echo '{{"img_per_sec": 100.0, "step_s": 0.08, "compile_s": 9.0}}' ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
  path.chmod(0o755)
  return str(path)


def test_a_failed_stage_leaves_the_later_ones_running_and_a_spent_budget_skips_them(tmp_path):
  python = stand_in_python(tmp_path)
  report = tmp_path / "report"
  proc = run_script("--rehearse", f"--out={tmp_path / 'out'}", f"--report={report}", python=python)
  assert proc.returncode == 1, proc.stderr
  rows = results(report)
  failed = f"vit_b32_{gpu_next.gemm_recipes()[1]}"
  assert rows[failed]["status"] == "FAIL" and rows[failed]["why"] == "exit 2: error: a stand-in failure"
  assert f"== {failed}: exit 2" in (report / "failures.txt").read_text()
  assert rows["vit_b32_compute_dtype"]["step_ms"] == pytest.approx(2 / 100 * 8 * 1e3 / 2)  # batch 8, 2 steps a row
  assert rows["vit_b64_compute_dtype"]["status"] == "ok" and rows["vit_b64_compute_dtype"]["seconds"] < 60
  assert not (tmp_path / "out" / "run_vit_b64_compute_dtype").exists()  # the workdir goes once measured
  assert rows["attention_w40"]["implementations"]["pallas"]["fwd_bwd_ms"] == 1.0
  # the first SwinV2-G form that runs ends its group: the stage-by-stage one (config.model.stage_scan_unrolls)
  assert rows["swin_form_grouped"]["status"] == "ok" and rows["swin_form_grouped"]["compile_s"] == 9.0
  assert rows["swin_form_unroll7"]["status"] == "skipped", rows["swin_form_unroll7"]
  # one second of budget: every stage skipped, the call reported as short
  proc = run_script("--rehearse", "--budget=1", f"--out={tmp_path / 'out'}", f"--report={report}", python=python)
  assert proc.returncode == 1
  assert {r["why"] for n, r in results(report).items() if n not in GPU_ONLY} >= {"0 s of the budget left"}
  # --only runs the stages it names; an unknown name is one error line
  proc = run_script(
    "--rehearse", "--only=attention_w7", f"--out={tmp_path / 'out'}", f"--report={report}", python=python
  )
  assert proc.returncode == 0, proc.stderr
  assert [n for n, r in results(report).items() if r["status"] == "ok"] == ["attention_w7"]
  proc = run_script("--rehearse", "--only=attention_w8", python=python)
  assert proc.returncode == 2 and proc.stderr.startswith("error: --only: no stage attention_w8 (the stages: vit_b32")
