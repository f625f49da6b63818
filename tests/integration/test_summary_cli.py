"""`python -m visionfm_jax.tools.summary` on a full-size recipe: its parameter count and state bytes, in a process
of its own as a user runs it."""

import re
import subprocess

from conftest import ROOT


def test_summary_tool_full_size_config(warm_python):
  run = subprocess.run(
    [
      warm_python.python,
      "-m",
      "visionfm_jax.tools.summary",
      "--config=configs/vit_huge.py",
      "--devices=8",
      "--strategy=zero3",
    ],
    env=warm_python.env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr
  values = dict(
    line.split()[0].split("=", 1) for line in run.stdout.splitlines() if line.startswith(("total_", "state_"))
  )
  assert int(values["total_params"]) == 658_743_121
  per_device, total = int(values["state_bytes_per_device"]), int(values["state_bytes_total"])
  assert abs(per_device - total / 8) / (total / 8) < 0.02
  assert "blocks" in run.stdout and "head" in run.stdout
  assert re.search(r"^state_bytes_total=\d+  \(7\.\d{3} GiB\)$", run.stdout, re.M)
  # ddp keeps everything on every device.
  run = subprocess.run(
    [
      warm_python.python,
      "-m",
      "visionfm_jax.tools.summary",
      "--config=configs/vit_huge.py",
      "--devices=8",
      "--strategy=ddp",
    ],
    env=warm_python.env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  values = dict(
    line.split()[0].split("=", 1) for line in run.stdout.splitlines() if line.startswith(("total_", "state_"))
  )
  assert int(values["state_bytes_per_device"]) == int(values["state_bytes_total"])
