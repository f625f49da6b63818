"""Where a run's scalars go besides `metrics.jsonl` (`config.report_to`): TensorBoard event files, Weights & Biases,
MLflow. Each is a sink of `metrics.MetricWriter` with its verbs: `scalars`, `panel`, `rewind` (the
steps after one are trained again: a resume from an earlier checkpoint, a health rollback) and `close`. Process 0
writes.

One tracker run per workdir: the trackers' run ids are kept in `<workdir>/trackers.json`, so a resumed, requeued
or rolled-back run continues the same tracker run. After a rewind to step s, each tracker's history holds every
step of the final trajectory once, with `metrics.jsonl`'s values:
- TensorBoard: an event that restarts the session at s + 1 (TensorBoard then drops the older events of later steps).
- W&B: its run rewind, `wandb.init(resume_from="<id>?_step=<s - 1>")` (the history after that step is truncated,
  the run id stays), then step s's kept row again and what follows. A process killed outright loses what W&B had
  not yet written, so after one the run is rewound to its start and given all of metrics.jsonl's kept rows again.
  Offline, a rewind is recorded in the run's transaction log and `wandb sync` applies it. Rewind is a W&B preview
  feature: where the server refuses it, the run is resumed instead and the steps W&B already holds are not sent
  again (a warning says their W&B values are the abandoned trajectory's).
- MLflow: it keeps every value it is sent. Timestamps only increase, so the latest value of each step (what MLflow
  shows, and `get_metric_history`'s last of the step) is the final trajectory's.
A W&B or MLflow call that fails (a lost server) warns once and drops that tracker: metrics.jsonl stays the record.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import secrets
import string
import time
from typing import Sequence

from absl import logging
import numpy as np

from visionfm_jax import atomic, config_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.training.infra import tensorboard

IDS_FILE = "trackers.json"
# The modules each tracker imports; the extra of the same name installs them.
NEEDS = {"wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}


def check_installed(config) -> None:
  """ConfigError naming the extra to install when config.report_to names a tracker that is not installed."""
  for name in config_lib.report_to(config):
    missing = [module for module in NEEDS.get(name, ()) if importlib.util.find_spec(module) is None]
    if missing:
      raise ConfigError(
        f"config.report_to={config.report_to!r}: {name} is not installed (no module "
        f"{missing[0]!r}): pip install -e '.[{name}]'"
      )


PANEL = "panel"  # the trackers' name of the panels (evaluate/panels.py)


@dataclasses.dataclass(frozen=True)
class Picture:
  """A panel: its HxWx3 uint8 array, PNG bytes and file (`<workdir>/panels/step_<N>.png`)."""

  array: np.ndarray
  png: bytes
  path: str


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a run's metrics begin: at `step` (0, or the checkpoint it resumed from), with metrics.jsonl's `kept` rows
  and the `panels` ((step, PNG file)) of steps <= step; `dropped`: rows of later steps were dropped (those steps
  are trained again)."""

  step: int = 0
  kept: tuple = ()
  panels: tuple = ()
  dropped: bool = False


def open_sinks(config, workdir: str, start: Start) -> list:
  """The sinks of `config.report_to` (TensorBoard alone when `config` is None). One that cannot start warns and
  is left out."""
  names = config_lib.report_to(config) if config is not None else ("tensorboard",)
  ids = RunIds(os.path.join(workdir, IDS_FILE))
  sinks = []
  for name in names:
    try:
      sinks.append(_SINKS[name](config, workdir, start, ids))
    except OSError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.warning(
        "%s could not start (%s: %s): no metrics go to it this run; metrics.jsonl has them all",
        name,
        type(e).__name__,
        e,
      )
  return sinks


class RunIds:
  """`<workdir>/trackers.json`: {tracker: {its run id, ...}}, rewritten whole at each change."""

  def __init__(self, path: str):
    self._path = path
    try:
      with open(path, encoding="utf-8") as f:
        self._ids = json.load(f)
    except FileNotFoundError:
      self._ids = {}
    except ValueError as e:
      raise ConfigError(
        f"{path} is not JSON ({e}): it keeps the tracker run ids of this workdir; delete it to start new tracker runs"
      ) from e

  def get(self, name: str) -> dict:
    return dict(self._ids.get(name, {}))

  def set(self, name: str, entry: dict) -> None:
    self._ids[name] = entry
    atomic.write_json(self._path, self._ids, indent=2)


class TensorBoardSink:
  """`<workdir>/tensorboard/` event files. Its faults are the workdir's storage faults."""

  name = "tensorboard"
  in_workdir = True

  def __init__(self, config, workdir, start: Start, ids):
    del config, ids
    self._events = tensorboard.EventFile(os.path.join(workdir, "tensorboard"))
    if start.step:
      self._events.restart(start.step + 1)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._events.scalars(step, values)

  def panel(self, step: int, picture: Picture) -> None:
    height, width = picture.array.shape[:2]
    self._events.image(step, PANEL, height, width, picture.png)

  def rewind(self, step: int, kept_rows: list[dict], kept_panels: list) -> None:
    del kept_rows, kept_panels
    self._events.restart(step + 1)

  def close(self, final: dict | None) -> None:
    del final
    self._events.close()


class WandbSink:
  """A W&B run: project, entity, name and tags from `config.wandb` unless the WANDB_* variables set them; the run's
  whole config as its config; its files under `<workdir>/wandb/` (WANDB_DIR elsewhere); console capture off (the
  run's console is its own).

  A process killed outright (SIGKILL, a lost node) takes with it what W&B had not yet written. trackers.json says
  whether the last process closed its run: when it did not, the resumed run is rewound to its start and given
  metrics.jsonl's kept rows and panels again. A W&B run that starts at a resume (W&B added to a run) is given
  them too."""

  name = "wandb"
  in_workdir = False

  def __init__(self, config, workdir, start: Start, ids: RunIds):
    import wandb  # pylint: disable=g-import-not-at-top

    self._wandb = wandb
    self._ids = ids
    saved = ids.get("wandb")
    self._id = saved.get("id") or os.environ.get("WANDB_RUN_ID") or _new_run_id()
    self._init_kwargs = dict(
      config=config.to_dict(), dir=os.environ.get("WANDB_DIR") or workdir, **_unless_set_in_env(config, workdir)
    )
    self._sent_through = 0  # the last step sent by this process
    self._skip_through = 0  # steps W&B holds from an abandoned trajectory, where it refused to rewind
    ids.set("wandb", {"id": self._id, "closed": False})
    if saved and not saved.get("closed"):
      self._rewind_to(0, start.kept, start.panels, last_sent=None)
    elif saved and start.dropped:
      self._rewind_to(
        start.step,
        [row for row in start.kept if row["step"] == start.step],
        [panel for panel in start.panels if panel[0] == start.step],
        last_sent=None,
      )
    else:
      self._run = self._init(id=self._id, resume="allow" if saved else None)
      if not saved:  # a tracker added at a resume: it gets the run's history so far
        self._send_again(start.kept, start.panels)
    where = self._run.url if not self._run.offline else os.path.dirname(self._run.dir)
    logging.info("W&B run %s: %s", self._id, where)

  def _init(self, **how):
    """wandb.init with fresh settings (wandb.init writes how it resumed into the settings it is given)."""
    return self._wandb.init(**self._init_kwargs, **how, settings=self._wandb.Settings(silent=True, console="off"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if step > self._skip_through:
      self._run.log(values, step=step)
      self._sent_through = max(self._sent_through, step)

  def panel(self, step: int, picture: Picture) -> None:
    self._image(step, picture.array)

  def _image(self, step: int, image) -> None:
    if step > self._skip_through:
      self._run.log({PANEL: self._wandb.Image(image)}, step=step)

  def rewind(self, step: int, kept_rows: list[dict], kept_panels: list) -> None:
    self._run.finish(exit_code=0)
    self._rewind_to(step, kept_rows, kept_panels, last_sent=self._sent_through)

  def _rewind_to(self, step: int, rows: Sequence[dict], panels: Sequence, last_sent: int | None) -> None:
    """Truncates the W&B history after step - 1 and sends `rows` (metrics.jsonl's, of steps >= step) and `panels`
    ((step, PNG file)) again; a later write at `step` joins them (W&B takes no step below its last)."""
    try:
      self._run = self._init(resume_from=f"{self._id}?_step={max(step - 1, 0)}")
    except Exception as e:  # pylint: disable=broad-except
      logging.warning(
        "W&B did not rewind run %s to step %d (%s): W&B's run rewind is a preview feature that the "
        "server must allow. The run continues; the W&B values of the steps after %d that it already "
        "holds are the abandoned trajectory's (metrics.jsonl holds the final ones)",
        self._id,
        step,
        e,
        step,
      )
      self._run = self._init(id=self._id, resume="allow")
      self._skip_through = max(self._run.starting_step - 1, last_sent or 0, step)
    self._send_again(rows, panels)

  def _send_again(self, rows: Sequence[dict], panels: Sequence) -> None:
    """metrics.jsonl's `rows` and the `panels` ((step, PNG file)), in step order."""
    by_step: collections.defaultdict[int, tuple[list[dict[str, float]], list[str]]] = collections.defaultdict(
      lambda: ([], [])
    )
    for row in rows:
      by_step[row["step"]][0].append(_scalars_of(row))
    for at, path in panels:
      by_step[at][1].append(path)
    for at in sorted(by_step):
      for values in by_step[at][0]:
        self.scalars(at, values)
      for path in by_step[at][1]:
        self._image(at, path)

  def close(self, final: dict | None) -> None:
    if final is not None:
      self._run.summary.update(final)
    self._run.finish(exit_code=0 if final is not None else 1)
    self._ids.set("wandb", {"id": self._id, "closed": True})


def _unless_set_in_env(config, workdir: str) -> dict:
  """wandb.init's project, entity, name and tags from config.wandb, each only when its WANDB_* variable is unset
  (W&B reads those itself, and they win)."""
  fields = {
    "project": ("WANDB_PROJECT", config.wandb.project),
    "entity": ("WANDB_ENTITY", config.wandb.entity),
    "name": ("WANDB_NAME", config.wandb.name or os.path.basename(os.path.normpath(workdir))),
    "tags": ("WANDB_TAGS", list(config.wandb.tags)),
  }
  return {key: value for key, (env, value) in fields.items() if value and env not in os.environ}


class MlflowSink:
  """An MLflow run in config.mlflow.experiment: tracking URI from MLFLOW_TRACKING_URI, else
  `sqlite:///<workdir>/mlflow.db` (artifacts under `<workdir>/mlflow_artifacts/`); the run's config as params
  (dotted names); config.json and the final metrics (summary.json) as artifacts; FINISHED or FAILED at the end. A
  run that starts at a resume (MLflow added to a run) is given metrics.jsonl's kept rows and the panels first."""

  name = "mlflow"
  in_workdir = False

  def __init__(self, config, workdir, start: Start, ids: RunIds):
    from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top

    workdir = os.path.abspath(workdir)
    self._workdir = workdir
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    self._client = MlflowClient(tracking_uri=uri)
    saved = ids.get("mlflow")
    run_id = saved.get("run_id") if saved.get("tracking_uri") == uri else None
    new = run_id is None
    if run_id is None:
      run_id = self._client.create_run(
        self._experiment(config.mlflow.experiment), run_name=os.path.basename(os.path.normpath(workdir))
      ).info.run_id
    else:
      self._client.update_run(run_id, status="RUNNING")
    ids.set("mlflow", {"run_id": run_id, "tracking_uri": uri})
    self._run_id = run_id
    self._last_ms = 0  # MLflow keeps every value: those of the steps trained again are logged later
    self._log_params(config, start.step)
    if new:  # a tracker added at a resume: it gets the run's history so far
      self._log_metrics([(row["step"], _scalars_of(row)) for row in start.kept])
      for _, path in start.panels:
        self._client.log_artifact(run_id, path, "panels")
    config_json = os.path.join(workdir, "config.json")
    if os.path.exists(config_json):
      self._client.log_artifact(run_id, config_json)
    logging.info("MLflow run %s in %s", run_id, uri)

  def _experiment(self, name: str) -> str:
    """The experiment's id, created if new (with the workdir's store: its artifacts in the workdir)."""
    found = self._client.get_experiment_by_name(name)
    if found is not None:
      return found.experiment_id
    artifacts = None if "MLFLOW_TRACKING_URI" in os.environ else os.path.join(self._workdir, "mlflow_artifacts")
    return self._client.create_experiment(name, artifact_location=artifacts)

  def _log_params(self, config, resume_step: int) -> None:
    """The config's fields as params (MLflow's length and batch limits). MLflow refuses to change a param: a field
    that a resume at step s changed is logged as `<field> from step <s>` beside its first value."""
    from mlflow.entities import Param  # pylint: disable=g-import-not-at-top
    from mlflow.utils import validation  # pylint: disable=g-import-not-at-top

    logged = self._client.get_run(self._run_id).data.params
    params = []
    for path, value in config_lib.fields(config):
      text = json.dumps(value) if isinstance(value, (tuple, list)) else str(value)
      text = text[: validation.MAX_PARAM_VAL_LENGTH]
      if path in logged and logged[path] != text:
        path = f"{path} from step {resume_step}"
      if logged.get(path) != text:
        params.append(Param(path, text))
    for start in range(0, len(params), validation.MAX_PARAMS_TAGS_PER_BATCH):
      self._client.log_batch(self._run_id, params=params[start : start + validation.MAX_PARAMS_TAGS_PER_BATCH])

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._log_metrics([(step, values)])

  def _log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
    """Each row's values at its step, a later timestamp for each row, in batches of MLflow's limit."""
    from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top
    from mlflow.utils import validation  # pylint: disable=g-import-not-at-top

    metrics = []
    for step, values in rows:
      self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
      metrics += [Metric(key, value, self._last_ms, step) for key, value in values.items()]
    for start in range(0, len(metrics), validation.MAX_METRICS_PER_BATCH):
      self._client.log_batch(self._run_id, metrics=metrics[start : start + validation.MAX_METRICS_PER_BATCH])

  def panel(self, step: int, picture: Picture) -> None:
    del step
    self._client.log_artifact(self._run_id, picture.path, "panels")  # step_<N>.png: a step trained again replaces it

  def rewind(self, step: int, kept_rows: list[dict], kept_panels: list) -> None:
    del step, kept_rows, kept_panels

  def close(self, final: dict | None) -> None:
    if final is not None:
      self._client.log_dict(self._run_id, final, "summary.json")
    self._client.set_terminated(self._run_id, "FINISHED" if final is not None else "FAILED")


def _new_run_id() -> str:
  """Eight lowercase letters and digits, as W&B's own run ids."""
  return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _scalars_of(row: dict) -> dict[str, float]:
  return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


_SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}
