r"""Soak benchmark of the training input pipeline at the seeds' shard counts: what a data-reading process holds
(open descriptors, memory, threads, child processes, /dev/shm entries), how fast it reads and how many bytes it
reads per record, over thousands of steps, with a verdict on each.

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
`--data_dir` (one folder per source and layout, reused when its dataset.json says it is complete;
bench/synthetic_shards.py). Each shard is a hard link to one of TEMPLATES distinct ArrayRecord files (an ArrayRecord
file takes 128 KiB whatever it holds; 232,000 links take seconds and no space), so every shard name is a file of its
own to open; `--nolinks` writes every shard as its own file instead (128 KiB each).

With hard-linked shards (the default) every open hits the page cache: 64 files stand for all the shards, so no read
waits on a disk or a network. The throughput and bytes-read figures then speak for the pipeline's own work only; for
a cluster file system they need `--nolinks` with realistic shard sizes (`--records_per_shard`) on that file system.

The pipeline is the training loop's: the config's task builds its train loader (`Task.train_loader`: globally
shuffled, augmented, tokenised, with the config's workers: config.data.num_workers=-1 resolves as a launch does,
`pipeline.worker_count`; `--num_workers` overrides), and any config field is overridable (say
`--config.data.image_size=64`). The soak draws `--steps` batches of `--batch_size` and samples after the first
batch, every `--every` steps and after the last, from /proc (no other dependency; bench/proc_probe.py):

  descriptors   entries of /proc/PID/fd
  RSS MB        VmRSS of /proc/PID/status
  threads       Threads of /proc/PID/status
  processes     the main process's descendants (grain's workers, multiprocessing's resource tracker)
  /dev/shm      entries in /dev/shm that the processes hold (open or mapped) at the sample or held at an earlier
                one and that still exist: a segment that passed through them and was never unlinked stays
                counted (the machine's count, which other jobs move, is in the JSON line)
  records/s     records drawn over the interval since the previous sample (the time spent sampling is no
                interval's)
  bytes/record  rchar of /proc/PID/io (the bytes read calls returned: files, pipes, /proc; cached or not) summed
                over the process tree, its rise over the interval over the records drawn in it (what the sampling
                reads is not counted)

descriptors, RSS and threads for the main process and summed over its descendants (the JSON line has every process).
The samples of the first `--warmup` steps (default a tenth of --steps; the reading caches fill) are shown but not
judged. After them each quantity's least-squares line gives its slope per 1000 steps (bytes per record, a rate over
each interval, the median of its samples' pairwise slopes, which one interval's outlier does not tilt); a quantity
grows when the slope's rise over the judged steps exceeds its tolerance (bench/trends.py's `TOLERANCES`): descriptors
32 per process, threads 4 per process, processes 0.5, /dev/shm 16 entries, RSS 16 MB per process or 4 MB per process
per 1000 steps, whichever is more, and bytes read per record 1 KiB or a tenth of the judged samples' mean, whichever
is more.
Throughput falls when the rate of the last `--window_s` seconds (default a minute; a third of the judged time in a
shorter run) is below the first's by more than `--throughput_tolerance` (10%), and so are its records per CPU second
of the process tree: other jobs' load on a shared machine moves the wall-clock rate alone (the table's last column
is the machine's load average).

Before the table, the start-up: the time the loader takes to build, the shard files any process opened meanwhile
(inotify's IN_OPEN on the sources' folders, bench/file_opens.py) and the main process's peak RSS; the JSON line adds
`ready_s` (the build and the first batch: ready to train) and the shard files opened until the first batch.

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
import sys
import time

from absl import flags
from ml_collections import config_flags

from visionfm_jax import cli, errors
from visionfm_jax.bench import file_opens
from visionfm_jax.bench.proc_probe import Probe, Sample
from visionfm_jax.bench.synthetic_shards import PRESETS, Preset, prepare_sources, scaled
from visionfm_jax.bench.trends import MIN_JUDGED, Findings, assess
from visionfm_jax.data.loader import pipeline
from visionfm_jax.errors import ConfigError, UserError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


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


@dataclasses.dataclass
class StartUp:
  """What building the loader cost beside its wall time: its CPU seconds (a shared machine's load moves the wall
  time alone), the shard files opened (by any process; a lower bound when inotify's queue overflowed), the main
  process's peak RSS; and the shard files opened until the first batch was drawn."""

  cpu_s: float
  shards_opened: int
  overflowed: bool
  peak_rss_mb: float
  first_batch_shards: int | None = None

  def line(self) -> str:
    at_least = "at least " if self.overflowed else ""
    return (
      f"{self.cpu_s:.1f} CPU s, {at_least}{self.shards_opened:,} shard files opened, peak RSS "
      f"{self.peak_rss_mb:,.0f} MB"
    )


def _peak_rss_mb() -> float:
  """VmHWM of this process, in MB."""
  with open("/proc/self/status", encoding="utf-8") as f:
    return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def soak(iterator, steps: int, every: int, batch_size: int, progress=None) -> Run:
  """Draws `steps` batches from `iterator`, sampling after the first, every `every` steps and after the last (or
  after the step that failed)."""
  samples, failure, failed_at, probe = [], None, None, Probe()
  start = time.perf_counter()
  last_step, last_time, first_batch_s, at = 0, start, None, set(sample_steps(steps, every))
  for step in range(1, steps + 1):
    try:
      batch = next(iterator)  # noqa: F841 (held while sampling, as a training step holds it)
    except Exception as e:  # pylint: disable=broad-except; the report names it
      failure, failed_at = f"{type(e).__name__}: {cli.last_line(e)}", step
      break
    now = time.perf_counter()
    if first_batch_s is None:
      first_batch_s = now - start
    if step in at:
      samples.append(probe.sample(step, now - start, (step - last_step) * batch_size, now - last_time))
      if progress:
        progress(samples[-1])
      last_step, last_time = step, time.perf_counter()  # the probe and its row are not the next interval's
  at_failure = probe.sample(failed_at, time.perf_counter() - start, 0, 0.0) if failure else None
  return Run(samples, first_batch_s or 0.0, failure, failed_at, at_failure)


# ------------------------------------------------------------------------------------------------- reporting
COLUMNS = (
  ("descriptors (main)", "fds:main", "{:.0f}"),
  ("descriptors (children)", "fds:child", "{:.0f}"),
  ("RSS MB (main)", "MB:main", "{:.0f}"),
  ("RSS MB (children)", "MB:child", "{:.0f}"),
  ("threads (main)", "thr:main", "{:.0f}"),
  ("threads (children)", "thr:child", "{:.0f}"),
  ("processes", "procs", "{:.0f}"),
  ("/dev/shm entries", "shm", "{:.0f}"),
  ("bytes read per record", "B/rec", "{:.0f}"),
)


def table_header() -> str:
  return f"{'step':>7} {'s':>7} {'rec/s':>8} " + " ".join(f"{label:>9}" for _, label, _ in COLUMNS) + f" {'load':>5}"


def table_row(sample: Sample) -> str:
  series = sample.series()
  return (
    f"{sample.step:>7} {sample.seconds:>7.1f} {sample.records_per_s:>8.1f} "
    + " ".join(f"{fmt.format(series[key]):>9}" for key, _, fmt in COLUMNS)
    + f" {sample.load:>5.1f}"
  )


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
    return (
      f"error: the input pipeline failed at step {run.failed_at} of {steps}: {run.failure} (RLIMIT_NOFILE soft "
      f"{soft}{held}){before}"
    )
  if grown:
    return f"error: grew over steps {findings.judged[0].step}..{findings.judged[-1].step}: " + "; ".join(grown)
  return None


def print_verdicts(findings: Findings, warmup: int, first_batch_s: float) -> None:
  if not findings.verdicts:
    print(f"verdicts: none ({len(findings.judged)} samples after the warm-up of {warmup} steps; {MIN_JUDGED} needed)")
    return
  print(
    f"verdicts over steps {findings.judged[0].step}..{findings.judged[-1].step} (warm-up {warmup} steps; the "
    f"first batch after {first_batch_s:.1f} s):"
  )
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
  config_flags.DEFINE_config_file(
    "config",
    default,
    "Config file, optionally with ':variant' (default: the preset's).",
    flag_values=fv,
    lock_config=False,
    sys_argv=list(argv),
  )
  flags.DEFINE_enum("preset", "laion", sorted(PRESETS), "The seed whose data the shards stand in for.", flag_values=fv)
  flags.DEFINE_integer("shards", 0, "Shards in all (0: the preset's counts).", flag_values=fv)
  flags.DEFINE_integer("records_per_shard", 2, "Records per shard.", flag_values=fv)
  flags.DEFINE_bool(
    "links", True, "Shards as hard links to a few written files (else every shard written).", flag_values=fv
  )
  flags.DEFINE_string("data_dir", "/tmp/visionfm_soak", "Where the shards are written (and reused).", flag_values=fv)
  flags.DEFINE_integer("steps", 2000, "Batches drawn.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 256, "Records per batch.", flag_values=fv)
  flags.DEFINE_integer("every", 100, "Steps between samples.", flag_values=fv)
  flags.DEFINE_integer("warmup", -1, "Steps whose samples are not judged (-1: a tenth of --steps).", flag_values=fv)
  flags.DEFINE_integer(
    "num_workers",
    None,
    "grain worker processes (default: config.data.num_workers; -1 as a launch resolves it).",
    flag_values=fv,
  )
  flags.DEFINE_float("window_s", 60.0, "Seconds of the first and last throughput windows.", flag_values=fv)
  flags.DEFINE_float(
    "throughput_tolerance",
    0.10,
    "How far the last window's records/s may fall below the first's (a fraction; 1 judges nothing).",
    flag_values=fv,
  )
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
    raise UserError(
      f"--steps={fv.steps}, --batch_size={fv.batch_size}, --every={fv.every} and --records_per_shard="
      f"{fv.records_per_shard} must be >= 1, --shards={fv.shards} >= 0"
    )
  if fv.num_workers is not None and fv.num_workers < -1:
    raise UserError(f"--num_workers={fv.num_workers}: expected -1 (as a launch sizes them) or a count >= 0")
  if not 0 <= fv.throughput_tolerance <= 1 or fv.window_s <= 0:
    raise UserError(
      f"--throughput_tolerance={fv.throughput_tolerance} must lie in [0, 1], --window_s={fv.window_s} be positive"
    )
  warmup = fv.steps // 10 if fv.warmup < 0 else fv.warmup
  judged = len([s for s in sample_steps(fv.steps, fv.every) if s >= warmup])
  if judged < MIN_JUDGED:
    raise UserError(
      f"--steps={fv.steps} with --every={fv.every} and a warm-up of {warmup} steps leaves {judged} "
      f"samples to judge; at least {MIN_JUDGED} are needed"
    )
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
  opens = file_opens.FileOpens([os.path.dirname(spec.split(":", 1)[1]) for spec in specs], ".array_record")
  with opens:
    start, cpu = time.perf_counter(), time.process_time()
    iterator = iter(build_loader(config, fv.batch_size))
    open_s = time.perf_counter() - start
    start_up = StartUp(round(time.process_time() - cpu, 2), opens.opened(), opens.overflowed, _peak_rss_mb())
    raised = resource.getrlimit(resource.RLIMIT_NOFILE)  # the loader may raise the soft limit to what it needs
    workers = pipeline.worker_count(config.data.num_workers)
    print(
      f"soak: preset {fv.preset} ({', '.join(f'{s.name} {s.shards:,} shards' for s in layouts)}; "
      f"{fv.records_per_shard} records each), {'reused' if reused else 'written'} in {write_s:.1f} s under "
      f"{fv.data_dir}; loader built in {open_s:.1f} s, {start_up.line()}; {workers} workers, batch "
      f"{fv.batch_size}, {fv.steps} steps, image size {config.data.image_size}; RLIMIT_NOFILE "
      f"{_limit(limits, raised)}",
      flush=True,
    )
    print(table_header(), flush=True)

    def progress(sample):
      if sample.step == 1:
        start_up.first_batch_shards = opens.opened()
      print(table_row(sample), flush=True)

    run = soak(iterator, fv.steps, fv.every, fv.batch_size, progress=progress)
  if run.at_failure is not None:
    print(table_row(run.at_failure) + f"  after the failure: {run.failure}", flush=True)
  del iterator  # grain's workers stop
  findings = assess(run.samples, warmup, fv.batch_size, fv.window_s, fv.throughput_tolerance, bool(run.failure))
  print_verdicts(findings, warmup, run.first_batch_s)
  error = error_line(run, findings, fv.steps)
  result.update(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    device=device(),
    versions=versions(),
    preset=fv.preset,
    config=preset.config,
    sources=[dataclasses.asdict(s) for s in layouts],
    records_per_shard=fv.records_per_shard,
    links=fv.links,
    data=specs,
    write_s=round(write_s, 2),
    reused=reused,
    open_s=round(open_s, 2),
    first_batch_s=round(run.first_batch_s, 2),
    ready_s=round(open_s + run.first_batch_s, 2),
    start_up=dataclasses.asdict(start_up),
    workers=workers,
    batch_size=fv.batch_size,
    steps=fv.steps,
    every=fv.every,
    warmup=warmup,
    image_size=config.data.image_size,
    rlimit_nofile=list(limits),
    rlimit_nofile_loader=list(raised),
    failure=run.failure,
    failed_at=run.failed_at,
    verdicts=[dataclasses.asdict(v) for v in findings.verdicts],
    throughput=dataclasses.asdict(findings.throughput) if findings.throughput is not None else None,
    samples=[dataclasses.asdict(s) for s in run.samples],
    at_failure=dataclasses.asdict(run.at_failure) if run.at_failure is not None else None,
    error=error,
  )
  print(json.dumps(result, sort_keys=True), flush=True)
  if error:
    errors.say(error)


def main(argv) -> int:
  """Parses `argv` (program name first), writes or reuses the shards, soaks, prints the report; returns the exit
  status: 0 flat, 1 something grew or the pipeline failed, 2 bad input."""
  if _preset_name(argv) not in PRESETS:
    errors.say(f"error: --preset={_preset_name(argv)}: expected one of {', '.join(sorted(PRESETS))}")
    return 2
  result = {}
  status = cli.run(argv, make_flags(argv), __doc__, functools.partial(_body, result))
  return status or (1 if result.get("error") else 0)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
