"""Benchmarks of the training step: `python -m visionfm_jax.bench` (see `__main__`), AOT memory plans for
simulated meshes that pick a setup fitting the devices (`memory_plan`), and the PyTorch twin the CPU figures
are compared against (`torch_twin`)."""
