"""Data: sources (TFDS, the embedded shapes set), host-side transforms and the grain pipelines."""

from visionfm_jax.data.pipeline import make_eval_iterator, make_train_loader
from visionfm_jax.data.shapes import COLOUR_NAMES, SHAPE_NAMES, ShapesSource
from visionfm_jax.data.sources import build_source, class_names, num_classes

__all__ = ["make_train_loader", "make_eval_iterator", "build_source", "num_classes", "class_names",
           "ShapesSource", "SHAPE_NAMES", "COLOUR_NAMES"]
