"""Evaluation that fits the data (issue 64): zero-shot on the user's own class names (a file, or the labelled data's
dataset.json) and prompt templates, and a CLIP run on unlabelled pairs whose zero-shot needs labels stopped in the dry
run and at start-up, before its first step, by one line naming the fields to change."""

import pytest

from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.sources import records
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate import zeroshot
from visionfm_jax.tasks import contrastive
from visionfm_jax.training import train

from conftest import tiny_clip_config
from test_bad_input import run_main_in_process

LABEL_ERROR = (
  "error: config.eval.zeroshot_classes='shapes' needs labelled eval images; the eval data config.data.source="
)


def _pairs(directory, labelled=False):
  """The source spec of train (64) and validation (48) shapes records: image-text pairs, with labels and a
  dataset.json of their class names when `labelled`."""
  for split, count in (("train", 64), ("validation", 48)):
    drawn = shapes.ShapesSource(split, count, 40)
    rows = (
      {"image": r["image"], "caption": r["caption"], **({"label": r["label"]} if labelled else {})}
      for r in (drawn[i] for i in range(count))
    )
    records.write_records(directory / f"{split}-00000-of-00001.array_record", rows)
  if labelled:
    records.write_metadata(
      directory,
      kind="classification",
      classes=list(shapes.SHAPE_NAMES),
      splits={
        s: {"records": n, "shards": [f"{s}-00000-of-00001.array_record"]}
        for s, n in (("train", 64), ("validation", 48))
      },
    )
  return f"arrayrecord:{directory}/{{split}}-*.array_record"


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
  return _pairs(tmp_path_factory.mktemp("unlabelled"))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  return _pairs(tmp_path_factory.mktemp("labelled"), labelled=True)


def _one_error_line(status, stderr) -> str:
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize("dry_run", [True, False])
def test_zeroshot_on_unlabelled_pairs_stops_before_the_first_step(dry_run, unlabelled, tmp_path, monkeypatch, capsys):
  """The user's case: the demo's zeroshot_classes='shapes' on their own pairs used to die at the first evaluation."""
  args = [
    "--config=configs/swinv2_g_clip.py:demo",
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.source={unlabelled}",
    "--config.data.num_workers=0",
  ] + (["--dry_run"] if dry_run else [])
  status, _, stderr = run_main_in_process(args, monkeypatch, capsys)
  error = _one_error_line(status, stderr)
  assert error.startswith(LABEL_ERROR + repr(unlabelled)), error
  assert "--config.eval.zeroshot_classes= (no zero-shot)" in error and "--config.eval.zeroshot_source=" in error
  assert not (tmp_path / "run").exists()  # stopped before it wrote anything: the new workdir is gone


# The two runs below train the same config on the same pairs (they differ in what they evaluate): the second
# loads the init and the train step that the first compiled (the module's compilation cache, in one xdist worker).
SAME_TRAINING = pytest.mark.xdist_group("eval_fits_data_training")


@pytest.mark.slow
@pytest.mark.usefixtures("compilation_cache")
@SAME_TRAINING
def test_without_zeroshot_unlabelled_pairs_train_and_report_retrieval(unlabelled, tmp_path):
  config = tiny_clip_config(**{"data.source": unlabelled, "data.num_workers": 0, "eval.zeroshot_classes": ""})
  final = train.run(config, str(tmp_path / "run"))
  assert final["step"] == 4 and "eval/retrieval/i2t_r1" in final
  assert not any(key.startswith("eval/zeroshot") for key in final)


@pytest.mark.slow
@pytest.mark.usefixtures("compilation_cache")
@SAME_TRAINING
def test_zeroshot_on_the_users_class_names_and_templates(unlabelled, tmp_path):
  """Trained on the user's unlabelled pairs, evaluated zero-shot on labelled images (the shapes) with the user's
  class names and templates."""
  (tmp_path / "classes.txt").write_text("\n".join(shapes.SHAPE_NAMES) + "\n\n")
  (tmp_path / "templates.txt").write_text("a photo of a {}\na drawing of a {}.\n")
  config = tiny_clip_config(
    **{
      "eval.zeroshot_classes": str(tmp_path / "classes.txt"),
      "eval.retrieval": False,
      "eval.zeroshot_templates": str(tmp_path / "templates.txt"),
      "data.num_workers": 0,
      "data.source": unlabelled,
      "data.eval_source": "shapes",
    }
  )
  final = train.run(config, str(tmp_path / "run"))
  assert 0 <= final["eval/zeroshot/top1"] <= final["eval/zeroshot/top5"] <= 1
  assert final["eval/zeroshot/count"] == config.eval.zeroshot_examples


def test_class_names_and_templates_from_files_and_from_the_data(labelled, unlabelled, tmp_path):
  (tmp_path / "classes.txt").write_text("cat\n dog \n")
  (tmp_path / "templates.txt").write_text("a photo of a {}\n")
  config = tiny_clip_config(**{"eval.zeroshot_classes": str(tmp_path / "classes.txt")})
  assert zeroshot.zeroshot_classes(config.eval, config.data) == (
    ["cat", "dog"],
    zeroshot.read_lines("imagenet_templates.txt"),
  )  # OpenAI's 80 by default
  config.eval.zeroshot_templates = str(tmp_path / "templates.txt")
  assert zeroshot.zeroshot_classes(config.eval, config.data) == (["cat", "dog"], ["a photo of a {}"])
  config = tiny_clip_config(**{"eval.zeroshot_classes": "data", "eval.zeroshot_source": labelled})
  data_cfg = contrastive.zeroshot_data_config(config.data, config.eval)
  assert len(zeroshot.open_zeroshot_source(config.eval, data_cfg)) == 48
  assert zeroshot.zeroshot_classes(config.eval, data_cfg)[0] == list(shapes.SHAPE_NAMES)
  config.eval.zeroshot_source = unlabelled  # pairs: no labels, no class names
  data_cfg = contrastive.zeroshot_data_config(config.data, config.eval)
  with pytest.raises(
    ConfigError,
    match=r"zeroshot_classes='data' needs labelled eval images; the eval data "
    r"config.eval.zeroshot_source=",
  ):
    zeroshot.open_zeroshot_source(config.eval, data_cfg)
  with pytest.raises(ConfigError, match=r"zeroshot_classes='data': .*no class names"):
    zeroshot.zeroshot_classes(config.eval, data_cfg)


@pytest.mark.parametrize(
  "case, match",
  [
    ("missing", r"zeroshot_classes='.*nope.txt': no such file; expected one of imagenet, imagenet_simple, shapes"),
    ("empty", r"zeroshot_classes='.*empty.txt': the file has no lines"),
    ("templates", r"zeroshot_templates='.*bad.txt': line 2 'a {} of {}' must hold exactly one '\{\}'"),
  ],
)
def test_bad_class_or_template_files_are_one_error_naming_them(case, match, tmp_path):
  (tmp_path / "empty.txt").write_text("\n \n")
  (tmp_path / "bad.txt").write_text("a photo of a {}\na {} of {}\n")
  classes = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt"}.get(case, "shapes")
  config = tiny_clip_config(
    **{
      "eval.zeroshot_classes": str(classes),
      "eval.zeroshot_templates": str(tmp_path / "bad.txt") if case == "templates" else "",
    }
  )
  with pytest.raises(ConfigError, match=match):
    zeroshot.zeroshot_classes(config.eval, config.data)


def test_a_missing_class_names_file_stops_the_dry_run_in_one_line(tmp_path, monkeypatch, capsys):
  args = [
    "--config=configs/swinv2_g_clip.py:demo",
    f"--workdir={tmp_path / 'run'}",
    "--dry_run",
    f"--config.eval.zeroshot_classes={tmp_path / 'nope.txt'}",
  ]
  error = _one_error_line(*run_main_in_process(args, monkeypatch, capsys)[::2])
  assert error.startswith(f"error: config.eval.zeroshot_classes='{tmp_path / 'nope.txt'}': no such file"), error
