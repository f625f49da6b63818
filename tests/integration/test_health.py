"""Run health (training/health.py): spike skipping in the step, rollback past bad data, both end to end.

The data: ArrayRecord files written with the project's records writer, 8 classes of noisy flat colours (a tiny
ViT learns them in a few dozen steps), read in stream order (data.shuffle=False, so stream position = record
index; batch 16: step k reads positions 16(k-1) .. 16k-1). Poisoned records carry wrong labels (label + 4 mod 8):
a model that has begun to learn sees a loss spike.

Two bursts of 6 poisoned batches (`BURST_A`, `BURST_B`, at steps 41-46 and, after the first rollback, 61-66;
late enough that the falling loss no longer widens the window's spread much): the first 3 spikes of a burst set
off a rollback (burst_skips 3 within 16 steps), read at once (log_every 1):
  A: trigger at step 43 -> restore checkpoint 30 (the newest <= 43 - 5), skip positions 480-751 (read since
     checkpoint 30, up to step 43's 688, plus 4 batches); step 31 then reads position 752 on.
  B: trigger at step 63 (positions up to 752 + 33 * 16 = 1280 read) -> restore checkpoint 50, skip positions
     1072-1343 (step 51 had read from 752 + 20 * 16).
"""

import json
import logging
import os
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from visionfm_jax import config_lib
from visionfm_jax.data.sources import records
from visionfm_jax.training import checkpoint, health, train

from conftest import override, stop_after_writing, tiny_vit_config
import tracker_runs

COLOURS = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], np.float32)
RECORDS = 2000
BATCH = 16
BURST_A = range(640, 736)  # steps 41-46
BURST_B = range(1232, 1328)  # steps 61-66 after rollback A (positions 752 + 30 * 16 on)
SPIKE = range(640, 656)  # step 41 alone
TOTAL = 80
ROLLBACK_A = dict(
  step=43, rule="burst", restored=30, skipped_positions=[480, 752], skipped_examples=272, set_aside=["40.rolled_back"]
)
ROLLBACK_B = dict(
  step=63, rule="burst", restored=50, skipped_positions=[1072, 1344], skipped_examples=272, set_aside=["60.rolled_back"]
)


def write_colours(directory, poisoned=(), removed=()):
  """A train split of RECORDS noisy flat colours (minus `removed` indices), labels of `poisoned` ones shifted by
  4, and a validation split of 64."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 8, RECORDS)
  noise = np.random.default_rng(1)

  def examples(indices, poison):
    for i in indices:
      image = np.clip(COLOURS[labels[i]] + noise.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
      yield {"image": image, "label": int((labels[i] + 4) % 8 if i in poison else labels[i])}

  splits = {}
  removed = set(removed)
  for split, indices, poison in (
    ("train", [i for i in range(RECORDS) if i not in removed], set(poisoned)),
    ("validation", range(64), set()),
  ):
    name = records.shard_name(split, 0, 1)
    count = records.write_records(os.path.join(directory, name), examples(indices, poison))
    splits[split] = {"records": count, "shards": [name], "kind": "labelled"}
  records.write_metadata(directory, kind="classification", classes=[f"c{i}" for i in range(8)], splits=splits)
  return f"arrayrecord:{directory}/{{split}}-*.array_record"


def health_config(source, **overrides):
  config = tiny_vit_config(total_steps=TOTAL, log_every=1, eval_every=TOTAL, checkpoint_every=10)
  config.data.source, config.data.shuffle, config.data.num_workers, config.data.eval_examples = source, False, 0, 64
  config.optim.lr = 3e-3  # learns the colours within 30 steps: enough for poisoned labels to spike the loss
  config_lib.set_fields(
    config.health,
    enabled=True,
    window=16,
    warmup=16,
    z=6.0,
    burst_skips=3,
    burst_window=16,
    restore_before=5,
    skip_margin=4,
    max_rollbacks=2,
    max_rollbacks_window=1000,
  )
  return override(config, **overrides)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def train_rows(workdir):
  return [r for r in read_metrics(workdir) if "train/loss" in r]


def final_leaves(workdir, step=TOTAL):
  state = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return jax.tree.leaves({"params": state["params"], "opt_state": state["opt_state"], "health": state["health"]})


def saved_rollbacks(workdir, step=TOTAL):
  return json.loads((workdir / "checkpoints" / str(step) / "health" / "health.json").read_text())["rollbacks"]


def drop_loss(rollbacks):
  return [{k: v for k, v in r.items() if k != "loss"} for r in rollbacks]


# The end-to-end tests share the module's runs and compiled programs: one xdist worker runs them all.
END_TO_END = pytest.mark.xdist_group("health_end_to_end")


@pytest.fixture(scope="module")
def data(tmp_path_factory, compilation_cache):
  """The three data sets. Every run of the module trains the same tiny ViT, most of them the same 80-step
  config: with the compilation cache on, each program compiles once."""
  del compilation_cache
  root = tmp_path_factory.mktemp("health_data")
  poisoned = [*BURST_A, *BURST_B]
  return {
    "bursts": write_colours(root / "bursts", poisoned),
    "removed": write_colours(root / "removed", removed=poisoned),
    "spike": write_colours(root / "spike", SPIKE),
  }


@pytest.fixture(scope="module")
def bursts_run(data, tmp_path_factory):
  """The two-burst run, uninterrupted: (workdir, its log)."""
  workdir = tmp_path_factory.mktemp("bursts") / "run"
  handler = _Capture()
  logging.getLogger().addHandler(handler)
  try:
    train.run(health_config(data["bursts"], report_to=tracker_runs.REPORT_TO), str(workdir))
  finally:
    logging.getLogger().removeHandler(handler)
  return workdir, handler.text()


@pytest.fixture(scope="module")
def stopped_after_rollback_a(data, tmp_path_factory):
  """The two-burst run stopped by a SIGTERM at step 35, after rollback A: it saves step 36 and exits. (its
  workdir, read-only: copy it to change it; the run's last metrics)."""
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  with pytest.MonkeyPatch.context() as patch:
    stop_after_writing(patch, 35, times=2)  # the second time: after rollback A
    stopped = train.run(health_config(data["bursts"]), str(workdir))
  return workdir, stopped


@pytest.fixture(scope="module")
def clean_stopped_at_40(data, tmp_path_factory):
  """The run on the data without the poisoned records, stopped by a SIGTERM after step 39: it saves step 40 and
  exits. (its workdir, read-only: copy it to change it; the run's last metrics). The start of the diverging
  change."""
  workdir = tmp_path_factory.mktemp("clean") / "run"
  with pytest.MonkeyPatch.context() as patch:
    stop_after_writing(patch, 39)
    stopped = train.run(health_config(data["removed"]), str(workdir))
  return workdir, stopped


def copy_of(workdir, tmp_path, name="run"):
  shutil.copytree(workdir, tmp_path / name)
  return tmp_path / name


@pytest.fixture(scope="module")
def diverged_then_rerun(data, clean_stopped_at_40, tmp_path_factory):
  """`clean_stopped_at_40` resumed with a 300x learning rate, which stops, then rerun with the old settings to the
  end: (its workdir, the HealthError, the checkpoints and checkpoint 40's health record as the stop left them, the
  rerun's last metrics). The rerun is also the clean run the bursts' run is compared with."""
  workdir = copy_of(clean_stopped_at_40[0], tmp_path_factory.mktemp("diverged"))
  changed = health_config(data["removed"], **{"optim.lr": 0.9, "resume.allow_changes": "optim.lr"})
  with pytest.raises(health.HealthError) as stop:
    train.run(changed, str(workdir))
  checkpoints = workdir / "checkpoints"
  left = sorted(os.listdir(checkpoints)), json.loads((checkpoints / "40" / "health" / "health.json").read_text())
  return workdir, stop.value, left, train.run(health_config(data["removed"]), str(workdir))


class _Capture(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())

  def text(self):
    return "\n".join(self.lines)


# ------------------------------------------------------------------------------------------- the rule


def _state(**fields):
  cfg = ml_collections.ConfigDict(dict(window=4, z=6.0, warmup=4, burst_skips=3, burst_window=16, rise=0.0))
  cfg.update(fields)
  return health.HealthState.create(cfg, max_consecutive_skips=5)


# One jitted function for every case: a state of the same rule fields compiles once per `fp16`.
_observe = jax.jit(
  lambda s, step, loss, overflowed, stalled, fp16: s.observe(step, loss, 1.0, overflowed, stalled, fp16=fp16),
  static_argnames="fp16",
)


def _feed(state, losses, fp16=False, overflowed=False, stalled=False):
  applied = []
  for loss in losses:
    state, apply = _observe(
      state,
      state.count + state.skipped + 1,
      jnp.float32(loss),
      jnp.asarray(overflowed),
      jnp.asarray(stalled),
      fp16=fp16,
    )
    applied.append(bool(apply))
  return state, applied


def test_a_spike_after_warmup_is_not_applied_and_stays_out_of_the_window():
  state, applied = _feed(_state(), [1.0, 1.1, 0.9, 1.0, 9.0, 1.05])  # the 9.0: far above mean 1 + 6 x 0.07
  assert applied == [True, True, True, True, False, True]
  assert int(state.skipped) == 1 and int(state.count) == 5 and int(state.trigger) == 0
  np.testing.assert_allclose(state.losses, [1.05, 1.1, 0.9, 1.0])  # the ring: the spike never entered it
  _, applied = _feed(_state(), [1.0, 9.0])  # before warmup nothing is a spike
  assert applied == [True, True]


def test_a_burst_of_spikes_triggers_and_freezes_the_state():
  state, applied = _feed(_state(), [1.0, 1.1, 0.9, 1.0, 9.0, 9.0, 9.0, 1.0, 1.0])
  assert applied == [True] * 4 + [False] * 5  # frozen after the trigger until the loop acts
  assert health.RULES[int(state.trigger)] == "burst" and int(state.trigger_step) == 7
  assert float(state.trigger_loss) == 9.0 and int(state.skipped) == 5


def test_spikes_further_apart_than_the_burst_window_do_not_trigger():
  losses = [1.0, 1.1, 0.9, 1.0] + [9.0, 1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0] * 3
  state, _ = _feed(_state(burst_window=8), losses)
  assert int(state.skipped) == 3 and int(state.trigger) == 0


def test_a_slow_rise_of_the_loss_triggers():
  # Step k's window mean is 1 + 0.1 (k - 2.5): the lowest is step 4's 1.15, and step 10's 1.75 > 1.5 x 1.15.
  losses = [1.0 + 0.1 * i for i in range(12)]
  state, applied = _feed(_state(z=100.0, rise=1.5), losses)
  assert health.RULES[int(state.trigger)] == "rise" and int(state.trigger_step) == 10
  assert applied == [True] * 10 + [False] * 2  # step 10 itself applied: the rise shows in its own update


def test_non_finite_numbers_trigger_without_loss_scaling_and_are_overflows_with_it():
  state, applied = _feed(_state(), [1.0, float("nan")])
  assert applied == [True, False] and health.RULES[int(state.trigger)] == "nonfinite"
  state, applied = _feed(_state(), [float("inf")], fp16=True, overflowed=True)
  assert applied == [False] and int(state.trigger) == 0 and int(state.skipped) == 0  # the loss scale's skip
  state, _ = _feed(_state(), [float("inf")], fp16=True, overflowed=True, stalled=True)
  assert health.RULES[int(state.trigger)] == "stall"


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@END_TO_END
def test_health_turned_on_at_a_resume_starts_afresh_and_skips_a_poisoned_batch_keeping_the_optimizer_count(
  data, tmp_path, monkeypatch
):
  """Steps 1-4 without health (stopped by a SIGTERM after step 3), resumed with it to step 46 (stopped by a
  SIGTERM after step 45: the module's 80-step programs serve): its statistics start at the resume, and the one
  poisoned batch (step 41) is skipped, without a rollback."""
  config = health_config(data["spike"], **{"health.enabled": False})
  stop_after_writing(monkeypatch, 3)
  assert train.run(config, str(tmp_path))["step"] == 4
  monkeypatch.undo()
  stop_after_writing(monkeypatch, 45)
  last = train.run(health_config(data["spike"]), str(tmp_path))
  assert last["step"] == 46
  state = ocp.PyTreeCheckpointer().restore(tmp_path / "checkpoints" / "46" / "state")
  assert int(state["health"]["count"]) == 42 - 1  # the statistics of the steps applied since the resume

  rows = {r["step"]: r for r in train_rows(tmp_path)}
  assert "health/skipped_steps" not in rows[3] and rows[5]["health/skipped_steps"] == 0
  assert [rows[s]["health/skipped_steps"] for s in (40, 41, 46)] == [0, 1, 1]
  assert rows[41]["train/loss"] > rows[40]["train/loss"] + 0.5  # the spike
  assert rows[42]["train/lr"] == rows[41]["train/lr"]  # step 41 left the optimizer's count (and schedule) as it was
  assert rows[41]["train/lr"] != rows[40]["train/lr"]
  assert rows[46]["health/rollbacks"] == 0 and rows[46]["health/skipped_examples"] == 0


@pytest.mark.slow
@END_TO_END
def test_bursts_roll_back_past_the_poisoned_records_and_end_near_the_run_without_them(bursts_run, diverged_then_rerun):
  workdir, log = bursts_run
  lines = re.findall(r"health: rolling back at (.*)", log)
  assert lines == [
    f"step 43, loss {lines[0].split('loss ')[1].split(',')[0]}, rule burst (3 steps skipped as spikes within 16 "
    f"steps): restored {workdir / 'checkpoints'}/30, skipping data stream positions 480-751 (272 examples; "
    f"rollback 1)",
    f"step 63, loss {lines[1].split('loss ')[1].split(',')[0]}, rule burst (3 steps skipped as spikes within 16 "
    f"steps): restored {workdir / 'checkpoints'}/50, skipping data stream positions 1072-1343 (272 examples; "
    f"rollback 2)",
  ], log
  assert drop_loss(saved_rollbacks(workdir)) == [ROLLBACK_A, ROLLBACK_B]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["40.rolled_back", "60", "60.rolled_back", "70", "80"]
  noted = [(r["step"], r["health/set_aside"]) for r in read_metrics(workdir) if "health/set_aside" in r]
  aside = [str(workdir / "checkpoints" / name) for name in ("40.rolled_back", "60.rolled_back")]
  assert noted == [(30, aside[:1]), (50, aside)]  # everything moved aside so far, at the step restored
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))  # the rolled-back steps' rows are dropped
  # The trackers hold the final trajectory too: W&B rewound to the step before each restored checkpoint (whose
  # kept rows it was given again), MLflow's latest value of each step.
  tracker_runs.check_trackers(workdir, wandb_exit_codes=[0, 0, 0], rewinds=[29, 49])
  assert rows[-1]["health/rollbacks"] == 2 and rows[-1]["health/skipped_examples"] == 272 + 272
  assert rows[-1]["health/skipped_steps"] == 0  # no poisoned record was trained on after the rollbacks
  data_state = json.loads((workdir / "checkpoints" / str(TOTAL) / "data" / "process_0-of-1.json").read_text())
  assert data_state["read"] == TOTAL * BATCH  # records trained on; the skipped ones are not counted as read

  # The same run on the data with the poisoned records removed (resumed from its step 40, as bitwise as running
  # on, after the diverging change's stop): nothing skipped, and the same place within the stated tolerance (mean
  # training loss of the last 10 steps within 0.05, eval top-1 within 0.1).
  clean, _, _, last = diverged_then_rerun
  clean_rows = train_rows(clean)
  assert clean_rows[-1]["health/skipped_steps"] == 0 and clean_rows[-1]["health/rollbacks"] == 0
  tail = lambda rs: np.mean([r["train/loss"] for r in rs[-10:]])
  assert abs(tail(rows) - tail(clean_rows)) < 0.05, (tail(rows), tail(clean_rows))
  evals = [r["eval/val/top1"] for r in read_metrics(workdir) if "eval/val/top1" in r]
  assert abs(evals[-1] - last["eval/val/top1"]) <= 0.1, (evals, last["eval/val/top1"])


@pytest.mark.slow
@END_TO_END
def test_a_resume_after_a_rollback_ends_bitwise_as_the_uninterrupted_run(
  data, bursts_run, stopped_after_rollback_a, tmp_path
):
  """SIGTERM at step 35, after rollback A: the run saves step 36 and exits; the rerun resumes there, takes
  rollback B, and ends with the uninterrupted run's params, optimizer state and health state bitwise."""
  reference, _ = bursts_run
  stopped_dir, stopped = stopped_after_rollback_a
  assert stopped["step"] == 36
  assert drop_loss(saved_rollbacks(stopped_dir, 36)) == [ROLLBACK_A]

  workdir = copy_of(stopped_dir, tmp_path)
  train.run(health_config(data["bursts"]), str(workdir))
  for got, want in zip(final_leaves(workdir), final_leaves(reference)):
    np.testing.assert_array_equal(got, want)
  assert saved_rollbacks(workdir) == saved_rollbacks(reference)
  assert train_rows(workdir)[-1]["health/rollbacks"] == 2


@pytest.mark.slow
@END_TO_END
def test_one_rollback_too_many_stops_naming_the_steps_and_the_last_good_checkpoint(
  data, stopped_after_rollback_a, tmp_path
):
  """max_rollbacks 1 (health's fields may change at a resume): the run resumed after rollback A (whose record
  its checkpoint carries) stops at the second trigger instead of rolling back again."""
  workdir = copy_of(stopped_after_rollback_a[0], tmp_path)
  checkpoints = workdir / "checkpoints"
  config = health_config(data["bursts"], report_to=tracker_runs.REPORT_TO, **{"health.max_rollbacks": 1})
  with pytest.raises(
    health.HealthError,
    match=re.escape(
      f"2 rollbacks within 1000 steps (at steps 43, 63; config.health.max_rollbacks=1); stopping. The last good "
      f"checkpoint: {checkpoints}/50; lower config.optim.lr or check the data. Moved aside: "
      f"{checkpoints}/40.rolled_back; to resume from the newest of them instead: "
    ),
  ) as stop:
    train.run(config, str(workdir))
  # The trackers, added at this resume, hold the whole run (given metrics.jsonl's rows first) and end failed.
  tracker_runs.check_trackers(workdir, status="FAILED", wandb_exit_codes=[1])
  # Nothing good is hidden: the line the error gives brings checkpoint 40 (moved aside by rollback A) back as
  # the newest, the one the next launch resumes from.
  bring_back = str(stop.value).split("to resume from the newest of them instead: ")[1]
  subprocess.run(["bash", "-c", bring_back], check=True)
  assert sorted(os.listdir(checkpoints)) == ["40", "40.superseded", "50.superseded", "60.superseded"]
  assert checkpoint.newest_committed_step(checkpoints) == 40
  assert saved_rollbacks(workdir, 40) == []  # the first run's step 40, trained before any rollback


@pytest.mark.slow
@END_TO_END
def test_two_processes_take_the_same_rollbacks(data, bursts_run, tmp_path, warm_python):
  """launch/local.sh 2 (each process reads 8 rows of every batch of 16, on one device: the processes, not their
  devices, are what the rollbacks agree across): both processes log the same two rollbacks as the one-process run
  (steps, checkpoints, stream positions) and save the same record."""
  from test_multiprocess import PROCESSES, _Job  # pylint: disable=g-import-not-at-top

  reference, log = bursts_run
  config = health_config(data["bursts"])
  changed = (
    "model.variant",
    "model.image_size",
    "data.image_size",
    "data.source",
    "data.shuffle",
    "data.num_workers",
    "data.eval_examples",
    "global_batch_size",
    "total_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "optim.lr",
    "optim.warmup_steps",
    "progress_bar",
  )
  flags = ["--config=configs/vit_huge.py:demo"] + [
    f"--config.{path}={value}"
    for path, value in config_lib.fields(config)
    if path in changed or path.startswith("health.")
  ]
  workdir = tmp_path / "run"
  code, out = _Job(workdir, *flags, base=(), devices=1, warm=warm_python).finish()
  assert code == 0, out[-6000:]

  def rollbacks_logged(text, where):
    return [
      re.sub(r", loss [^,]+", "", line).replace(str(where), "WORKDIR")
      for line in re.findall(r"health: rolling back at (.*)", text)
    ]

  assert len(rollbacks_logged(log, reference)) == 2
  assert sorted(rollbacks_logged(out, workdir)) == sorted(rollbacks_logged(log, reference) * PROCESSES), out[-6000:]
  assert drop_loss(saved_rollbacks(workdir)) == [ROLLBACK_A, ROLLBACK_B]
  for i in range(PROCESSES):
    state = json.loads((workdir / "checkpoints" / str(TOTAL) / "data" / f"process_{i}-of-2.json").read_text())
    assert state["read"] == TOTAL * BATCH // PROCESSES


@pytest.mark.slow
@END_TO_END
def test_a_diverging_change_at_a_resume_stops_naming_it_and_keeps_the_checkpoint_before_it(
  clean_stopped_at_40, diverged_then_rerun
):
  """Clean data to step 40 (a SIGTERM after step 39 saves 40), resumed with a 300x learning rate: the run does
  not roll back past checkpoint 40 (trained before the change) and, the trigger repeating from there, stops
  within one window naming the change; a plain rerun resumes from 40 and ends as the run never changed."""
  assert clean_stopped_at_40[1]["step"] == 40
  workdir, stop, (left, record), last = diverged_then_rerun
  checkpoints = workdir / "checkpoints"
  message = str(stop)
  step = int(re.match(r"health: step (\d+),", message).group(1))
  assert 40 < step <= 40 + health_config("unused").health.window, message
  assert (
    f"within 16 steps of the resume from {checkpoints}/40 that changed config.optim.lr 0.003 -> 0.9, after a "
    f"rollback to it: the likely cause is that change, not the data; stopping. {checkpoints}/40 was trained "
    f"before it: resume from it with the old settings"
  ) in message
  assert left == ["20", "30", "40"]  # nothing trained before the change moved aside
  assert record["environment"] == health.environment() and record["changes"] == []
  assert last["step"] == TOTAL and last["health/rollbacks"] == 0  # the plain rerun


def test_a_change_keeps_rollbacks_from_going_past_its_resume_and_a_repeat_in_its_window_stops():
  config = health_config("unused", **{"health.max_rollbacks": 10})
  saved = {"environment": {**health.environment(), "processes": 4}, "rollbacks": []}
  rollbacks = health.Rollbacks(config, saved, start_step=40, changes=["config.optim.lr 0.003 -> 0.9"])
  assert rollbacks.changes == [
    {"step": 40, "what": ["config.optim.lr 0.003 -> 0.9", f"processes 4 -> {jax.process_count()}"]}
  ]
  trigger = lambda step: health.Trigger(step, "burst", 9.0)
  steps = [20, 30, 40, 50, 60]
  assert rollbacks.restore_step(trigger(43), steps, "ck") == 40  # within restore_before of it: the resume itself
  assert rollbacks.restore_step(trigger(80), steps, "ck") == 60
  rollbacks.history.append({"step": 90, "restored": 70, "skipped_examples": 0, "set_aside": []})
  assert rollbacks.restore_step(trigger(45), [20, 30, 40], "ck") == 40  # a rollback past the window: no repeat
  rollbacks.history.append({"step": 43, "restored": 40, "skipped_examples": 0, "set_aside": ["50.rolled_back"]})
  with pytest.raises(
    health.ChangeError,
    match="within 16 steps of the resume from ck/40 that changed "
    f"config.optim.lr 0.003 -> 0.9; processes 4 -> {jax.process_count()}",
  ):
    rollbacks.restore_step(trigger(50), [20, 30, 40], "ck")
  assert rollbacks.restore_step(trigger(90), [20, 30, 40, 70], "ck") == 70  # past its window: data again
  assert rollbacks.restore_step(trigger(90), [20, 30, 40, 88], "ck") == 40  # ... but never past the change
  with pytest.raises(health.HealthError, match="not before step 40"):
    rollbacks.restore_step(trigger(90), [20, 30, 88], "ck")  # never past the change, whatever the window
  unchanged = health.Rollbacks(config, {"environment": health.environment()}, start_step=40)
  assert unchanged.changes == [] and unchanged.restore_step(trigger(43), steps, "ck") == 30
