r"""Soak benchmark of the training input pipeline at the seeds' shard counts: what a data-reading process holds
(open descriptors, memory, threads, child processes, /dev/shm entries) and how fast it reads, over thousands of
steps, with a verdict on each.

  python -m visionfm_jax.bench.soak --preset=laion|imagenet21k|aurora [--steps=2000] [--batch_size=256]
      [--every=100] [--warmup=N] [--num_workers=N] [--data_dir=/tmp/visionfm_soak] [--shards=N]
      [--records_per_shard=2] [--config=FILE] [--config.<field>=...]

A preset names a seed's config and its training data as shard counts (`PRESETS`):

  laion        configs/swinv2_g_clip.py: LAION's ~232,000 shards of pairs (one per img2dataset tar)
  imagenet21k  configs/vit_huge.py: ImageNet-21K fall11 as prepared, 14,088 shards of labelled images
  aurora       configs/aurora_xl.py: its config.data.mixture, LAION's shards (shared with `laion`) with COCO's,
               Visual Genome's and 500,000 shards of uncaptioned images, at the config's weights

`--shards=N` replaces a preset's count (a mixture's entries are scaled to N in all, at least one shard each).
The shards are synthetic and tiny: `--records_per_shard` records of a 16x16 JPEG each, written once under
`--data_dir` (one folder per source and layout, reused when its dataset.json says it is complete). Each shard is a
hard link to one of TEMPLATES distinct ArrayRecord files (an ArrayRecord file takes 128 KiB whatever it holds;
232,000 links take seconds and no space), so every shard name is a file of its own to open; `--nolinks` writes
every shard as its own file instead (128 KiB each).

The pipeline is the training loop's: the config's task builds its train loader (`Task.train_loader`: globally
shuffled, augmented, tokenised, with the config's workers: config.data.num_workers=-1 resolves as a launch does,
`pipeline.worker_count`; `--num_workers` overrides), and any config field is overridable (say
`--config.data.image_size=64`). The soak draws `--steps` batches of `--batch_size` and samples after the first
batch, every `--every` steps and after the last, from /proc (no other dependency):

  descriptors   entries of /proc/PID/fd
  RSS MB        VmRSS of /proc/PID/status
  threads       Threads of /proc/PID/status
  processes     the main process's descendants (grain's workers, multiprocessing's resource tracker)
  /dev/shm      entries in /dev/shm that the processes hold (open or mapped) at the sample or held at an earlier
                one and that still exist: a segment that passed through them and was never unlinked stays
                counted (the machine's count, which other jobs move, is in the JSON line)
  records/s     records drawn over the interval since the previous sample

descriptors, RSS and threads for the main process and summed over its descendants (the JSON line has every
process). The samples of the first `--warmup` steps (default a tenth of --steps; the reading caches fill) are
shown but not judged. After them each quantity's least-squares line is its slope per 1000 steps; a quantity grows
when the line's rise over the judged steps exceeds its tolerance (`TOLERANCES`): descriptors 32 per process,
threads 4 per process, processes 0.5, /dev/shm 16 entries, RSS 16 MB per process or 4 MB per process per 1000
steps, whichever is more. Throughput falls when the rate of the last `--window_s` seconds (default a minute; a
third of the judged time in a shorter run) is below the first's by more than `--throughput_tolerance` (10%), and
so are its records per CPU second of the process tree: other jobs' load on a shared machine moves the wall-clock
rate alone (the table's last column is the machine's load average).

Prints a table over time, one verdict line per quantity and, last, one JSON object with every figure. Exit status
0 when every quantity is flat; 1, after one `error:` line naming what grew (or the pipeline's failure, say
"Too many open files"), when one grows or the pipeline fails; 2 for bad input.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import sys
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources import records
from visionfm_jax.errors import ConfigError, UserError
from visionfm_jax.tools import cli

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TEMPLATES = 64  # distinct shard files the shards link to
IMAGE_SIDE = 16  # px of the records' JPEGs
SHARD_BYTES = 128 << 10  # an ArrayRecord file's size, however few records it holds (riegeli's 64 KiB blocks)
SPLIT = "train"
DATASET_KINDS = {"pairs": "pairs", "labelled": "classification", "images": "images"}  # split kind -> dataset kind


@dataclasses.dataclass(frozen=True)
class SourceLayout:
  """One synthetic source: `name` (its folder), what its records hold (records.write_metadata's split kinds:
  pairs, labelled, images) and its shard count; `classes` for labelled records."""
  name: str
  kind: str
  shards: int
  classes: int = 0


@dataclasses.dataclass(frozen=True)
class Preset:
  """A seed's config and its training data: one source (config.data.source) or, in config.data.mixture's order,
  one per entry (the weights stay the config's)."""
  config: str
  sources: tuple[SourceLayout, ...]


# The counts: LAION-2B-en is ~232,000 img2dataset tars, one shard each (docs/data_preparation.md); ImageNet-21K
# fall11 holds 14,197,122 images of 21,841 classes, 5 per class held out, the rest in shards of 1,000
# (prepare_data's default): 14,088; COCO's 591,753 caption pairs: 592 shards; Visual Genome's at most 5.4M region
# crops: 5,400; Aurora's 500M uncaptioned images: 500,000 (docs/runbooks/aurora_xl.md).
LAION = SourceLayout("laion", "pairs", 232_000)
PRESETS = {
    "laion": Preset("configs/swinv2_g_clip.py", (LAION,)),
    "imagenet21k": Preset("configs/vit_huge.py", (SourceLayout("imagenet21k", "labelled", 14_088, classes=21_841),)),
    "aurora": Preset("configs/aurora_xl.py", (LAION, SourceLayout("coco", "pairs", 592),
                                              SourceLayout("vg", "pairs", 5_400),
                                              SourceLayout("aurora_images", "images", 500_000))),
}


# ------------------------------------------------------------------------------------------------- the shards
def scaled(sources: tuple[SourceLayout, ...], shards: int) -> tuple[SourceLayout, ...]:
  """`sources` with `shards` in all, in proportion to their counts (at least one each); unchanged for 0."""
  if not shards:
    return sources
  total = sum(s.shards for s in sources)
  return tuple(dataclasses.replace(s, shards=max(1, round(s.shards * shards / total))) for s in sources)


def layout_dir(data_dir: str, layout: SourceLayout, records_per_shard: int, links: bool) -> str:
  """The folder of one source's shards: its name, shard count and records per shard."""
  return os.path.join(data_dir, f"{layout.name}-{layout.shards}x{records_per_shard}{'' if links else '-files'}")


def _jpegs(count: int) -> list[bytes]:
  rng = np.random.default_rng(0)
  return [records.encode_jpeg(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))
          for _ in range(count)]


def _record(layout: SourceLayout, jpeg: bytes, number: int) -> dict:
  """Record `number` of the templates: a caption, a label or neither, as `layout.kind` says."""
  if layout.kind == "pairs":
    return {"image": jpeg, "caption": f"a synthetic photo of pattern {number}", "key": f"{number:09d}"}
  if layout.kind == "labelled":
    return {"image": jpeg, "label": number % layout.classes, "key": f"{number:09d}"}
  return {"image": jpeg, "key": f"{number:09d}"}


def _template_records(layout: SourceLayout, records_per_shard: int, template: int, jpegs: list[bytes]) -> list:
  first = template * records_per_shard
  return [_record(layout, jpegs[(first + k) % len(jpegs)], first + k) for k in range(records_per_shard)]


def _soak_entry(layout: SourceLayout, records_per_shard: int, links: bool) -> dict:
  """What dataset.json's 'soak' field says of a complete folder."""
  return {"shards": layout.shards, "records_per_shard": records_per_shard, "kind": layout.kind,
          "classes": layout.classes, "links": links, "templates": min(TEMPLATES, layout.shards)}


def is_complete(directory: str, layout: SourceLayout, records_per_shard: int, links: bool) -> bool:
  """Whether `directory` holds the layout's shards, all of them, under a dataset.json that describes them."""
  try:
    metadata = records.read_metadata(directory)
  except UserError:
    return False
  if not metadata or metadata.get("soak") != _soak_entry(layout, records_per_shard, links):
    return False
  prefix = f"{SPLIT}-"
  with os.scandir(directory) as entries:
    present = sum(1 for e in entries if e.name.startswith(prefix) and e.name.endswith(".array_record"))
  return present == layout.shards


def check_space(directory: str, layouts, links: bool) -> None:
  """UserError when the shards to write need more space than the file system of `directory` has free."""
  need = sum(min(TEMPLATES, s.shards) if links else s.shards for s in layouts) * SHARD_BYTES
  parent = directory
  while not os.path.exists(parent):
    parent = os.path.dirname(parent) or "."
  free = shutil.disk_usage(parent).free
  if need > free:
    raise UserError(f"--data_dir={directory}: the shards need {need / 2**20:,.0f} MiB, the file system has "
                    f"{free / 2**20:,.0f} MiB free (each ArrayRecord file takes {SHARD_BYTES >> 10} KiB; the default "
                    f"--links writes {TEMPLATES} files per source)")


def write_source(directory: str, layout: SourceLayout, records_per_shard: int, links: bool) -> None:
  """Writes the layout's shards into `directory` (those already there are kept: a link or a renamed file is
  complete), then dataset.json."""
  os.makedirs(directory, exist_ok=True)
  jpegs = _jpegs(TEMPLATES)
  count = min(TEMPLATES, layout.shards)
  templates = [os.path.join(directory, f".template-{t:03d}.array_record") for t in range(count)]
  names = [records.shard_name(SPLIT, i, layout.shards) for i in range(layout.shards)]
  for t, path in enumerate(templates):
    if links and not os.path.exists(path):
      records.write_records(path, _template_records(layout, records_per_shard, t, jpegs))
  for i, name in enumerate(names):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      continue
    if links:
      os.link(templates[i % count], path)
    else:
      records.write_records(path, _template_records(layout, records_per_shard, i % count, jpegs))
  classes = [f"n{c:08d}" for c in range(layout.classes)] if layout.kind == "labelled" else None
  records.write_metadata(directory, kind=DATASET_KINDS[layout.kind], classes=classes,
                         splits={SPLIT: {"records": layout.shards * records_per_shard, "shards": names,
                                         "kind": layout.kind}},
                         soak=_soak_entry(layout, records_per_shard, links))


def prepare_sources(data_dir: str, layouts, records_per_shard: int, links: bool) -> tuple[list[str], float, bool]:
  """(the sources' `arrayrecord:` specs, seconds spent writing, whether every folder was reused)."""
  start, reused, specs = time.perf_counter(), True, []
  directories = [layout_dir(data_dir, s, records_per_shard, links) for s in layouts]
  missing = [(d, s) for d, s in zip(directories, layouts) if not is_complete(d, s, records_per_shard, links)]
  if missing:
    check_space(data_dir, [s for _, s in missing], links)
  for directory, layout in missing:
    try:
      write_source(directory, layout, records_per_shard, links)
    except OSError as e:
      raise UserError(f"--data_dir={data_dir}: cannot write the {layout.name} shards in {directory}: {e}") from e
    reused = False
  for directory in directories:
    specs.append(f"arrayrecord:{directory}/{{split}}-*.array_record")
  return specs, time.perf_counter() - start, reused


# --------------------------------------------------------------------------------------------------- /proc
def descendants(pid: int) -> list[int]:
  """Every process below `pid` (children first), from /proc/PID/task/*/children."""
  out, queue = [], [pid]
  while queue:
    parent = queue.pop(0)
    try:
      tasks = os.listdir(f"/proc/{parent}/task")
    except OSError:
      continue
    for task in tasks:
      try:
        with open(f"/proc/{parent}/task/{task}/children", encoding="ascii") as f:
          kids = [int(k) for k in f.read().split()]
      except OSError:
        continue
      out.extend(kids)
      queue.extend(kids)
  return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_figures(pid: int) -> dict | None:
  """{'pid', 'role', 'fds', 'rss_mb', 'threads', 'cpu_s' (user + system)} of a live process; None once it has
  gone."""
  try:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
      status = dict(line.split(":", 1) for line in f if ":" in line)
    with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
      fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
  except OSError:
    return None
  return {"pid": pid, "role": _role(cmdline), "fds": fds, "threads": int(status["Threads"]),
          "rss_mb": round(int(status.get("VmRSS", "0 kB").split()[0]) / 1024, 2),
          "cpu_s": round((int(fields[11]) + int(fields[12])) / CLOCK_TICKS, 2)}  # utime, stime


def _role(cmdline: str) -> str:
  if "resource_tracker" in cmdline:
    return "resource_tracker"
  if "multiprocessing" in cmdline:
    return "worker"
  return "other"


SHM = "/dev/shm"


def shm_held(pid: int) -> set[str]:
  """The /dev/shm names a process holds open or mapped (grain's batches, multiprocessing's semaphores)."""
  names = set()
  try:
    for fd in os.listdir(f"/proc/{pid}/fd"):
      try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
      except OSError:
        continue
      if target.startswith(SHM + "/"):
        names.add(os.path.basename(target.split(" ")[0]))
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
      for line in f:
        at = line.find(SHM + "/")
        if at >= 0:
          names.add(os.path.basename(line[at:].split()[0]))
  except OSError:
    pass
  return names


def shm_entries() -> set[str]:
  try:
    return set(os.listdir(SHM))
  except OSError:
    return set()


def load_average() -> float:
  try:
    with open("/proc/loadavg", encoding="ascii") as f:
      return float(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return 0.0


@dataclasses.dataclass
class Sample:
  step: int
  seconds: float  # since the first batch was asked for
  records_per_s: float  # over the interval since the previous sample
  main: dict
  children: list[dict]
  shm: int  # /dev/shm entries this process tree holds or has held (`Probe`)
  shm_all: int  # the machine's
  cpu_s: float  # user + system seconds of the live processes of the tree
  load: float  # the machine's one-minute load average

  def series(self) -> dict[str, float]:
    """The judged figures: the main process's, and summed over its descendants."""
    total = lambda key: sum(c[key] for c in self.children)  # noqa: E731
    return {"descriptors (main)": self.main["fds"], "descriptors (children)": total("fds"),
            "RSS MB (main)": self.main["rss_mb"], "RSS MB (children)": total("rss_mb"),
            "threads (main)": self.main["threads"], "threads (children)": total("threads"),
            "processes": len(self.children), "/dev/shm entries": self.shm}


class Probe:
  """Samples this process and its descendants. Other jobs' /dev/shm entries come and go on a shared machine, so
  the tree's own are those it holds at a sample or held at an earlier one and that still exist: a segment that
  passed through it and was never unlinked stays counted."""

  def __init__(self):
    self.pid = os.getpid()
    self._seen = set()

  def sample(self, step: int, seconds: float, records_per_s: float) -> Sample:
    pids = [self.pid, *descendants(self.pid)]
    figures = {pid: process_figures(pid) for pid in pids}
    children = [figures[pid] for pid in pids[1:] if figures[pid] is not None]
    entries = shm_entries()
    self._seen = (self._seen | set().union(*map(shm_held, pids))) & entries
    cpu = sum(f["cpu_s"] for f in [figures[self.pid], *children])
    return Sample(step, round(seconds, 3), round(records_per_s, 1), figures[self.pid], children, len(self._seen),
                  len(entries), round(cpu, 2), load_average())


# ---------------------------------------------------------------------------------------------- the verdicts
@dataclasses.dataclass(frozen=True)
class Tolerance:
  """What a quantity may rise over the judged steps: `fixed` + `per_1000_steps` x steps / 1000, each per process
  when `per_process` (the main process: one; the children: as many as there are)."""
  fixed: float
  per_1000_steps: float = 0.0
  per_process: bool = True

  def allowed(self, steps: float, processes: int) -> float:
    scale = max(1, processes) if self.per_process else 1
    return scale * max(self.fixed, self.per_1000_steps * steps / 1000)


TOLERANCES = {"descriptors": Tolerance(32), "RSS MB": Tolerance(16, per_1000_steps=4), "threads": Tolerance(4),
              "processes": Tolerance(0.5, per_process=False), "/dev/shm entries": Tolerance(16, per_process=False)}


def tolerance_of(quantity: str) -> Tolerance:
  return TOLERANCES[quantity.split(" (")[0]]


@dataclasses.dataclass(frozen=True)
class Verdict:
  quantity: str
  first: float  # the judged samples' first and last values
  last: float
  slope_per_1000: float  # least squares, per 1000 steps
  rise: float  # the fitted line's, from the first judged step to the last
  allowed: float
  growing: bool

  def line(self) -> str:
    return (f"{self.quantity:<24} {'GROWING' if self.growing else 'flat':<8} {self.first:>10,.1f} -> "
            f"{self.last:>10,.1f}, slope {self.slope_per_1000:+,.1f} per 1000 steps, fitted rise {self.rise:+,.1f} "
            f"(tolerance {self.allowed:,.1f})")


def slope(xs, ys) -> float:
  """The least-squares slope of ys over xs (0 for fewer than two distinct xs)."""
  x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  spread = float(((x - x.mean()) ** 2).sum())
  return float(((x - x.mean()) * (y - y.mean())).sum() / spread) if spread else 0.0


def judge(quantity: str, steps, values, tolerance: Tolerance, processes: int = 1) -> Verdict:
  """Whether `values` (sampled at `steps`) grow: their fitted rise over the steps beyond `tolerance`."""
  per_step = slope(steps, values)
  span = float(steps[-1] - steps[0])
  allowed = tolerance.allowed(span, processes)
  return Verdict(quantity, float(values[0]), float(values[-1]), per_step * 1000, per_step * span, allowed,
                 bool(per_step * span > allowed))


@dataclasses.dataclass(frozen=True)
class Throughput:
  first: float  # records/s over the first and the last window
  last: float
  first_per_cpu_s: float  # records per CPU second of the process tree over the same windows
  last_per_cpu_s: float
  window_s: float
  tolerance: float
  falling: bool

  def line(self) -> str:
    ratio = lambda a, b: f"{b / a:.0%}" if a else "-"  # noqa: E731
    cpu = ratio(self.first_per_cpu_s, self.last_per_cpu_s)
    return (f"{'throughput':<24} {'FALLING' if self.falling else 'flat':<8} {self.first:>10,.1f} -> "
            f"{self.last:>10,.1f} records/s ({ratio(self.first, self.last)}), per CPU second "
            f"{self.first_per_cpu_s:,.1f} -> {self.last_per_cpu_s:,.1f} ({cpu}) over the first and the last "
            f"{self.window_s:.0f} s (tolerance {self.tolerance:.0%})")


def judge_throughput(seconds, steps, cpu_s, batch_size: int, window_s: float, tolerance: float) -> Throughput:
  """Records/s and records per CPU second (`cpu_s`: the process tree's, at each sample) over the first and the
  last `window_s` of the samples at `seconds` (steps drawn by then); the window shrinks to a third of the time
  sampled when that is shorter than three windows. Falling: both below the first window's by more than
  `tolerance` (other jobs' load moves the wall-clock rate alone)."""
  t, n, c = (np.asarray(v, np.float64) for v in (seconds, steps, cpu_s))
  window = min(window_s, (t[-1] - t[0]) / 3)
  head = max(1, int(np.searchsorted(t, t[0] + window, side="left")))  # the first sample at or after its end
  tail = max(0, min(int(np.searchsorted(t, t[-1] - window, side="right")) - 1, len(t) - 2))  # last before its start
  def per(clock, a, b):
    return (n[b] - n[a]) * batch_size / (clock[b] - clock[a]) if clock[b] > clock[a] else 0.0
  first, last = per(t, 0, head), per(t, tail, len(t) - 1)
  first_cpu, last_cpu = per(c, 0, head), per(c, tail, len(t) - 1)
  falling = last < (1 - tolerance) * first and last_cpu < (1 - tolerance) * first_cpu
  return Throughput(float(first), float(last), float(first_cpu), float(last_cpu), float(window), tolerance,
                    bool(falling))


def verdicts(judged: list[Sample]) -> list[Verdict]:
  """Every quantity of Sample.series judged over the `judged` samples (the descendants' tolerances scaled by the
  most processes sampled)."""
  steps = [s.step for s in judged]
  children = max(len(s.children) for s in judged)
  out = []
  for quantity in judged[0].series():
    values = [s.series()[quantity] for s in judged]
    out.append(judge(quantity, steps, values, tolerance_of(quantity), children if "(children)" in quantity else 1))
  return out


@dataclasses.dataclass(frozen=True)
class Findings:
  judged: list[Sample]  # the samples after the warm-up
  verdicts: list[Verdict]  # empty with fewer than MIN_JUDGED judged samples
  throughput: Throughput | None  # None then, or when the pipeline failed

  def grown(self) -> list[str]:
    """What grew, one phrase each."""
    out = [f"{v.quantity} {v.first:,.0f} -> {v.last:,.0f} (fitted rise {v.rise:+,.1f}, tolerance {v.allowed:,.1f})"
           for v in self.verdicts if v.growing]
    if self.throughput is not None and self.throughput.falling:
      t = self.throughput
      out.append(f"throughput fell {t.first:,.0f} -> {t.last:,.0f} records/s, {t.first_per_cpu_s:,.0f} -> "
                 f"{t.last_per_cpu_s:,.0f} per CPU second (below {1 - t.tolerance:.0%} of the first "
                 f"{t.window_s:.0f} s)")
    return out


MIN_JUDGED = 3  # samples a slope is judged from


def assess(samples: list[Sample], warmup: int, batch_size: int, window_s: float, tolerance: float,
           failed: bool) -> Findings:
  judged = [s for s in samples if s.step >= warmup]
  if len(judged) < MIN_JUDGED:
    return Findings(judged, [], None)
  throughput = None if failed else judge_throughput([s.seconds for s in judged], [s.step for s in judged],
                                                    [s.cpu_s for s in judged], batch_size, window_s, tolerance)
  return Findings(judged, verdicts(judged), throughput)


# ------------------------------------------------------------------------------------------------- the soak
def sample_steps(steps: int, every: int) -> list[int]:
  """The steps after which the soak samples: the first, every `every`-th and the last."""
  return sorted({1, steps, *range(every, steps + 1, every)})


def load_config(fv, preset: Preset):
  """The --config (the preset's when not given) with its overrides; UserError for a file that does not load."""
  try:
    config = fv.config
    if config is None:
      raise UserError(f"--config: no config file {os.path.join(REPO, preset.config)} (this package's configs/)")
    config.data  # pylint: disable=pointless-statement; a config file that failed to load raises here
  except (OSError, AttributeError) as e:
    raise UserError(f"--config: {cli.last_line(e)}") from e
  return config


def point_at(config, specs: list[str], num_workers: int | None) -> None:
  """config.data reads the synthetic sources: one as config.data.source, several as config.data.mixture in its
  order and weights; the demo tokenizer (the seeds' are files of a prepared corpus)."""
  data = config.data
  if len(specs) == 1:
    data.source, data.mixture = specs[0], ()
  else:
    weights = [weight for _, weight in data.mixture]
    if len(weights) != len(specs):
      raise ConfigError(f"config.data.mixture has {len(weights)} entries; the preset writes {len(specs)} sources")
    data.source, data.mixture = "", tuple(zip(specs, weights))
  if "tokenizer" in data:
    data.tokenizer = ""
  if num_workers is not None:
    data.num_workers = num_workers


def build_loader(config, batch_size: int):
  """The training loop's loader: the config's task's train_loader, for one process of one."""
  # tasks imports jax; grain's workers import this module again (multiprocessing's spawn) and need none of it.
  from visionfm_jax import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.build(config)
  return task.train_loader(batch_size=batch_size, seed=config.seed, process_index=0, process_count=1)


@dataclasses.dataclass
class Run:
  samples: list[Sample]  # while the pipeline ran
  first_batch_s: float
  failure: str | None  # the pipeline's exception, one line
  failed_at: int | None
  at_failure: Sample | None = None  # what the processes held after it (a dead worker holds nothing)


def soak(iterator, steps: int, every: int, batch_size: int, progress=None) -> Run:
  """Draws `steps` batches from `iterator`, sampling after the first, every `every` steps and after the last (or
  after the step that failed)."""
  samples, start, failure, failed_at, probe = [], time.perf_counter(), None, None, Probe()
  last_step, last_time, first_batch_s, at = 0, start, None, set(sample_steps(steps, every))
  for step in range(1, steps + 1):
    try:
      batch = next(iterator)  # held while sampling, as a training step holds it
    except Exception as e:  # pylint: disable=broad-except; the report names it
      failure, failed_at = f"{type(e).__name__}: {cli.last_line(e)}", step
      break
    now = time.perf_counter()
    if first_batch_s is None:
      first_batch_s = now - start
    if step in at:
      samples.append(probe.sample(step, now - start, (step - last_step) * batch_size / max(now - last_time, 1e-9)))
      last_step, last_time = step, now
      if progress:
        progress(samples[-1])
  at_failure = probe.sample(failed_at, time.perf_counter() - start, 0.0) if failure else None
  return Run(samples, first_batch_s or 0.0, failure, failed_at, at_failure)


# ------------------------------------------------------------------------------------------------- reporting
COLUMNS = (("descriptors (main)", "fds:main", "{:.0f}"), ("descriptors (children)", "fds:child", "{:.0f}"),
           ("RSS MB (main)", "MB:main", "{:.0f}"), ("RSS MB (children)", "MB:child", "{:.0f}"),
           ("threads (main)", "thr:main", "{:.0f}"), ("threads (children)", "thr:child", "{:.0f}"),
           ("processes", "procs", "{:.0f}"), ("/dev/shm entries", "shm", "{:.0f}"))


def table_header() -> str:
  return f"{'step':>7} {'s':>7} {'rec/s':>8} " + " ".join(f"{label:>9}" for _, label, _ in COLUMNS) + f" {'load':>5}"


def table_row(sample: Sample) -> str:
  series = sample.series()
  return (f"{sample.step:>7} {sample.seconds:>7.1f} {sample.records_per_s:>8.1f} "
          + " ".join(f"{fmt.format(series[key]):>9}" for key, _, fmt in COLUMNS) + f" {sample.load:>5.1f}")


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in ("jax", "grain", "array_record", "numpy", "pillow"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


def device() -> str:
  model = ""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  return f"{model or platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs of {os.cpu_count()}"


def error_line(run: Run, findings: Findings, steps: int) -> str | None:
  """The `error:` line naming the pipeline's failure and what grew; None when it ran and nothing did."""
  grown = findings.grown()
  if run.failure:
    last = run.samples[-1].series() if run.samples else {}
    held = ", ".join(f"{k} {last[k]:,.0f}" for k in ("descriptors (main)", "descriptors (children)") if k in last)
    held = f"; at step {run.samples[-1].step} {held}" if held else ""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    before = f"; grew before it: {'; '.join(grown)}" if grown else ""
    return (f"error: the input pipeline failed at step {run.failed_at} of {steps}: {run.failure} (RLIMIT_NOFILE soft "
            f"{soft}{held}){before}")
  if grown:
    return f"error: grew over steps {findings.judged[0].step}..{findings.judged[-1].step}: " + "; ".join(grown)
  return None


def print_verdicts(findings: Findings, warmup: int, first_batch_s: float) -> None:
  if not findings.verdicts:
    print(f"verdicts: none ({len(findings.judged)} samples after the warm-up of {warmup} steps; {MIN_JUDGED} needed)")
    return
  print(f"verdicts over steps {findings.judged[0].step}..{findings.judged[-1].step} (warm-up {warmup} steps; the "
        f"first batch after {first_batch_s:.1f} s):")
  for verdict in findings.verdicts:
    print("  " + verdict.line())
  if findings.throughput is not None:
    print("  " + findings.throughput.line())


# ------------------------------------------------------------------------------------------------------ main
def make_flags(argv) -> flags.FlagValues:
  fv = flags.FlagValues()
  preset = _preset_name(argv)
  default = os.path.join(REPO, PRESETS[preset].config) if preset in PRESETS else None
  if default is not None and not os.path.isfile(default):
    default = None  # load_config names it
  config_flags.DEFINE_config_file("config", default, "Config file, optionally with ':variant' (default: the "
                                  "preset's).", flag_values=fv, lock_config=False, sys_argv=list(argv))
  flags.DEFINE_enum("preset", "laion", sorted(PRESETS), "The seed whose data the shards stand in for.",
                    flag_values=fv)
  flags.DEFINE_integer("shards", 0, "Shards in all (0: the preset's counts).", flag_values=fv)
  flags.DEFINE_integer("records_per_shard", 2, "Records per shard.", flag_values=fv)
  flags.DEFINE_bool("links", True, "Shards as hard links to a few written files (else every shard written).",
                    flag_values=fv)
  flags.DEFINE_string("data_dir", "/tmp/visionfm_soak", "Where the shards are written (and reused).", flag_values=fv)
  flags.DEFINE_integer("steps", 2000, "Batches drawn.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 256, "Records per batch.", flag_values=fv)
  flags.DEFINE_integer("every", 100, "Steps between samples.", flag_values=fv)
  flags.DEFINE_integer("warmup", -1, "Steps whose samples are not judged (-1: a tenth of --steps).", flag_values=fv)
  flags.DEFINE_integer("num_workers", None, "grain worker processes (default: config.data.num_workers; -1 as a "
                       "launch resolves it).", flag_values=fv)
  flags.DEFINE_float("window_s", 60.0, "Seconds of the first and last throughput windows.", flag_values=fv)
  flags.DEFINE_float("throughput_tolerance", 0.10, "How far the last window's records/s may fall below the first's "
                     "(a fraction; 1 judges nothing).", flag_values=fv)
  return fv


def _preset_name(argv) -> str:
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg.startswith("--preset="):
      return arg.split("=", 1)[1]
    if arg == "--preset" and i + 1 < len(args):
      return args[i + 1]
  return "laion"


def check_flags(fv) -> int:
  """The warm-up in steps; UserError for counts out of range or too few judged samples."""
  if min(fv.steps, fv.batch_size, fv.every, fv.records_per_shard) < 1 or fv.shards < 0:
    raise UserError(f"--steps={fv.steps}, --batch_size={fv.batch_size}, --every={fv.every} and --records_per_shard="
                    f"{fv.records_per_shard} must be >= 1, --shards={fv.shards} >= 0")
  if fv.num_workers is not None and fv.num_workers < -1:
    raise UserError(f"--num_workers={fv.num_workers}: expected -1 (as a launch sizes them) or a count >= 0")
  if not 0 <= fv.throughput_tolerance <= 1 or fv.window_s <= 0:
    raise UserError(f"--throughput_tolerance={fv.throughput_tolerance} must lie in [0, 1], --window_s="
                    f"{fv.window_s} be positive")
  warmup = fv.steps // 10 if fv.warmup < 0 else fv.warmup
  judged = len([s for s in sample_steps(fv.steps, fv.every) if s >= warmup])
  if judged < MIN_JUDGED:
    raise UserError(f"--steps={fv.steps} with --every={fv.every} and a warm-up of {warmup} steps leaves {judged} "
                    f"samples to judge; at least {MIN_JUDGED} are needed")
  return warmup


def _limit(before: tuple[int, int], after: tuple[int, int]) -> str:
  soft = f"{before[0]}" if before[0] == after[0] else f"{before[0]}, {after[0]} once the loader is built"
  return f"soft {soft} (hard {after[1]})"


def _body(result: dict, fv, rest) -> None:
  cli.check_args(fv, rest)
  warmup = check_flags(fv)
  preset = PRESETS[fv.preset]
  config = load_config(fv, preset)
  layouts = scaled(preset.sources, fv.shards)
  specs, write_s, reused = prepare_sources(os.path.expanduser(fv.data_dir), layouts, fv.records_per_shard, fv.links)
  point_at(config, specs, fv.num_workers)
  limits = resource.getrlimit(resource.RLIMIT_NOFILE)
  start = time.perf_counter()
  iterator = iter(build_loader(config, fv.batch_size))
  open_s = time.perf_counter() - start
  raised = resource.getrlimit(resource.RLIMIT_NOFILE)  # the loader may raise the soft limit to what it needs
  workers = pipeline.worker_count(config.data.num_workers)
  print(f"soak: preset {fv.preset} ({', '.join(f'{s.name} {s.shards:,} shards' for s in layouts)}; "
        f"{fv.records_per_shard} records each), {'reused' if reused else 'written'} in {write_s:.1f} s under "
        f"{fv.data_dir}; loader built in {open_s:.1f} s; {workers} workers, batch {fv.batch_size}, {fv.steps} steps, "
        f"image size {config.data.image_size}; RLIMIT_NOFILE {_limit(limits, raised)}", flush=True)
  print(table_header(), flush=True)
  run = soak(iterator, fv.steps, fv.every, fv.batch_size, progress=lambda s: print(table_row(s), flush=True))
  if run.at_failure is not None:
    print(table_row(run.at_failure) + f"  after the failure: {run.failure}", flush=True)
  del iterator  # grain's workers stop
  findings = assess(run.samples, warmup, fv.batch_size, fv.window_s, fv.throughput_tolerance, bool(run.failure))
  print_verdicts(findings, warmup, run.first_batch_s)
  error = error_line(run, findings, fv.steps)
  result.update(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device(),
      versions=versions(), preset=fv.preset, config=preset.config, sources=[dataclasses.asdict(s) for s in layouts],
      records_per_shard=fv.records_per_shard, links=fv.links, data=specs, write_s=round(write_s, 2), reused=reused,
      open_s=round(open_s, 2), first_batch_s=round(run.first_batch_s, 2), workers=workers,
      batch_size=fv.batch_size, steps=fv.steps, every=fv.every, warmup=warmup, image_size=config.data.image_size,
      rlimit_nofile=list(limits), rlimit_nofile_loader=list(raised), failure=run.failure, failed_at=run.failed_at,
      verdicts=[dataclasses.asdict(v) for v in findings.verdicts],
      throughput=dataclasses.asdict(findings.throughput) if findings.throughput is not None else None,
      samples=[dataclasses.asdict(s) for s in run.samples],
      at_failure=dataclasses.asdict(run.at_failure) if run.at_failure is not None else None, error=error)
  print(json.dumps(result, sort_keys=True), flush=True)
  if error:
    print(error, file=sys.stderr, flush=True)


def main(argv) -> int:
  """Parses `argv` (program name first), writes or reuses the shards, soaks, prints the report; returns the exit
  status: 0 flat, 1 something grew or the pipeline failed, 2 bad input."""
  if _preset_name(argv) not in PRESETS:
    print(f"error: --preset={_preset_name(argv)}: expected one of {', '.join(sorted(PRESETS))}", file=sys.stderr)
    return 2
  result = {}
  status = cli.run(argv, make_flags(argv), __doc__, functools.partial(_body, result))
  return status or (1 if result.get("error") else 0)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
