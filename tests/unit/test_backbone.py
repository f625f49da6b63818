"""The backbone interface (models/backbone.py): the ViT and SwinV2 families answer FLOPs, layer ids and checkpoint
adaptation, their classes feature strides, with the numbers the callers computed before the interface existed
(recorded from that code); the models of towers ask their towers; no Linen class of models/ carries the
families' answers; and nothing outside models/ dispatches on the backbone class."""

import dataclasses
import functools
import importlib
import inspect
import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import config_lib, models
from visionfm_jax.models import backbone, dense_heads, layers, segmenter, swinv2, text, vit
from visionfm_jax.trained import clip_config
from visionfm_jax.training import optim

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Training FLOPs per example, recorded from training/flops.py before the counters moved into the models.
RECORDED_FLOPS = [
  (lambda: vit.ViT(**vit.parse_variant("B/16"), image_size=224, num_classes=1000), 105382969344.0),
  (lambda: vit.ViT(**vit.parse_variant("H/14"), image_size=224, num_classes=21841), 1003930713600.0),
  (lambda: vit.ViT(**vit.parse_variant("H/14"), image_size=518, num_classes=0), 6100292904960.0),
  (lambda: swinv2.SwinV2(**swinv2.parse_variant("T"), window_size=7, image_size=224, num_classes=1000), 26943399936.0),
  (lambda: swinv2.SwinV2(**swinv2.parse_variant("G"), window_size=40, image_size=640), 27833401344000.0),
  (lambda: swinv2.SwinV2(**swinv2.parse_variant("B"), window_size=16, image_size=512), 524053118976.0),
  (
    lambda: swinv2.SwinV2(
      **swinv2.parse_variant("pico"), window_size=4, patch_size=2, image_size=20, num_classes=3, mlp_ratio=2.0
    ),
    11924544.0,
  ),
  (lambda: models.build(config_lib.model_config("clip", image_tower="swinv2"), jnp.float32, "cpu"), 47209555968.0),
  (lambda: models.build(config_lib.model_config("clip", image_tower="vit"), jnp.float32, "cpu"), 123259342848.0),
  (lambda: models.build(config_lib.model_config("aurora"), jnp.float32, "cpu"), 129917011968.0),
]


@pytest.mark.parametrize("build, flops", RECORDED_FLOPS)
def test_flops_per_example_are_the_recorded_counts(build, flops):
  assert models.train_flops_per_example(build()) == flops


def _shapes(module, image_size):
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
  return {
    optim.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract["params"]))[0]
  }


def _recorded_id(table, name):
  """The id of the first (path regex, id) row of `table` matching `name`."""
  return next(ids for pattern, ids in table if re.match(pattern, name))


# Layer ids recorded from training/optim.py's path regexes before the models numbered their own layers.
VIT_IDS = {
  True: [(r"blocks/", [1, 2, 3]), (r"(cls_token|patch_embed|pos_embed)", 0), (r"(head|norm)/", 4)],
  False: [(r"blocks_(\d)/", None), (r"(cls_token|patch_embed|pos_embed)", 0), (r"(head|norm)/", 4)],
}
# SwinV2's scanned stages hold (plain, shifted) pairs of blocks: blocks 2j and 2j + 1 of their stage.
SWIN_IDS = {
  True: [
    (r"stage_0/blocks/plain/", [1]),
    (r"stage_0/blocks/shifted/", [2]),
    (r"stage_0/downsample/", 2),
    (r"stage_1/blocks/plain/", [3, 5]),
    (r"stage_1/blocks/shifted/", [4, 6]),
    (r"(mask_token|patch_embed|patch_norm)", 0),
    (r"(head|norm)/", 7),
  ],
  False: [
    (r"stage_0/blocks_0/", 1),
    (r"stage_0/(blocks_1|downsample)/", 2),
    (r"stage_1/blocks_0/", 3),
    (r"stage_1/blocks_1/", 4),
    (r"stage_1/blocks_2/", 5),
    (r"stage_1/blocks_3/", 6),
    (r"(mask_token|patch_embed|patch_norm)", 0),
    (r"(head|norm)/", 7),
  ],
}


@pytest.mark.parametrize("scan", [True, False])
def test_layer_ids_are_the_recorded_ones(scan):
  cases = [
    (vit.ViT(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4, num_classes=5, scan=scan), 16, VIT_IDS[scan], 5),
    (
      swinv2.SwinV2(
        embed_dim=16,
        depths=(2, 4),
        num_heads=(2, 4),
        window_size=2,
        patch_size=2,
        num_classes=3,
        scan=scan,
        mask_token=True,
      ),
      8,
      SWIN_IDS[scan],
      8,
    ),
  ]
  for model, image_size, table, num_ids in cases:
    family = models.family_of(model)
    assert family.num_layer_ids(model) == num_ids
    ids, num_blocks = models.layer_ids(model, _shapes(model, image_size))
    assert num_blocks == num_ids - 2
    for name, layer in ids.items():
      expected = _recorded_id(table, name)
      if expected is None:  # an unrolled ViT block: blocks_i is layer i + 1
        expected = int(re.match(r"blocks_(\d)/", name).group(1)) + 1
      np.testing.assert_array_equal(layer, expected, err_msg=name)
      np.testing.assert_array_equal(family.layer_id(model, name), expected, err_msg=name)


def test_a_dense_model_numbers_its_backbone_and_puts_neck_and_head_last():
  backbone_vit = vit.ViT(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4)
  model = segmenter.Segmenter(backbone=backbone_vit, num_classes=3)
  family = models.family_of(model)  # a Segmenter is a DenseModel
  assert family is dense_heads.FAMILY and family.num_layer_ids(model) == 5
  layer_id = functools.partial(family.layer_id, model)
  assert layer_id("backbone/pos_embed") == 0 and layer_id("backbone/norm/ln/scale") == 4
  np.testing.assert_array_equal(layer_id("backbone/blocks/mlp/fc1/kernel"), [1, 2, 3])
  assert layer_id("neck/s4_up_0/kernel") == layer_id("head/classifier/kernel") == 4
  assert layer_id("pos_embed") == 4  # outside the backbone
  assert models.train_flops_per_example(model) is None  # no analytic count for the neck and head: no train/mfu


def test_feature_strides_and_aurora_stride():
  assert vit.ViT(**vit.parse_variant("H/14")).feature_strides() == (14.0,)
  swin = swinv2.SwinV2(**swinv2.parse_variant("T"))
  assert swin.feature_strides() == (4.0, 8.0, 16.0, 32.0) and swin.output_stride == 32
  aurora = models.build(config_lib.model_config("aurora"), jnp.float32, "cpu")
  assert aurora.stride == aurora.encoder.output_stride == aurora.encoder.feature_strides()[-1]
  assert isinstance(swin, backbone.ImageBackbone) and not isinstance(aurora, backbone.ImageBackbone)


def test_an_image_backbone_has_every_member_the_interface_lists():
  methods = ("feature_maps", "feature_strides")
  attributes = ("num_features",)
  members = {**{name: lambda self, *args: None for name in methods}, **{name: 1 for name in attributes}}
  assert isinstance(type("Complete", (), members)(), backbone.ImageBackbone)
  for name in methods + attributes:
    lacking = type(f"Without_{name}", (), {k: v for k, v in members.items() if k != name})()
    assert not isinstance(lacking, backbone.ImageBackbone), name
  assert isinstance(vit.ViT(**vit.parse_variant("H/14")), backbone.ImageBackbone)


# The family's answers (backbone.Family): what no Linen class carries.
ANSWERS = tuple(f.name for f in dataclasses.fields(backbone.Family) if f.name not in ("module", "name", "build"))
# What a backbone answers only when it applies (backbone.py): a conflict with its checkpoint's config (SwinV2's
# windows), a composite model's tower fields, params that depend on the resolution (ViT's pos_embed).
IF_IT_APPLIES = ("checkpoint_conflicts", "tower_fields", "adapt_checkpoint")


def test_the_backbone_families_answer_everything_and_the_registry_finds_them():
  for family, model in (
    (vit.FAMILY, vit.ViT(**vit.parse_variant("H/14"))),
    (swinv2.FAMILY, swinv2.SwinV2(**swinv2.parse_variant("T"))),
  ):
    assert models.family_of(model) is family and models.FAMILIES[type(model)] is family
    assert all(getattr(family, answer) is not None for answer in ANSWERS if answer not in IF_IT_APPLIES), family.name
    assert models.from_checkpoint_fields(models.checkpoint_fields(model)) == model
    assert models.hf_converter(model) == f"hf_{family.name}" and models.description(model)
  assert models.family_of(models.build(config_lib.model_config("clip"), jnp.float32, "cpu").text) is None
  assert models.layer_ids(models.build(config_lib.model_config("aurora"), jnp.float32, "cpu"), ["encoder/norm"]) is None


def _another_value(row: config_lib.Field):
  """A value of `row`'s domain other than its default, so that a config may set every field to one at once."""
  default = row.default
  if isinstance(default, bool):
    return not default
  if isinstance(default, tuple):  # per stage of the default SwinV2 ('T')
    return (row.domain.names[-1] if isinstance(row.domain, config_lib.Choices) else 2,) * 4
  if isinstance(row.domain, config_lib.Choices):
    return next(name for name in reversed(row.domain.names) if name != default)
  return default + 1 if isinstance(default, int) else default + 0.125


def _varied(rows, module: type) -> dict:
  """Another value of each row of `rows` that is a field of `module`."""
  fields = backbone.module_fields(module)
  return {name: _another_value(row) for name, row in rows.items() if name in fields}


def _fields(model, names) -> dict:
  return {name: getattr(model, name) for name in names}


def _run_defaults(model):
  """`model` with its RUN_FIELDS at their defaults: what it keeps of model.json or an imported config."""
  fields = backbone.module_fields(type(model))
  return model.clone(**{name: fields[name].default for name in backbone.RUN_FIELDS if name in fields})


@pytest.mark.parametrize("family", ["vit", "swinv2"])
def test_a_model_field_costs_its_row_and_its_math(family):
  """A row that is a field of the module reaches it through the builder, and every field but the run's
  (backbone.RUN_FIELDS) round-trips through model.json's fields: a new row and field need nothing else. A row
  that is no field is the builder's to read: the variant, nothing else."""
  module = {"vit": vit.ViT, "swinv2": swinv2.SwinV2}[family]
  rows = config_lib.model_rows(family)
  assert set(rows) - set(backbone.module_fields(module)) == {"name", "variant"}
  config = config_lib.base_config(family)
  varied = _varied(rows, module)
  config.model.update(varied)
  config_lib.check_domains(config)
  model = models.BUILDERS[family](config.model, jnp.float32)
  assert _fields(model, varied) == varied
  assert models.from_checkpoint_fields(json.loads(json.dumps(models.checkpoint_fields(model)))) == _run_defaults(model)


def test_an_imported_clip_config_carries_every_field_of_its_towers(tmp_path):
  """The config of a CLIP that no run trained (trained/clip_config.py) builds its towers whatever their fields
  (but the run's); a row of the text tower is a field of it or its variant."""
  text_rows = config_lib.model_rows("clip")["text"]
  assert set(text_rows) - set(backbone.module_fields(text.TextTransformer)) == {"variant"}
  config = config_lib.model_config("clip", image_tower="vit")
  image = _varied(config_lib.model_rows("clip", image_tower="vit")["image"], vit.ViT)
  words = _varied(text_rows, text.TextTransformer)
  config.image.update(image)
  config.text.update(words)
  model = models.BUILDERS["clip"](config, jnp.float32)
  assert (_fields(model.image, image), _fields(model.text, words)) == (image, words)
  fields = clip_config.clip_fields(model, "tokenizer.json", str(tmp_path))
  rebuilt = models.build(clip_config.task_config(fields).model, jnp.float32, "cpu")
  assert _run_defaults(rebuilt.image) == _run_defaults(model.image)
  assert _run_defaults(rebuilt.text) == _run_defaults(model.text)


def test_the_activation_and_variant_rows_name_the_activations_and_sizes_the_models_have():
  assert config_lib.ACTIVATIONS == tuple(layers.ACTIVATIONS)
  assert (config_lib.SWINV2_SIZES, config_lib.TEXT_SIZES) == (tuple(swinv2.SIZES), tuple(text.SIZES))


def test_no_linen_class_of_models_carries_a_family_answer():
  """The classes hold the math: FLOPs, layer ids, checkpoint adaptation, descriptions, checkpoint fields and
  converters are their families' (module functions)."""
  carrying = []
  for path in sorted((ROOT / "visionfm_jax" / "models").glob("*.py")):
    module = importlib.import_module(f"visionfm_jax.models.{path.stem}".removesuffix(".__init__"))
    for name, cls in inspect.getmembers(module, inspect.isclass):
      if issubclass(cls, nn.Module) and cls.__module__ == module.__name__:
        carrying += [f"{name}.{answer}" for answer in ANSWERS if hasattr(cls, answer)]
  assert not carrying


def test_vit_adapts_pos_embed_as_recorded_and_leaves_the_rest():
  pos = np.sin(np.arange(17 * 4, dtype=np.float32)).reshape(1, 17, 4)
  model = vit.ViT(width=4, depth=1, mlp_dim=8, num_heads=1, patch_size=4, image_size=32)
  head = np.ones((4, 5), np.float32)
  out = models.adapt_checkpoint(
    model, {"pos_embed": pos, "head/kernel": head}, {"pos_embed": (1, 65, 4), "head/kernel": (4, 7)}
  )
  # Recorded from training/init_from.py's resize before it moved to models/vit.py.
  assert out["pos_embed"].shape == (1, 65, 4)
  np.testing.assert_allclose(out["pos_embed"].sum(), -2.055453062057495, rtol=1e-6)
  np.testing.assert_allclose(
    out["pos_embed"][0, 1:4, 0], [-1.0859590768814087, -0.47441697120666504, 0.8215919137001038], rtol=1e-6
  )
  np.testing.assert_allclose(
    out["pos_embed"][0, -1],
    [1.1927210092544556, 1.1701490879058838, 0.07174760848283768, -1.0926183462142944],
    rtol=1e-6,
  )
  np.testing.assert_array_equal(out["pos_embed"][:, 0], pos[:, 0])  # the class token's entry is kept
  assert out["head/kernel"] is head  # not the model's to carry: init_from reports it
  clip = models.build(config_lib.model_config("clip", image_tower="vit"), jnp.float32, "cpu").clone(
    image=model.clone(num_classes=0)
  )
  adapted = models.adapt_checkpoint(
    clip, {"image/pos_embed": pos, "text/pos_embed": pos}, {"image/pos_embed": (1, 65, 4), "text/pos_embed": (1, 65, 4)}
  )
  np.testing.assert_array_equal(adapted["image/pos_embed"], out["pos_embed"])
  assert adapted["text/pos_embed"] is pos


def test_a_swinv2_tower_adapts_nothing_and_its_composite_returns_the_params_as_given():
  clip = models.build(config_lib.model_config("clip", image_tower="swinv2"), jnp.float32, "cpu")
  params = {"image/stage_0/blocks/attn/logit_scale": np.ones(3), "text/pos_embed": np.zeros((1, 5, 4))}
  adapted = models.adapt_checkpoint(clip, params, {"image/stage_0/blocks/attn/logit_scale": (4,)})
  assert adapted == params and all(adapted[name] is value for name, value in params.items())


def test_a_swinv2_conflicts_with_a_checkpoint_of_other_windows_on_its_pretrained_windows():
  trained = {
    "name": "swinv2",
    "variant": "G",
    "patch_size": 4,
    "image_size": 224,
    "window_size": 14,
    "pretrained_window_sizes": (),
  }
  fine_tuned = {**trained, "image_size": 640, "window_size": 40}
  assert models.checkpoint_conflicts(fine_tuned, trained) == {"pretrained_window_sizes": (14, 14, 14, 7)}
  assert models.checkpoint_conflicts({**fine_tuned, "pretrained_window_sizes": (14, 14, 14, 7)}, trained) == {}
  assert models.checkpoint_conflicts(trained, trained) == {}
  assert models.checkpoint_conflicts({"name": "vit"}, trained) == {}


def test_image_tower_is_the_model_or_its_one_backbone_field():
  """What tools.export_hf exports and evaluate/probe probes: the backbone itself, CLIP's image tower, Aurora's
  encoder, a dense model's backbone; nothing for a text tower."""
  small = vit.ViT(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4)
  assert backbone.image_tower(small) == (small, None)
  clip = models.build(config_lib.model_config("clip"), jnp.float32, "cpu")
  aurora = models.build(config_lib.model_config("aurora"), jnp.float32, "cpu")
  dense = segmenter.Segmenter(backbone=small, num_classes=3)
  for model, name in ((clip, "image"), (aurora, "encoder"), (dense, "backbone")):
    assert backbone.image_tower(model) == (getattr(model, name), name)
  assert backbone.image_tower(clip.text) is None


def test_nothing_outside_models_dispatches_on_a_backbone_class():
  """(That training/ imports no model at all is test_layering's.)"""
  dispatch = re.compile(r"isinstance\([^)]*(SwinV2|ViT)")
  offenders = [
    str(p.relative_to(ROOT))
    for p in (ROOT / "visionfm_jax").rglob("*.py")
    if "models" not in p.relative_to(ROOT / "visionfm_jax").parts[:1] and dispatch.search(p.read_text())
  ]
  assert not offenders
