"""bench.naflex_fill: the budget's fill by the pipeline's grid rule, worked by hand on three sizes; bad input exits
with status 2 and one error line."""

import json

import pytest

from visionfm_jax.bench import naflex_fill


def test_fill_of_three_sizes(capsys):
  # budget 64, patches of 16: a square is 8 x 8; 300 x 451 is 6 x 10 (s = 0.32: 7 rows would need 10 columns);
  # 100 x 300 is 4 x 12 (5 rows would need 13 columns)
  assert naflex_fill.main(["naflex_fill", "--budgets=64", "--sizes=512x512,300x451,100x300"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["budgets"]["64"] == {
    "mean_fill": pytest.approx((1 + 60 / 64 + 48 / 64) / 3, abs=1e-4),
    "min_fill": 0.75,
  }


@pytest.mark.parametrize("args", [["--budgets=0", "--sizes=8x8"], ["--sizes=3x"], ["--patch=1", "--sizes=8x8"]])
def test_bad_input_exits_2(capsys, args):
  assert naflex_fill.main(["naflex_fill", *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")
