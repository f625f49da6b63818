"""The recipe configs: each says which of its values the paper states and which are ours, states wall-clock
figures as the paper's or as BENCHMARKS.md's predictions, its variants load and validate for their clusters, and
the windows a fine-tuning recipe states are those of the run its docstring starts it from."""

import ast
import os
import re

import pytest

from visionfm_jax import config_lib
from visionfm_jax.data.loader import mixture as mixture_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.training import checks, init_from

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = ["vit_huge.py", "swinv2_g_clip.py", "aurora_xl.py"]
TABLE_HEADER = ["setting", "value", "source"]
SOURCE_MARKER = re.compile(r"paper\b.*|ours: \S.*")


def _load(spec: str):
  return config_lib.load(os.path.join(ROOT, "configs", spec))


def _docstring(name: str) -> str:
  with open(os.path.join(ROOT, "configs", name), encoding="utf-8") as f:
    return ast.get_docstring(ast.parse(f.read()))


def _cells(line: str) -> list[str]:
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def source_tables(text: str) -> list[list[list[str]]]:
  """The `| setting | value | source |` tables of `text`, each a list of logical rows: a line whose first cell is
  empty continues the row above it, cell by cell."""
  tables, rows = [], None
  for line in text.splitlines():
    if not line.lstrip().startswith("|"):
      rows = None
      continue
    cells = _cells(line)
    if cells == TABLE_HEADER:
      rows = []
      tables.append(rows)
    elif rows is None or all(set(cell) <= {"-"} for cell in cells):
      continue
    elif cells[0] or not rows:
      rows.append(cells)
    else:
      rows[-1] = [" ".join(filter(None, pair)) for pair in zip(rows[-1], cells)]
  return tables


def other_table_cells(text: str) -> list[str]:
  """The cells of the table lines of `text` outside its `| setting | value | source |` tables."""
  cells, in_source_table = [], False
  for line in text.splitlines():
    if not line.lstrip().startswith("|"):
      in_source_table = False
    elif _cells(line) == TABLE_HEADER:
      in_source_table = True
    elif not in_source_table:
      cells += _cells(line)
  return cells


def test_source_tables_join_continuation_lines():
  text = (
    "  | setting | value | source |\n  | --- | --- | --- |\n  | batch | 8,192 | ours: the paper |\n"
    "  |  | pairs | states none |\n  | resolution | 640 px | paper |\n\nprose\n"
  )
  assert source_tables(text) == [
    [["batch", "8,192 pairs", "ours: the paper states none"], ["resolution", "640 px", "paper"]]
  ]


@pytest.mark.parametrize("name", RECIPES)
def test_every_setting_of_a_recipe_says_whether_the_paper_states_it(name):
  tables = source_tables(_docstring(name))
  assert tables, f"configs/{name}: no `| setting | value | source |` table in the docstring"
  rows = [row for table in tables for row in table]
  unmarked = [row for row in rows if len(row) != 3 or not row[1] or not SOURCE_MARKER.fullmatch(row[2])]
  assert not unmarked, f"configs/{name}: rows without 'paper' or 'ours: <reason>': {unmarked}"
  sources = {re.match(r"paper|ours", row[2]).group() for row in rows}
  assert sources == {"paper", "ours"}, sources


def predicted_days() -> dict[str, str]:
  """{config file name: predicted days} from BENCHMARKS.md's tables with a 'predicted days' column (the first row
  that names the file)."""
  with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  days, column = {}, None
  for line in lines:
    if not line.startswith("|"):
      column = None
      continue
    cells = _cells(line)
    if "predicted days" in cells:
      column = cells.index("predicted days")
    elif column is not None and column < len(cells):
      figure = re.match(r"[\d.]+", cells[column])
      for name in re.findall(r"`([\w.]+\.py)", cells[0]):
        if figure:
          days.setdefault(name, figure.group())
  return days


@pytest.mark.parametrize("name", RECIPES)
def test_wall_clock_is_the_papers_figure_or_the_benchmarks_prediction(name):
  text = _docstring(name)
  prose = " ".join(line.strip() for line in text.splitlines() if not line.lstrip().startswith("|"))
  table_cells = [cell for table in source_tables(text) for row in table for cell in row] + other_table_cells(text)
  sentences = [s for part in [prose, *table_cells] for s in re.split(r"(?<=\.)\s+", part)]
  unattributed = [s for s in sentences if re.search(r"\bweeks?\b", s) and "paper" not in s]
  assert not unattributed, f"configs/{name}: a duration in weeks that is not the paper's: {unattributed}"
  days = predicted_days().get(name)
  assert days, f"BENCHMARKS.md predicts no days for configs/{name}"
  assert f"predicts {days} days" in prose, f"configs/{name}: does not cite BENCHMARKS.md's {days} days"


def test_imagenet21k_variant_trains_swinv2_on_all_21841_classes_and_validates_on_64_devices():
  config = _load("swinv2_cls.py:B,in21k")
  checks.validate(config, num_devices=64, num_processes=8)
  assert config.model.num_classes == 21841 and config.model.variant == "B"
  assert config.data.source == "arrayrecord:/data/imagenet21k/{split}-*.array_record"
  assert (config.model.image_size, config.model.window_size) == (224, 14)  # what the ADE20K recipe transfers
  assert config.global_batch_size == 4096
  epoch = 14_197_122 / 4096
  assert (config.total_steps, config.optim.warmup_steps) == (round(90 * epoch), round(5 * epoch))
  assert (config.optim.lr, config.optim.end_lr, config.optim.weight_decay) == (1e-3, 1e-5, 0.1)


@pytest.mark.parametrize("variant", ["B,in21k,640", "B,in21k,demo"])
def test_imagenet21k_variant_takes_a_size_only(variant):
  with pytest.raises(ConfigError, match="'in21k' is 224 px pretraining"):
    _load(f"swinv2_cls.py:{variant}")


def test_clip_default_takes_the_2_micro_batches_planned_for_an_a100_and_validates_on_128_devices():
  config = _load("swinv2_g_clip.py")
  checks.validate(config, num_devices=128, num_processes=16)
  assert config.grad_accum_steps == 2 and config.global_batch_size == 32768


class _KeyedRecords:
  """A source of n records that carry only their index."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return {"key": int(index)}


def _first_batch_keys(config, source, size: int = 0) -> list[int]:
  """The records of the first global batch (its first `size`), read from the stream the training loaders read
  (pipeline.grain_train_loader: a MixtureSource of config.seed, read in order)."""
  mixture = mixture_lib.as_mixture(source, config.data, config.data.train_split)
  stream = mixture_lib.MixtureSource(mixture, config.seed, shuffle=config.data.shuffle)
  return [stream[position]["key"] for position in range(size or config.global_batch_size)]


def test_the_640_stage_does_not_begin_with_the_pairs_the_224_run_began_with():
  source = _KeyedRecords(2**16)
  first_640 = _first_batch_keys(_load("swinv2_g_clip.py:ft640"), source)
  start_224 = _first_batch_keys(_load("swinv2_g_clip.py"), source, size=len(first_640))
  # with the 224 run's seed the two would be equal; with another seed ~1,024 of the 8,192 (8,192 / 2^16 of them)
  # are shared by chance
  assert len(set(first_640) & set(start_224)) < len(first_640) // 4


def _workdir_of(spec: str, directory) -> str:
  """`directory` as the workdir of a run of `spec`: its config.json."""
  directory.mkdir()
  (directory / "config.json").write_text(_load(spec).to_json_best_effort(indent=2))
  return str(directory)


# (the run a recipe starts from as its docstring names it, the recipe, its init_from fields, the windows' field)
STATED_WINDOWS = [
  ("swinv2_g_clip.py", "swinv2_g_clip.py:ft640", {}, "model.image"),
  ("swinv2_g_clip.py:demo", "swinv2_g_clip.py:demo,ft640", {}, "model.image"),
  ("swinv2_g_clip.py:small", "swinv2_g_clip.py:small,ft640", {}, "model.image"),
  ("swinv2_cls.py:B", "swinv2_cls.py:B,640", {}, "model"),
  ("swinv2_cls.py:B", "finetune_ade20k.py:swinv2", {}, "model"),
  ("swinv2_cls.py:B", "finetune_coco.py:swinv2", {}, "model"),
  ("swinv2_g_clip.py", "finetune_ade20k.py:swinv2", {"model.variant": "G", "init_from_subtree": "image"}, "model"),
  ("swinv2_g_clip.py", "finetune_coco.py:swinv2", {"model.variant": "G", "init_from_subtree": "image"}, "model"),
]


@pytest.mark.parametrize(
  "source, spec, fields, model", STATED_WINDOWS, ids=[f"{source}->{spec}" for source, spec, _, _ in STATED_WINDOWS]
)
def test_a_recipes_stated_windows_are_those_of_the_run_it_starts_from(source, spec, fields, model, tmp_path):
  """What init_from checks at every launch of the recipe, on the config.json of the run its docstring names; left
  at (), the windows are refused."""
  config = config_lib.set_paths(_load(spec), {**fields, "init_from": _workdir_of(source, tmp_path / "source")})
  init_from.check_model_fields(config)
  with pytest.raises(ConfigError, match=rf"set --config.{model}.pretrained_window_sizes="):
    init_from.check_model_fields(config_lib.set_paths(config, {f"{model}.pretrained_window_sizes": ()}))


def test_aurora_encoders_windows_are_checked_from_its_config_json(tmp_path):
  """Aurora's encoder has no name field (always a SwinV2) and takes image_size from the model: completed as
  Aurora's builder completes it, its 448 px / window 14 windows are (14, 14, 14, 14), not the (14, 14, 14, 7) of a
  224 px run that finetune_ade20k.py:swinv2 states."""
  aurora = _workdir_of("aurora_xl.py", tmp_path / "aurora")
  config = config_lib.set_paths(
    _load("finetune_ade20k.py:swinv2"), {"init_from": aurora, "init_from_subtree": "encoder"}
  )
  with pytest.raises(
    ConfigError,
    match=re.escape(
      "config.model.pretrained_window_sizes=(14, 14, 14, 7) but the init_from checkpoint trained with "
      '(14, 14, 14, 14): set --config.model.pretrained_window_sizes="(14, 14, 14, 14)"'
    ),
  ):
    init_from.check_model_fields(config)
  config = config_lib.set_paths(_load("aurora_xl.py"), {"init_from": aurora, "model.encoder.window_size": 28})
  with pytest.raises(
    ConfigError, match=re.escape('set --config.model.encoder.pretrained_window_sizes="(14, 14, 14, 14)"')
  ):
    init_from.check_model_fields(config)
