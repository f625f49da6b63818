# XLA / NCCL settings for A100 nodes (the seeds' SwinV2-G-CLIP and Aurora clusters). Source before launching:
# `source launch/xla_flags_a100.sh`. The H100 file's XLA and NCCL settings, without NVLink SHARP (NVLS needs the
# H100's third-generation NVSwitch).
source "$(dirname "${BASH_SOURCE[0]}")/xla_flags_h100.sh"
export NCCL_NVLS_ENABLE=0
# The gradient collectives as they were before the H100 file's 4 MiB reduce-scatters and three collectives in flight:
# SwinV2-G-CLIP's and Aurora's predicted days are priced at these (XLA takes a flag's last value). The H100 file's
# change nothing in SwinV2-G-CLIP's runbook layout (deviceless, 128 A100s: 7.90 s a step, 0.29 s exposed, either way).
export XLA_FLAGS="$XLA_FLAGS --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
export XLA_FLAGS="$XLA_FLAGS --xla_gpu_experimental_parallel_collective_overlap_limit=1"
