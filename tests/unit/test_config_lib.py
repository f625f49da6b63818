"""config_lib's recipe helpers: base_config's sections, set_fields and the shared CPU demo; config_lib is a leaf."""

import os
import pathlib
import re

import pytest

from visionfm_jax import config_lib
from visionfm_jax.config_lib import schema
from visionfm_jax.errors import ConfigError
from visionfm_jax.training import checks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMOS = [
  "vit_huge.py:demo",
  "swinv2_cls.py:demo",
  "swinv2_cls.py:B,640,demo",
  "swinv2_g_clip.py:demo",
  "swinv2_g_clip.py:demo,ft640",
  "aurora_xl.py:demo",
  "finetune_ade20k.py:demo",
  "finetune_coco.py:demo",
]


def test_base_config_is_its_sections():
  config = config_lib.base_config("swinv2")
  sections = [
    *schema.RUN,
    *schema.PARALLEL,
    "model",
    "optim",
    "precision",
    "health",
    "data",
    *schema.INIT_FROM,
    "probe",
    *schema.LOOP,
    *schema.TRACKING,
    "resume",
  ]
  assert len(set(sections)) == len(sections) and set(config.keys()) == set(sections)
  assert config.model.name == "swinv2" and config.data.augment == config_lib.defaults(schema.AUGMENT)
  for section, rows in [
    ("optim", schema.OPTIM),
    ("precision", schema.PRECISION),
    ("health", schema.HEALTH),
    ("data", schema.DATA),
    ("probe", schema.PROBE),
    ("resume", schema.RESUME),
  ]:
    assert config[section] == config_lib.defaults(rows), section


def test_set_fields_sets_known_fields_and_names_an_unknown_one():
  optim = config_lib.defaults(schema.OPTIM)
  config_lib.set_fields(optim, lr=2e-4, warmup_steps=7)
  assert (optim.lr, optim.warmup_steps) == (2e-4, 7)
  with pytest.raises(ConfigError, match="no field 'warmup'.*warmup_steps"):
    config_lib.set_fields(optim, lr=1.0, warmup=5)
  assert optim.lr == 2e-4  # nothing is set when a name is wrong


@pytest.mark.parametrize(
  "name, key, tower", [("clip", "image", "swinv2"), ("clip", "image", "vit"), ("aurora", "encoder", "swinv2")]
)
def test_a_composite_models_tower_config_completes_to_its_familys_fields(name, key, tower):
  """config.model.image / .encoder lacks what CLIP / Aurora set for it; completed (models/towers.py), it has
  exactly the fields of a standalone model of its family, the shared ones with the composite model's values."""
  from visionfm_jax.models import towers  # pylint: disable=g-import-not-at-top  (imports jax)

  model_cfg = config_lib.model_config(name, image_tower=tower)
  assert not set(model_cfg[key]) & {*config_lib.TOWER_SHARED_FIELDS, *config_lib.TOWER_HEADLESS}
  completed = towers.tower_config(model_cfg, key, name=tower)
  assert set(completed) == set(config_lib.model_config(tower))
  assert completed.num_classes == 0 and completed.head_bias_init == 0.0
  assert all(completed[field] == model_cfg[field] for field in config_lib.TOWER_SHARED_FIELDS)


def test_cpu_demo_names_an_unknown_source():
  with pytest.raises(ConfigError, match="source='imagenet'"):
    config_lib.cpu_demo(config_lib.base_config(), image_size=32, total_steps=10, eval_every=5, source="imagenet")


@pytest.mark.parametrize("spec", DEMOS)
def test_every_demo_is_a_valid_cpu_run_from_scratch_on_embedded_data(spec):
  config = config_lib.load(os.path.join(ROOT, "configs", spec))
  checks.validate(config, num_devices=1)
  from visionfm_jax.data.sources import registry as sources  # pylint: disable=g-import-not-at-top

  assert all(sources.source_kind(spec) in config_lib.DEMO_DATA for _, spec, _ in sources.train_specs(config.data))
  assert config.data.num_workers == 0
  assert (config.precision.compute_dtype, config.strategy, config.model.remat_policy) == ("float32", "ddp", "none")
  assert config.model.image_size == config.data.image_size <= 64
  assert config.eval_every == config.checkpoint_every and config.total_steps <= 2000
  assert config.init_from == "" and config.init_from_prefix == ""


def test_a_config_file_that_is_not_python_is_named(tmp_path):
  path = tmp_path / "vit.txt"
  path.write_text("def get_config():\n  return None\n")
  with pytest.raises(ConfigError, match=re.escape(f"--config={path}:demo: {path} is not a Python file")):
    config_lib.load(f"{path}:demo")


def test_config_lib_imports_nothing_of_the_package_but_its_errors():
  """The config is data: the checks between fields live with their owners (training/checks.py runs them)."""
  import ast  # pylint: disable=g-import-not-at-top

  imported = set()
  for path in pathlib.Path(config_lib.__file__).parent.glob("*.py"):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
  ours = {m for m in imported if m and m.startswith("visionfm_jax")}
  inside = {m for m in ours if m == "visionfm_jax.config_lib" or m.startswith("visionfm_jax.config_lib.")}
  assert ours - inside == {"visionfm_jax.errors"}


@pytest.mark.parametrize(
  "field, value", [("strategy", "zero4"), ("precision.compute_dtype", "float8"), ("model.remat_policy", "sometimes")]
)
def test_a_name_outside_its_choices_is_a_domain_error(field, value):
  config = config_lib.set_paths(config_lib.base_config(), {field: value})
  with pytest.raises(ConfigError, match=rf"config.{field}='{value}': must be one of "):
    config_lib.check(config)


def test_a_fields_domain_is_its_familys_wherever_the_section_sits():
  """The same SwinV2 rows at model., model.image. (CLIP) and model.encoder. (Aurora); a ViT tower has its own."""
  swin, clip, aurora = (config_lib.base_config(name) for name in ("swinv2", "clip", "aurora"))
  for field in ("window_size", "token_subgrid", "drop_path", "pretrained_window_sizes", "layer_norm_eps"):
    domain = config_lib.domain_of(swin, f"model.{field}")
    assert domain is not None
    assert (
      config_lib.domain_of(clip, f"model.image.{field}")
      == domain
      == config_lib.domain_of(aurora, f"model.encoder.{field}")
    )
  clip.model.image = config_lib.model_config("clip", image_tower="vit").image
  assert config_lib.domain_of(clip, "model.image.token_drop") == config_lib.RATE
  assert config_lib.row_at(config_lib.schema_of(clip), "model.image.window_size") is None  # a ViT has no windows


def _vit_clip():
  config = config_lib.base_config("clip", task="contrastive")
  config.model.image = config_lib.model_config("clip", image_tower="vit").image
  return config


@pytest.mark.parametrize(
  "config, path, owner",
  [
    (_vit_clip, "model.image.window_size", "a vit image tower"),
    (lambda: config_lib.base_config("aurora", task="aurora"), "model.encoder.window", "Aurora's SwinV2 encoder"),
    (_vit_clip, "model.embed_dims", "a clip model"),
    (_vit_clip, "head", "a contrastive run"),
    (config_lib.base_config, "optim.lrr", "config.optim"),
  ],
)
def test_a_field_without_a_row_in_its_configs_own_schema_is_refused(config, path, owner):
  """Nothing reads such a field, nor checks it (a window size on a ViT tower, a head on a task without one): the
  check names it, as ml_collections names an unknown override of a locked config."""
  config = config_lib.set_paths(config(), {path: 8})
  with pytest.raises(ConfigError, match=rf"^config\.{path}: {owner} has no such field$"):
    config_lib.check(config)


@pytest.mark.parametrize("task", sorted(config_lib.TASK_SECTIONS))
def test_a_task_adds_its_sections_with_their_defaults(task):
  config = config_lib.base_config("vit", task=task)
  assert config.task == task
  for path, rows in config_lib.TASK_SECTIONS[task].items():
    node = config
    for key in path.split("."):
      node = node[key]
    assert node == config_lib.defaults(rows)
  config_lib.check(config)


def test_a_head_field_outside_its_domain_is_named_and_the_head_follows_the_task():
  config = config_lib.set_paths(config_lib.base_config("vit", task="detection"), {"head.focal_alpha": 1.5})
  with pytest.raises(ConfigError, match=r"config.head.focal_alpha=1.5: must be a number in \[0, 1\]"):
    config_lib.check(config)
  assert config_lib.domain_of(config_lib.base_config("vit", task="segmentation"), "head.dropout") == config_lib.RATE
  with pytest.raises(ConfigError, match="'classification' has no head"):
    config_lib.head_config("classification")


def test_every_row_says_what_its_field_means():
  def rows_of(rows, prefix=""):
    for key, row in rows.items():
      yield from rows_of(row, f"{prefix}{key}.") if isinstance(row, dict) else [(prefix + key, row)]

  for model, tower, task in [
    ("vit", "swinv2", "detection"),
    ("swinv2", "swinv2", "segmentation"),
    ("clip", "vit", "contrastive"),
    ("clip", "swinv2", "contrastive"),
    ("aurora", "swinv2", "aurora"),
  ]:
    rows = config_lib.config_rows(config_lib.model_rows(model, image_tower=tower), task)
    assert [path for path, row in rows_of(rows) if not row.doc] == [], (model, tower, task)


def test_finetune_backbone_puts_a_headless_backbone_at_the_crop_under_backbone():
  config = config_lib.base_config("vit", task="segmentation")
  config_lib.finetune_backbone(
    config, "swinv2", init_from="/ckpt/b", variant="B", image_size=512, drop_path=0.3, window_size=16
  )
  assert (config.model.name, config.model.variant, config.model.num_classes, config.model.window_size) == (
    "swinv2",
    "B",
    0,
    16,
  )
  assert config.model.image_size == config.data.image_size == 512 and config.model.drop_path == 0.3
  assert (config.init_from, config.init_from_prefix, config.model.remat_policy) == (
    "/ckpt/b",
    "backbone",
    "nothing_saveable",
  )
