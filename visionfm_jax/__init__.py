"""visionfm_jax: pretraining vision foundation models with JAX/Flax on GPU meshes.

`visionfm_jax.load(path)` gives a trained model to use from Python (trained/model.py); it is imported on first
use, so that importing the package stays cheap (no JAX until then)."""

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
  # On first use: the API pulls in JAX, the models and the data. The package root is the top layer (the
  # package's face), so this import runs downward like every other.
  if name == "load":
    from visionfm_jax.trained import model  # pylint: disable=g-import-not-at-top

    return model.load
  raise AttributeError(f"module 'visionfm_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  """What completion offers: `load` (not yet imported) beside the module's own names."""
  return sorted(set(globals()) | set(__all__))
