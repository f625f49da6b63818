"""bench.input on a tiny synthetic set: the report's last line is JSON with positive figures; bad input
exits with status 2 and one error line."""

import json
import sys

import pytest

from visionfm_jax.bench import input as bench_input

CONFIG = "--config=configs/vit_huge.py:demo"  # 32 px
TINY = ["--synthetic=16", "--synthetic_size=64x48", "--images=16", "--batch_size=8", "--workers=0"]


def test_report_figures(capsys):
  assert bench_input.main(["bench_input", CONFIG, *TINY]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  report = json.loads(lines[-1])
  assert lines[0].startswith("measurement")
  assert set(report["results"]) == {
    "baseline",
    "baseline_draft",
    "ours_ops",
    "ours_loader_w0",
    "read_arrayrecord",
    "read_wds",
    "ours_ops_wds",
    "ours_loader_wds_w0",
  }
  assert set(report["ratio_wds_to_arrayrecord"]) == {"read_arrayrecord", "ours_ops", "ours_loader_w0"}
  assert all(ratio > 0 for ratio in report["ratio_wds_to_arrayrecord"].values())
  for name, r in report["results"].items():
    assert r["images"] == 16, name
    for key in ("wall_s", "cpu_s", "images_per_s", "images_per_s_per_core", "cores"):
      assert r[key] > 0, (name, key)
  assert report["ratio_ours_ops_to_baseline"] > 0 and report["ratio_ours_ops_to_baseline_draft"] > 0
  assert report["device_augment"]["ms_per_image"] > 0
  per_cpu_s = {name: r["images"] / r["cpu_s"] for name, r in report["results"].items()}
  assert report["ratio_ours_ops_to_baseline_images_per_cpu_s"] == pytest.approx(
    per_cpu_s["ours_ops"] / per_cpu_s["baseline"], abs=1e-3
  )
  assert all(ms >= 0 for ms in report["ours_ops_ms_per_image"].values())
  assert report["image_size"] == 32 and report["records"] == 16
  assert report["synthetic"]["size"] == "64x48" and report["synthetic"]["mean_jpeg_bytes"] > 0
  assert report["machine"]["cpu_count"] > 0 and report["machine"]["pillow"]


def test_bad_input_exits_2(capsys, tmp_path, monkeypatch):
  cases = [
    ["--config=configs/no_such_config.py"],
    [CONFIG, f"--source=arrayrecord:{tmp_path}/*.array_record"],
    [CONFIG, "--workers=two"],
    [CONFIG, "--config.data.augment.randaugment_magnitude=31"],
  ]
  for args in cases:
    monkeypatch.setattr(sys, "argv", ["bench_input", *args])  # config_flags finds --config.* overrides there
    assert bench_input.main(["bench_input", *args]) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
  assert "config.data.augment.randaugment_magnitude=31: must be a number in [0, 30]" in err  # its row's domain
