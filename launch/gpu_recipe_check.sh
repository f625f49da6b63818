#!/usr/bin/env bash
# ViT-H/14 at its recipe's per-GPU share (2048 images over 64 GPUs: 32), trained for 300 steps through `python -m
# visionfm_jax.main` on photo-like JPEGs converted as a user converts theirs, with the blocks' GEMMs in the compute
# dtype (seeds 0 and 1: the run-to-run spread of the loss) and in FP8 (seed 0); FP8's step profiled; SwinV2-G in the
# CLIP tower's form (dots_with_no_batch_dims_saveable, 7 blocks a loop iteration, cuDNN attention, batch 32) through
# `python -m visionfm_jax.bench`, both ways; then ViT-H/14 through `bench`, both ways. One H100 after the install
# (e.g. `launch/gpu_check.sh --wheels=DIR --skip_cpu_suite --skip_gpu_tests --bench=none --no_profile`, or the wheels
# unpacked onto PYTHONPATH); no network. All stages take more than one 9-minute call: --only picks a call's share.
#
#   launch/gpu_recipe_check.sh [--out=DIR] [--images=N] [--budget=S] [--only=STAGE,...] [--rehearse]
#
#   --out=DIR     everything it writes (default gpu_recipe_check_out/; ~0.5 GB): photos/ (N synthetic 500x375
#                 JPEGs, bench/input.py's, in 10 class folders, each class tinted its own colour), shards/
#                 (datatools.prepare_data --format=folders, 5 per class held out), run_<gemm>[_seed1]/ (main's
#                 workdirs; the final checkpoint, ~7.6 GB of params and AdamW state, is deleted once written),
#                 compile_cache/ (main's, which the second seed reuses), profile_fp8/ (the trace), logs/ (each
#                 stage's stdout and stderr), summary.json
#   --images=N    photos to write (default 2560; 40 with --rehearse)
#   --budget=S    seconds for everything but the table (default 520: a 540 s call less `timeout`'s 15 s between
#                 its TERM and KILL); a stage gets at most what is left of it, one with under 10 s left is skipped
#   --only=LIST   run only these stages (comma-separated; photos and shards come with any vit_main stage), the
#                 others recorded as skipped
#   --rehearse    the same stages on a CPU in about a minute (2 cores): a pico ViT and a femto SwinV2 (one stage) at
#                 16 px, 4 classes, batch 8, 6 steps, main's input decoded in its own process (no data workers),
#                 compiled with JAX_DISABLE_MOST_OPTIMIZATIONS=1
#                 (tests/integration/test_gpu_recipe_check.py runs it, with the suite's fast-compile XLA flags too)
#
# The stages, in order, each under `timeout` with its bound (s), and what each took on an H100 (2026-11-28, a fresh
# machine: its first GPU process had run no step after 166 s, the same program from the compile cache ran its 10th
# step at 40 s):
#   warmup                        90        a cuBLAS GEMM and cuDNN attention: the CUDA libraries' first load, once
#   photos                        30     9  N JPEGs, one process per core
#   shards                        30     7  prepare_data --holdout_per_class=5
#   vit_main_compute_dtype       200  >170  start-up, the compile, 300 steps at lr 1e-4 (30 of warmup, a metrics row
#   vit_main_fp8                 170  ~150  every 10), the final checkpoint and evaluation
#   vit_main_compute_dtype_seed1 130   ~95  the same with --config.seed=1, its programs from the compile cache
#   vit_profile_fp8              150        bench's FP8 step, 2 steps traced: its busiest operations
#   swin_bench_compute_dtype     180  >118  --steps=10 --warmup=2
#   swin_bench_fp8               180
#   vit_bench_compute_dtype      120
#   vit_bench_fp8                120  >125  (the first process of its machine)
# main's img/s is train/img_per_sec of metrics.jsonl over its rows after the first 2 (the first includes the
# compile): their steps over their seconds; the rows come before the final checkpoint and evaluation, so a main that
# times out in those still has its figures (its status stays FAIL). bench runs the same config with main's class
# count (the head's 10 outputs, not 21,841), so that main / bench is the cost of the loop around the step: the input
# pipeline, logging, the health guard. The recipe's own lr (1e-3, for batch 2048) made batch 32 spike until the
# health guard stopped both the compute dtype's and FP8's runs near step 250, the loss still at ln 10.
# summary.json holds each stage's status, seconds and figures, main / bench per GEMM setting, FP8 over the compute
# dtype per model, and the loss's spread: the mean absolute difference, row by row, of FP8's loss from the compute
# dtype's at seed 0, against that of seed 1's from seed 0's; a table goes to stdout. A failed stage does not stop
# the later ones; the exit status is 1 when any stage failed or found its budget spent (not one --only left out), 2
# on bad arguments or (without --rehearse) when JAX sees no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

out="gpu_recipe_check_out" images="" budget=520 rehearse=0 only=""
stages=(warmup photos shards vit_main_compute_dtype vit_main_fp8 vit_main_compute_dtype_seed1 vit_profile_fp8
        swin_bench_compute_dtype swin_bench_fp8 vit_bench_compute_dtype vit_bench_fp8)
for arg in "$@"; do
  case $arg in
    --out=*) out=${arg#*=} ;;
    --images=*) images=${arg#*=} ;;
    --budget=*) budget=${arg#*=} ;;
    --only=*) only=${arg#*=} ;;
    --rehearse) rehearse=1 ;;
    *) echo "gpu_recipe_check.sh: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}

if (( rehearse )); then
  images=${images:-40} classes=4 holdout=2 batch=8 steps=6 warmup=1 log_every=2 warm_rows=1 lr=1e-4
  bench_steps=(--steps=3 --warmup=1) swin_attention=softmax  # the CPU has no cuDNN
  vit_size=(--config.model.variant=pico/4 --config.model.image_size=16 --config.data.image_size=16)
  main_input=(--config.data.num_workers=0)  # 2 cores: the decoding in main's process, not a worker's start-up
  swin_size=(--config.model.variant=femto --config.model.image_size=16 --config.data.image_size=16
             --config.model.window_size=2)
  # tiny models compile far longer than they run
  export JAX_DISABLE_MOST_OPTIMIZATIONS=${JAX_DISABLE_MOST_OPTIMIZATIONS:-1}
else
  images=${images:-2560} classes=10 holdout=5 batch=32 steps=300 warmup=30 log_every=10 warm_rows=2 lr=1e-4
  bench_steps=(--steps=10 --warmup=2) swin_attention=cudnn vit_size=() swin_size=() main_input=()
fi
if ! [[ $images =~ ^[0-9]+$ ]] || (( images < classes * holdout + batch )); then
  echo "gpu_recipe_check.sh: --images=$images: expected an integer of at least $(( classes * holdout + batch ))" \
       "($classes classes, $holdout held out per class, a batch of $batch left to train on)" >&2
  exit 2
fi
if ! [[ $budget =~ ^[0-9]+$ ]] || (( budget < 1 )); then
  echo "gpu_recipe_check.sh: --budget=$budget: expected a positive number of seconds" >&2; exit 2
fi
for name in ${only//,/ }; do
  if [[ " ${stages[*]} " != *" $name "* ]]; then
    echo "gpu_recipe_check.sh: --only: no stage $name (the stages: ${stages[*]})" >&2; exit 2
  fi
done
[[ ,$only, == *,vit_main_* ]] && only="photos,shards,$only"

deadline=$(( SECONDS + budget ))
source launch/xla_flags_h100.sh
device=$($python -c 'import jax; print(f"{jax.default_backend()}: {jax.devices()[0].device_kind}")' 2>/dev/null)
if (( ! rehearse )) && [[ $device != gpu:* ]]; then
  echo "gpu_recipe_check.sh: JAX sees no GPU (${device:-jax failed to start}); --rehearse runs the stages on a CPU" >&2
  exit 2
fi
rm -rf "$out/photos" "$out/shards" "$out"/run_* "$out/compile_cache" "$out/profile_fp8" "$out/logs" \
  "$out/summary.json"
mkdir -p "$out/logs"

record() {  # stage, status, seconds, why: one row of logs/stages.tsv
  local why=${4//$'\t'/ }
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${why//$'\n'/ }" >>"$out/logs/stages.tsv"
  echo "== $1: $2 (${3} s)${4:+: $4}"
}

wanted() { [[ -z $only || ,$only, == *,$1,* ]]; }  # stage: is it one --only names (or is there no --only)

stage() {  # stage, bound (s), command...: the command under `timeout`, its stdout and stderr in logs/<stage>.{out,log}
  local name=$1 bound=$2 left=$(( deadline - SECONDS )) start=$SECONDS rc why=""
  shift 2
  if ! wanted "$name"; then
    record "$name" skipped 0 "not in --only"; return 1
  fi
  (( left < bound )) && bound=$left
  if (( bound < 10 )); then
    record "$name" skipped 0 "${left} s of --budget=$budget left"; return 1
  fi
  timeout --kill-after=15 "$bound" "$@" >"$out/logs/$name.out" 2>"$out/logs/$name.log"
  rc=$?
  if (( rc == 0 )); then
    record "$name" ok $(( SECONDS - start )) ""; return 0
  fi
  if (( rc == 124 || (rc == 137 && SECONDS - start >= bound) )); then
    why="timeout after $bound s"
  elif grep -q "RESOURCE_EXHAUSTED\|Out of memory\|out of memory" "$out/logs/$name.log"; then
    why="out of memory"
  else
    why=$(grep -m 1 '^error:' "$out/logs/$name.log" || grep -v '^\s*$' "$out/logs/$name.log" | tail -n 1)
    why="exit $rc: ${why:0:200}"
  fi
  tail -n 15 "$out/logs/$name.log" >&2
  record "$name" FAIL $(( SECONDS - start )) "$why"; return 1
}

# 0. The CUDA libraries' first load, which a fresh machine's first GPU process pays, measured on its own.
stage warmup 90 "$python" - <<'PY'
import jax, jax.numpy as jnp
x = jnp.ones((2, 256, 8, 64), jnp.bfloat16)
attention = jax.nn.dot_product_attention(x, x, x, implementation="cudnn" if jax.default_backend() == "gpu" else None)
print(float(jax.jit(lambda a, b: (a @ b).sum())(x[0, :, 0], x[0, :, 0].T)), float(attention.sum()))
PY

# 1. Data: photo-like JPEGs in class folders, converted as docs/your_data.md converts a user's photos. Each class has
# its own tint, so that the loss falls and FP8's curve can be set against the compute dtype's.
stage photos 30 "$python" - "$out/photos" "$images" "$classes" <<'PY'
import multiprocessing, os, sys
import numpy as np
from visionfm_jax.bench.input import synthetic_jpeg
folder, count, classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tints = np.random.default_rng(classes).normal(0, 25, (classes, 3))
def write(i):
  with open(os.path.join(folder, f"class_{i % classes:02d}", f"{i:06d}.jpg"), "wb") as f:
    f.write(synthetic_jpeg(np.random.default_rng(i), 500, 375, tints[i % classes]))
for c in range(classes):
  os.makedirs(os.path.join(folder, f"class_{c:02d}"), exist_ok=True)
with multiprocessing.get_context("fork").Pool() as pool:
  pool.map(write, range(count))
PY
stage shards 30 "$python" -m visionfm_jax.datatools.prepare_data --format=folders --input="$out/photos" \
  --output="$out/shards" --holdout_per_class="$holdout"
[[ -f $out/shards/dataset.json ]] && have_shards=1 || have_shards=0

# 2. ViT-H/14 through main (the recipe's config, a short schedule): the compute dtype and FP8 at seed 0, then the
# compute dtype at seed 1, whose programs come from the compile cache the first run wrote.
for run in vit_main_compute_dtype:compute_dtype:0:200 vit_main_fp8:fp8:0:170 \
           vit_main_compute_dtype_seed1:compute_dtype:1:130; do
  IFS=: read -r name gemm seed bound <<<"$run"
  if (( ! have_shards )) && wanted "$name"; then
    record "$name" skipped 0 "no shards in $out/shards"; continue
  fi
  stage "$name" "$bound" "$python" -m visionfm_jax.main --config=configs/vit_huge.py \
    --workdir="$out/run_${name#vit_main_}" --config.seed="$seed" \
    --config.data.source="arrayrecord:$out/shards/{split}-*.array_record" --config.model.num_classes="$classes" \
    --config.global_batch_size="$batch" --config.strategy=ddp --config.precision.gemm="$gemm" \
    --config.total_steps="$steps" --config.optim.warmup_steps="$warmup" --config.optim.lr="$lr" \
    --config.log_every="$log_every" --config.progress_bar=False --config.compile_cache="$out/compile_cache" \
    "${vit_size[@]}" "${main_input[@]}"
  rm -rf "$out/run_${name#vit_main_}/checkpoints"
done

# 3. Where FP8's step goes: bench's step traced, its busiest operations (bench/profile.py).
stage vit_profile_fp8 150 "$python" -m visionfm_jax.bench --config=configs/vit_huge.py --devices=1 \
  "${bench_steps[@]}" --config.global_batch_size="$batch" --config.strategy=ddp --config.precision.gemm=fp8 \
  --config.model.num_classes="$classes" --profile="$out/profile_fp8" --profile_steps=2 "${vit_size[@]}"

# 4. SwinV2-G through bench, per GEMM setting, in the CLIP tower's form (configs/swinv2_g_clip.py's remat policy).
for gemm in compute_dtype fp8; do
  stage "swin_bench_$gemm" 180 "$python" -m visionfm_jax.bench --config=configs/swinv2_cls.py:G --devices=1 \
    "${bench_steps[@]}" --config.global_batch_size="$batch" --config.strategy=ddp --config.precision.gemm="$gemm" \
    --config.model.remat_policy=dots_with_no_batch_dims_saveable --config.model.scan_unroll=7 \
    --config.model.attention="$swin_attention" "${swin_size[@]}"
done

# 5. ViT-H/14 through bench, per GEMM setting: main / bench is the loop's cost.
for gemm in compute_dtype fp8; do
  stage "vit_bench_$gemm" 120 "$python" -m visionfm_jax.bench --config=configs/vit_huge.py --devices=1 \
    "${bench_steps[@]}" --config.global_batch_size="$batch" --config.strategy=ddp --config.precision.gemm="$gemm" \
    --config.model.num_classes="$classes" "${vit_size[@]}"
done

# 6. summary.json and the table.
$python - "$out" "$warm_rows" "$rehearse" "$device" "$classes" "$batch" <<'PY'
import datetime, json, os, sys

out, warm_rows, rehearse, device = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
classes, batch = int(sys.argv[5]), int(sys.argv[6])
GEMMS = ("compute_dtype", "fp8")


def last_json(path):
  for line in reversed(open(path, encoding="utf-8").read().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise ValueError(f"no JSON line in {path}")


def main_figures(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [r for r in map(json.loads, f) if "train/img_per_sec" in r]
  timed = [(r, r["step"] - prev) for prev, r in zip([0] + [r["step"] for r in rows], rows)][warm_rows:]
  if not timed:
    raise ValueError(f"{len(rows)} train/img_per_sec rows in {workdir}/metrics.jsonl: none after the first {warm_rows}")
  steps = sum(n for _, n in timed)
  seconds = sum(n / r["train/img_per_sec"] for r, n in timed)  # each row's seconds over the batch, which cancels
  first = timed[0][0]
  mfu = first["train/mfu"] / first["train/img_per_sec"] * steps / seconds if "train/mfu" in first else None
  wait = sum(r["train/data_wait_fraction"] * n / r["train/img_per_sec"] for r, n in timed) / seconds
  return dict(img_per_sec=round(steps / seconds, 2), mfu=None if mfu is None else round(mfu, 4), steps_timed=steps,
              rows=len(rows), rows_timed=len(timed), data_wait_fraction=round(wait, 4),
              final_loss=round(rows[-1]["train/loss"], 4), workdir=workdir,
              loss_by_step={str(r["step"]): round(r["train/loss"], 4) for r in rows})


def bench_figures(path):
  r = last_json(path)
  if not r.get("img_per_sec"):
    raise ValueError(f"no img_per_sec in the last JSON line of {path}")
  return {k: r.get(k) for k in ("img_per_sec", "mfu", "step_s", "compile_s", "peak_bytes_in_use", "device")}


def shards_figures(path):
  splits = json.load(open(path, encoding="utf-8"))["splits"]
  return {name: split["records"] for name, split in splits.items()}


def figures(name, status):
  """A stage's figures; of a failed one only main's, whose metric rows come before the final checkpoint and
  evaluation that a timeout may cut."""
  workdir = os.path.join(out, "run_" + name.removeprefix("vit_main_"))
  if name.startswith("vit_main_") and (status == "ok" or os.path.exists(os.path.join(workdir, "metrics.jsonl"))):
    return main_figures(workdir)
  if status != "ok" or name == "warmup":
    return {}
  if name == "photos":
    written = sum(len(files) for _, _, files in os.walk(os.path.join(out, "photos")))
    return dict(images=written, classes=classes, size="500x375")
  if name == "shards":
    return shards_figures(os.path.join(out, "shards", "dataset.json"))
  return bench_figures(os.path.join(out, "logs", name + ".out"))


stages = {}
for line in open(os.path.join(out, "logs", "stages.tsv"), encoding="utf-8"):
  name, status, seconds, why = line.rstrip("\n").split("\t")
  stage = dict(status=status, seconds=int(seconds))
  if why:
    stage["why"] = why
  try:
    stage.update(figures(name, status))
  except (OSError, ValueError, KeyError, ZeroDivisionError) as e:
    if status == "ok":
      stage.update(status="FAIL", why=f"its figures: {e}")
  if name.startswith(("vit_", "swin_")):
    stage["gemm"] = "fp8" if name.endswith("_fp8") else "compute_dtype"
  stages[name] = stage


def ratio(a, b):
  x, y = (stages.get(s, {}).get("img_per_sec") for s in (a, b))
  return round(x / y, 4) if x and y else None


def loss_gap(a, b):
  """The mean absolute difference of two main runs' losses at the steps both logged, or None."""
  x, y = (stages.get(s, {}).get("loss_by_step") for s in (a, b))
  common = sorted(set(x or ()) & set(y or ()), key=int)
  return round(sum(abs(x[s] - y[s]) for s in common) / len(common), 4) if common else None


fp8_gap, seed_gap = (loss_gap(f"vit_main_{run}", "vit_main_compute_dtype") for run in ("fp8", "compute_dtype_seed1"))
summary = dict(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device,
    rehearse=rehearse, batch=batch, stages=stages,
    main_over_bench={g: ratio(f"vit_main_{g}", f"vit_bench_{g}") for g in GEMMS},
    fp8_over_compute_dtype={m: ratio(f"{m}_fp8", f"{m}_compute_dtype")
                            for m in ("vit_main", "vit_bench", "swin_bench")},
    loss_spread=dict(fp8_from_compute_dtype=fp8_gap, seed1_from_seed0=seed_gap,
                     fp8_within=None if None in (fp8_gap, seed_gap) else fp8_gap <= seed_gap))
with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
  json.dump(summary, f, indent=1)

fmt = lambda v, spec: format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)
print(f"\ngpu_recipe_check ({summary['date']}, {device}{', rehearsal' if rehearse else ''}, batch {batch}):")
print(f"  {'stage':29} {'status':7} {'s':>4} {'img/s':>9} {'MFU':>6}  detail")
for name, s in stages.items():
  detail = s.get("why") or (f"{s['rows_timed']} of {s['rows']} metric rows timed, data wait "
                            f"{s['data_wait_fraction']:.3f}, final loss {s['final_loss']}"
                            if "rows" in s else f"compile {s['compile_s']:.1f} s" if "compile_s" in s
                            else ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("status", "seconds")))
  print(f"  {name:29} {s['status']:7} {s['seconds']:>4} {fmt(s.get('img_per_sec'), '9.1f')} "
        f"{fmt(s.get('mfu'), '6.3f')}  {detail}")
print("  ViT-H/14 main / bench: " + ", ".join(f"{g} {fmt(v, '.3f')}" for g, v in summary["main_over_bench"].items()))
print("  fp8 / compute_dtype img/s: " + ", ".join(f"{m} {fmt(v, '.3f')}"
                                                 for m, v in summary["fp8_over_compute_dtype"].items()))
print(f"  ViT-H/14 loss, mean |difference| row by row: fp8 from compute_dtype {fmt(fp8_gap, '.4f')}, seed 1 from "
      f"seed 0 {fmt(seed_gap, '.4f')}")
print(f"  {out}/summary.json")
sys.exit(any(s["status"] != "ok" and s.get("why") != "not in --only" for s in stages.values()))
PY
