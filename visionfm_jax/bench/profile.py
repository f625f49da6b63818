"""Where a train step's time goes: a profiler trace of a few steps and a table of the busiest operations.

`python -m visionfm_jax.bench --config=... --profile=DIR` runs `--profile_steps` more steps under
`jax.profiler.trace(DIR)` (TensorBoard / XProf / Perfetto read DIR as it is) and summarises the Perfetto trace
it writes: per timeline of the devices (on a GPU: the XLA ops line, the modules line, each stream's kernels;
on a CPU, where the host threads run the ops: XLA's client threads), the total time of each operation name,
largest first, as a share of the timeline's busy time. Times are self times: an event that encloses others on
its timeline (an executor's wrapper around the ops) counts only the time its children do not cover, so
nothing counts twice and the shares add up to the busy time. Operation names are XLA's (`fusion.12`,
`custom-call.3`, kernel names); `kind` is the name without its number, so that the many `loop_fusion`s of a
scanned layer add up. The interpreter's own threads (Python, the profiler) are left out.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

import jax

HOST_THREADS = re.compile(r"^(python|pythonw?|tf_XLAEigen.*)$")  # not the step's operations
TOP = 15
NAME_WIDTH = 120  # printed kinds are cut here: a GPU stream's kernel names run to hundreds of characters


def trace_steps(run_step, steps: int, log_dir: str) -> str:
  """Runs `run_step()` `steps` times under the profiler; returns the Perfetto trace file it wrote."""
  os.makedirs(log_dir, exist_ok=True)
  before = set(_traces(log_dir))
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(steps):
      run_step()
  new = sorted(set(_traces(log_dir)) - before)
  if not new:
    raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {log_dir}")
  return new[-1]


def _traces(log_dir: str) -> list[str]:
  return glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))


def op_kind(name: str) -> str:
  """'loop_fusion.123' -> 'loop_fusion' (and the CPU runtime's 'end: loop_fusion.123' tail with it); kernel
  names stay as they are."""
  return re.sub(r"[.:]\d+$", "", name.removeprefix("end: "))


def self_times(events: list[dict]) -> list[tuple[str, float]]:
  """(name, self time) of the events of one timeline: its duration less that of the events directly inside it
  (sorted by start, longer first on ties; an event inside another starts before the other ends)."""
  ordered = sorted(events, key=lambda e: (float(e["ts"]), -float(e["dur"])))
  own = [float(e["dur"]) for e in ordered]
  stack = []  # indices of the enclosing events
  for i, e in enumerate(ordered):
    start = float(e["ts"])
    while stack and float(ordered[stack[-1]]["ts"]) + float(ordered[stack[-1]]["dur"]) <= start:
      stack.pop()
    if stack:
      own[stack[-1]] -= float(e["dur"])
    stack.append(i)
  return [(e["name"], max(t, 0.0)) for e, t in zip(ordered, own)]


def summarize(trace_path: str, top: int = TOP) -> list[dict]:
  """Per timeline (device processes' threads; on a CPU, the XLA client threads): its name, busy microseconds,
  and the `top` operation kinds by total duration with their share of the busy time and event counts."""
  with gzip.open(trace_path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  by_timeline = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
    if devices and e["pid"] not in devices:
      continue
    if not devices and HOST_THREADS.match(thread):
      continue
    by_timeline[(processes.get(e["pid"], str(e["pid"])), thread)].append(e)
  totals = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
  for timeline, timeline_events in by_timeline.items():
    for name, seconds in self_times(timeline_events):
      entry = totals[timeline][op_kind(name)]
      entry[0] += seconds
      entry[1] += 1
  out = []
  for (process, thread), kinds in totals.items():
    busy = sum(t for t, _ in kinds.values())
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1][0])[:top]
    out.append(
      {
        "timeline": f"{process} {thread}",
        "busy_us": busy,
        "ops": [{"kind": k, "us": t, "share": t / busy if busy else 0.0, "count": n} for k, (t, n) in ranked],
      }
    )
  return sorted(out, key=lambda timeline: -timeline["busy_us"])


def add_step_shares(timelines: list[dict], steps: int, step_s: float) -> list[dict]:
  """Sets each timeline's `busy_share_of_step`: its busy time per traced step over the (untraced) median step
  time. Well below 1 on the GPU's stream, the device waits between kernels (launches, host, synchronisation);
  near 1, the time is in the kernels themselves, and the ranking says which."""
  for timeline in timelines:
    timeline["busy_share_of_step"] = timeline["busy_us"] / steps / 1e6 / step_s
  return timelines


def print_summary(timelines: list[dict], steps: int) -> None:
  for timeline in timelines:
    share = timeline.get("busy_share_of_step")
    of_step = f" ({share:.0%} of the step)" if share is not None else ""
    print(f"{timeline['timeline']}: {timeline['busy_us'] / steps / 1e3:.1f} ms busy per step{of_step}")
    for op in timeline["ops"]:
      kind = op["kind"] if len(op["kind"]) <= NAME_WIDTH else op["kind"][: NAME_WIDTH - 3] + "..."
      print(f"  {op['share']:6.1%} {op['us'] / steps / 1e3:9.2f} ms/step {op['count'] // steps:6d} x  {kind}")
