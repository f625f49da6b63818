"""Random-access sources of dict records, named by `config.data.source`: '<kind>' or '<kind>:<rest>', the kind one
row of `KINDS` (kind.py's `SourceKind` records; each module's docstring says its spec):

  shapes, shapes:images, shapes:mixed_aspect, scenes
                              the embedded procedural sets, no download (embedded_sets.py)
  tfds:<name>[:<ver>][:<split>] a TFDS dataset prepared as ArrayRecord (tfds_prepared.py)
  arrayrecord:<glob>          files written by `datatools.prepare_data` (records.py): labelled images, image-text
                              pairs or image-only records; '{split}' in the glob becomes the split name
  wds:<glob>[;option=value]   img2dataset WebDataset tars read in place through their indexes (wds.py)
  ade20k:<root>               ADE20K segmentation, the ADEChallengeData2016 folder (ade20k.py)
  coco:<root>                 COCO 2017 detection: images and instances JSON (coco.py)
  imagenet_a:<root>, imagenet_r:<root>, imagenet_sketch:<root>, imagenetv2:<root>
                              ImageNet's test-only variants as released (imagenet_variants.py)

Training reads config.data.source, or with `config.data.mixture` = ((spec, weight), ...) and config.data.source
'' a weighted mixture of such sources (`train_specs`; data/loader/mixture.py reads it). Evaluation reads
config.data.eval_source, else config.data.source, else the mixture's first entry (`eval_source_spec`).

Nothing is ever downloaded here: a dataset that is not prepared fails at once with a `DataError` naming the
dataset, split and directory.
"""

from __future__ import annotations

import glob
import math
import os

from visionfm_jax.data.sources import ade20k, coco, embedded_sets, imagenet_variants, records, tfds_prepared, wds
from visionfm_jax.data.sources.kind import PREPARE_HINT as PREPARE_HINT  # loader/checks.py's hint, kept here
from visionfm_jax.data.sources.kind import Request, SourceKind
from visionfm_jax.errors import ConfigError, DataError

# The one table: every kind by its name, in the order a malformed spec's message lists them.
KINDS: dict[str, SourceKind] = {
  kind.name: kind
  for kind in (
    embedded_sets.SHAPES,
    embedded_sets.SCENES,
    tfds_prepared.SOURCE_KIND,
    records.SOURCE_KIND,
    wds.SOURCE_KIND,
    ade20k.SOURCE_KIND,
    coco.SOURCE_KIND,
    *imagenet_variants.SOURCE_KINDS,
  )
}


def _parse(spec: str, what: str | None = None) -> tuple[str, str, str]:
  """(kind, name, split): 'shapes' -> ('shapes', '', ''); 'shapes:images' -> ('shapes', 'images', '');
  'tfds:imagenet2012:5.1.0:train[:10%]' -> ('tfds', 'imagenet2012:5.1.0', 'train[:10%]');
  'arrayrecord:/d/{split}-*' -> ('arrayrecord', '/d/{split}-*', ''); 'coco:/data/coco' -> ('coco', '/data/coco', '').
  A malformed spec is a DataError naming `what` (the field and spec, "config.data.eval_source='x'"; default
  config.data.source)."""
  kind, _, rest = spec.partition(":")
  parsed = KINDS[kind].parsed(rest) if kind in KINDS else None
  if parsed is None:
    raise DataError(f"{what or _source_what(spec)}: expected {_usages()}")
  return kind, *parsed


def _usages() -> str:
  """Every kind's forms, each usage once, the last after 'or'."""
  usages = list(dict.fromkeys(kind.usage for kind in KINDS.values()))
  return f"{', '.join(usages[:-1])} or {usages[-1]}"


def _source_what(spec: str) -> str:
  return f"config.data.source={spec!r}"


def source_kind(spec: str, what: str | None = None) -> str:
  """The kind of `spec` (a `KINDS` key: 'shapes', 'scenes', 'tfds', 'arrayrecord', 'wds', 'ade20k', 'coco' or an
  ImageNet variant's kind); DataError naming `what` for a malformed spec."""
  return _parse(spec, what)[0]


def eval_source_spec(data_cfg) -> str:
  """config.data.eval_source, else config.data.source, else the spec of config.data.mixture's first entry."""
  return data_cfg.get("eval_source") or data_cfg.source or train_specs(data_cfg)[0][1]


def eval_source_what(data_cfg) -> str:
  """The eval source for messages: the field `eval_source_spec` takes it from, and its spec
  ("config.data.mixture[0]='shapes:images'")."""
  field = (
    "config.data.eval_source"
    if data_cfg.get("eval_source")
    else "config.data.source"
    if data_cfg.source
    else "config.data.mixture[0]"
  )
  return f"{field}={eval_source_spec(data_cfg)!r}"


def train_specs(data_cfg) -> list[tuple[str, str, float]]:
  """What training reads, as (field, spec, weight) per entry: `field` names it in messages
  ("config.data.mixture[1]='shapes:images'"). config.data.mixture when it is set (config.data.source must then
  be ''), else config.data.source alone with weight 1. ConfigError naming the entry for a malformed one."""
  mixture = tuple(data_cfg.mixture)
  if not mixture:
    return [(_source_what(data_cfg.source), data_cfg.source, 1.0)]
  if data_cfg.source:
    raise ConfigError(
      f"config.data.mixture is set ({len(mixture)} entries) and config.data.source="
      f"{data_cfg.source!r}: set --config.data.source='' to train on the mixture, or "
      f"config.data.mixture=() to train on the source alone"
    )
  entries = []
  for i, entry in enumerate(mixture):
    field = f"config.data.mixture[{i}]"
    if not (
      isinstance(entry, (tuple, list))
      and len(entry) == 2
      and isinstance(entry[0], str)
      and isinstance(entry[1], (int, float))
      and not isinstance(entry[1], bool)
    ):
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


def build_source(spec: str, split: str, data_cfg, *, training: bool = False, what: str | None = None):
  """The RandomAccessDataSource for `spec` and `split` (a split inside `spec` wins): len, getitem -> dict with
  'image' and 'label' (classification sources) or 'caption' (pair sources; shapes has both), or the dense
  fields 'mask' (scenes, ade20k) and 'boxes' + 'classes' (scenes, coco). `training`: for a training
  loader (coco then leaves out images without boxes). Errors name `what`, the field the spec comes from and
  the spec ("config.data.mixture[1]='coco:/data'"; default config.data.source)."""
  what = what or _source_what(spec)
  kind, name, spec_split = _parse(spec, what)
  return KINDS[kind].open(Request(name, spec_split or split, data_cfg, what, training))


def disk_path(spec: str, split: str, data_cfg, what: str | None = None) -> str | None:
  """What `spec` reads from disk in `split`: the glob of arrayrecord: and wds: ('{split}' filled in), the root
  folder of the other folder kinds, TFDS' dataset folder in its data dir; None for the embedded sets."""
  what = what or _source_what(spec)
  kind, name, spec_split = _parse(spec, what)
  return KINDS[kind].path_on_disk(Request(name, spec_split or split, data_cfg, what))


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
  return KINDS[kind].class_names(name, data_cfg, what)


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
