"""A run says how long its first step took to compile and draws its first progress line (seconds a step, ETA) a few
steps after it, long before its first logging step (training/infra/console.py, `FIRST_LINE_AFTER`)."""

from __future__ import annotations

import logging
import re

import pytest

from visionfm_jax.training import train
from visionfm_jax.training.infra import console

from conftest import tiny_vit_config


@pytest.mark.slow  # 9.5 s on 2 shared cores
def test_the_first_progress_line_comes_a_few_steps_after_the_compile(tmp_path, caplog):
  config = tiny_vit_config(
    **{
      "total_steps": 8,
      "log_every": 50,
      "progress_bar": True,
      "eval_every": 8,
      "checkpoint_every": 8,
      "data.eval_examples": 16,
    }
  )
  with caplog.at_level(logging.INFO):
    train.run(config, str(tmp_path))
  lines = [r.getMessage() for r in caplog.records]
  compiled = [
    i for i, line in enumerate(lines) if re.fullmatch(r"compiled the train step in [\d.]+s; step 1 runs", line)
  ]
  first = 1 + console.FIRST_LINE_AFTER
  progress = [
    i
    for i, line in enumerate(lines)
    if re.search(
      rf"\] {first}/8 loss [\d.]+ [\d,]+ img/s [\d.e-]+s/step "
      rf"eta \dm\d\ds$",
      line,
    )
  ]
  assert len(compiled) == 1 and len(progress) == 1 and compiled[0] < progress[0], lines
