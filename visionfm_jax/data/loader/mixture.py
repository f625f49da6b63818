"""Training data as one global stream over a weighted mixture of sources (`config.data.mixture`).

  config.data.source = ''
  config.data.mixture = (("arrayrecord:/data/pairs/{split}-*.array_record", 3.0), ("shapes:images", 1.0))

Entry i is its source's records, shuffled per its own epoch (grain's index_shuffle, seed `entry_seed(seed, i)`,
a new order each epoch) and repeated for ever; grain's `MapDataset.mix` interleaves the entries by stream
position in proportion to the weights (deterministically: position g of the stream is a fixed (entry, position
in the entry), and every position of every entry is reached once). `MixtureSource` serves that stream by
position, and the training loaders read it in order (pipeline.grain_train_loader): process p of P takes positions
p, p + P, ..., so the processes' shares of each entry are disjoint, each entry's records appear once per its
own epoch, and saving, restoring and re-sharding a loader's position (data/loader/resume.py) work on the mixture as on
one source.

A single source is a mixture of one whose seed is the loader's: its stream is exactly the one grain's IndexSampler
gives (it shuffles with the same index_shuffle and per-epoch seeds).

Labels: the classes of a mixture are the ordered union of its entries' class names (`sources.union_classes`),
and `with_union_labels` remaps each entry's labels into it (the first entry's labels stay as they are).
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import numpy as np

from visionfm_jax.data.sources import registry as sources
from visionfm_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source of a mixture: `field` names it in messages ("config.data.mixture[1]='shapes:images'")."""

  field: str
  source: object  # a grain RandomAccessDataSource
  weight: float = 1.0
  spec: str = ""  # '' for a source given directly: then `classes` is needed to remap labels
  classes: tuple | None = None  # class names, index = label; None: sources.class_names(spec)
  label_map: tuple | None = None  # the entry's label -> the mixture's label; None: unchanged


@dataclasses.dataclass(frozen=True)
class Mixture:
  entries: tuple
  what: str  # the whole, for messages

  @property
  def records(self) -> int:
    """Records in one epoch of every entry."""
    return sum(len(e.source) for e in self.entries)


def open_train(data_cfg, split: str) -> Mixture:
  """The training data of `data_cfg` (config.data.source, or config.data.mixture: `sources.train_specs`) in
  `split`, every source opened; a DataError naming the entry for one that cannot be opened or is empty."""
  entries = []
  for what, spec, weight in sources.train_specs(data_cfg):
    source = sources.build_source(spec, split, data_cfg, training=True, what=what)
    entries.append(Entry(what, source, weight, spec))
  return _checked(Mixture(tuple(entries), sources.training_what(data_cfg)), split)


def as_mixture(source, data_cfg, split: str) -> Mixture:
  """`source` as it is when it is a Mixture, else the mixture of one of a source given in place of
  config.data.source."""
  if isinstance(source, Mixture):
    return _checked(source, split)
  field = f"config.data.source={data_cfg.source!r}"
  return _checked(Mixture((Entry(field, source, 1.0, data_cfg.source),), field), split)


def _checked(mixture: Mixture, split: str) -> Mixture:
  for entry in mixture.entries:
    if len(entry.source) <= 0:
      raise DataError(f"{entry.field} split {split!r} has no records")
  return mixture


def with_union_labels(mixture: Mixture, data_cfg) -> Mixture:
  """`mixture` whose entries' labels are remapped into the union of their class names (`sources.union_classes`);
  as it is for a mixture of one."""
  if len(mixture.entries) == 1:
    return mixture
  lists = [
    e.classes if e.classes is not None else sources.class_names(e.spec, data_cfg, e.field) for e in mixture.entries
  ]
  _, maps = sources.union_classes(lists)
  entries = tuple(
    dataclasses.replace(e, label_map=None if labels == list(range(len(labels))) else tuple(labels))
    for e, labels in zip(mixture.entries, maps)
  )
  return dataclasses.replace(mixture, entries=entries)


def entry_seed(seed: int, index: int) -> int:
  """The shuffle seed of entry `index` (32 bits, as grain takes them): the loader's own for the first entry, so
  a mixture of one reads the stream a single source always had; a hash of (seed, index) for the others (not
  seed + index: grain shuffles epoch e with seed + e)."""
  if index == 0:
    return int(seed) % 2**32
  return int(np.random.SeedSequence([int(seed) % 2**32, index]).generate_state(1)[0])


class Relabel:
  """record['label'] -> label_map[record['label']] (records without a label pass; a label outside the map
  becomes -1, which the example op counts and skips as out of range)."""

  def __init__(self, label_map):
    self.label_map = tuple(label_map)

  def __call__(self, record: dict) -> dict:
    if "label" not in record:
      return record
    label = int(record["label"])
    return {**record, "label": self.label_map[label] if 0 <= label < len(self.label_map) else -1}


class MixtureSource:
  """grain RandomAccessDataSource of the mixture's stream: item g is the record at stream position g (any g >= 0;
  `len` is sys.maxsize). Picklable for grain's workers; its repr (compared by grain when an iterator state is
  restored) names every entry's source, weight and seed."""

  def __init__(self, mixture: Mixture, seed: int, shuffle: bool):
    self.entries = mixture.entries
    self.seeds = tuple(entry_seed(seed, i) for i in range(len(self.entries)))
    self.seed, self.shuffle = int(seed) % 2**32, bool(shuffle)
    self._stream = None

  def _build(self):
    parts = []
    for entry, seed in zip(self.entries, self.seeds):
      part = grain.MapDataset.source(entry.source)
      if entry.label_map is not None:
        part = part.map(Relabel(entry.label_map))
      if self.shuffle:
        part = part.shuffle(seed=seed)
      parts.append(part.repeat())
    return grain.MapDataset.mix(parts, [e.weight for e in self.entries])

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, position) -> dict:
    if self._stream is None:
      self._stream = self._build()
    return self._stream[int(position)]

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_stream": None}

  def __repr__(self) -> str:
    entries = ", ".join(
      f"({_source_repr(e.source)}, weight={e.weight}, seed={s}, labels={e.label_map})"
      for e, s in zip(self.entries, self.seeds)
    )
    return f"MixtureSource([{entries}], shuffle={self.shuffle})"


def _source_repr(source) -> str:
  """repr(source) as grain's DataLoader writes it into iterator states (in-memory sequences by type only)."""
  if isinstance(source, (list, tuple, np.ndarray)):
    return str(type(source))
  return repr(source)
