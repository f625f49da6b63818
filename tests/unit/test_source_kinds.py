"""The `config.data.source` kinds are records (data/sources/kind.py's `SourceKind`, one in the module of each reader)
in one table (data/sources/registry.py, `KINDS`): a kind added to the table alone is parsed, named in messages,
opened and trained from through `config.data.source`, with no edit to the registry's functions."""

import numpy as np
import pytest

from visionfm_jax.data.sources import kind as kind_lib
from visionfm_jax.data.sources import registry
from visionfm_jax.errors import DataError

from test_bad_input import run_main_in_process

CLASSES = ["dark", "grey", "light"]


class _Tiles:
  """`count` 8 x 8 tiles of one grey level per class: record i is of class i % 3."""

  def __init__(self, count: int, split: str):
    self.count, self.split = count, split

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index) -> dict:
    label = int(index) % len(CLASSES)
    return {"image": np.full((8, 8, 3), 40 + 80 * label, np.uint8), "label": label}

  def __repr__(self) -> str:
    return f"_Tiles({self.count}, {self.split!r})"


def _tiles_kind(opened: list) -> kind_lib.SourceKind:
  """'tiles:<count>': `count` tiles in every split; `opened` records each (split, training) it opens."""

  def open_tiles(request: kind_lib.Request) -> _Tiles:
    opened.append((request.split, request.training))
    return _Tiles(int(request.name), request.split)

  return kind_lib.SourceKind(
    "tiles",
    "'tiles:<count>'",
    open_tiles,
    lambda name, data_cfg, what: list(CLASSES),
    parse=lambda rest: (rest, "") if rest.isdigit() and int(rest) > 0 else None,
  )


@pytest.fixture(name="opened")
def _with_tiles(monkeypatch) -> list:
  opened = []
  monkeypatch.setitem(registry.KINDS, "tiles", _tiles_kind(opened))
  return opened


def test_a_kind_in_the_table_is_parsed_named_and_opened(opened):
  assert registry.source_kind("tiles:12") == "tiles"
  assert registry._parse("tiles:12") == ("tiles", "12", "")  # pylint: disable=protected-access
  assert registry.class_names("tiles:12", None) == CLASSES and registry.disk_path("tiles:12", "train", None) is None
  assert repr(registry.build_source("tiles:12", "validation", None)) == "_Tiles(12, 'validation')"
  assert opened == [("validation", False)]
  with pytest.raises(DataError) as error:
    registry.source_kind("tiles:x")
  assert str(error.value).startswith("config.data.source='tiles:x': expected 'shapes', ")
  assert str(error.value).endswith(", imagenetv2:<root> or 'tiles:<count>'")


def test_a_kind_in_the_table_is_what_a_dry_run_opens_and_sizes_the_head_by(opened, tmp_path, monkeypatch, capsys):
  """`main --dry_run` on 'tiles:96': its class names stop a head of another class count in one line; with a head of
  three classes it opens the training split for training and the held-out one, and plans an epoch of 96 records."""
  args = [
    "--config=configs/vit_huge.py:demo",
    f"--workdir={tmp_path / 'run'}",
    "--dry_run",
    "--config.data.source=tiles:96",
  ]
  status, _, stderr = run_main_in_process(args, monkeypatch, capsys)
  assert status == 2 and "error: config.model.num_classes=8 but config.data.source='tiles:96' has 3 classes" in stderr
  status, stdout, stderr = run_main_in_process([*args, "--config.model.num_classes=3"], monkeypatch, capsys)
  assert status == 0, stderr[-3000:]
  assert "examples per epoch: 96" in stdout and {("train", True), ("validation", False)} <= set(opened), opened
  assert not (tmp_path / "run").exists()
