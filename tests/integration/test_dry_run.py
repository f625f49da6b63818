"""`python -m visionfm_jax.main --dry_run`: the checks a run makes before its first step and its plan, with nothing
trained or written; the launch scripts run one process for it."""

import os
import re
import subprocess
import time

import pytest

from visionfm_jax import config_lib
from visionfm_jax.data.sources import records
from visionfm_jax.errors import DataError
from visionfm_jax.training import dry_run

from conftest import ROOT
from test_bad_input import run_main_in_process

DEMOS = [
  "vit_huge.py:demo",
  "swinv2_cls.py:demo",
  "swinv2_g_clip.py:demo",
  "aurora_xl.py:demo",
  "finetune_ade20k.py:demo",
  "finetune_coco.py:demo",
]
FP32 = 4


def _main(*args, warm, launcher=("python", "-m", "visionfm_jax.main"), env=None):
  """(the finished command, its seconds): `launcher` (its `python` the warm interpreter `warm`) with `args`."""
  start = time.perf_counter()
  proc = subprocess.run(
    [*launcher, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=warm.env(dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))),
  )
  return proc, time.perf_counter() - start


def _figures(stdout: str) -> dict:
  """The numbers of the dry run's report lines."""

  def number(pattern):
    return int(re.search(pattern, stdout).group(1).replace(",", ""))

  mesh = re.search(r"mesh data (\d+) x fsdp (\d+) x tensor (\d+) over (\d+) devices in (\d+) process", stdout)
  return dict(
    params=number(r"([\d,]+) params"),
    steps=number(r"steps: ([\d,]+) of"),
    examples=number(r"examples per epoch: ([\d,]+)"),
    checkpoint_every=number(r"checkpoints: every ([\d,]+)"),
    mesh=tuple(int(x) for x in mesh.groups()),
  )


@pytest.mark.parametrize("spec", DEMOS)
def test_the_plan_of_every_demo_from_shapes(spec, tmp_path):
  """Params and per-device state bytes from shapes: fp32 params, gradients of the same size and Adam's two moments
  on one device; under zero3 on 2 devices each holds half of the params (and the few leaves too small to split
  whole). Examples per epoch: the embedded sets' sizes, every mixture entry's."""
  config = config_lib.load(os.path.join(ROOT, "configs", spec))
  plan = dry_run.plan(config, str(tmp_path / "run"), num_devices=1, num_processes=1)
  per_device = plan["bytes_per_device"]
  assert per_device["params"] == per_device["grads"] == FP32 * plan["params"]
  assert 2 * per_device["params"] <= per_device["opt_state"] <= 2 * per_device["params"] + 1024
  entries = len(config.data.mixture) or 1
  assert plan["examples_per_epoch"] == entries * config.data.shapes_train_size
  assert (plan["total_steps"], plan["start_step"], plan["checkpoint_every"]) == (
    config.total_steps,
    0,
    config.checkpoint_every,
  )
  assert plan["evaluators"] and not (tmp_path / "run").exists()
  assert "for good" not in dry_run.report(plan)[-1]  # the demos keep no history
  config.checkpoint_keep_period = 2 * config.checkpoint_every
  kept = dry_run.plan(config, str(tmp_path / "run"), num_devices=1, num_processes=1)
  assert f"and every {2 * config.checkpoint_every:,} for good" in dry_run.report(kept)[-1]

  config.strategy = "zero3"
  config.accumulate_unreduced = False  # needs whole params on each device (Aurora's recipe turns it on)
  sharded = dry_run.plan(config, str(tmp_path / "run"), num_devices=2, num_processes=2)
  assert sharded["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert per_device["params"] / 2 <= sharded["bytes_per_device"]["params"] < per_device["params"] / 1.5


def test_a_dry_run_through_main_prints_the_plan_and_exits_0_without_training(tmp_path, warm_python):
  workdir = tmp_path / "run"
  # planned for the 2 devices the mesh names; this process has 8
  proc, seconds = _main(
    "--config=configs/vit_huge.py:demo", f"--workdir={workdir}", "--dry_run", "--config.mesh.fsdp=2", warm=warm_python
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  figures = _figures(proc.stdout)
  config = config_lib.load(os.path.join(ROOT, "configs", "vit_huge.py:demo"))
  assert figures["steps"] == config.total_steps and figures["examples"] == config.data.shapes_train_size
  assert figures["checkpoint_every"] == config.checkpoint_every and figures["mesh"] == (1, 2, 1, 2, 1)
  assert figures["params"] == dry_run.plan(config, str(workdir), 1, 1)["params"]
  assert not workdir.exists() and "train/loss" not in proc.stdout + proc.stderr
  assert seconds < 60, seconds  # no step is compiled or run (about 4 s on a 2-core CPU)


def _empty_split(directory, split):
  with records.RecordWriter(directory / f"{split}-00000-of-00001.array_record"):
    pass


def _pairs_split(directory, split, count=64):
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  records.write_records(
    directory / f"{split}-00000-of-00001.array_record",
    ({"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i % 3} for i in range(count)),
  )


@pytest.mark.parametrize("case", ["missing-subprocess", "empty_train", "empty_eval"])
def test_a_missing_or_empty_source_is_one_error_line_naming_it(case, tmp_path, monkeypatch, capsys, warm_python):
  """`missing` runs main as a real process; the others in this process (test_bad_input.run_main_in_process)."""
  data = tmp_path / "data"
  data.mkdir()
  if not case.startswith("missing"):
    (_empty_split if case == "empty_train" else _pairs_split)(data, "train")
    _empty_split(data, "validation")
  spec = f"arrayrecord:{data}/{{split}}-*.array_record"
  args = (
    "--config=configs/vit_huge.py:demo",
    f"--workdir={tmp_path / 'run'}",
    "--dry_run",
    f"--config.data.source={spec}",
    "--config.model.num_classes=3",
  )
  if case.endswith("subprocess"):
    proc, _ = _main(*args, warm=warm_python)
    status, stderr = proc.returncode, proc.stderr
  else:
    status, _, stderr = run_main_in_process(args, monkeypatch, capsys)
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
  split = "validation" if case == "empty_eval" else "train"
  assert f"config.data.source={spec!r} split {split!r}" in errors[0]
  assert ("no files match" if case.startswith("missing") else "has no records") in errors[0], errors[0]


def test_an_empty_eval_source_stops_a_run_at_start_up(tmp_path):
  """open_eval_source, which every evaluator opens when built, refuses an empty split as a missing one."""
  from visionfm_jax.data.loader import pipeline  # pylint: disable=g-import-not-at-top

  _empty_split(tmp_path, "validation")
  config = config_lib.base_config()
  config.data.source = f"arrayrecord:{tmp_path}/{{split}}-*.array_record"
  with pytest.raises(DataError, match=r"config.data.source=.* split 'validation' has no records"):
    pipeline.open_eval_source(config.data)


def test_local_sh_runs_one_process_for_the_whole_job(tmp_path, warm_python):
  proc, _ = _main(
    "--config=configs/vit_huge.py:demo",
    f"--workdir={tmp_path / 'run'}",
    "--dry_run",
    launcher=("bash", "launch/local.sh", "2"),
    env={"DEVICES_PER_PROCESS": "2"},
    warm=warm_python,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("dry run:") == 1 and _figures(proc.stdout)["mesh"] == (1, 4, 1, 4, 2)


def test_slurm_sbatch_plans_the_allocation_from_one_process(tmp_path, warm_python):
  """Run with bash on a login node: NODES x GPUS_PER_NODE devices, one process per node; no srun."""
  proc, _ = _main(
    "--config=configs/vit_huge.py:demo",
    f"--workdir={tmp_path / 'run'}",
    "--dry_run",
    launcher=("bash", "launch/slurm.sbatch"),
    env={"NODES": "4", "GPUS_PER_NODE": "8"},
    warm=warm_python,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("dry run:") == 1 and _figures(proc.stdout)["mesh"] == (1, 32, 1, 32, 4)
