"""TFDS datasets prepared as ArrayRecord (`config.data.source='tfds:<name>[:<version>][:<split>]'`), read with
`tfds.data_source`: random access, images kept as encoded bytes for our Pillow decoder. A split in the spec (e.g.
'train[:99%]') replaces config.data.train_split / eval_split. The data dir is config.data.data_dir, else
$TFDS_DATA_DIR, else ~/tensorflow_datasets.

TensorFlow is never imported: TFDS reads ArrayRecord files itself, and nothing is ever downloaded here. A dataset
that is not prepared fails at once with a DataError naming the dataset, split and directory.
"""

from __future__ import annotations

import os
from pathlib import Path
import re

from visionfm_jax.data.sources.kind import PREPARE_HINT, Request, SourceKind
from visionfm_jax.errors import DataError

_VERSION = re.compile(r"^(\d+(\.(\d+|\*))*|\*)$")  # TFDS versions: 5.1.0, 5.*.*, *


def parse(rest: str) -> tuple[str, str] | None:
  """'imagenet2012:5.1.0:train[:10%]' -> ('imagenet2012:5.1.0', 'train[:10%]'); 'imagenet2012:validation' ->
  ('imagenet2012', 'validation'); None without a dataset name."""
  if not rest or rest.startswith(":"):
    return None
  name, _, after = rest.partition(":")
  version, _, split = after.partition(":")
  if version and not _VERSION.match(version):  # no version: the whole rest is the split
    version, split = "", after
  return f"{name}:{version}" if version else name, split


def tfds_data_dir(data_cfg) -> Path:
  """config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  data_dir = data_cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return Path(data_dir).expanduser()


def _folder(name: str, data_dir: Path) -> Path:
  """The dataset's folder in `data_dir`: its name without config or version."""
  return data_dir / name.split("/")[0].split(":")[0]


def _check_prepared(name: str, split: str, data_dir: Path) -> None:
  """Fails fast (no TFDS call, so no download attempt) when `name` has no dataset_info.json."""
  folder = _folder(name, data_dir)
  found = [
    p
    for pattern in ("dataset_info.json", "*/dataset_info.json", "*/*/dataset_info.json")
    for p in folder.glob(pattern)
    if "incomplete" not in str(p.relative_to(folder))
  ]
  if not found:
    raise DataError(
      f"TFDS dataset {name!r} (split {split!r}) is not prepared: no dataset_info.json under "
      f"{folder} (data dir {data_dir}, from config.data.data_dir, $TFDS_DATA_DIR or "
      f"~/tensorflow_datasets); {PREPARE_HINT}"
    )


def _open(request: Request):
  name, split, data_dir = request.name, request.split, tfds_data_dir(request.data_cfg)
  _check_prepared(name, split, data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(
      name, split=split, data_dir=str(data_dir), download=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
      f"TFDS dataset {name!r} (split {split!r}) in {data_dir} cannot be read as ArrayRecord: "
      f"{type(e).__name__}: {str(e)[:500]}; {PREPARE_HINT}"
    ) from e


def _label_feature(name: str, data_cfg):
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


SOURCE_KIND = SourceKind(
  "tfds",
  "'tfds:<name>[:<version>][:<split>]'",
  _open,
  class_names=lambda name, data_cfg, what: list(_label_feature(name, data_cfg).names),
  parse=parse,
  disk_path=lambda request: str(_folder(request.name, tfds_data_dir(request.data_cfg))),
)  # as _check_prepared looks
