"""The input pipeline, a folder per idea; imports run down this list (tests/unit/test_layering.py, DATA_LAYERS):

  text/        captions and tokens: the tokenizer, the retrieval benchmarks with several captions per image
               (caption_sets: COCO, Flickr30k) and the captioned corpora datatools.prepare_data lists (pair_corpora)
  loader/      the grain pipelines: pipeline (classification and pairs), dense (segmentation, detection), the
               weighted mixture of sources, skipping undecodable records, resume on another process or worker
               count, and the data section's config checks
  sources/     the readers of stored data, one per layout (records: ArrayRecord, wds, coco, ade20k,
               imagenet_variants), and the registry that names them by config.data.source
  embedded/    the procedural sets that need no download: shapes, scenes
  transforms/  record -> example: host (decode, crop, resize), randaugment, dense_transforms (masks, boxes),
               device_augment (the per-pixel half of the training augmentation, under jit)
  limits.py    what every reader and decoder takes from untrusted data, and the names of what it leaves out

Here: the loaders and the source registry that the tasks and evaluators call."""

from visionfm_jax.data.loader.dense import coco_ground_truth, make_dense_eval_iterator, make_dense_train_loader
from visionfm_jax.data.loader.pipeline import (
  make_eval_iterator,
  make_pair_eval_iterator,
  make_pair_train_loader,
  make_train_loader,
  open_eval_source,
)
from visionfm_jax.data.sources.registry import build_source, class_names, train_class_names

__all__ = [
  "make_train_loader",
  "make_eval_iterator",
  "open_eval_source",
  "make_pair_train_loader",
  "make_pair_eval_iterator",
  "build_source",
  "class_names",
  "train_class_names",
  "make_dense_train_loader",
  "make_dense_eval_iterator",
  "coco_ground_truth",
]
