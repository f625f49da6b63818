"""Data: sources (TFDS, ArrayRecord records, the embedded shapes and scenes sets, ADE20K, COCO), their weighted
mixtures (mixture.py), host-side transforms, tokenizer and the grain pipelines (classification and pairs:
pipeline.py; dense tasks: dense.py); the retrieval benchmarks with several captions per image (COCO,
Flickr30k: caption_sets.py)."""

from visionfm_jax.data.records import ArrayRecordSource, read_metadata, write_pairs, write_records
from visionfm_jax.data.dense import coco_ground_truth, make_dense_eval_iterator, make_dense_train_loader
from visionfm_jax.data.pipeline import (make_eval_iterator, make_pair_eval_iterator, make_pair_train_loader,
                                        make_train_loader, open_eval_source)
from visionfm_jax.data.randaugment import RandAugment
from visionfm_jax.data.scenes import ScenesSource
from visionfm_jax.data.shapes import COLOUR_NAMES, SHAPE_NAMES, ShapesSource
from visionfm_jax.data.sources import build_source, class_names, train_class_names
from visionfm_jax.data.tokenizer import Tokenizer, eos_positions, shapes_tokenizer_path, train_tokenizer

__all__ = ["make_train_loader", "make_eval_iterator", "open_eval_source", "make_pair_train_loader",
           "make_pair_eval_iterator", "build_source", "class_names", "train_class_names",
           "ShapesSource", "SHAPE_NAMES", "COLOUR_NAMES", "ArrayRecordSource", "write_pairs", "write_records",
           "read_metadata", "RandAugment", "Tokenizer", "eos_positions", "shapes_tokenizer_path", "train_tokenizer",
           "make_dense_train_loader", "make_dense_eval_iterator", "coco_ground_truth", "ScenesSource"]
