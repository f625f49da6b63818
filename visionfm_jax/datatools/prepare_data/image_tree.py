"""The image files of a folder tree, for datatools.prepare_data --format=folders.

A class tree (`list_class_tree`) is listed whole: its labels follow the sorted class folders, and its files are
shuffled across shards. A tree of unlabelled images (500M files) is never listed whole: it is cut into folders
(`top_level_folders`: the input's subfolders, plus its own files as one more), each walked on its own as a
stream in sorted path order (`folder_images`), so that a task of a cluster job walks only the folders it
converts and memory holds the listings of the directories on the walk's current path, never the tree's. A file
that is a link is listed, and refused or followed when read (`prepare_data.images.read_image_file`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.datatools.prepare_data import shards
from visionfm_jax.datatools.prepare_data.images import read_image_file
from visionfm_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ROOT_FILES = ""  # the folder name of the input's own image files (not those of its subfolders)
# --holdout_examples=N draws from the first HOLDOUT_POOL * N images of the folders in a seeded order: memory and
# the walk ahead stay O(N), and the held-out images come from more than one folder.
HOLDOUT_POOL = 10


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _check_directory(input_dir: str) -> None:
  if not os.path.isdir(input_dir):
    raise UserError(f"--input={input_dir}: no such directory")


def no_images(input_dir: str) -> UserError:
  return UserError(f"--input={input_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}) below it")


def require_decodable(input_dir: str, paths: Iterable[str], follow_links: bool = False) -> None:
  """UserError naming `input_dir`, with the reasons, unless one of its image files `paths` (under it) is read as
  the conversion reads it and decodes: a conversion that would write not one image. Stops at the first that
  decodes (in a tree of images, the first), so it costs one decode, also where the shards keep the bytes as they
  are and nothing else decodes them."""
  root = os.path.realpath(input_dir)
  reasons, count = collections.Counter(), 0
  for path in paths:
    count += 1
    data, reason = read_image_file(os.path.join(input_dir, path), root, follow_links)
    if data is not None:
      try:
        transforms.decode_image(data)
        return
      except transforms.DECODE_ERRORS as e:
        reason = transforms.failure_reason(e)
    reasons[reason] += 1
  raise shards.none_read(input_dir, f"its {count} image files", shards.ordered_reasons(reasons))


# ------------------------------------------------------------------------------------------- class trees


@dataclasses.dataclass
class ClassTree:
  classes: list[str]  # label order
  paths: list[str]  # image files under the tree root, '/'-separated, sorted
  labels: np.ndarray  # int, one per path


def list_class_tree(input_dir: str, follow_links: bool = False) -> ClassTree:
  """The class folders of `input_dir` (sorted) and the image files below each, sorted; UserError when none. A class
  folder that is a link is a class, entered only with `follow_links` and when it resolves inside `input_dir` (else
  named in a warning), so that no link reads a folder from outside the tree."""
  _check_directory(input_dir)
  with os.scandir(input_dir) as entries:
    found_classes = {e.name: e.is_symlink() for e in entries if e.is_dir() and not e.name.startswith(".")}
  classes = sorted(found_classes)
  if not classes:
    raise UserError(f"--input={input_dir}: no class folders (expected one folder of images per class)")
  inside = os.path.realpath(input_dir)
  paths, labels = [], []
  for label, name in enumerate(classes):
    if found_classes[name] and not (follow_links and _resolves_inside(os.path.join(input_dir, name), inside)):
      logging.warning(
        "prepare_data: class folder %s of %s is a link%s: not entered",
        name,
        input_dir,
        " out of the tree" if follow_links else " (--follow_links follows those inside --input)",
      )
      continue
    found = list(walk_images(input_dir, name))
    paths += found
    labels += [label] * len(found)
  if not paths:
    raise UserError(
      f"--input={input_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its {len(classes)} "
      f"class folders ({classes[0]}, ...)"
    )
  empty = len(classes) - len(set(labels))
  if empty:
    logging.warning("prepare_data: %d of the %d class folders of %s hold no images", empty, len(classes), input_dir)
  order = sorted(range(len(paths)), key=paths.__getitem__)
  return ClassTree(classes, [paths[i] for i in order], np.asarray(labels, np.int64)[order])


def _resolves_inside(path: str, inside: str) -> bool:
  """Whether `path` resolves to `inside` (a resolved folder) or below it."""
  return os.path.commonpath((os.path.realpath(path), inside)) == inside


def carve_holdout(labels: np.ndarray, order: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held out): the first `per_class` items of each class in `order` are held out, at most half of the
  class (rounded down), so that no class trains on fewer items than it holds out; a warning line says which
  classes hold out fewer than `per_class`. Both keep `order`'s order."""
  counts = np.bincount(labels)
  quota = np.minimum(per_class, counts // 2)
  taken = np.zeros_like(quota)
  held = np.zeros(len(order), bool)
  for position, label in enumerate(labels[order].tolist()):
    if taken[label] < quota[label]:
      taken[label] += 1
      held[position] = True
  capped = np.flatnonzero((quota < per_class) & (counts > 0))
  if len(capped):
    logging.warning("%s", capped_holdout_line(per_class, quota[capped], int(np.sum(counts > 0))))
  return order[~held], order[held]


def capped_holdout_line(per_class: int, quotas: np.ndarray, classes: int) -> str:
  """The line of a --holdout_per_class that some classes (their `quotas`, of `classes` with images) are too small
  for."""
  low, high = int(quotas.min()), int(quotas.max())
  held = f"{low}" if low == high else f"{low} to {high}"
  return (
    f"prepare_data: --holdout_per_class={per_class}: {len(quotas)} of the {classes} classes have fewer than "
    f"{2 * per_class} images; each holds out half of its images, rounded down ({held}), so that no class "
    f"trains on fewer images than it holds out"
  )


# -------------------------------------------------------------------------------------- streamed walking


def _sorted_entries(directory: str) -> list[os.DirEntry]:
  """The entries of `directory` in the order of the paths below them: a folder `d` sorts as `d/`, so that a walk
  in this order yields the sorted list of all paths."""
  with os.scandir(directory) as entries:
    return sorted(entries, key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)


def walk_images(root: str, folder: str) -> Iterator[str]:
  """The image files anywhere below `root`/`folder`, '/'-separated paths under `root`, in sorted order, one
  directory listed at a time; hidden folders, and folders reached through a link, are not entered."""
  directory = os.path.join(root, folder)
  for entry in _sorted_entries(directory):
    relative = f"{folder}/{entry.name}" if folder else entry.name
    if entry.is_dir(follow_symlinks=False):
      if not entry.name.startswith("."):
        yield from walk_images(root, relative)
    elif not entry.is_dir() and is_image_file(entry.name):
      yield relative


def _root_images(root: str) -> Iterator[str]:
  for entry in _sorted_entries(root):
    if not entry.is_dir() and is_image_file(entry.name):
      yield entry.name


def top_level_folders(input_dir: str) -> list[str]:
  """The parts an unlabelled tree is converted in: ROOT_FILES when `input_dir` holds image files itself, then
  its subfolders (hidden ones left out), sorted; UserError when there is neither."""
  _check_directory(input_dir)
  folders, root_images = [], False
  with os.scandir(input_dir) as entries:
    for entry in entries:
      if entry.is_dir(follow_symlinks=False):
        if not entry.name.startswith("."):
          folders.append(entry.name)
      elif not entry.is_dir() and is_image_file(entry.name):
        root_images = True
  if not folders and not root_images:
    raise no_images(input_dir)
  return [ROOT_FILES] * root_images + sorted(folders)


def folder_images(input_dir: str, folder: str) -> Iterator[str]:
  """The image files of one of `top_level_folders`, sorted, streamed (ROOT_FILES: the root's own files)."""
  return _root_images(input_dir) if folder == ROOT_FILES else walk_images(input_dir, folder)


def sample_holdout(input_dir: str, folders: Sequence[str], count: int, seed: int) -> list[str]:
  """`count` image paths (sorted) drawn by `seed` from the first HOLDOUT_POOL * `count` images of `folders` taken
  in a `seed`-shuffled order (each walked in sorted order; the rest is not listed); UserError when the tree holds
  no more than `count` images (none would be left to train on)."""
  rng = np.random.default_rng(seed)
  limit = HOLDOUT_POOL * count
  pool = []
  for index in rng.permutation(len(folders)).tolist():
    for path in folder_images(input_dir, folders[index]):
      pool.append(path)
      if len(pool) == limit:
        break
    if len(pool) == limit:
      break
  if not pool:
    raise no_images(input_dir)
  if len(pool) <= count:
    raise UserError(f"--holdout_examples={count}: {input_dir} has only {len(pool)} images")
  return sorted(pool[i] for i in rng.choice(len(pool), count, replace=False).tolist())
