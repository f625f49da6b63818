"""The synthetic shards a soak reads (bench/soak.py): a seed's training data as shard counts (`PRESETS`), written
once under a folder per source and layout and reused when its dataset.json says it is complete.

Each shard holds a few records of a 16x16 JPEG (with a caption, a label or neither, as its source's kind says). A
shard is a hard link to one of TEMPLATES distinct ArrayRecord files (an ArrayRecord file takes 128 KiB whatever it
holds; 232,000 links take seconds and no space), so every shard name is a file of its own to open; without links
every shard is written as its own file (128 KiB each). dataset.json names the shards' index (shard_index.py), as
datatools.prepare_data leaves it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import numpy as np

from visionfm_jax.data.sources import records, shard_index
from visionfm_jax.errors import UserError

TEMPLATES = 64  # distinct shard files the shards link to
IMAGE_SIDE = 16  # px of the records' JPEGs
SHARD_BYTES = 128 << 10  # an ArrayRecord file's size, however few records it holds (riegeli's 64 KiB blocks)
SPLIT = "train"
DATASET_KINDS = {"pairs": "pairs", "labelled": "classification", "images": "images"}  # split kind -> dataset kind


@dataclasses.dataclass(frozen=True)
class SourceLayout:
  """One synthetic source: `name` (its folder), what its records hold (records.write_metadata's split kinds:
  pairs, labelled, images) and its shard count; `classes` for labelled records."""

  name: str
  kind: str
  shards: int
  classes: int = 0


@dataclasses.dataclass(frozen=True)
class Preset:
  """A seed's config and its training data: one source (config.data.source) or, in config.data.mixture's order,
  one per entry (the weights stay the config's)."""

  config: str
  sources: tuple[SourceLayout, ...]


# The counts: LAION-2B-en is ~232,000 img2dataset tars, one shard each (docs/data_preparation.md); ImageNet-21K
# fall11 holds 14,197,122 images of 21,841 classes, 5 per class held out, the rest in shards of 1,000
# (prepare_data's default): 14,088; COCO's 591,753 caption pairs: 592 shards; Visual Genome's at most 5.4M region
# crops: 5,400; Aurora's 500M uncaptioned images: 500,000 (docs/runbooks/aurora_xl.md).
LAION = SourceLayout("laion", "pairs", 232_000)
PRESETS = {
  "laion": Preset("configs/swinv2_g_clip.py", (LAION,)),
  "imagenet21k": Preset("configs/vit_huge.py", (SourceLayout("imagenet21k", "labelled", 14_088, classes=21_841),)),
  "aurora": Preset(
    "configs/aurora_xl.py",
    (
      LAION,
      SourceLayout("coco", "pairs", 592),
      SourceLayout("vg", "pairs", 5_400),
      SourceLayout("aurora_images", "images", 500_000),
    ),
  ),
}


def scaled(sources: tuple[SourceLayout, ...], shards: int) -> tuple[SourceLayout, ...]:
  """`sources` with `shards` in all, in proportion to their counts (at least one each); unchanged for 0."""
  if not shards:
    return sources
  total = sum(s.shards for s in sources)
  return tuple(dataclasses.replace(s, shards=max(1, round(s.shards * shards / total))) for s in sources)


def layout_dir(data_dir: str, layout: SourceLayout, records_per_shard: int, links: bool) -> str:
  """The folder of one source's shards: its name, shard count and records per shard."""
  return os.path.join(data_dir, f"{layout.name}-{layout.shards}x{records_per_shard}{'' if links else '-files'}")


def _jpegs(count: int) -> list[bytes]:
  rng = np.random.default_rng(0)
  return [records.encode_jpeg(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)) for _ in range(count)]


def _record(layout: SourceLayout, jpeg: bytes, number: int) -> dict:
  """Record `number` of the templates: a caption, a label or neither, as `layout.kind` says."""
  if layout.kind == "pairs":
    return {"image": jpeg, "caption": f"a synthetic photo of pattern {number}", "key": f"{number:09d}"}
  if layout.kind == "labelled":
    return {"image": jpeg, "label": number % layout.classes, "key": f"{number:09d}"}
  return {"image": jpeg, "key": f"{number:09d}"}


def _template_records(layout: SourceLayout, records_per_shard: int, template: int, jpegs: list[bytes]) -> list:
  first = template * records_per_shard
  return [_record(layout, jpegs[(first + k) % len(jpegs)], first + k) for k in range(records_per_shard)]


def _soak_entry(layout: SourceLayout, records_per_shard: int, links: bool) -> dict:
  """What dataset.json's 'soak' field says of a complete folder."""
  return {
    "shards": layout.shards,
    "records_per_shard": records_per_shard,
    "kind": layout.kind,
    "classes": layout.classes,
    "links": links,
    "templates": min(TEMPLATES, layout.shards),
  }


def is_complete(directory: str, layout: SourceLayout, records_per_shard: int, links: bool) -> bool:
  """Whether `directory` holds the layout's shards, all of them, under a dataset.json that describes them."""
  try:
    metadata = records.read_metadata(directory)
  except UserError:
    return False
  if not metadata or metadata.get("soak") != _soak_entry(layout, records_per_shard, links):
    return False
  if shard_index.KEY not in metadata.get("splits", {}).get(SPLIT, {}):
    return False
  prefix = f"{SPLIT}-"
  with os.scandir(directory) as entries:
    present = sum(1 for e in entries if e.name.startswith(prefix) and e.name.endswith(".array_record"))
  return present == layout.shards


def check_space(directory: str, layouts, links: bool) -> None:
  """UserError when the shards to write need more space than the file system of `directory` has free."""
  need = sum(min(TEMPLATES, s.shards) if links else s.shards for s in layouts) * SHARD_BYTES
  parent = directory
  while not os.path.exists(parent):
    parent = os.path.dirname(parent) or "."
  free = shutil.disk_usage(parent).free
  if need > free:
    raise UserError(
      f"--data_dir={directory}: the shards need {need / 2**20:,.0f} MiB, the file system has "
      f"{free / 2**20:,.0f} MiB free (each ArrayRecord file takes {SHARD_BYTES >> 10} KiB; the default "
      f"--links writes {TEMPLATES} files per source)"
    )


def write_source(directory: str, layout: SourceLayout, records_per_shard: int, links: bool) -> None:
  """Writes the layout's shards into `directory` (those already there are kept: a link or a renamed file is
  complete), then dataset.json."""
  os.makedirs(directory, exist_ok=True)
  jpegs = _jpegs(TEMPLATES)
  count = min(TEMPLATES, layout.shards)
  templates = [os.path.join(directory, f".template-{t:03d}.array_record") for t in range(count)]
  names = [records.shard_name(SPLIT, i, layout.shards) for i in range(layout.shards)]
  for t, path in enumerate(templates):
    if links and not os.path.exists(path):
      records.write_records(path, _template_records(layout, records_per_shard, t, jpegs))
  for i, name in enumerate(names):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      continue
    if links:
      os.link(templates[i % count], path)
    else:
      records.write_records(path, _template_records(layout, records_per_shard, i % count, jpegs))
  classes = [f"n{c:08d}" for c in range(layout.classes)] if layout.kind == "labelled" else None
  split = {"records": layout.shards * records_per_shard, "shards": names, "kind": layout.kind}
  if links:  # every shard is its template: the index repeats the templates' rows
    rows = np.array([shard_index.measure(path) for path in templates], shard_index.DTYPE)
    split[shard_index.KEY] = shard_index.save(directory, SPLIT, rows[np.arange(layout.shards) % count])
  records.write_metadata(
    directory,
    kind=DATASET_KINDS[layout.kind],
    classes=classes,
    splits={SPLIT: split},
    soak=_soak_entry(layout, records_per_shard, links),
  )
  if not links:
    records.write_index(directory, SPLIT)


def prepare_sources(data_dir: str, layouts, records_per_shard: int, links: bool) -> tuple[list[str], float, bool]:
  """(the sources' `arrayrecord:` specs, seconds spent writing, whether every folder was reused)."""
  start, reused, specs = time.perf_counter(), True, []
  directories = [layout_dir(data_dir, s, records_per_shard, links) for s in layouts]
  missing = [(d, s) for d, s in zip(directories, layouts) if not is_complete(d, s, records_per_shard, links)]
  if missing:
    check_space(data_dir, [s for _, s in missing], links)
  for directory, layout in missing:
    try:
      write_source(directory, layout, records_per_shard, links)
    except OSError as e:
      raise UserError(f"--data_dir={data_dir}: cannot write the {layout.name} shards in {directory}: {e}") from e
    reused = False
  for directory in directories:
    specs.append(f"arrayrecord:{directory}/{{split}}-*.array_record")
  return specs, time.perf_counter() - start, reused
