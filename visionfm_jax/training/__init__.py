"""The training core: the one loop (`train`), its state, Orbax checkpoints, the optimiser and its param rules,
precision (loss scaling), fault handling, starting points (`init_from`), FLOPs for MFU and the console/metric
writers."""
