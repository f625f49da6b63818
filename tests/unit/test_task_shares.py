"""A task of a cluster job touches only its share of a corpus's metadata: index_tars and each prepare_data format
that takes tasks stat, check and read the files of their own share (besides the one listing of the input), never
those of every task. Counted by wrapping the file system's calls (stat, open, listing) at a reduced but telling
size: 200 tars or images, 10 tasks of 20 each (LAION's conversion: 232,000 tars, 1000 tasks)."""

import builtins
import collections
import io
import json
import os
import re
import tarfile

import numpy as np
from PIL import Image
import pytest

from visionfm_jax.data.sources import records
from visionfm_jax.datatools import cluster_task, index_tars
from visionfm_jax.datatools.prepare_data.folders import convert_folders
from visionfm_jax.datatools.prepare_data.webdataset import convert_webdataset

ITEMS, TASKS = 200, 10
# The calls that reach a file's metadata: stat (os.path.exists, isfile, getsize), open (np.load, json, tarfile's
# own `bltn_open`, os.open), listing (glob, walks).
CALLS = (
  (os, "stat"),
  (os, "lstat"),
  (os, "open"),
  (os, "scandir"),
  (os, "listdir"),
  (builtins, "open"),
  (tarfile, "bltn_open"),
)


_ATOMIC_TMP = re.compile(r"\.\d+\.tmp$")  # atomic.write's '<path>.<pid>.tmp', counted as '<path>.tmp'


class Touched:
  """The paths under `root` that the file system calls reach (relative to `root`, with their call count)."""

  def __init__(self, monkeypatch, root):
    self.root, self.paths = str(root) + os.sep, collections.Counter()
    for module, name in CALLS:
      monkeypatch.setattr(module, name, self._counted(getattr(module, name)))

  def _counted(self, call):
    def counted(*args, **kwargs):
      path = args[0] if args else kwargs.get("path", kwargs.get("file", "."))
      if kwargs.get("dir_fd") is not None and isinstance(path, str):  # a name in an open folder (limits.open_inside)
        path = os.path.join(os.readlink(f"/proc/self/fd/{kwargs['dir_fd']}"), path)
      if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(self.root):
        self.paths[_ATOMIC_TMP.sub(".tmp", os.fspath(path)[len(self.root) :])] += 1
      return call(*args, **kwargs)

    return counted

  def take(self) -> collections.Counter:
    """The paths touched since the last take."""
    paths, self.paths = self.paths, collections.Counter()
    return paths


def tiny_jpeg() -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 12, 3), 128, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def write_tars(folder) -> list[str]:
  """ITEMS img2dataset-style tars of one sample each (.jpg, .txt, .json); their names, sorted."""
  os.makedirs(folder)
  image, names = tiny_jpeg(), []
  for t in range(ITEMS):
    names.append(f"{t:05d}.tar")
    with tarfile.open(os.path.join(folder, names[-1]), "w") as archive:
      for extension, data in (("jpg", image), ("txt", b"a caption"), ("json", b'{"similarity": 0.3}')):
        member = tarfile.TarInfo(f"{t:05d}0000.{extension}")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
  return names


def write_images(root, folders: int) -> None:
  """ITEMS image files, in `folders` folders."""
  image = tiny_jpeg()
  for i in range(ITEMS):
    path = os.path.join(root, f"f{i % folders:02d}", f"{i:05d}.jpg")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(image)


def task_run(touched: Touched, convert) -> list[collections.Counter]:
  """The paths each of TASKS tasks touches running `convert(task)`, in task order."""
  touched.take()
  seen = []
  for index in range(TASKS):
    convert(cluster_task.Task(index, TASKS))
    seen.append(touched.take())
  return seen


def shard_files(names) -> set[str]:
  """`names`' shards with their sidecars and temporary files, under out/."""
  return {f"out/{name}{end}" for name in names for end in ("", ".json", ".tmp", ".json.tmp")}


def assert_only_its_outputs(paths, own_shards, last: bool) -> None:
  """A task touched no output but its own shards (and their folders' lists, for `own_shards` given as such), the
  folder, dataset.json and the tasks' summaries (every one only by the last task, which gathers them)."""
  outputs = {p for p in paths if p.startswith("out")}
  summaries = {p for p in outputs if p.startswith("out/tasks/")}
  others = (
    outputs - shard_files(own_shards) - summaries - {"out", "out/dataset.json", "out/dataset.json.tmp", "out/tasks"}
  )
  assert not others, sorted(others)[:5]
  assert len({p for p in summaries if not p.endswith(".tmp")}) <= (TASKS if last else ITEMS // TASKS), summaries


@pytest.mark.parametrize("index_dir", [None, "index"])
def test_index_tars_tasks_stat_and_write_only_their_tars(tmp_path, monkeypatch, index_dir):
  names = write_tars(tmp_path / "in")
  options = {"index_dir": str(tmp_path / index_dir)} if index_dir else {}
  touched = Touched(monkeypatch, tmp_path)
  seen = task_run(touched, lambda task: index_tars.index_tars(str(tmp_path / "in" / "*.tar"), task=task, **options))
  for index, paths in enumerate(seen):
    own = names[index::TASKS]
    tars = {p for p in paths if p.endswith(".tar")}
    assert tars == {f"in/{name}" for name in own}, sorted(tars - {f"in/{n}" for n in own})[:5]
    assert sum(paths[p] for p in tars) <= 6 * len(own), paths  # a few calls per tar
    assert paths["in"] == 1  # the one listing
    indexes = {p for p in paths if p.endswith(".index.npz")}
    assert {os.path.basename(p) for p in indexes} == {name + ".index.npz" for name in own}
    assert all(p.startswith(f"{index_dir or 'in'}/") for p in indexes), indexes


def test_webdataset_tasks_touch_only_their_tars_and_shards(tmp_path, monkeypatch):
  names = write_tars(tmp_path / "in")
  touched = Touched(monkeypatch, tmp_path)
  seen = task_run(
    touched,
    lambda task: convert_webdataset(str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"), num_workers=0, task=task),
  )
  for index, paths in enumerate(seen):
    own = names[index::TASKS]
    inputs = {p for p in paths if p == "in" or p.startswith("in/")}
    assert inputs == {"in"} | {f"in/{name}" for name in own}, sorted(inputs - {f"in/{n}" for n in own})[:5]
    assert sum(paths[p] for p in inputs) <= 6 * len(own) + 1, paths
    assert_only_its_outputs(
      paths, [records.shard_name("train", j, ITEMS) for j in range(index, ITEMS, TASKS)], last=index == TASKS - 1
    )
  dataset = json.loads((tmp_path / "out" / "dataset.json").read_text())
  assert dataset["splits"]["train"]["records"] == ITEMS


def test_class_folder_tasks_read_only_their_images_and_shards(tmp_path, monkeypatch):
  write_images(tmp_path / "in", folders=10)
  touched = Touched(monkeypatch, tmp_path)
  seen = task_run(
    touched,
    lambda task: convert_folders(
      str(tmp_path / "in"), str(tmp_path / "out"), num_workers=0, records_per_shard=1, task=task
    ),
  )
  read = collections.Counter()
  for index, paths in enumerate(seen):
    images = {p for p in paths if p.endswith(".jpg")}
    assert len(images) == ITEMS // TASKS  # its shards' images; the tree is listed whole (its shards mix classes)
    read.update(images)
    assert_only_its_outputs(
      paths, [records.shard_name("train", j, ITEMS) for j in range(index, ITEMS, TASKS)], last=index == TASKS - 1
    )
  assert len(read) == ITEMS and set(read.values()) == {1}
  assert json.loads((tmp_path / "out" / "dataset.json").read_text())["splits"]["train"]["records"] == ITEMS


def test_unlabelled_tasks_walk_and_read_only_their_folders(tmp_path, monkeypatch):
  write_images(tmp_path / "in", folders=TASKS)
  touched = Touched(monkeypatch, tmp_path)
  seen = task_run(
    touched,
    lambda task: convert_folders(
      str(tmp_path / "in"), str(tmp_path / "out"), num_workers=0, records_per_shard=1, unlabelled=True, task=task
    ),
  )
  per_folder = ITEMS // TASKS
  for index, paths in enumerate(seen):
    inputs = {p for p in paths if p.startswith("in/")}
    assert {p.split("/")[1] for p in inputs} == {f"f{index:02d}"}, sorted(inputs)[:5]
    own = [f"train-{index:05d}-{n:05d}.array_record" for n in range(per_folder)]
    lists = {f"out/train-folders/{index:05d}.json", f"out/train-folders/{index:05d}.json.tmp", "out/train-folders"}
    assert_only_its_outputs(
      collections.Counter({p: n for p, n in paths.items() if p not in lists}), own, last=index == TASKS - 1
    )
  assert json.loads((tmp_path / "out" / "dataset.json").read_text())["splits"]["train"]["records"] == ITEMS


@pytest.mark.parametrize("finished_first", [False, True])
def test_the_last_task_to_finish_writes_dataset_json(tmp_path, finished_first):
  """Whichever task ends last finds every summary; a summary of another conversion counts as missing."""
  write_tars(tmp_path / "in")
  convert = lambda task, **kw: convert_webdataset(
    str(tmp_path / "in" / "0000?.tar"), str(tmp_path / "out"), num_workers=0, task=cluster_task.Task(task, 3), **kw
  )
  order = (2, 0, 1) if finished_first else (1, 2, 0)
  assert convert(order[0]) == {"unfinished": "2 of 3 tasks' shares", "task": f"task {order[0]} of 3"}
  assert convert(order[1], resize_shorter=4) == {"unfinished": "1 of 3 tasks' shares", "task": f"task {order[1]} of 3"}
  assert convert(order[2]) == {"unfinished": "1 of 3 tasks' shares", "task": f"task {order[2]} of 3"}
  assert convert(order[1])["splits"]["train"]["records"] == 10
