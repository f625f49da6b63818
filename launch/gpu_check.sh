#!/usr/bin/env bash
# First contact with a GPU machine, in one command: install, the CPU suite under this machine's Python and jax,
# the GPU tests, the step benchmark sweep; a summary of what passed, and a non-zero exit on any failure.
#
#   launch/gpu_check.sh [--wheels=DIR] [--out=DIR] [--bench=full|core|quick|leads|none] [--no_profile] [--skip_cpu_suite]
#                       [--skip_gpu_tests] [--gpu_tests=EXPR]
#
#   --wheels=DIR   install offline: missing dependencies come from DIR (BUILD.md, "A GPU machine without network",
#                  says how to fill it on another machine); without it pip uses the package index
#   --out=DIR      logs and the benchmark's JSON lines (default gpu_check_out/)
#   --bench        the sweep of launch/bench_gpu.sh: full (default), core (six setups), quick (one per model),
#                  leads (ViT-H/14's planned setup against each MFU lead of BENCHMARKS.md) or none
#   --no_profile   leave out the profiles: after the sweep, ViT-H/14 (cuDNN, nothing_saveable, batch 128) and
#                  SwinV2-G (cuDNN, nothing_saveable, batch 32) traced for 3 steps, their busiest operations per
#                  device timeline in OUT/profile_<model>.txt, the traces under OUT/profile_<model>/
#   --skip_cpu_suite  leave out the CPU suite (e.g. when it already passed on this image)
#   --skip_gpu_tests  leave out the GPU tests (e.g. a call that only benchmarks, when they passed in an earlier one)
#   --gpu_tests=EXPR  only the GPU tests pytest's `-k EXPR` selects (the 26 take longer than one 10-minute call)
#
# The CPU suite runs beside the GPU tests (it uses no GPU: JAX_PLATFORMS=cpu); the benchmark runs alone, after
# both, so that its timings see an idle machine.
set -uo pipefail
cd "$(dirname "$0")/.."

wheels="" out="gpu_check_out" bench="full" cpu_suite=1 gpu_tests=1 profile=1 gpu_select=()
for arg in "$@"; do
  case $arg in
    --wheels=*) wheels=${arg#*=} ;;
    --out=*) out=${arg#*=} ;;
    --bench=*) bench=${arg#*=} ;;
    --skip_cpu_suite) cpu_suite=0 ;;
    --skip_gpu_tests) gpu_tests=0 ;;
    --gpu_tests=*) gpu_select=(-k "${arg#*=}") ;;
    --no_profile) profile=0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
case $bench in full|core|quick|leads|none) ;; *) echo "gpu_check.sh: --bench=$bench: expected full, core, quick, leads or none" >&2; exit 2 ;; esac
mkdir -p "$out"
python=${PYTHON:-python3}
results=()
failed=0

stage() {  # name, status, detail: one line of the summary
  results+=("$(printf '%-10s %-4s %s' "$1" "$2" "$3")")
  [[ $2 == ok ]] || failed=1
  echo "== $1: $2 $3"
}

tail_of() { sed -n '/= FAILURES =\|short test summary/,$p' "$1" | tail -n 40; tail -n 3 "$1"; }

# 1. Install. --no-build-isolation: an offline machine cannot fetch setuptools into a build environment.
pip_args=(install -q --no-build-isolation -e ".[test]")
[[ -n $wheels ]] && pip_args+=(--no-index --find-links="$wheels")
if $python -m pip "${pip_args[@]}" >"$out/install.log" 2>&1; then
  stage install ok "$($python -c 'import sys, jax; print(f"python {sys.version.split()[0]}, jax {jax.__version__}")')"
else
  stage install FAIL "see $out/install.log"; tail -n 20 "$out/install.log"
  printf '%s\n' "${results[@]}"; exit 1
fi
$python - <<'PY' | tee "$out/versions.txt"
import importlib.metadata as md, jax
print("devices:", ", ".join(f"{d.device_kind} ({d.platform})" for d in jax.devices()))
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "torch", "transformers")
print("versions:", ", ".join(f"{n} {md.version(n)}" for n in names))
PY
if [[ $($python -c 'import jax; print(jax.default_backend())') != gpu ]]; then
  stage gpu FAIL "JAX sees no GPU (devices above): the GPU tests and the benchmark cannot run"
  printf '%s\n' "${results[@]}"; exit 1
fi

# 2. The CPU suite (background) beside 3. the GPU tests.
if (( cpu_suite )); then
  workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
  JAX_PLATFORMS=cpu $python -m pytest -n "$workers" -m "not gpu" tests -p no:cacheprovider >"$out/cpu_suite.log" 2>&1 &
  cpu_pid=$!
fi
# The GPU tests compile with XLA's full optimisations (conftest lowers them for the CPU suite's tiny models).
if (( gpu_tests )); then
  if JAX_PLATFORMS=cuda JAX_DISABLE_MOST_OPTIMIZATIONS=0 $python -m pytest -n 0 -m gpu tests/gpu/test_gpu.py \
      "${gpu_select[@]}" -o faulthandler_timeout=300 -p no:cacheprovider -rA >"$out/gpu_tests.log" 2>&1; then
    stage gpu_tests ok "$(tail -n 1 "$out/gpu_tests.log")"
  else
    stage gpu_tests FAIL "$(tail -n 1 "$out/gpu_tests.log") (see $out/gpu_tests.log)"; tail_of "$out/gpu_tests.log"
  fi
fi
if (( cpu_suite )); then
  if wait "$cpu_pid"; then
    stage cpu_suite ok "$(tail -n 1 "$out/cpu_suite.log")"
  else
    stage cpu_suite FAIL "$(tail -n 1 "$out/cpu_suite.log") (see $out/cpu_suite.log)"; tail_of "$out/cpu_suite.log"
  fi
fi

# 4. The step benchmark sweep, alone on the machine.
if [[ $bench != none ]]; then
  rm -f "$out/bench_gpu.jsonl"
  if launch/bench_gpu.sh "$out/bench_gpu.jsonl" "$bench" 2>"$out/bench.log" | tee "$out/bench_table.txt"; then
    stage bench ok "$(grep -c . "$out/bench_gpu.jsonl" 2>/dev/null || echo 0) runs, table in $out/bench_table.txt"
  else
    stage bench FAIL "see $out/bench.log"; tail -n 20 "$out/bench.log"
  fi
fi

# 5. Where the step's time goes: the best setups of BENCHMARKS.md's first GPU table, traced.
if (( profile )); then
  source launch/xla_flags_h100.sh
  for setup in "vit_h14 configs/vit_huge.py 128" "swinv2_g configs/swinv2_cls.py:G 32"; do
    read -r name config batch <<<"$setup"
    if $python -m visionfm_jax.bench --config="$config" --devices=1 --steps=3 --warmup=2 --config.strategy=ddp \
        --config.precision.compute_dtype=bfloat16 --config.global_batch_size="$batch" \
        --config.model.remat_policy=nothing_saveable --config.model.attention=cudnn --config.model.scan_unroll=1 \
        --profile="$out/profile_$name" >"$out/profile_$name.txt" 2>"$out/profile_$name.log"; then
      stage "profile_$name" ok "busiest operations in $out/profile_$name.txt"
    else
      stage "profile_$name" FAIL "see $out/profile_$name.log"; tail -n 20 "$out/profile_$name.log"
    fi
  done
fi

echo; echo "gpu_check summary ($(date -u +%FT%TZ)):"; printf '  %s\n' "${results[@]}"
exit $failed
