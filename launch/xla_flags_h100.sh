# XLA / NCCL settings for H100/H200 nodes. Source before launching: `source launch/xla_flags_h100.sh`.
xla_flags=(
  --xla_gpu_enable_latency_hiding_scheduler=true   # overlap FSDP all-gathers / reduce-scatters with compute
  --xla_gpu_enable_pipelined_all_gather=true       # zero3: gather layer i+1's params while layer i computes
                                                   # (deviceless ViT-H 8-GPU plan: exposed 6.6 -> 1.1 ms a step)
  --xla_gpu_enable_triton_gemm=false               # cuBLAS's GEMMs until the recipe's form runs faster with Triton's
                                                   # (bench_gpu.sh's recipe_b32_triton_gemm lead; the scanned step did)
  --xla_gpu_dot_merger_threshold_mb=8              # ViT-H/14's q, k, v (9.4 MiB merged) stay 3 GEMMs, each biased in its
                                                   # epilogue; merged, XLA splits and biases the output in more passes.
                                                   # At 0 smaller products unmerge too, and SwinV2-G-CLIP's ZeRO-3
                                                   # default no longer fits an A100 (docs/tried_and_dropped.md)
  --xla_gpu_enable_command_buffer=                 # CUDA graphs off: they fight with the async collectives
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728      # fuse small all-reduces (128 MiB buckets)
  --xla_gpu_all_gather_combine_threshold_bytes=134217728      # fuse per-layer param gathers under zero3
  --xla_gpu_reduce_scatter_combine_threshold_bytes=4194304    # gradient reduce-scatters in 4 MiB pieces, each
                                                              # started as its layers' backward ends (at 128 MiB
                                                              # ViT-H/14's were one, after the last layer)
  --xla_gpu_experimental_parallel_collective_overlap_limit=3  # the network's all-reduce issued while a node's
                                                              # reduce-scatters run, all behind the backward (the
                                                              # deviceless ViT-H/14 64-GPU plan: exposed 6.7 -> 1.2 ms)
)
export XLA_FLAGS="${XLA_FLAGS:-} ${xla_flags[*]}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}  # leave room for NCCL buffers
export NCCL_IB_SL=${NCCL_IB_SL:-1}          # InfiniBand service level used by most HDR/NDR fabrics
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-1}  # NVLink SHARP on H100 NVSwitch systems
