"""The `imagenet` zero-shot set is OpenAI's, entry for entry: compared with the copy open_clip ships
(tests/openai_zeroshot.py reads it from the installed `open_clip_torch` wheel, a test dependency)."""

import pytest

from visionfm_jax.evaluate import zeroshot

import openai_zeroshot


@pytest.fixture(scope="module")
def openai_lists():
  path = openai_zeroshot.metadata_file()
  if path is None:
    pytest.skip("open_clip_torch is not installed (pip install -e '.[test]'): it holds OpenAI's lists")
  return openai_zeroshot.read(path)


def _first_difference(ours, theirs):
  return next(((i, a, b) for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)


def test_imagenet_set_is_openais(openai_lists):
  names, templates = zeroshot.class_names_and_templates("imagenet")
  assert len(names) == len(openai_lists["IMAGENET_CLASSNAMES"]) == 1000
  assert _first_difference(names, openai_lists["IMAGENET_CLASSNAMES"]) is None
  assert len(templates) == len(openai_lists["OPENAI_IMAGENET_TEMPLATES"]) == 80
  assert _first_difference(templates, openai_lists["OPENAI_IMAGENET_TEMPLATES"]) is None
  assert (names[0], names[4], names[21]) == ("tench", "hammerhead shark", "kite (bird of prey)")


def test_imagenet_simple_set_is_openais_subset_plus_the_plain_prompt(openai_lists):
  names, templates = zeroshot.class_names_and_templates("imagenet_simple")
  assert names == openai_lists["IMAGENET_CLASSNAMES"]
  assert templates == ["a photo of a {}."] + openai_lists["SIMPLE_IMAGENET_TEMPLATES"]


def test_template_reader_turns_lambdas_into_format_strings(tmp_path):
  source = tmp_path / "zero_shot_metadata.py"
  source.write_text(
    'IMAGENET_CLASSNAMES = ("tench", "kite (bird of prey)")\n'
    "OPENAI_IMAGENET_TEMPLATES = (\n"
    "    lambda c: f'a photo of a {c}.',\n    lambda c: f'{c} art',\n)\n"
  )
  assert openai_zeroshot.read(str(source)) == {
    "IMAGENET_CLASSNAMES": ["tench", "kite (bird of prey)"],
    "OPENAI_IMAGENET_TEMPLATES": ["a photo of a {}.", "{} art"],
  }
  source.write_text("OPENAI_IMAGENET_TEMPLATES = (lambda c: c.upper(),)\n")
  with pytest.raises(ValueError, match="not a lambda returning an f-string"):
    openai_zeroshot.read(str(source))
