"""visionfm_jax: pretraining vision foundation models with JAX/Flax on GPU meshes.

`visionfm_jax.load(path)` gives a trained model to use from Python (tools/trained_model.py); it is imported on first
use, so that importing the package stays cheap."""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
  # By name, on first use: the API sits at the top (with the tools) and pulls in JAX, the models and the data.
  if name == "load":
    return importlib.import_module("visionfm_jax.tools.trained_model").load
  raise AttributeError(f"module 'visionfm_jax' has no attribute {name!r}")
