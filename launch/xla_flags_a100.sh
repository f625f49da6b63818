# XLA / NCCL settings for A100 nodes (the seeds' SwinV2-G-CLIP and Aurora clusters). Source before launching:
# `source launch/xla_flags_a100.sh`. The H100 file's XLA and NCCL settings, without NVLink SHARP (NVLS needs the
# H100's third-generation NVSwitch).
source "$(dirname "${BASH_SOURCE[0]}")/xla_flags_h100.sh"
export NCCL_NVLS_ENABLE=0
