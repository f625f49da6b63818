"""A run opens each of its data sources once, at start-up, and works out its class names once: the loader, the
evaluators and the panel share them (tasks/base.py: `EvalContext.open_eval_source`, `Task.class_names`)."""

import collections
import sys

import pytest

from configs import finetune_ade20k
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.sources import records, registry
from visionfm_jax.training import step as step_lib
from visionfm_jax.training import train

from conftest import override, tiny_clip_config, tiny_vit_config


class _StateReached(Exception):
  """Raised where the run starts building its state: its loader, evaluators and panel are built by then."""


def _counting(monkeypatch, original, count):
  """`original` counted by `count(args, kwargs)` under every name a module of the package binds it to."""

  def counted(*args, **kwargs):
    count(args, kwargs)
    return original(*args, **kwargs)

  for module in [m for name, m in sys.modules.items() if name.startswith("visionfm_jax")]:
    for attr, value in list(vars(module).items()):
      if value is original:
        monkeypatch.setattr(module, attr, counted)


def _opens_at_start_up(monkeypatch, tmp_path, config):
  """({(spec, split, training): sources opened}, class-name lists worked out) by train.run up to the state."""
  opened, named = collections.Counter(), collections.Counter()
  _counting(
    monkeypatch,
    registry.build_source,
    lambda args, kwargs: opened.update([(args[0], args[1], kwargs.get("training", False))]),
  )
  _counting(monkeypatch, registry.class_names, lambda args, kwargs: named.update([args[0]]))
  monkeypatch.setattr(step_lib, "make_init_fn", lambda *a: (_ for _ in ()).throw(_StateReached()))
  config.data.num_workers = 0
  with pytest.raises(_StateReached):
    train.run(config, str(tmp_path))
  return dict(opened), dict(named)


def test_classification_with_a_probe_opens_each_source_once_and_names_its_classes_once(tmp_path, monkeypatch):
  config = tiny_vit_config(**{"probe.knn": True, "model.num_classes": -1})  # the head sized by the data's classes
  opened, named = _opens_at_start_up(monkeypatch, tmp_path, config)
  # the loader's training source, the probe's training split, the eval split (top-1, probe and panel)
  assert opened == {("shapes", "train", True): 1, ("shapes", "train", False): 1, ("shapes", "validation", False): 1}
  assert named == {"shapes": 1}  # the sizing's class count, the loader's class-count check and the panel's labels


def _labelled_pairs(directory) -> str:
  """The spec of 16 training and 16 held-out shapes records with captions and labels (dataset.json names them)."""
  splits = {}
  for split in ("train", "validation"):
    drawn = shapes.ShapesSource(split, 16, 16)
    name = records.shard_name(split, 0, 1)
    records.write_records(
      directory / name, ({k: drawn[i][k] for k in ("image", "caption", "label")} for i in range(16))
    )
    splits[split] = {"records": 16, "shards": [name]}
  records.write_metadata(directory, kind="classification", classes=list(shapes.SHAPE_NAMES), splits=splits)
  return f"arrayrecord:{directory}/{{split}}-*.array_record"


def test_contrastive_opens_and_reads_its_held_out_pairs_once_and_names_its_zeroshot_classes_once(tmp_path, monkeypatch):
  spec = _labelled_pairs(tmp_path)
  read = collections.Counter()
  getitem = records.ArrayRecordSource.__getitem__
  monkeypatch.setattr(
    records.ArrayRecordSource, "__getitem__", lambda self, i: read.update([(self.pattern, int(i))]) or getitem(self, i)
  )
  config = tiny_clip_config(**{"eval.zeroshot_classes": "data", "eval.retrieval": True, "data.source": spec})
  opened, named = _opens_at_start_up(monkeypatch, tmp_path / "run", config)
  assert opened == {(spec, "train", True): 1, (spec, "validation", False): 1}  # zero-shot, retrieval, panel
  assert named == {spec: 1}  # the zero-shot evaluator's and the panel's
  # the tokenizer's fit to the held-out captions (image_text.check_tokenizer_fits_captions) reads each once; the
  # zero-shot check that they are labelled (zeroshot.open_zeroshot_source), the first again
  held_out = {i: n for (pattern, i), n in read.items() if "validation" in pattern}
  assert held_out == {0: 2, **dict.fromkeys(range(1, 16), 1)}, read


def test_segmentation_opens_its_eval_source_at_start_up_once(tmp_path, monkeypatch):
  """Not at each evaluation: a missing eval set stops the run before it trains."""
  config = override(finetune_ade20k.get_config("demo"), progress_bar=False)
  opened, _ = _opens_at_start_up(monkeypatch, tmp_path, config)
  assert opened == {("scenes", "train", True): 1, ("scenes", "validation", False): 1}
