"""Random-access sources of dict records, named by `config.data.source`.

  shapes                      the embedded procedural set (`shapes.ShapesSource`), no download
  shapes:images               the same drawing, other images (seed shapes.IMAGES_SEED), records with only an
                              'image': the embedded uncaptioned, unlabelled set (image-only data in a mixture)
  shapes:mixed_aspect         the 'shapes' records, each widened or heightened to an aspect of its own
                              (shapes.ASPECTS; NaFlex demos)
  tfds:<name>[:<ver>][:<split>] a TFDS dataset prepared as ArrayRecord; images stay encoded bytes for our
                              Pillow decoder. A split in the spec (e.g. 'train[:99%]') replaces
                              config.data.train_split / eval_split
  arrayrecord:<glob>          files written by `datatools.prepare_data` (`records.ArrayRecordSource`): labelled
                              images, image-text pairs or image-only records; '{split}' in the glob becomes the
                              split name (config.data.train_split / eval_split), a glob without it serves every
                              split
  wds:<glob>[;option=value]   img2dataset WebDataset tars read in place through their indexes (`wds.WdsSource`):
                              the same records as `arrayrecord:` of the tars prepared; options min_similarity,
                              max_pwatermark, max_punsafe filter by LAION's scores, index_dir names where
                              `index_tars --index_dir` put the indexes; '{split}' as for arrayrecord
  scenes                      the embedded multi-object set for segmentation and detection
                              (`scenes.ScenesSource`), split sizes config.data.shapes_train_size / _eval_size
  ade20k:<root>               ADE20K segmentation, the ADEChallengeData2016 folder (`ade20k.ADE20KSource`)
  coco:<root>                 COCO 2017 detection: images and instances JSON (`coco.CocoSource`)
  imagenet_a:<root>, imagenet_r:<root>, imagenet_sketch:<root>, imagenetv2:<root>
                              ImageNet's test-only variants as released (`imagenet_variants.ImageFolderSource`;
                              every split is the whole set), labelled within their own class lists, whose
                              names are ImageNet WordNet ids

Training reads config.data.source, or with `config.data.mixture` = ((spec, weight), ...) and config.data.source
'' a weighted mixture of such sources (`train_specs`; data/loader/mixture.py reads it). Evaluation reads
config.data.eval_source, else config.data.source, else the mixture's first entry (`eval_source_spec`).

TensorFlow is never imported: TFDS reads ArrayRecord files itself, and nothing is ever downloaded here. A
dataset that is not prepared fails at once with a `DataError` naming the dataset, split and directory.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
import re

from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.embedded.scenes import ScenesSource
from visionfm_jax.data.embedded.shapes import SHAPE_NAMES, ShapesSource
from visionfm_jax.data.sources import ade20k, coco, imagenet_variants, records, wds
from visionfm_jax.data.sources.ade20k import ADE20KSource
from visionfm_jax.data.sources.coco import CocoSource
from visionfm_jax.data.sources.records import ArrayRecordSource, split_pattern
from visionfm_jax.errors import ConfigError, DataError

PREPARE_HINT = "see docs/data_preparation.md"
VARIANTS_HINT = "see docs/data_preparation.md, 'Zero-shot benchmarks: ImageNet variants'"
FOLDER_KINDS = ("arrayrecord", "wds", "ade20k", "coco", *imagenet_variants.KINDS)  # '<kind>:<path>'


_VERSION = re.compile(r"^(\d+(\.(\d+|\*))*|\*)$")  # TFDS versions: 5.1.0, 5.*.*, *


def _parse(spec: str, what: str | None = None) -> tuple[str, str, str]:
  """(kind, name, split): 'shapes' -> ('shapes', '', ''); 'shapes:images' -> ('shapes', 'images', '');
  'tfds:imagenet2012:5.1.0:train[:10%]' -> ('tfds', 'imagenet2012:5.1.0', 'train[:10%]');
  'arrayrecord:/d/{split}-*' -> ('arrayrecord', '/d/{split}-*', ''); 'coco:/data/coco' -> ('coco', '/data/coco', '').
  A malformed spec is a DataError naming `what` (the field and spec, "config.data.eval_source='x'"; default
  config.data.source)."""
  kind, _, name = spec.partition(":")
  if (kind in ("shapes", "scenes") and not name) or (kind == "shapes" and name in ("images", "mixed_aspect")):
    return kind, name, ""
  if kind in FOLDER_KINDS and name:
    return kind, name, ""
  if kind == "tfds" and name and not name.startswith(":"):
    name, _, rest = name.partition(":")
    version, _, split = rest.partition(":")
    if version and not _VERSION.match(version):  # no version: the whole rest is the split
      version, split = "", rest
    return kind, f"{name}:{version}" if version else name, split
  raise DataError(f"{what or _source_what(spec)}: expected 'shapes', 'shapes:images', 'shapes:mixed_aspect', 'scenes', "
                  f"'tfds:<name>[:<version>][:<split>]', 'arrayrecord:<glob>', 'wds:<glob>', 'ade20k:<root>', "
                  f"'coco:<root>' or one of {', '.join(k + ':<root>' for k in imagenet_variants.KINDS)}")


def _source_what(spec: str) -> str:
  return f"config.data.source={spec!r}"


def source_kind(spec: str, what: str | None = None) -> str:
  """'shapes', 'scenes', 'tfds', 'arrayrecord', 'wds', 'ade20k', 'coco' or an ImageNet variant's kind; DataError
  naming `what` for a malformed spec."""
  return _parse(spec, what)[0]


def eval_source_spec(data_cfg) -> str:
  """config.data.eval_source, else config.data.source, else the spec of config.data.mixture's first entry."""
  return data_cfg.get("eval_source") or data_cfg.source or train_specs(data_cfg)[0][1]


def eval_source_what(data_cfg) -> str:
  """The eval source for messages: the field `eval_source_spec` takes it from, and its spec
  ("config.data.mixture[0]='shapes:images'")."""
  field = ("config.data.eval_source" if data_cfg.get("eval_source") else "config.data.source" if data_cfg.source
           else "config.data.mixture[0]")
  return f"{field}={eval_source_spec(data_cfg)!r}"


def train_specs(data_cfg) -> list[tuple[str, str, float]]:
  """What training reads, as (field, spec, weight) per entry: `field` names it in messages
  ("config.data.mixture[1]='shapes:images'"). config.data.mixture when it is set (config.data.source must then
  be ''), else config.data.source alone with weight 1. ConfigError naming the entry for a malformed one."""
  mixture = tuple(data_cfg.mixture)
  if not mixture:
    return [(_source_what(data_cfg.source), data_cfg.source, 1.0)]
  if data_cfg.source:
    raise ConfigError(f"config.data.mixture is set ({len(mixture)} entries) and config.data.source="
                      f"{data_cfg.source!r}: set --config.data.source='' to train on the mixture, or "
                      f"config.data.mixture=() to train on the source alone")
  entries = []
  for i, entry in enumerate(mixture):
    field = f"config.data.mixture[{i}]"
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)):
      raise ConfigError(f"{field}={entry!r}: expected a (source spec, weight) pair")
    spec, weight = entry
    if not spec:
      raise ConfigError(f"{field}={entry!r}: empty source spec")
    if not (math.isfinite(weight) and weight > 0):
      raise ConfigError(f"{field}={entry!r}: the weight must be a positive number")
    what = f"{field}={spec!r}"
    try:
      _parse(spec, what)
    except DataError as e:
      raise ConfigError(str(e)) from e
    entries.append((what, spec, float(weight)))
  return entries


def training_what(data_cfg) -> str:
  """The training data for messages: "config.data.source='shapes'", or "config.data.mixture (2 entries)"."""
  specs = train_specs(data_cfg)
  return specs[0][0] if not data_cfg.mixture else f"config.data.mixture ({len(specs)} entries)"


def tfds_data_dir(data_cfg) -> Path:
  """config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  data_dir = data_cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return Path(data_dir).expanduser()


def _check_prepared(name: str, split: str, data_dir: Path) -> None:
  """Fails fast (no TFDS call, so no download attempt) when `name` has no dataset_info.json."""
  base = name.split("/")[0].split(":")[0]
  folder = data_dir / base
  found = [p for pattern in ("dataset_info.json", "*/dataset_info.json", "*/*/dataset_info.json")
           for p in folder.glob(pattern) if "incomplete" not in str(p.relative_to(folder))]
  if not found:
    raise DataError(f"TFDS dataset {name!r} (split {split!r}) is not prepared: no dataset_info.json under "
                    f"{folder} (data dir {data_dir}, from config.data.data_dir, $TFDS_DATA_DIR or "
                    f"~/tensorflow_datasets); {PREPARE_HINT}")


def _tfds_source(name: str, split: str, data_dir: Path):
  _check_prepared(name, split, data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=str(data_dir), download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"TFDS dataset {name!r} (split {split!r}) in {data_dir} cannot be read as ArrayRecord: "
                    f"{type(e).__name__}: {str(e)[:500]}; {PREPARE_HINT}") from e


def _tfds_label_feature(name: str, data_cfg):
  data_dir = tfds_data_dir(data_cfg)
  _check_prepared(name, "-", data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    features = tfds.builder(name, data_dir=str(data_dir)).info.features
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"TFDS dataset {name!r} in {data_dir}: cannot read its info: {e}; {PREPARE_HINT}") from e
  if "label" not in features or not hasattr(features["label"], "num_classes"):
    raise DataError(f"TFDS dataset {name!r} in {data_dir} has no ClassLabel feature 'label'")
  return features["label"]


def build_source(spec: str, split: str, data_cfg, *, training: bool = False, what: str | None = None):
  """The RandomAccessDataSource for `spec` and `split` (a split inside `spec` wins): len, getitem -> dict with
  'image' and 'label' (classification sources) or 'caption' (pair sources; shapes has both), or the dense
  fields 'mask' (scenes, ade20k) and 'boxes' + 'classes' (scenes, coco). `training`: for a training
  loader (coco then leaves out images without boxes). Errors name `what`, the field the spec comes from and
  the spec ("config.data.mixture[1]='coco:/data'"; default config.data.source)."""
  what = what or _source_what(spec)
  kind, name, spec_split = _parse(spec, what)
  split = spec_split or split
  if kind in ("shapes", "scenes"):
    size = data_cfg.shapes_train_size if split == "train" else data_cfg.shapes_eval_size
    if kind == "scenes":
      return ScenesSource(split, size, data_cfg.image_size, seed=shapes.SEED,
                          max_objects=data_cfg.scenes_max_objects)
    if name == "images":
      return ShapesSource(split, size, data_cfg.image_size, seed=shapes.IMAGES_SEED, annotated=False)
    return ShapesSource(split, size, data_cfg.image_size, seed=shapes.SEED, caption_style=data_cfg.shapes_captions,
                        mixed_aspect=name == "mixed_aspect")
  if kind == "arrayrecord":
    return _arrayrecord_source(what, name, split)
  if kind in imagenet_variants.KINDS:
    try:
      return imagenet_variants.open_variant(kind, name)
    except DataError as e:
      raise DataError(f"{what}: {e}; {VARIANTS_HINT}") from e
  if kind == "wds":
    return _wds_source(what, name, split)
  if kind in ("ade20k", "coco"):
    try:
      return ADE20KSource(name, split) if kind == "ade20k" else CocoSource(name, split, skip_empty=training)
    except DataError as e:
      raise DataError(f"{what} split {split!r}: {e}; {PREPARE_HINT}") from e
  return _tfds_source(name, split, tfds_data_dir(data_cfg))


def _arrayrecord_source(what: str, pattern: str, split: str) -> ArrayRecordSource:
  try:
    return ArrayRecordSource(split_pattern(pattern, split))
  except DataError as e:
    raise DataError(f"{what} split {split!r}: {e}") from e


def _wds_source(what: str, spec: str, split: str) -> wds.WdsSource:
  pattern, score_filter, index_dir = wds.parse_spec(spec, what)
  try:
    return wds.WdsSource(split_pattern(pattern, split), score_filter, index_dir)
  except DataError as e:
    raise DataError(f"{what} split {split!r}: {e}") from e


def disk_path(spec: str, split: str, data_cfg, what: str | None = None) -> str | None:
  """What `spec` reads from disk in `split`: the glob of arrayrecord: and wds: ('{split}' filled in), the root
  folder of the other folder kinds, TFDS' dataset folder in its data dir; None for the embedded sets."""
  kind, name, spec_split = _parse(spec, what or _source_what(spec))
  if kind in ("shapes", "scenes"):
    return None
  if kind == "tfds":
    return str(tfds_data_dir(data_cfg) / name.split("/")[0].split(":")[0])  # as _check_prepared looks
  if kind == "wds":
    name = wds.parse_spec(name, what or _source_what(spec))[0]
  if kind in ("arrayrecord", "wds"):
    return split_pattern(name, spec_split or split)
  return os.path.expanduser(name)


def fixed_folder(path: str) -> str:
  """The folder part of `path` before its first component with a wildcard: what must exist for it to match."""
  parts = path.split(os.sep)
  fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
  folder = os.sep.join(parts[:fixed]) if fixed < len(parts) else path
  return folder or (os.sep if path.startswith(os.sep) else os.curdir)


def matches_nothing(path: str) -> bool:
  """Whether no file or folder matches `path` (a glob, or a plain path); stops at the first match."""
  return next(glob.iglob(path, recursive=True), None) is None


def class_names(spec: str, data_cfg, what: str | None = None) -> list[str]:
  """Human-readable label names, index = label (`train_class_names`: of the training data, a mixture's too);
  errors name `what` as build_source's do."""
  what = what or _source_what(spec)
  kind, name, _ = _parse(spec, what)
  if kind == "shapes" and name == "images":
    raise DataError(f"{what}: uncaptioned, unlabelled images have no class names")
  if kind in ("shapes", "scenes"):  # scenes: the object kinds; its masks add background as 0
    return list(SHAPE_NAMES)
  if kind == "ade20k":
    return list(ade20k.class_names())
  if kind in imagenet_variants.KINDS:
    return list(imagenet_variants.class_wnids(kind))
  if kind == "coco":  # contiguous classes in category-id order
    try:
      return list(coco.load_index(name, data_cfg.train_split).class_names)
    except DataError as e:
      raise DataError(f"{what} split {data_cfg.train_split!r}: {e}; {PREPARE_HINT}") from e
  if kind == "wds":
    raise DataError(f"{what}: image-text tars have no class names")
  if kind == "arrayrecord":
    try:
      return records.class_names(split_pattern(name, data_cfg.train_split))
    except DataError as e:
      raise DataError(f"{what} split {data_cfg.train_split!r}: {e}") from e
  return list(_tfds_label_feature(name, data_cfg).names)


def union_classes(lists) -> tuple[list[str], list[list[int]]]:
  """(names, maps): the ordered union of the class-name lists (first occurrence order; the first list is kept
  as it is) and, per list, each of its labels' label in the union (the same name: the same label)."""
  names, index, maps = [], {}, []
  for position, classes in enumerate(lists):
    labels = []
    for name in classes:
      if position == 0 or name not in index:
        index.setdefault(name, len(names))
        names.append(name)
        labels.append(len(names) - 1)
      else:
        labels.append(index[name])
    maps.append(labels)
  return names, maps


def train_class_names(data_cfg) -> list[str]:
  """The class names of the training data: config.data.source's, or the ordered union of config.data.mixture's
  entries' (`union_classes`; the loaders remap each entry's labels into it, and the first entry's stay)."""
  specs = train_specs(data_cfg)
  return union_classes([class_names(spec, data_cfg, what) for what, spec, _ in specs])[0]
