"""visionfm_jax: pretraining vision foundation models with JAX/Flax on GPU meshes."""

__version__ = "0.1.0"
