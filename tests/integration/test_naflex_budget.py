"""A NaFlex token budget whose largest product (the attention scores, quadratic in the budget) outgrows a device is
one `error:` line naming config.data.naflex.max_tokens from main's start-up checks and from `--dry_run`, before
anything compiles; a budget that fits passes. `visionfm_jax.load`'s max_tokens takes a positive int only."""

import os
import re

import pytest

import visionfm_jax
from visionfm_jax.errors import UserError
from visionfm_jax.training import checks

from test_bad_input import run_main_in_process
from test_load_api import naflex_siglip  # noqa: F401  pylint: disable=unused-import

DEMO = ["--config=configs/swinv2_g_clip.py:demo,naflex"]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "start_up"])
def test_a_budget_whose_attention_outgrows_a_device_is_one_line_before_compiling(
  dry_run, tmp_path, monkeypatch, capsys
):
  workdir = tmp_path / "run"
  status, _, err = run_main_in_process(
    [*DEMO, f"--workdir={workdir}", "--config.data.naflex.max_tokens=65535", *(["--dry_run"] if dry_run else [])],
    monkeypatch,
    capsys,
  )
  assert status == 2, err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, err
  assert errors[0].startswith("error: config.data.naflex.max_tokens=65535: one matrix product of the loss, float32("), (
    errors
  )
  assert "65535, 65535) for a micro-batch of" in errors[0] and "over a device's" in errors[0], errors
  assert "RESOURCE_EXHAUSTED" not in err
  assert not os.path.exists(workdir / "checkpoints") or not os.listdir(workdir / "checkpoints")


def test_the_demos_budget_fits_and_the_bound_is_its_attention_scores():
  from configs import swinv2_g_clip  # pylint: disable=g-import-not-at-top
  from visionfm_jax import tasks  # pylint: disable=g-import-not-at-top

  config = swinv2_g_clip.get_config("demo,naflex")
  checks.validate(config)
  checks.check_naflex_budget(config, 8, checks.device_memory_bytes())
  config.data.naflex.max_tokens = 4096
  largest = checks.largest_product(tasks.build(config), 8)
  assert largest.shape[0] == 8 and largest.shape[-2:] == (4096, 4096), largest  # (batch, heads, tokens, tokens)
  with pytest.raises(UserError, match="max_tokens=4096: one matrix product"):
    checks.check_naflex_budget(config, 8, 2**30)


@pytest.mark.parametrize("value", [1.5, True, "64", 24.0])  # 0 or 65536: test_load_api's range
def test_loads_max_tokens_takes_a_positive_int_only(naflex_siglip, value):  # noqa: F811
  with pytest.raises(UserError, match=rf"^max_tokens={re.escape(repr(value))}: expected a positive int"):
    visionfm_jax.load(naflex_siglip[0], max_tokens=value)
