"""visionfm_jax: pretraining vision foundation models with JAX/Flax on GPU meshes.

`visionfm_jax.load(path)` gives a trained model to use from Python (tools/trained_model.py); it is imported on first
use, so that importing the package stays cheap (no JAX until then)."""

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
  # By name, on first use: the API sits at the top (with the tools) and pulls in JAX, the models and the data.
  if name == "load":
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module("visionfm_jax.tools.trained_model").load
  raise AttributeError(f"module 'visionfm_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  """What completion offers: `load` (not yet imported) beside the module's own names."""
  return sorted(set(globals()) | set(__all__))
