"""Every field of every model that exports to transformers is named by its converter (convert/fields.py): written,
exported at one value only (another refused, naming the field and the value), or inert; a field added to a model
fails here until its converter says which."""

import importlib

import pytest

from visionfm_jax import convert, models
from visionfm_jax.convert import hf_clip, hf_swinv2, hf_vit
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import backbone, clip, swinv2, text, vit

CONVERTERS = {
  family.module: importlib.import_module(f"visionfm_jax.convert.{family.hf_converter}")
  for family in models.FAMILIES.values()
  if family.hf_converter
}
VIT = vit.ViT(width=8, depth=1, mlp_dim=16, num_heads=2, patch_size=4, image_size=8, num_classes=3)
SWIN = swinv2.SwinV2(embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, patch_size=2, image_size=8)
CLIP = clip.CLIP(
  image=VIT.clone(pre_norm=True, patch_bias=False, num_classes=0),
  text=text.TextTransformer(width=8, depth=1, num_heads=2, mlp_dim=16, embed_dim=8, vocab_size=10, max_len=4),
  embed_dim=8,
)
# Per converter, per class it names: a model of that class that the converter exports whole, and how to put a field
# of it into the model it is part of.
BASES = {
  hf_vit: {vit.ViT: (VIT, lambda changed: changed)},
  hf_swinv2: {swinv2.SwinV2: (SWIN, lambda changed: changed)},
  hf_clip: {
    clip.CLIP: (CLIP, lambda changed: changed),
    vit.ViT: (CLIP.image, lambda changed: CLIP.clone(image=changed)),
    text.TextTransformer: (CLIP.text, lambda changed: CLIP.clone(text=changed)),
  },
}


def _another(value):
  """A value other than `value` of an `only` field; a KeyError names a new kind of value to add here."""
  if isinstance(value, bool):
    return not value
  if value is None:
    return -10.0
  if isinstance(value, int):
    return value + 6
  return {"cls": "gap", "eos": "cls"}[value]


def test_every_exporting_family_has_its_converters_fields():
  assert set(CONVERTERS) == {vit.ViT, swinv2.SwinV2, clip.CLIP}
  for module, converter in CONVERTERS.items():
    assert module in converter.EXPORT_FIELDS, converter.__name__


@pytest.mark.parametrize(
  "converter", sorted(set(CONVERTERS.values()), key=lambda m: m.__name__), ids=lambda m: m.__name__
)
def test_each_field_is_named_once(converter):
  for cls, fields in converter.EXPORT_FIELDS.items():
    names = fields.names()
    assert len(names) == len(set(names)), (cls.__name__, names)
    assert sorted(names) == sorted(backbone.module_fields(cls)), cls.__name__


@pytest.mark.parametrize("converter", list(BASES), ids=lambda m: m.__name__)
def test_an_only_field_at_another_value_is_refused_by_name(converter, tmp_path):
  assert set(BASES[converter]) == set(converter.EXPORT_FIELDS)
  for cls, fields in converter.EXPORT_FIELDS.items():
    base, whole = BASES[converter][cls]
    for name, value in fields.only.items():
      assert getattr(base, name) == value, (cls.__name__, name)
      other = _another(value)
      with pytest.raises(ConfigError, match=f"{name}={other!r}"):  # the field and its value
        convert.to_hf(whole(base.clone(**{name: other})), {}, str(tmp_path))  # the fields come before the params
