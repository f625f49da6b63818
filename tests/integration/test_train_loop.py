"""The training loop end to end: metrics and checkpoints on disk, exact resume after a kill, clear errors."""

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from visionfm_jax import tasks
from visionfm_jax.errors import ConfigError, DataError
from visionfm_jax.evaluate import panels
from visionfm_jax.training import step as step_lib
from visionfm_jax.training import train
from visionfm_jax.training.infra import metrics

from conftest import ROOT, compilation_cache_env, cpu_env, read_the_loss_after_every_step, tiny_vit_config
from test_bad_input import run_main_in_process

TINY_FLAGS = [
  "--config=configs/vit_huge.py:demo",
  "--config.model.variant=pico/4",
  "--config.model.image_size=16",
  "--config.data.image_size=16",
  "--config.global_batch_size=16",
  "--config.optim.warmup_steps=2",
  "--config.data.eval_examples=64",
  "--config.progress_bar=False",
]


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _final_state(workdir, step):
  state = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return jax.tree.leaves({"params": state["params"], "opt_state": state["opt_state"]})


# The module's runs share their compiled programs: the same config trained, stopped and resumed compiles once.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _main(workdir, *flags, devices=8, cache=None, warm=None):
  """`python -m visionfm_jax.main` on the tiny ViT; `warm`: run by that warm interpreter (tests/warm_python.py)."""
  env = cpu_env(devices, **(compilation_cache_env(cache) if cache else {}))
  python, env = (warm.python, warm.env(env)) if warm else (sys.executable, env)
  return subprocess.Popen(
    [python, "-m", "visionfm_jax.main", f"--workdir={workdir}", *TINY_FLAGS, *flags],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )


def _zero3_config():
  """6 steps of zero3, a log line every 2, an evaluation (of 40 examples: 2 batches and a part) and a checkpoint
  every 3."""
  config = tiny_vit_config(total_steps=6, log_every=2, eval_every=3, checkpoint_every=3, strategy="zero3")
  config.data.num_workers = 0
  config.data.eval_examples = 40
  return config


# `_zero3_config` as main's flags.
ZERO3_FLAGS = [
  *TINY_FLAGS,
  "--config.total_steps=6",
  "--config.log_every=2",
  "--config.eval_every=3",
  "--config.checkpoint_every=3",
  "--config.strategy=zero3",
  "--config.data.num_workers=0",
  "--config.data.eval_examples=40",
]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
  """(the workdir of `_zero3_config` trained uninterrupted (read-only: copy it to change it), its last metrics, the
  DeprecationWarnings it raised)."""
  workdir = tmp_path_factory.mktemp("zero3") / "run"
  with warnings.catch_warnings(record=True) as raised:
    warnings.simplefilter("always", DeprecationWarning)
    last = train.run(_zero3_config(), str(workdir))
  return workdir, last, [w for w in raised if issubclass(w.category, DeprecationWarning)]


ZERO3_RUN = pytest.mark.xdist_group("train_loop_zero3_run")  # its tests share it in one xdist worker


@ZERO3_RUN
def test_the_run_calls_nothing_deprecated(zero3_run):
  """JAX, flax and optax announce an API's removal with a DeprecationWarning at the line that calls it (the
  suite's settings hide them): none of the run's is at a line of this package."""
  package = os.path.join(ROOT, "visionfm_jax") + os.sep
  assert train.__file__.startswith(package), train.__file__  # else no warning could be told ours
  ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in zero3_run[2] if w.filename.startswith(package)]
  assert not ours, ours


@ZERO3_RUN
def test_run_writes_metrics_checkpoints_and_config(zero3_run, tmp_path):
  workdir, last, _ = zero3_run
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  config = _zero3_config()
  rows = _read_metrics(tmp_path)
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  for key in ("train/loss", "train/lr", "train/grad_norm", "train/img_per_sec", "train/top1"):
    assert key in train_rows[-1]
  assert train_rows[-1]["data/skipped"] == 0 and train_rows[-1]["data/skipped_fraction"] == 0
  eval_rows = [r for r in rows if "eval/val/top1" in r]
  assert [r["step"] for r in eval_rows] == [3, 6]
  assert 0.0 <= last["eval/val/top1"] <= 1.0
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
  assert json.loads((tmp_path / "config.json").read_text())["strategy"] == "zero3"
  # Rerunning a finished run resumes at the end and trains nothing more.
  again = train.run(config, str(tmp_path))
  assert again["step"] == 6
  assert len(_read_metrics(tmp_path)) == len(rows)
  # TensorBoard holds what metrics.jsonl holds; the rerun's file keeps TensorBoard at steps <= 6 of the first.
  import test_tensorboard  # pylint: disable=g-import-not-at-top  (it skips without tensorboardX, its reference)

  first, rerun = test_tensorboard.read_event_files(tmp_path / "tensorboard")
  jsonl_by_step = {}
  for row in rows:
    jsonl_by_step.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
  tensorboard_by_step = test_tensorboard.scalars_by_step(first)
  assert tensorboard_by_step.keys() == jsonl_by_step.keys()
  for step, row in jsonl_by_step.items():
    np.testing.assert_allclose([tensorboard_by_step[step][k] for k in row], list(row.values()), rtol=2e-7)
  assert [e.step for e in rerun if e.session_log.status] == [7]
  # At each evaluation a panel of the first validation images: a PNG in the workdir, the same in TensorBoard.
  assert sorted(os.listdir(tmp_path / "panels")) == ["step_3.png", "step_6.png"]
  images = test_tensorboard.images_by_step(first)
  assert sorted(images) == [3, 6]
  np.testing.assert_array_equal(images[6]["panel"], np.asarray(Image.open(tmp_path / "panels" / "step_6.png")))
  assert images[6]["panel"].shape[1] >= 8 * panels.TILE  # a column per example


@ZERO3_RUN
def test_a_rerun_after_a_kill_before_the_final_evaluation_completes_the_record(
  zero3_run, tmp_path, monkeypatch, capsys, caplog
):
  """Killed after its last checkpoint, while writing step 6's train row (left without its newline), before the final
  evaluation: the rerun through main keeps the row, says the run was already complete, makes the evaluation and the
  panel of step 6 as the uninterrupted run did, closes the trackers with the final metrics and prints them on its
  `done` line. Killed again while writing a row (cut short): the next rerun drops that line, saying so, and prints
  the final metrics from metrics.jsonl without evaluating again."""
  reference_dir, reference, _ = zero3_run
  shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
  rows = _read_metrics(tmp_path)
  final_eval = rows.pop()
  assert final_eval["step"] == 6 and "eval/val/top1" in final_eval
  (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
  (tmp_path / "panels" / "step_6.png").unlink()
  finals = []
  close = metrics.MetricWriter.close

  def close_noting_final(self, final=None):
    finals.append(final)
    close(self, final)

  monkeypatch.setattr(metrics.MetricWriter, "close", close_noting_final)

  status, err = _rerun_main(tmp_path, monkeypatch, capsys, caplog)
  assert status == 0, err
  assert _read_metrics(tmp_path) == rows + [final_eval]
  assert f"{tmp_path / 'metrics.jsonl'}: its last line (a row of step 6) lacked its newline" in err
  assert "step 6: the run was already complete; making its final evaluation and panel" in err
  assert re.search(r"step 6 eval val: top1 [\d.]+", err), err
  assert (tmp_path / "panels" / "step_6.png").read_bytes() == (reference_dir / "panels" / "step_6.png").read_bytes()
  done = re.search(r"done at step 6: train/loss [\d.]+, .*eval/val/top1 [\d.]+.*", err)
  assert done, err
  for key in ("train/loss", "eval/val/top1", "eval/val/top5"):
    assert finals[-1][key] == reference[key]

  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 6, "eval/va')
  status, err = _rerun_main(tmp_path, monkeypatch, capsys, caplog)
  assert status == 0, err
  assert f"{tmp_path / 'metrics.jsonl'}: dropped its last line, 20 bytes without a newline" in err
  assert "step 6: the run was already complete\n" in err and "eval val" not in err, err
  assert re.search(r"done at step 6: .*", err).group(0) == done.group(0)
  assert _read_metrics(tmp_path) == rows + [final_eval]
  assert finals[-1]["eval/val/top1"] == reference["eval/val/top1"]


def _rerun_main(workdir, monkeypatch, capsys, caplog) -> tuple[int, str]:
  """(exit status, log lines) of main run in this process on `workdir` with `ZERO3_FLAGS`."""
  caplog.clear()
  with caplog.at_level(logging.INFO):
    status, _, err = run_main_in_process([f"--workdir={workdir}", *ZERO3_FLAGS], monkeypatch, capsys)
  return status, err + "\n".join(caplog.messages)


@pytest.mark.slow
def test_preempted_run_resumes_to_the_same_result_bitwise(tmp_path, monkeypatch, warm_python):
  """SIGTERM (to the whole process group, data workers included, as a scheduler does) mid-run: the run saves
  the step it is at and exits 0; the rerun resumes there and ends with the uninterrupted run's parameters
  bitwise, so the data order resumed exactly too. The interrupted run keeps its programs in its workdir's
  compile cache and the rerun loads its train step from there: a loaded program computes bitwise what a compiled
  one does. (The uninterrupted run, last, loads them too instead of compiling them a third time.)"""
  flags = [
    "--config.total_steps=12",
    "--config.checkpoint_every=4",
    "--config.eval_every=12",
    "--config.log_every=1",
    "--config.data.num_workers=1",
    "--config.strategy=zero3",
  ]
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # JAX keeps programs of 1 s and more
  preempted = _main(tmp_path / "run", *flags, warm=warm_python)  # config.compile_cache '': <workdir>/compile_cache
  first_checkpoint = tmp_path / "run" / "checkpoints" / "4"
  deadline = time.monotonic() + 600
  while not first_checkpoint.exists() and preempted.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  assert first_checkpoint.exists(), preempted.communicate()[0]
  os.killpg(preempted.pid, signal.SIGTERM)
  out, _ = preempted.communicate(timeout=600)
  assert preempted.returncode == 0, out
  named = re.search(r"preemption notice: saved step (\d+) \((.*?)\)", out)
  assert named, out
  saved = sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints"))
  assert int(named.group(1)) == saved[-1] and 4 < saved[-1] < 12, (saved, out)
  assert named.group(2) == str(tmp_path / "run" / "checkpoints" / str(saved[-1]))

  cache = tmp_path / "run" / "compile_cache"
  kept = set(os.listdir(cache))
  resumed = _main(tmp_path / "run", *flags, warm=warm_python)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out
  assert f"resuming from {tmp_path / 'run' / 'checkpoints'}/{saved[-1]}" in out
  assert int(re.search(rf"compile cache {cache}: (\d+) programs? loaded", out).group(1)) >= 1, out
  is_step = lambda name: name.startswith("jit_train_step-")  # JAX names a cache file after its program
  assert any(map(is_step, kept)) and not any(map(is_step, set(os.listdir(cache)) - kept)), (kept, out)

  reference = _main(tmp_path / "ref", *flags, f"--config.compile_cache={cache}", warm=warm_python)
  out, _ = reference.communicate(timeout=600)
  assert reference.returncode == 0, out
  for got, want in zip(_final_state(tmp_path / "run", 12), _final_state(tmp_path / "ref", 12)):
    np.testing.assert_array_equal(got, want)
  rows = [r for r in _read_metrics(tmp_path / "run") if r["step"] == 12 and "eval/val/top1" in r]
  assert (
    rows[-1]["eval/val/top1"]
    == [r for r in _read_metrics(tmp_path / "ref") if "eval/val/top1" in r][-1]["eval/val/top1"]
  )


@ZERO3_RUN
def test_signal_during_a_logging_steps_wait_saves_the_step_it_names(zero3_run, tmp_path, monkeypatch, caplog):
  """SIGTERM lands while step 2's metrics are being fetched and written (where the flag used to be read twice,
  skipping the save yet logging it): the next step boundary saves step 3, the log names it only once it has
  committed, and the rerun from it ends bitwise where an uninterrupted run (`zero3_run`: the same training, other
  evaluation and checkpoint steps) ends."""
  reference_dir, reference, _ = zero3_run
  config = _zero3_config()
  config.eval_every, config.checkpoint_every = 6, 100

  write = metrics.MetricWriter.write

  def write_then_signal(self, step, values):
    write(self, step, values)
    if step == 2 and "train/loss" in values:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics.MetricWriter, "write", write_then_signal)
  with caplog.at_level(logging.INFO):
    stopped = train.run(config, str(tmp_path / "run"))
  checkpoints = tmp_path / "run" / "checkpoints"
  assert stopped["step"] == 3 and os.listdir(checkpoints) == ["3"]
  assert f"preemption notice: saved step 3 ({checkpoints / '3'})" in caplog.text
  monkeypatch.undo()

  with caplog.at_level(logging.INFO):
    resumed = train.run(config, str(tmp_path / "run"))
  assert f"resuming from {checkpoints}/3" in caplog.text
  for got, want in zip(_final_state(tmp_path / "run", 6), _final_state(reference_dir, 6)):
    np.testing.assert_array_equal(got, want)
  assert resumed["eval/val/top1"] == reference["eval/val/top1"] and resumed["step"] == 6


def test_bad_configs_name_the_field(tmp_path):
  with pytest.raises(ConfigError, match="global_batch_size"):
    train.run(tiny_vit_config(global_batch_size=12), str(tmp_path))  # 12 does not divide over 8 devices
  with pytest.raises(ConfigError, match="config.mesh"):
    train.run(tiny_vit_config(**{"mesh.fsdp": 3}), str(tmp_path))
  with pytest.raises(ConfigError, match="config.strategy"):
    train.run(tiny_vit_config(strategy="zero4"), str(tmp_path))


def test_batch_axes_that_do_not_span_the_processes_are_a_config_error(tmp_path, monkeypatch):
  """As if 8 processes drove one device each: a mesh of tensor=8 would give every process the same batch shard."""
  monkeypatch.setattr(jax, "process_count", lambda: 8)
  with pytest.raises(ConfigError, match=r"config.mesh=.* 1 batch shards do not divide over the 8 processes"):
    train.run(tiny_vit_config(**{"mesh.fsdp": 1, "mesh.tensor": 8}), str(tmp_path))


def test_non_finite_loss_stops_before_saving_and_keeps_the_good_checkpoints(tmp_path):
  """lr 1e30: step 2's update sends the params to ~1e29, so step 3's loss is not finite. The check runs before
  every save (checkpoint_every=1), even between log steps (log_every=5)."""
  config = tiny_vit_config(
    total_steps=6,
    log_every=5,
    eval_every=6,
    checkpoint_every=1,
    **{"optim.lr": 1e30, "optim.warmup_steps": 2, "data.num_workers": 0},
  )
  with pytest.raises(train.NonFiniteLossError, match=r"at step 3; stopping. The last good checkpoint: .*/2;"):
    train.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["1", "2"]
  params = ocp.PyTreeCheckpointer().restore(tmp_path / "checkpoints" / "2" / "state")["params"]
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_console_shows_our_lines_only(tmp_path, warm_python):
  """Not a terminal (as in a SLURM log): a handful of timestamped lines of ours (no Orbax or JAX internals),
  plain progress lines, one line per evaluation, where each checkpoint goes, and the final metrics."""
  proc = _main(
    tmp_path / "run",
    "--config.total_steps=4",
    "--config.log_every=1",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.progress_bar=True",
    devices=1,
    warm=warm_python,
  )
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  lines = out.splitlines()
  assert len(lines) <= 20, out
  assert all(re.match(r"\d\d:\d\d:\d\d \S", line) for line in lines), out
  for internal in ("orbax", "checkpoint_manager", "xla_bridge", "libtpu", "handler"):
    assert internal not in out.lower(), out
  assert re.search(r"\] 1/4 loss \d", out) and re.search(r"\] 4/4 loss \d", out), out
  assert re.search(r"step 2 eval val: top1 [\d.]+, top5 [\d.]+ \(", out), out
  assert f"step 2: saving a checkpoint to {tmp_path / 'run' / 'checkpoints' / '2'}" in out
  assert re.search(r"done at step 4: train/loss [\d.]+, eval/val/top1 [\d.]+", lines[-1]), out


def _emulate_the_device_to_host_guard(monkeypatch):
  """On accelerators `jax.transfer_guard_device_to_host('disallow')` makes any read of a device value an error;
  the CPU backend ignores it (its arrays are host memory already). Emulated here: reading an array's value or
  waiting on it while that guard is set raises, as it would on a GPU."""
  from jax._src import array  # pylint: disable=g-import-not-at-top

  def guarded(read):
    def check(self, *args):
      if jax.config.jax_transfer_guard_device_to_host == "disallow":
        raise RuntimeError("device-to-host read between logging steps")
      return read(self, *args)

    return check

  monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded(array.ArrayImpl._value.fget)))
  monkeypatch.setattr(array.ArrayImpl, "block_until_ready", guarded(array.ArrayImpl.block_until_ready))


def test_steps_between_logging_steps_never_wait_on_the_device(tmp_path, monkeypatch):
  """The loop reads device values (metrics, the step, checkpoints) only at logging, saving and evaluation steps;
  the steps between them only feed the device. A step that reads its loss every time is caught."""
  config = tiny_vit_config(total_steps=6, log_every=3, eval_every=6, checkpoint_every=6)
  config.data.num_workers = 0
  config.data.eval_examples = 16
  _emulate_the_device_to_host_guard(monkeypatch)
  last = train.run(config, str(tmp_path / "quiet"))
  assert last["step"] == 6 and 0 <= last["train/data_wait_fraction"] <= 1

  read_the_loss_after_every_step(monkeypatch)
  with pytest.raises(RuntimeError, match="between logging steps"):
    train.run(config, str(tmp_path / "stalling"))


def test_fp16_run_overflowing_at_the_minimum_scale_stops_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
  """Two good fp16 steps are saved; then every step overflows at the minimum scale (its batch's labels marked, its
  loss then infinite; a skipped step changes no param, so the step-4 save is still good): the third such step in
  a row stops the run, naming checkpoint 4."""
  fields = {
    "precision.compute_dtype": "float16",
    "precision.loss_scale_init": 1.0,
    "precision.max_consecutive_skips": 3,
  }
  config = tiny_vit_config(total_steps=8, log_every=1, eval_every=100, checkpoint_every=2, **fields)
  config.data.num_workers = 0
  config.data.eval_examples = 16

  loss = tasks.ClassificationTask.loss

  def overflowing_on_marked_labels(self, params, batch, rng):
    value, aux = loss(self, params, batch, rng)
    return value * jnp.where(jnp.all(batch["label"] < 0), jnp.inf, 1.0), aux

  monkeypatch.setattr(tasks.ClassificationTask, "loss", overflowing_on_marked_labels)
  jit_train_step = step_lib.jit_train_step

  def marking_after_two_steps(*args, **kwargs):
    step, calls = jit_train_step(*args, **kwargs), []

    def run(state, batch):
      calls.append(1)
      return step(state, batch if len(calls) <= 2 else dict(batch, label=batch["label"] - 1000))

    return run

  monkeypatch.setattr(step_lib, "jit_train_step", marking_after_two_steps)
  with pytest.raises(
    train.NonFiniteLossError, match=f"3 consecutive fp16 steps overflowed .* up to step 5.*{tmp_path / 'checkpoints'}/4"
  ):
    train.run(config, str(tmp_path))
  rows = [r for r in _read_metrics(tmp_path) if "train/loss" in r]
  assert [math.isfinite(r["train/loss"]) for r in rows] == [True, True, False, False]  # steps 1-4 logged


@pytest.mark.parametrize(
  "family,fields",
  [
    ("clip", {"eval.zeroshot_source": "arrayrecord:/nonexistent/zeroshot-{split}-*"}),
    ("clip", {"data.eval_source": "arrayrecord:/nonexistent/pairs-{split}-*"}),
    ("clip", {"eval.retrieval_benchmarks": (("coco", "coco_karpathy:/nonexistent/coco"),)}),
    ("vit", {"probe.knn": True, "probe.source": "arrayrecord:/nonexistent/probe-{split}-*"}),
  ],
  ids=["zeroshot", "retrieval", "retrieval_benchmark", "probe"],
)
def test_a_missing_evaluation_source_stops_the_run_before_any_state_is_built(tmp_path, monkeypatch, family, fields):
  """Not at the first evaluation, thousands of steps later: the evaluators open their sources when built."""
  from conftest import override, tiny_clip_config  # pylint: disable=g-import-not-at-top

  config = override(tiny_vit_config() if family == "vit" else tiny_clip_config(), **fields)
  config.data.num_workers = 0
  monkeypatch.setattr(step_lib, "make_init_fn", lambda *a: pytest.fail("the state was built"))
  with pytest.raises(DataError, match="/nonexistent/"):
    train.run(config, str(tmp_path))


def test_compile_cache_settings(tmp_path):
  """'' is JAX's own setting when one is made, else the workdir's folder; 'off' none; a path itself. The run's
  setting holds inside `in_use` only."""
  from visionfm_jax.training.infra import compile_cache  # pylint: disable=g-import-not-at-top

  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.directory("", "/w") == "/w/compile_cache"
    assert compile_cache.directory("off", "/w") is None
    assert compile_cache.directory("/shared/cache", "/w") == "/shared/cache"
    with compile_cache.in_use("", str(tmp_path)):
      assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compile_cache")
    assert jax.config.jax_compilation_cache_dir is None
    jax.config.update("jax_compilation_cache_dir", "/mine")  # JAX_COMPILATION_CACHE_DIR
    assert compile_cache.directory("", "/w") == "/mine"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
