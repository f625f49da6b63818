#!/usr/bin/env bash
# The next lent GPU's measurements in one call of at most 9 minutes (bench/gpu_next.py's header: the stages, their
# bounds, what each reports): ViT-H/14 through `main` in bf16 and each FP8 recipe at batch 32 and 64, SwinV2-G's
# window attention alone (the Pallas kernel, cuDNN, the softmax path at windows 7 and 40) and in its step, SwinV2-G's
# fastest form that compiles in time. XLA's flags are launch/xla_flags_h100.sh's, as the cluster's jobs get them.
#
#   launch/gpu_next.sh [--out=DIR] [--report=DIR] [--budget=S] [--only=STAGE,...] [--rehearse] [--list]
#
# --rehearse: the same stages on a CPU with tiny models (tests/integration/test_gpu_next.py), compiled with
# JAX_DISABLE_MOST_OPTIMIZATIONS=1 (tiny models compile far longer than they run).
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/xla_flags_h100.sh
for arg in "$@"; do
  [[ $arg == --rehearse ]] && export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
    JAX_DISABLE_MOST_OPTIMIZATIONS=${JAX_DISABLE_MOST_OPTIMIZATIONS:-1}
done
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m visionfm_jax.bench.gpu_next "$@"
