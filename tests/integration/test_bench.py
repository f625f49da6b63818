"""The training-step benchmark (`python -m visionfm_jax.bench`) end to end on tiny configs, with the PyTorch twin."""

import collections
import contextlib
import gzip
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from visionfm_jax.bench import __main__ as bench
from visionfm_jax.bench import primitives
from visionfm_jax.bench import step as step_lib
from visionfm_jax.models import kernels
from visionfm_jax.training import flops

from conftest import FAST_COMPILE_FLAGS, YNNPACK_OFF, cpu_env

TINY = [
  "--config.global_batch_size=4",
  "--devices=1",
  "--config.precision.compute_dtype=float32",
  "--config.strategy=ddp",
  "--config.model.image_size=32",
  "--config.data.image_size=32",
  "--config.model.num_classes=10",
  "--steps=2",
  "--warmup=1",
]


def _run(capsys, *args):
  code = bench.main(["bench", *args])
  out, err = capsys.readouterr()
  return code, out, err


PICO = "--config=configs/vit_huge.py:pico/8"
# One bench run of the pico ViT serves several tests (each run compiles its steps anew): the kernels against the
# plain path with a profile of the step (default CPU dots), and the same step with XNNPACK's dots against the
# PyTorch twin (where torch and transformers are installed).
SHARED = pytest.mark.xdist_group("bench_pico_runs")
TORCH_TWIN = all(importlib.util.find_spec(name) for name in ("torch", "transformers"))


@pytest.fixture(scope="module")
def pico_runs(tmp_path_factory):
  """{"plain", "xnn"}: (status, stdout, stderr, the dot libraries of each step the run compiled, profile dir)."""
  profile_dir = str(tmp_path_factory.mktemp("profile"))
  runs = {
    "plain": [PICO, *TINY, "--compare=plain", f"--profile={profile_dir}", "--profile_steps=2"],
    "xnn": [PICO, *TINY, "--cpu_dots=xnn", *(["--compare=torch"] if TORCH_TWIN else [])],
  }
  out = {}
  for name, args in runs.items():
    compiled = []
    with pytest.MonkeyPatch.context() as patch:
      jax_step = step_lib.JaxStep

      class Recorded(jax_step):
        def __init__(self, *a, **k):
          super().__init__(*a, **k)
          compiled.append(_dot_libraries(self.compiled.as_text()))

      patch.setattr(step_lib, "JaxStep", Recorded)
      stdout, stderr = io.StringIO(), io.StringIO()
      with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = bench.main(["bench", *args])
    out[name] = (code, stdout.getvalue(), stderr.getvalue(), compiled, profile_dir)
  return out


@pytest.mark.slow
@SHARED
def test_bench_reports_figures_and_the_torch_ratio_of_the_vit(pico_runs):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  _check_the_torch_report(*pico_runs["xnn"][:3], "configs/vit_huge.py:pico/8")


@pytest.mark.slow
def test_bench_reports_figures_and_the_torch_ratio_of_the_swinv2(capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  config = "configs/swinv2_cls.py:demo"
  _check_the_torch_report(
    *_run(capsys, f"--config={config}", *TINY, "--config.model.variant=pico", "--compare=torch"), config
  )


def _check_the_torch_report(code, out, err, config):
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert config in result["config"]
  assert result["global_batch"] == 4 and result["dtype"] == "float32" and result["devices"] == 1
  for key in ("step_s", "step_s_min", "step_s_max", "cpu_s", "img_per_sec", "compile_s", "model_tflops"):
    assert result[key] > 0, key
  assert result["step_s_min"] <= result["step_s"] <= result["step_s_max"]
  assert result["img_per_sec"] == pytest.approx(4 / result["step_s"])
  assert result["mfu"] is None  # fp32 on CPU: no known peak
  assert result["memory_plan_bytes"] > 0
  assert np.isfinite(result["loss"]) and np.isfinite(result["torch"]["loss"])
  # Both start from a 10-class head at chance and fit the one repeated batch: neither diverges.
  assert 0 < result["loss"] < np.log(10) + 0.5
  assert 0 < result["torch"]["loss"] < np.log(10) + 0.5
  assert result["ratio"] == pytest.approx(result["step_s"] / result["torch"]["step_s"])
  low, high = result["ratio_ci90"]
  assert result["steps"] == 2 and low <= result["ratio_paired"] <= high
  assert result["verdict"] in ("faster", "slower", "within noise")
  assert result["versions"]["torch"] and result["versions"]["jax"]
  assert "ratio:" in out


@SHARED
def test_bench_compares_the_kernels_with_the_plain_path(pico_runs):
  code, out, err, _, _ = pico_runs["plain"]
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["plain"]["step_s"] > 0
  assert result["ratio"] == pytest.approx(result["step_s"] / result["plain"]["step_s"])
  # The same model, init and batch down either path: the same loss.
  assert result["plain"]["loss"] == pytest.approx(result["loss"], rel=1e-4)
  assert result["verdict"] in ("faster", "slower", "within noise") and "plain:" in out


@SHARED
def test_bench_traces_the_step_with_a_kernel_candidate_and_names_a_wrong_one(pico_runs, capsys):
  """--try_kernels=pallas_layer_norm (Pallas's interpreter on the CPU) trains the pico ViT to the loss of the run
  without it; a name that is no candidate is one error line naming the candidates, before anything compiles."""
  code, out, err = _run(capsys, PICO, *TINY, "--try_kernels=pallas_layer_norm")
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["try_kernels"] == ["pallas_layer_norm"]
  assert result["loss"] == pytest.approx(json.loads(pico_runs["plain"][1].strip().splitlines()[-1])["loss"], rel=1e-4)
  code, out, err = _run(capsys, PICO, *TINY, "--try_kernels=pallas_layer_nrm")
  assert code != 0 and err.strip().splitlines()[-1] == (
    "error: --try_kernels=pallas_layer_nrm: pallas_layer_nrm is not a kernel candidate; the candidates: "
    f"pallas_layer_norm ({kernels.CANDIDATES['pallas_layer_norm']})"
  )


def test_paired_ratio_calls_a_side_faster_only_when_the_interval_excludes_1():
  rng = np.random.default_rng(1)
  load = rng.uniform(1.0, 1.6, 40)  # drift shared by both sides of a pair
  theirs = 1.0 * load
  faster = bench.paired_ratio(list(0.8 * load * rng.uniform(0.97, 1.03, 40)), list(theirs))
  assert faster["verdict"] == "faster" and faster["ratio_ci90"][1] < 1
  assert faster["ratio_paired"] == pytest.approx(0.8, abs=0.02)
  slower = bench.paired_ratio(list(1.25 * load), list(theirs))
  assert slower["verdict"] == "slower" and slower["ratio_paired"] == pytest.approx(1.25)
  noisy = bench.paired_ratio(list(load * rng.uniform(0.6, 1.4, 40)), list(theirs))
  assert noisy["verdict"] == "within noise"
  low, high = noisy["ratio_ci90"]
  assert low < 1 < high
  assert bench.paired_ratio([2.0], [1.0]) == {"ratio_paired": 2.0, "ratio_ci90": [2.0, 2.0], "verdict": "slower"}


@SHARED
def test_bench_compiles_the_step_for_another_cpu_dot_library_and_trains_alike(pico_runs):
  # xnn, not onednn: jaxlib 0.10.2's oneDNN fusions abort the process on this graph ("partition compile failed").
  losses, libraries = {}, {}
  for dots, run in (("default", "plain"), ("xnn", "xnn")):
    code, out, err, compiled, _ = pico_runs[run]
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["cpu_dots"] == dots
    losses[dots], libraries[dots] = result["loss"], compiled[0]  # our step (the plain path's comes second)
  # With xnn no dot goes to YNNPACK (or oneDNN), nor by default where the suite's flags turn YNNPACK off (an XLA
  # without that flag, or an XLA_FLAGS of your own, routes as XLA does: test_primitives_routes_dots_to_the_library_
  # named checks that routing).
  assert set(libraries["xnn"]) == {"xla"}, libraries
  if YNNPACK_OFF in FAST_COMPILE_FLAGS.split():
    assert set(libraries["default"]) == {"xla"}, libraries
  # Same init, batch and steps: only the matmul kernels differ, so the losses agree to fp32 rounding, and the
  # steps did move the model off the zero head's exact ln(10).
  assert losses["xnn"] == pytest.approx(losses["default"], rel=1e-5)
  assert abs(losses["default"] - np.log(10)) > 1e-6


def test_bench_rejects_what_has_no_twin(capsys):
  code, _, err = _run(
    capsys, "--config=configs/vit_huge.py:pico/8", *TINY, "--config.model.pool=gap", "--compare=torch"
  )
  assert code == 2 and "pool" in err


def test_primitives_times_matmuls_against_torch_and_both_sums(capsys):
  pytest.importorskip("torch")
  code = primitives.main(["primitives", "--gemm=16x8x4,9x3x5", "--reduce=4x3x5:2", "--repeats=2"])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert [row["gemm"] for row in result["gemm"]] == ["16x8x4", "9x3x5"]
  for row in result["gemm"]:
    assert list(row["xla"]) == ["default"] and row["xla"]["default"]["gflops"] > 0 and row["torch_gflops"] > 0
  assert result["reduce"][0]["reduce"] == "4x3x5:2" and result["reduce"][0]["sum_leading_ms"] > 0


def test_primitives_compiles_each_matmul_for_every_cpu_dot_library(capsys):
  pytest.importorskip("torch")
  code = primitives.main(
    ["primitives", "--gemm=16x8x4", "--train", "--backends=default,onednn,xnn,eigen", "--reduce=", "--repeats=2"]
  )
  out, err = capsys.readouterr()
  assert code == 0, err
  [row] = json.loads(out.strip().splitlines()[-1])["gemm"]
  assert row["train"] and sorted(row["xla"]) == ["default", "eigen", "onednn", "xnn"]
  for side in row["xla"].values():
    assert side["gflops"] > 0 and side["ratio_to_torch"] > 0


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) \(.*\{$")
_FUSION = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = .* fusion\(.*\bcalls=%([\w.-]+)(?:.*\"kind\":\"__(\w+)_fusion\")?")
_DOT = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = \S+ dot\(")


def _dot_libraries(hlo_text: str) -> collections.Counter:
  """How many dots of a compiled CPU module each library runs: the library of the custom fusion whose computation
  holds the dot ('ynn', 'onednn', ...), else 'xla' (a dot XLA emits itself)."""
  dots, library_of, computation = collections.Counter(), {}, None
  for line in hlo_text.splitlines():
    if m := _COMPUTATION.match(line):
      computation = m.group(1)
    elif m := _FUSION.match(line):
      library_of[m.group(1)] = m.group(2) or "xla"
    elif _DOT.match(line):
      dots[computation] += 1
  out = collections.Counter()
  for name, count in dots.items():
    out[library_of.get(name, "xla")] += count
  return out


_COMPILE_WITH_EACH_BACKEND = """
import json, jax
from visionfm_jax.bench import primitives
x, w, dy = jax.numpy.ones((32, 16)), jax.numpy.ones((16, 8)), jax.numpy.ones((32, 8))
lowered = jax.jit(lambda x, w, dy: (x @ w, dy @ w.T, x.T @ dy)).lower(x, w, dy)
print(json.dumps({name: lowered.compile(compiler_options=options).as_text()
                  for name, options in primitives.CPU_DOT_BACKENDS.items()}))
"""


def test_primitives_routes_dots_to_the_library_named():
  """The options reach XLA: of a dense layer's three training products, oneDNN runs all three, Eigen (XLA's own
  dots) all three, the default hands YNNPACK those it takes, and `xnn` (YNNPACK off) leaves none to YNNPACK or
  oneDNN (this jaxlib's HLO names no XNNPACK fusion: XLA picks XNNPACK for a dot when it emits it). Compiled in a
  process where XLA routes dots as it does by default (the suite's own processes keep YNNPACK off)."""
  compiled = subprocess.run(
    [sys.executable, "-c", _COMPILE_WITH_EACH_BACKEND],
    capture_output=True,
    text=True,
    check=True,
    timeout=120,
    env=cpu_env(1, xla_dot_routing=True),
  ).stdout
  libraries = {name: _dot_libraries(text) for name, text in json.loads(compiled.splitlines()[-1]).items()}
  assert libraries["onednn"] == {"onednn": 3} and libraries["eigen"] == {"xla": 3}, libraries
  default = libraries["default"]
  assert set(default) <= {"ynn", "xla"} and default["ynn"] >= 1 and sum(default.values()) == 3, libraries
  assert libraries["xnn"] == {"xla": 3}, libraries


@pytest.mark.parametrize(
  "flag,message",
  [
    ("--gemm=16x8", "MxKxN"),
    ("--gemm=16xaxb", "not a shape"),
    ("--reduce=4x3x5:3", "AXES"),
    ("--repeats=0", "repeats"),
    ("--backends=mkl", "--backends"),
  ],
)
def test_primitives_rejects_bad_shapes(capsys, flag, message):
  code = primitives.main(["primitives", flag])
  _, err = capsys.readouterr()
  assert code == 2 and message in err, err


@SHARED
def test_bench_profiles_the_step_and_names_its_busiest_operations(pico_runs):
  code, out, err, _, profile_dir = pico_runs["plain"]
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  profile = result["profile"]
  assert profile["trace"].startswith(profile_dir) and profile["trace"].endswith("perfetto_trace.json.gz")
  assert profile["steps"] == 2 and profile["timelines"]
  busiest = profile["timelines"][0]
  assert busiest["busy_us"] > 0 and busiest["ops"]
  # Busy time per traced step against the median untraced step: the share a GPU stream idles is 1 minus it.
  assert busiest["busy_share_of_step"] == pytest.approx(busiest["busy_us"] / 2 / 1e6 / result["step_s"])
  shares = [op["share"] for op in busiest["ops"]]
  assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
  assert all(op["count"] >= 1 and op["us"] > 0 for op in busiest["ops"])
  assert not any(t["timeline"].endswith(" python") for t in profile["timelines"])  # the interpreter is not a timeline
  assert "ms busy per step (" in out and "of the step)" in out


def test_profile_self_times_add_up_without_counting_twice():
  from visionfm_jax.bench import profile  # pylint: disable=g-import-not-at-top

  events = [
    {"name": "module", "ts": 0, "dur": 100},
    {"name": "fusion.1", "ts": 10, "dur": 30},
    {"name": "end: fusion.1", "ts": 35, "dur": 5},
    {"name": "custom-call.7", "ts": 50, "dur": 40},
    {"name": "fusion.2", "ts": 120, "dur": 10},
  ]
  own = dict(profile.self_times(events))
  assert own == {"module": 30.0, "fusion.1": 25.0, "end: fusion.1": 5.0, "custom-call.7": 40.0, "fusion.2": 10.0}
  assert sum(own.values()) == 110.0  # the busy time: 0..100 and 120..130
  assert [profile.op_kind(n) for n in ("fusion.12", "end: fusion.12", "loop_fusion", "sm90_xmma_gemm")] == [
    "fusion",
    "fusion",
    "loop_fusion",
    "sm90_xmma_gemm",
  ]


def test_profile_of_a_gpu_trace_reads_the_device_timelines_only(tmp_path):
  """A trace shaped as the profiler writes one on a GPU (no GPU trace has been parsed here yet): device
  processes named /device:..., whose lines (modules, XLA ops, each stream's kernels) are timelines of their own;
  the host's threads, XLA's client threads included, are left out once a device process exists."""
  from visionfm_jax.bench import profile  # pylint: disable=g-import-not-at-top

  meta = lambda kind, pid, name, tid=0: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}
  op = lambda pid, tid, name, ts, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}
  events = [
    meta("process_name", 1, "/device:GPU:0"),
    meta("thread_name", 1, "XLA Modules", 1),
    meta("thread_name", 1, "XLA Ops", 2),
    meta("thread_name", 1, "Stream #14(Compute)", 3),
    meta("process_name", 701, "/host:CPU"),
    meta("thread_name", 701, "python", 5),
    meta("thread_name", 701, "tf_XLAPjRtCpuClient/123", 6),
  ]
  for step in range(2):  # two steps of 100 us: 80 us of kernels, 20 us idle
    t = 1000 * step
    events += [
      op(1, 1, "jit_train_step(1)", t, 80),
      op(1, 2, "fusion.3", t, 30),
      op(1, 2, "fusion.17", t + 30, 10),
      op(1, 2, "custom-call.2", t + 40, 40),
      op(1, 3, "sm90_xmma_gemm_bf16", t, 40),
      op(1, 3, "loop_add_fusion", t + 40, 40),
      op(701, 5, "train_step", t, 100),
      op(701, 6, "ThunkExecutor::Execute", t, 90),
    ]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  timelines = {t["timeline"]: t for t in profile.add_step_shares(profile.summarize(str(path)), 2, 100e-6)}
  assert sorted(timelines) == [
    "/device:GPU:0 Stream #14(Compute)",
    "/device:GPU:0 XLA Modules",
    "/device:GPU:0 XLA Ops",
  ]
  ops = timelines["/device:GPU:0 XLA Ops"]
  assert ops["busy_us"] == 160 and ops["busy_share_of_step"] == pytest.approx(0.8)
  assert [(o["kind"], o["us"], o["count"]) for o in ops["ops"]] == [("fusion", 80, 4), ("custom-call", 80, 2)]
  assert timelines["/device:GPU:0 XLA Modules"]["ops"][0]["kind"] == "jit_train_step(1)"


def test_bench_gpu_script_runs_each_lead_with_its_flags_and_tabulates_failures(tmp_path):
  """launch/bench_gpu.sh's plumbing, with a stand-in for `python -m visionfm_jax.bench` (no GPU here): each lead
  reaches the bench with its XLA flag after the H100 file's and its extra arguments; a failing setup gets a
  line naming why; the table lists every row."""
  stub = tmp_path / "python"
  stub.write_text(f"""#!/usr/bin/env bash
if [[ $1 == -m && $2 == visionfm_jax.bench ]]; then
  [[ " $* " == *scan_unroll=0* ]] && {{ echo "XLA_FLAGS=$XLA_FLAGS" >&2
                                     echo "RESOURCE_EXHAUSTED: out of memory" >&2; exit 1; }}
  exec {sys.executable} -c 'import json, os, sys; print(json.dumps(dict(img_per_sec=280.0, mfu=0.28, compile_s=9.0, \\
peak_bytes_in_use=2**34, xla_flags=os.environ["XLA_FLAGS"], argv=sys.argv[1:])))' "$@"
fi
exec {sys.executable} "$@"
""")
  stub.chmod(0o755)
  out = tmp_path / "leads.jsonl"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
    ["bash", "launch/bench_gpu.sh", str(out), "leads", "3"],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHON": str(stub), "XLA_FLAGS": ""},
  )
  assert proc.returncode == 0, proc.stderr
  rows = {r["lead"]: r for r in map(json.loads, out.read_text().splitlines())}
  assert list(rows) == [
    "planned",
    "triton_gemm",
    "cuda_graphs",
    "gelu_tanh",
    "pallas_layer_norm",
    "no_remat_b64",
    "nothing_saveable_b256",
    "scanned_dots_b32",
    "straight_dots_b32",
    "recipe_b32",
    "recipe_b32_cuda_graphs",
    "recipe_b32_triton_gemm",
    "fp8_recipe_b32",
    "fp8_bf16_wgrad_recipe_b32",
    "swinv2_g_b32",
    "swinv2_g_pallas",
    "swinv2_g_unroll7",
    "swinv2_g_fp8",
    "swinv2_g_straight",
    "swinv2_g_dots_u7",
    "swinv2_g_attention_kept_u7",
    "clip_vit_b16",
    "siglip_vit_b16",
    "flip_vit_b16",
    "clip_swinv2_g",
    "swin_mask_swinv2_g",
  ]
  assert "--config.model.act=gelu_pytorch_tanh" in rows["gelu_tanh"]["argv"]
  assert "--try_kernels=pallas_layer_norm" in rows["pallas_layer_norm"]["argv"]
  assert {"--config.model.remat_policy=none", "--config.global_batch_size=64"} <= set(rows["no_remat_b64"]["argv"])
  assert rows["nothing_saveable_b256"]["remat"] == "nothing_saveable" and rows["nothing_saveable_b256"]["batch"] == 256
  assert rows["recipe_b32"]["failed"] == rows["straight_dots_b32"]["failed"] == "out of memory"
  assert (rows["swinv2_g_unroll7"]["model"], rows["swinv2_g_unroll7"]["batch"]) == ("swinv2_g", 32)
  assert "--config.model.scan_unroll=7" in rows["swinv2_g_unroll7"]["argv"]
  straight = rows["swinv2_g_straight"]  # the stand-in fails every straight-line setup (scan_unroll=0)
  assert (straight["model"], straight["remat"], straight["batch"]) == ("swinv2_g", "none", 32)
  flags = rows["triton_gemm"]["xla_flags"].split()
  assert flags.index("--xla_gpu_enable_triton_gemm=true") > flags.index("--xla_gpu_enable_triton_gemm=false")
  assert "--xla_gpu_enable_triton_gemm=true" not in rows["planned"]["xla_flags"]
  assert {
    "--steps=3",
    "--config.global_batch_size=64",
    "--config.model.remat_policy=dots_saveable",
    "--config.model.attention=cudnn",
    "--config.model.scan_unroll=1",
  } <= set(rows["planned"]["argv"])
  table = proc.stdout.splitlines()
  graphs = rows["recipe_b32_cuda_graphs"]  # the stand-in runs no straight-line setup
  assert (graphs["remat"], graphs["batch"], graphs["failed"]) == ("none", 32, "out of memory")
  failed_runs = {block.split("\n", 1)[0]: block for block in proc.stderr.split("== ")}  # header: its log's tail
  graphs_log = next(b for h, b in failed_runs.items() if h.endswith(" lead=recipe_b32_cuda_graphs"))
  assert "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL" in graphs_log
  assert "command_buffer=FUSION" not in next(b for h, b in failed_runs.items() if h.endswith(" lead=recipe_b32"))
  triton = rows["recipe_b32_triton_gemm"]
  assert (triton["remat"], triton["batch"]) == ("none", 32) and "--xla_gpu_enable_triton_gemm=true" in next(
    b for h, b in failed_runs.items() if h.endswith(" lead=recipe_b32_triton_gemm")
  )
  assert rows["fp8_recipe_b32"]["failed"] == straight["failed"] == "out of memory"
  assert "failed" not in rows["swinv2_g_fp8"] and "--config.precision.gemm=fp8" in rows["swinv2_g_fp8"]["argv"]
  pallas = rows["swinv2_g_pallas"]
  assert (pallas["model"], pallas["attention"], pallas["remat"]) == ("swinv2_g", "pallas", "nothing_saveable")
  assert "--config.model.attention=pallas" in pallas["argv"]
  assert len(table) == 27 and "lead" in table[0] and "failed: out of memory" in " ".join(table)
  models = {lead: r.get("model") for lead, r in rows.items()}
  assert rows["swinv2_g_attention_kept_u7"]["remat"] == "dots_with_no_batch_dims_and_attention_saveable"
  assert [models[lead] for lead in rows] == ["vit_h14"] * 14 + ["swinv2_g"] * 7 + [
    "vit_b16_clip",
    "vit_b16_clip",
    "vit_b16_clip",
    "swinv2_g_clip",
    "swinv2_g_clip",
  ]
  assert "--config.model.image.attention=cudnn" in rows["siglip_vit_b16"]["argv"]
  assert any(a.startswith("--config=configs/swinv2_g_clip.py:vit,flip") for a in rows["flip_vit_b16"]["argv"])
  out.unlink()
  proc = subprocess.run(
    ["bash", "launch/bench_gpu.sh", str(out), "leads", "3"],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=120,
    env={
      **os.environ,
      "PYTHON": str(stub),
      "XLA_FLAGS": "",
      "LEADS": "planned no_remat_b64",
      "BATCH": "8",
      "REMAT": "none",
    },
  )
  assert proc.returncode == 0, proc.stderr
  picked = [json.loads(r) for r in out.read_text().splitlines()]
  assert [(r["lead"], r["remat"], r["batch"]) for r in picked] == [
    ("planned", "dots_saveable", 64),
    ("no_remat_b64", "none", 64),
  ]
  proc = subprocess.run(
    ["bash", "launch/bench_gpu.sh", str(out), "leads", "3"],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHON": str(stub), "XLA_FLAGS": "", "LEADS": "planned no_remat_b46", "LEAD_BATCH": "8"},
  )
  assert proc.returncode == 2 and "LEADS names no_remat_b46; the leads: planned triton_gemm" in proc.stderr


@pytest.mark.parametrize(
  "kind,peak",
  [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("cpu", None),
  ],
)
def test_the_peak_is_the_longest_table_name_in_the_device_kind(monkeypatch, kind, peak):
  class Device:
    device_kind = kind

  monkeypatch.setattr(flops.jax, "devices", lambda: [Device()])
  assert flops.device_peak_flops("bfloat16") == peak
  assert flops.device_peak_flops("float32") is None
