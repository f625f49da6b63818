#!/usr/bin/env bash
# The GPU step benchmark (BENCHMARKS.md, "GPU (H100 / H200): MFU"): ViT-H/14 and SwinV2-G at 224 px, bf16, one GPU, over remat policy
# x attention implementation x per-GPU batch. One JSON line per setup in OUT (a failed setup gets a line naming
# why), then one table on stdout: img/s, MFU, peak memory, compile time, best MFU per model first.
#
#   launch/bench_gpu.sh [OUT.jsonl] [full|core|quick|leads] [STEPS]
#
# core: the six setups of BENCHMARKS.md's first GPU table; quick: one per model, a smoke test of the whole path;
# leads: ViT-H/14's planned setup (dots_saveable, cuDNN, batch 64) once as it is and once per MFU lead of
# BENCHMARKS.md (unrolled layers, XLA flag changes, kernel candidates, remat and batch), each row labelled with what
# it changes; LEADS="planned pallas_layer_norm ..." runs only the leads named (the rows of one 10-minute call).
# The image-text options (issue 63) run as leads too, each beside its unmasked CLIP row on the same tower: SigLIP's
# loss and FLIP's token_drop 0.5 on configs/swinv2_g_clip.py's ViT-B/16 tower (clip_vit_b16, siglip_vit_b16,
# flip_vit_b16), and the SwinV2 tower's token_subgrid 2 (clip_swinv2_g, swin_mask_swinv2_g).
# RUN_TIMEOUT (seconds, default 900) bounds each setup, compile included.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/xla_flags_h100.sh
out=${1:-bench_gpu.jsonl}
mode=${2:-full}
steps=${3:-10}
python=${PYTHON:-python3}
# scan_unroll=1: the rolled loop every table's rows were measured with; a lead that changes it says so after
common=(--devices=1 --steps="$steps" --warmup=2 --config.strategy=ddp --config.precision.compute_dtype=bfloat16
        --config.model.scan_unroll=1)

run() {  # model name, config, remat, attention, batch, [bench arguments...]; LEAD / LEAD_XLA_FLAGS: a labelled variant
  local name=$1 config=$2 remat=$3 attention=$4 batch=$5 lead=${LEAD:-} log
  shift 5
  log=$(mktemp)
  local attention_args=(--config.model.attention="$attention")
  [[ $config == *_clip.py* ]] && attention_args=(--config.model.image.attention="$attention"
                                                 --config.model.text.attention="$attention")  # a tower each
  echo "== $name remat=$remat attention=$attention batch=$batch${lead:+ lead=$lead}" >&2
  XLA_FLAGS="$XLA_FLAGS ${LEAD_XLA_FLAGS:-}" timeout "${RUN_TIMEOUT:-900}" $python -m visionfm_jax.bench \
    --config="$config" "${common[@]}" --config.global_batch_size="$batch" --config.model.remat_policy="$remat" \
    "${attention_args[@]}" "$@" >"$log" 2>&1
  local rc=$?
  if (( rc == 0 )); then
    tail -n 1 "$log" | $python -c "import json, sys; r = json.loads(sys.stdin.read()); r.update(model='$name', \
remat='$remat', attention='$attention', batch=$batch, lead='$lead'); print(json.dumps(r))" >>"$out"
  else
    local why="error"
    (( rc == 124 )) && why="timeout"
    grep -q "RESOURCE_EXHAUSTED\|Out of memory\|out of memory" "$log" && why="out of memory"
    tail -n 15 "$log" >&2
    echo "{\"model\": \"$name\", \"remat\": \"$remat\", \"attention\": \"$attention\", \"batch\": $batch, \"lead\": \"$lead\", \"failed\": \"$why\"}" >>"$out"
  fi
  rm -f "$log"
}

lead() {  # label, XLA flags appended to launch/xla_flags_h100.sh's (later flags win), [bench arguments...];
          # LEAD_REMAT / LEAD_BATCH / LEAD_MODEL / LEAD_ATTENTION: another remat policy / per-GPU batch / model
          # (swinv2_g) / attention than the planned setup's; LEAD_CONFIG: the config (with its variants) of a
          # LEAD_MODEL named for the row
  local label=$1 flags=$2 model=${LEAD_MODEL:-vit_h14} config=configs/vit_huge.py
  shift 2
  [[ -z ${LEADS:-} || " $LEADS " == *" $label "* ]] || return 0
  [[ $model == swinv2_g ]] && config=configs/swinv2_cls.py:G
  config=${LEAD_CONFIG:-$config}
  LEAD=$label LEAD_XLA_FLAGS=$flags run "$model" "$config" "${LEAD_REMAT:-dots_saveable}" "${LEAD_ATTENTION:-cudnn}" \
    "${LEAD_BATCH:-64}" "$@"
}

if [[ $mode == leads ]]; then  # ~40 s a row, each bounded to 240 s (RUN_TIMEOUT): two 10-minute calls (LEADS)
  RUN_TIMEOUT=${RUN_TIMEOUT:-240}
  known=$(grep -oE '^ *(LEAD_[A-Z]+=[^ ]+ +)*lead [a-z0-9_]+' launch/bench_gpu.sh | awk '{print $NF}')
  for name in ${LEADS:-}; do
    grep -qx "$name" <<<"$known" || { echo "bench_gpu.sh: LEADS names $name; the leads: $(echo $known)" >&2; exit 2; }
  done
  lead planned ""
  lead triton_gemm --xla_gpu_enable_triton_gemm=true
  lead cuda_graphs --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL
  lead gelu_tanh "" --config.model.act=gelu_pytorch_tanh  # changes the math: GELU's tanh approximation
  lead pallas_layer_norm "" --try_kernels=pallas_layer_norm  # JAX's Pallas Triton LayerNorm (models/kernels.py)
  LEAD_REMAT=none LEAD_BATCH=64 lead no_remat_b64 ""  # nothing recomputed, every activation kept
  LEAD_REMAT=nothing_saveable LEAD_BATCH=256 lead nothing_saveable_b256 ""  # the 0.31 row's setup, today's code
  graphs=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL  # the unrolled step's launches
  # The stack's form (model.scan_unroll, 0: straight-line with each block's remat kept) and FP8 GEMMs at the ViT-H/14
  # recipe's per-GPU share (2048 images over 64 GPUs: 32), and SwinV2-G's stage 2 in loops of 7 pairs, in FP8, and
  # straight-line without remat (the planner's pick for SwinV2-G on one H100)
  LEAD_BATCH=32 lead scanned_dots_b32 ""  # the recipe's form before the planner's straight-line pick
  LEAD_BATCH=32 lead straight_dots_b32 "" --config.model.scan_unroll=0
  LEAD_REMAT=none LEAD_BATCH=32 lead recipe_b32 "" --config.model.scan_unroll=0  # configs/vit_huge.py's form
  LEAD_REMAT=none LEAD_BATCH=32 lead recipe_b32_cuda_graphs $graphs --config.model.scan_unroll=0
  LEAD_REMAT=none LEAD_BATCH=32 lead recipe_b32_triton_gemm --xla_gpu_enable_triton_gemm=true \
      --config.model.scan_unroll=0
  LEAD_REMAT=none LEAD_BATCH=32 lead fp8_recipe_b32 "" --config.model.scan_unroll=0 --config.precision.gemm=fp8
  LEAD_REMAT=none LEAD_BATCH=32 lead fp8_bf16_wgrad_recipe_b32 "" --config.model.scan_unroll=0 \
      --config.precision.gemm=fp8_bf16_wgrad
  LEAD_MODEL=swinv2_g LEAD_REMAT=nothing_saveable LEAD_BATCH=32 lead swinv2_g_b32 ""
  # the window attention as Pallas kernels, the bias-table gradient summed inside (models/kernels.py)
  LEAD_MODEL=swinv2_g LEAD_REMAT=nothing_saveable LEAD_BATCH=32 LEAD_ATTENTION=pallas lead swinv2_g_pallas ""
  LEAD_MODEL=swinv2_g LEAD_REMAT=nothing_saveable LEAD_BATCH=32 lead swinv2_g_unroll7 "" --config.model.scan_unroll=7
  LEAD_MODEL=swinv2_g LEAD_REMAT=nothing_saveable LEAD_BATCH=32 lead swinv2_g_fp8 "" --config.precision.gemm=fp8
  LEAD_MODEL=swinv2_g LEAD_REMAT=none LEAD_BATCH=32 lead swinv2_g_straight "" --config.model.scan_unroll=0
  # remat keeping cuDNN attention's outputs against the same loops without them (SwinV2-G-CLIP 640's and Aurora's)
  LEAD_MODEL=swinv2_g LEAD_REMAT=dots_with_no_batch_dims_saveable LEAD_BATCH=32 lead swinv2_g_dots_u7 "" \
      --config.model.scan_unroll=7
  LEAD_MODEL=swinv2_g LEAD_REMAT=dots_with_no_batch_dims_and_attention_saveable LEAD_BATCH=32 \
      lead swinv2_g_attention_kept_u7 "" --config.model.scan_unroll=7
  # image-text: CLIP (one micro-batch) against SigLIP, FLIP and the SwinV2 subgrid on the same tower and batch
  clip=configs/swinv2_g_clip.py
  LEAD_MODEL=vit_b16_clip LEAD_CONFIG=$clip:vit LEAD_BATCH=256 lead clip_vit_b16 "" --config.grad_accum_steps=1
  LEAD_MODEL=vit_b16_clip LEAD_CONFIG=$clip:vit,siglip LEAD_BATCH=256 lead siglip_vit_b16 "" --config.grad_accum_steps=1
  LEAD_MODEL=vit_b16_clip LEAD_CONFIG=$clip:vit,flip LEAD_BATCH=256 lead flip_vit_b16 "" --config.grad_accum_steps=1
  LEAD_MODEL=swinv2_g_clip LEAD_CONFIG=$clip LEAD_REMAT=nothing_saveable LEAD_BATCH=32 lead clip_swinv2_g "" \
      --config.grad_accum_steps=1
  LEAD_MODEL=swinv2_g_clip LEAD_CONFIG=$clip:swin_mask LEAD_REMAT=nothing_saveable LEAD_BATCH=32 \
      lead swin_mask_swinv2_g "" --config.grad_accum_steps=1
elif [[ $mode == quick ]]; then
  run vit_h14 configs/vit_huge.py dots_with_no_batch_dims_saveable cudnn 64
  run swinv2_g configs/swinv2_cls.py:G nothing_saveable cudnn 32
elif [[ $mode == core ]]; then
  run vit_h14 configs/vit_huge.py dots_with_no_batch_dims_saveable cudnn 64
  run swinv2_g configs/swinv2_cls.py:G nothing_saveable cudnn 32
  run vit_h14 configs/vit_huge.py dots_with_no_batch_dims_saveable softmax 64
  run vit_h14 configs/vit_huge.py nothing_saveable cudnn 128
  run swinv2_g configs/swinv2_cls.py:G nothing_saveable softmax 32
  run vit_h14 configs/vit_huge.py none cudnn 32
else
  for remat in nothing_saveable dots_with_no_batch_dims_saveable dots_saveable none; do
    for attention in cudnn softmax; do
      for batch in 32 64 128; do
        run vit_h14 configs/vit_huge.py $remat $attention $batch
      done
    done
  done
  for remat in nothing_saveable dots_with_no_batch_dims_saveable dots_saveable; do
    for attention in cudnn softmax; do
      for batch in 16 32 64; do
        run swinv2_g configs/swinv2_cls.py:G $remat $attention $batch
      done
    done
  done
fi

$python - "$out" <<'PY'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'model':9} {'remat':33} {'attention':9} {'batch':>5} {'lead':17} {'img/s':>8} {'MFU':>6} {'peak GiB':>8} "
      f"{'compile s':>9}")
for r in sorted(runs, key=lambda r: (r["model"], -(r.get("mfu") or 0))):
  head = f"{r['model']:9} {r['remat']:33} {r['attention']:9} {r['batch']:>5} {r.get('lead') or '-':17}"
  if "failed" in r:
    print(f"{head} {'failed: ' + r['failed']:>33}")
    continue
  peak = r.get("peak_bytes_in_use") or r.get("memory_plan_bytes") or 0
  print(f"{head} {r['img_per_sec']:8.1f} {r['mfu'] or 0:6.3f} {peak / 2**30:8.1f} {r['compile_s']:9.1f}")
if runs and all("failed" in r for r in runs):
  sys.exit("every setup failed")
PY
