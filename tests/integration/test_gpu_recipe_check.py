"""launch/gpu_recipe_check.sh on the CPU: its rehearsal (`--rehearse`: tiny models, 40 photos, 6 steps) runs every
stage and reports each one's figures and the loss's spread; with stand-ins for main and bench, a failed stage leaves
the later ones running, a spent budget skips the stages, and either makes the exit status 1."""

import json
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT, compilation_cache_env, cpu_env

MAIN_RUNS = ["compute_dtype", "fp8", "compute_dtype_seed1"]
STAGES = [
  "warmup",
  "photos",
  "shards",
  *(f"vit_main_{run}" for run in MAIN_RUNS),
  "vit_profile_fp8",
  "swin_bench_compute_dtype",
  "swin_bench_fp8",
  "vit_bench_compute_dtype",
  "vit_bench_fp8",
]
GEMMS = ("compute_dtype", "fp8")


def run_check(*args: str, python: str = sys.executable, warm=None, **env) -> subprocess.CompletedProcess:
  """launch/gpu_recipe_check.sh ARGS with PYTHON=`python`, or the warm interpreter `warm` (tests/warm_python.py),
  and `env`."""
  env = warm.env(cpu_env(1, PYTHON=warm.python, **env)) if warm else cpu_env(1, PYTHON=python, **env)
  return subprocess.run(
    ["bash", "launch/gpu_recipe_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )


def stand_in_python(tmp_path: pathlib.Path) -> str:
  """A PYTHON whose main fails (with FP8 GEMMs after writing its metric rows), whose bench prints a figure at once
  (SwinV2-G's FP8 step: out of memory), and which runs everything else (the photos, prepare_data, the summary) with
  this interpreter."""
  row = '{"step": %d, "train/img_per_sec": %d, "train/data_wait_fraction": 0.5, "train/loss": 1.0}'
  path = tmp_path / "python"
  path.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *"-m visionfm_jax.main "*gemm=fp8*)
    for arg in "$@"; do [[ $arg == --workdir=* ]] && mkdir -p "${{arg#*=}}" && workdir=${{arg#*=}}; done
    printf '{row}\\n' 2 50 4 50 6 100 >"$workdir/metrics.jsonl"
    echo "error: a stand-in failure in the evaluation" >&2; exit 1 ;;
  *"-m visionfm_jax.main "*) echo "error: a stand-in failure" >&2; exit 2 ;;
  *"-m visionfm_jax.bench --config=configs/swinv2_cls.py:G"*gemm=fp8*) echo "RESOURCE_EXHAUSTED: Out of memory" >&2
    exit 1 ;;
  *"-m visionfm_jax.bench "*gemm=fp8*) echo '{{"img_per_sec": 200.0, "compile_s": 9.0}}' ;;
  *"-m visionfm_jax.bench "*) echo '{{"img_per_sec": 100.0, "compile_s": 9.0}}' ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
  path.chmod(0o755)
  return str(path)


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_and_reports_its_figures(tmp_path, warm_python, compilation_cache):
  # the FP8 profile and bench stages compile one program: the cache compiles it once
  proc = run_check("--rehearse", f"--out={tmp_path}", warm=warm_python, **compilation_cache_env(compilation_cache))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  stages = summary["stages"]
  assert list(stages) == STAGES and {s["status"] for s in stages.values()} == {"ok"}, stages
  assert stages["photos"]["images"] == 40 and (stages["shards"]["train"], stages["shards"]["validation"]) == (32, 8)
  for name in STAGES[3:]:
    assert stages[name]["img_per_sec"] > 0 and stages[name]["gemm"] == ("fp8" if "fp8" in name else "compute_dtype")
  assert summary["rehearse"] and set(summary["main_over_bench"]) == set(GEMMS)
  assert all(r > 0 for r in [*summary["main_over_bench"].values(), *summary["fp8_over_compute_dtype"].values()])
  for run in MAIN_RUNS:
    workdir = tmp_path / f"run_{run}"
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/img_per_sec" in r] == [2, 4, 6]  # the first one is not timed
    assert stages[f"vit_main_{run}"]["rows_timed"] == 2 and any("eval/val/top1" in r for r in rows)
    config = json.loads((workdir / "config.json").read_text())
    assert (config["precision"]["gemm"], config["seed"]) == (run.split("_seed")[0], int(run.endswith("seed1")))
    assert not (workdir / "checkpoints").exists()
  assert (tmp_path / "compile_cache").is_dir()
  # the loss's spread: FP8 against the compute dtype at seed 0, and seed 1 against seed 0, row by row
  losses = {run: stages[f"vit_main_{run}"]["loss_by_step"] for run in MAIN_RUNS}
  assert all(list(steps) == ["2", "4", "6"] for steps in losses.values()), losses
  gap = lambda a, b: sum(abs(losses[a][s] - losses[b][s]) for s in losses[a]) / 3
  spread = summary["loss_spread"]
  assert spread["fp8_from_compute_dtype"] == pytest.approx(gap("fp8", "compute_dtype"), abs=1e-4)
  assert spread["seed1_from_seed0"] == pytest.approx(gap("compute_dtype_seed1", "compute_dtype"), abs=1e-4)
  assert spread["seed1_from_seed0"] > 0 and "loss, mean |difference| row by row: fp8 from compute_dtype" in proc.stdout
  assert "vit_main_fp8" in proc.stdout and "ViT-H/14 main / bench: compute_dtype " in proc.stdout
  profile = (tmp_path / "logs" / "vit_profile_fp8.out").read_text()
  assert "ms busy per step" in profile and list((tmp_path / "profile_fp8").rglob("*.json.gz")), profile[-2000:]


def test_a_failed_stage_leaves_the_later_ones_running(tmp_path):
  proc = run_check("--rehearse", "--images=16", f"--out={tmp_path}", python=stand_in_python(tmp_path))
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  status = {name: s["status"] for name, s in summary["stages"].items()}
  assert status == dict(zip(STAGES, ["ok", "ok", "ok", "FAIL", "FAIL", "FAIL", "ok", "ok", "FAIL", "ok", "ok"]))
  assert summary["stages"]["vit_main_compute_dtype"]["why"] == "exit 2: error: a stand-in failure"
  assert "img_per_sec" not in summary["stages"]["vit_main_compute_dtype"]
  assert summary["stages"]["swin_bench_fp8"]["why"] == "out of memory"
  # main's rows before its failure still count: steps 3-6, 2 at 50 img/s and 2 at 100, the first row untimed
  main_fp8 = summary["stages"]["vit_main_fp8"]
  assert main_fp8["why"] == "exit 1: error: a stand-in failure in the evaluation"
  assert main_fp8["img_per_sec"] == pytest.approx(200 / 3, abs=0.01) and main_fp8["rows_timed"] == 2
  assert summary["main_over_bench"] == {"compute_dtype": None, "fp8": pytest.approx(1 / 3, abs=1e-4)}
  assert summary["fp8_over_compute_dtype"] == {"vit_main": None, "vit_bench": 2.0, "swin_bench": None}
  assert "== vit_main_compute_dtype: FAIL" in proc.stdout and "a stand-in failure" in proc.stderr


def test_a_spent_budget_skips_the_stages(tmp_path):
  proc = run_check("--rehearse", "--budget=1", f"--out={tmp_path}", python=stand_in_python(tmp_path))
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
  assert list(stages) == STAGES and {s["status"] for s in stages.values()} == {"skipped"}
  assert {name: s["why"] for name, s in stages.items() if "--budget=1" not in s["why"]} == {
    f"vit_main_{run}": f"no shards in {tmp_path}/shards" for run in MAIN_RUNS
  }


def test_only_runs_the_stages_it_names_and_the_others_do_not_fail_the_check(tmp_path):
  python = stand_in_python(tmp_path)
  proc = run_check("--rehearse", "--only=vit_bench_fp8,vit_profile_fp8", f"--out={tmp_path}", python=python)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
  ran = {"vit_bench_fp8", "vit_profile_fp8"}
  assert {name for name, s in stages.items() if s["status"] == "ok"} == ran
  assert {s["why"] for name, s in stages.items() if name not in ran} == {"not in --only"}
  # a main stage brings the data it trains on; a failed stage still fails the check
  proc = run_check("--rehearse", "--only=vit_main_fp8", f"--out={tmp_path}", python=python)
  status = {name: s["status"] for name, s in json.loads((tmp_path / "summary.json").read_text())["stages"].items()}
  assert proc.returncode == 1
  assert {n for n, s in status.items() if s != "skipped"} == {"photos", "shards", "vit_main_fp8"}
  assert status["vit_main_fp8"] == "FAIL"


@pytest.mark.parametrize(
  "args, message",
  [
    (["--images=15"], "--images=15: expected an integer of at least 16"),
    (["--images=many"], "--images=many: expected an integer"),
    (["--budget=0"], "--budget=0: expected a positive number of seconds"),
    (["--steps=3"], "unknown argument --steps=3"),
    (["--only=vit_main"], "--only: no stage vit_main (the stages: warmup photos"),
  ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, message):
  proc = run_check("--rehearse", f"--out={tmp_path}", *args)
  assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
  assert not any(tmp_path.iterdir())
