"""The run's infrastructure around the training step: the workdir (its lock, storage probes), JAX's compile
cache, faults (preemption agreement, the hang watchdog, lost peers), the console, metrics and their writers
(metrics.jsonl, TensorBoard, W&B, MLflow). Nothing here knows a model, a task or the optimizer."""
