"""Reading a workdir's tracker runs back with the trackers' own libraries, to compare with its metrics.jsonl.

W&B: an offline run is a folder `wandb/offline-run-<time>-<id>[-n]/` per process (and per rewind) holding
`run-<id>.wandb`, a transaction log that `wandb sync` uploads. No public reader of it ships, so `wandb_runs` reads
its framing (LevelDB's log format: 32 KiB blocks of records, each a 7-byte header of CRC-32C, length and kind
full/first/middle/last, after a 7-byte file header ':W&B', 0xBEE1, version 0) and parses each record with W&B's
own protobuf class, `wandb.proto.wandb_internal_pb2.Record`. The segments of one run id apply in their start
order, each rewind (a run record with a branch point) truncating the history after its step, as W&B does.
MLflow: `MlflowClient().get_metric_history`, the latest value of each step by timestamp.
"""

from __future__ import annotations

import collections
import glob
import importlib.util
import json
import os
import struct
import sys

from visionfm_jax.training.infra import trackers

# The trackers this machine has (the README's test command installs both; a GPU image may have neither), and
# config.report_to for every tracker it has.
INSTALLED = tuple(
  name for name in ("wandb", "mlflow") if all(importlib.util.find_spec(module) for module in trackers.NEEDS[name])
)
REPORT_TO = ",".join(("tensorboard", *INSTALLED))

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def jsonl_scalars(workdir) -> dict[int, dict[str, float]]:
  """{step: {key: value}} of metrics.jsonl, a later row's value of a key at a step replacing an earlier one."""
  steps = collections.defaultdict(dict)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
      if scalars:  # not a note of values the trackers do not take (the checkpoints a rollback moved aside)
        steps[row["step"]].update(scalars)
  return dict(steps)


def wandb_records(path: str):
  """The `Record`s of one W&B transaction log."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top

  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), path
  pos, pending = _HEADER, b""
  while pos + _HEADER <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < _HEADER:  # a block's tail too short for a header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
    pos += _HEADER
    if kind == 0:  # zeros: the rest of the block is padding
      pos += left - _HEADER
      continue
    pending += data[pos : pos + length]
    pos += length
    if kind in (_FULL, _LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      yield record
      pending = b""


def wandb_runs(workdir) -> dict[str, dict]:
  """{run id: {"history": {step: {key: value}}, "images": {(step, key): W&B's record of a logged image},
  "exit_codes": [one per segment that ended], "summary": {...}, "segments": n, "rewinds": [step, ...]}} of the
  offline W&B runs under `<workdir>/wandb/`. W&B's service writes a run's log as it closes the run's stream, which
  `finish` does not wait for (a log read just after it can still be empty): this process's W&B is torn down first,
  as it is at exit."""
  if "wandb" in sys.modules:
    sys.modules["wandb"].teardown()
  segments = []
  for path in glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb")):
    records = list(wandb_records(path))
    run = next((r.run for r in records if r.WhichOneof("record_type") == "run"), None)
    if run is None:  # a process killed before W&B wrote anything of its run
      continue
    segments.append(((run.start_time.seconds, run.start_time.nanos, path), run, records))
  runs = {}
  for _, run, records in sorted(segments, key=lambda s: s[0]):
    out = runs.setdefault(
      run.run_id, {"history": {}, "images": {}, "exit_codes": [], "summary": {}, "segments": 0, "rewinds": []}
    )
    out["segments"] += 1
    if run.branch_point.run:
      assert run.branch_point.run == run.run_id and run.branch_point.metric == "_step", run.branch_point
      cut = run.branch_point.value
      out["history"] = {step: row for step, row in out["history"].items() if step <= cut}
      out["images"] = {key: image for key, image in out["images"].items() if key[0] <= cut}
      out["rewinds"].append(int(cut))
    for record in records:
      kind = record.WhichOneof("record_type")
      if kind == "history":
        row = _nested(
          {tuple(item.nested_key) or (item.key,): json.loads(item.value_json) for item in record.history.item}
        )
        step = row.pop("_step")
        out["history"].setdefault(step, {}).update(
          {k: v for k, v in row.items() if not k.startswith("_") and isinstance(v, (int, float))}
        )
        out["images"].update({(step, k): v for k, v in row.items() if isinstance(v, dict) and v.get("_type")})
      elif kind == "summary":
        out["summary"].update(
          {_key(item): json.loads(item.value_json) for item in record.summary.update if not _key(item).startswith("_")}
        )
      elif kind == "exit":
        out["exit_codes"].append(record.exit.exit_code)
  return runs


def _nested(items: dict[tuple, object]) -> dict:
  """W&B's flattened keys (('panel', 'width'): 5) as nested dicts ({'panel': {'width': 5}})."""
  out = {}
  for path, value in items.items():
    node = out
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return out


def _key(item) -> str:
  return item.key or "/".join(item.nested_key)


def mlflow_runs(workdir, tracking_uri: str | None = None) -> dict[str, dict]:
  """{run id: {"status": ..., "history": {step: {key: latest value}}, "params": {...}, "artifacts": [...]}} of
  every run in every experiment of the workdir's MLflow store (sqlite:///<workdir>/mlflow.db unless given)."""
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top

  client = MlflowClient(tracking_uri or f"sqlite:///{os.path.join(os.path.abspath(workdir), 'mlflow.db')}")
  runs = {}
  for experiment in client.search_experiments():
    for run in client.search_runs([experiment.experiment_id]):
      history = collections.defaultdict(dict)
      for key in run.data.metrics:
        latest = {}
        for metric in client.get_metric_history(run.info.run_id, key):
          if metric.step not in latest or metric.timestamp > latest[metric.step].timestamp:
            latest[metric.step] = metric
          else:
            assert metric.timestamp != latest[metric.step].timestamp, (key, metric.step)  # no tie to break
        for step, metric in latest.items():
          history[step][key] = metric.value
      runs[run.info.run_id] = {
        "status": run.info.status,
        "history": dict(history),
        "params": run.data.params,
        "artifacts": [a.path for a in client.list_artifacts(run.info.run_id)],
        "experiment": experiment.name,
      }
  return runs


def check_trackers(workdir, *, status: str = "FINISHED", wandb_exit_codes=None, rewinds=None) -> None:
  """The installed trackers hold metrics.jsonl's values: one W&B run (with these exit codes and rewinds, when
  given) and one MLflow run, ended with `status`."""
  want = jsonl_scalars(workdir)
  if "wandb" in INSTALLED:
    (run,) = wandb_runs(workdir).values()
    assert run["history"] == want
    assert wandb_exit_codes is None or run["exit_codes"] == wandb_exit_codes, run["exit_codes"]
    assert rewinds is None or run["rewinds"] == rewinds, run["rewinds"]
  if "mlflow" in INSTALLED:
    (run,) = mlflow_runs(workdir).values()
    assert run["status"] == status and run["history"] == want, run["status"]
