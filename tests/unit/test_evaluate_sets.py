"""tools.evaluate scores the sets a checkpoint's config names and those the command adds, no others: a raw
transformers CLIPModel (whose config is the contrastive defaults, with the embedded shapes as its data) gets no
retrieval on held-out pairs unless the command asks; a training workdir keeps its own config's sets."""

import json

from visionfm_jax import tasks
from visionfm_jax.tools import evaluate
from visionfm_jax.trained import loader

from conftest import tiny_clip_config
from test_clip_checkpoint import hf_dir  # noqa: F401  pylint: disable=unused-import

ZEROSHOT_ON_SHAPES = (
  "--config.eval.zeroshot_classes=shapes",
  "--config.eval.zeroshot_source=shapes",
  "--config.eval.zeroshot_split=validation",
  "--config.eval.zeroshot_examples=16",
  "--batch_size=8",
)


def _evaluate(capsys, *args) -> dict:
  assert evaluate.main(["evaluate", *args]) == 0, capsys.readouterr().err[-2000:]
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_raw_clip_scores_retrieval_only_when_the_command_names_it(hf_dir, capsys):  # noqa: F811
  src, _ = hf_dir
  results = _evaluate(capsys, f"--checkpoint={src}", *ZEROSHOT_ON_SHAPES)
  assert sorted(results) == ["eval/zeroshot/count", "eval/zeroshot/top1", "eval/zeroshot/top5", "step"]
  results = _evaluate(
    capsys, f"--checkpoint={src}", *ZEROSHOT_ON_SHAPES, "--config.eval.retrieval=true", "--config.data.eval_examples=16"
  )
  assert {"eval/retrieval/i2t_r1", "eval/retrieval/t2i_r1", "eval/zeroshot/top1"} <= set(results)


def test_a_workdir_keeps_the_sets_its_config_names(tmp_path):
  config = tiny_clip_config()
  assert config.eval.retrieval
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  assert loader.checkpoint_config(str(tmp_path), tuple(tasks.TASKS)).eval.retrieval
  config.eval.retrieval = False
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  assert not loader.checkpoint_config(str(tmp_path), tuple(tasks.TASKS)).eval.retrieval
