#!/usr/bin/env bash
# The GPU benchmark sweep of BENCHMARKS.md ("GPU"): ViT-H/14 and SwinV2-G at 224 px, bf16, one GPU, over the
# remat policies and attention implementations; one JSON line per run in $OUT (default bench_gpu.jsonl), then
# the best MFU per model. Usage: launch/bench_gpu.sh [out.jsonl] [steps]
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/xla_flags_h100.sh
out=${1:-bench_gpu.jsonl}
steps=${2:-20}
common=(--devices=1 --steps="$steps" --warmup=3 --config.strategy=ddp --config.precision.compute_dtype=bfloat16)

run() {  # name, then bench flags
  local name=$1; shift
  echo "== $name $*" >&2
  python -m visionfm_jax.bench "${common[@]}" "$@" | tail -n 1 | python -c "import json,sys; r=json.loads(sys.stdin.read()); r['run']='$name'; print(json.dumps(r))" >> "$out" \
    || echo "   failed (out of memory or unsupported): $name" >&2
}

for remat in nothing_saveable dots_with_no_batch_dims_saveable dots_saveable none; do
  for attention in cudnn softmax; do
    for batch in 32 64; do
      run "vit_h14 remat=$remat attention=$attention batch=$batch" --config=configs/vit_huge.py \
        --config.global_batch_size=$batch --config.model.remat_policy=$remat --config.model.attention=$attention
    done
  done
done
for remat in nothing_saveable dots_with_no_batch_dims_saveable dots_saveable; do
  for attention in jax softmax; do
    for batch in 16 32; do
      run "swinv2_g remat=$remat attention=$attention batch=$batch" --config=configs/swinv2_cls.py:G \
        --config.global_batch_size=$batch --config.model.remat_policy=$remat --config.model.attention=$attention
    done
  done
done
python - "$out" <<'PY'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
for model in ("vit_h14", "swinv2_g"):
  mine = [r for r in runs if r["run"].startswith(model) and r.get("mfu")]
  if mine:
    best = max(mine, key=lambda r: r["mfu"])
    print(f"{model}: best mfu {best['mfu']:.3f} ({best['img_per_sec']:.1f} img/s) with {best['run']}")
PY
