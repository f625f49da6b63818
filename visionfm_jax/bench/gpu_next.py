r"""The next lent GPU's measurements in one call (launch/gpu_next.sh runs this with launch/xla_flags_h100.sh's flags):
each stage a process of its own under its own time bound, most important first, so that one stuck compile cannot
eat the rest; the stages a call's budget does not reach are recorded as skipped, and `--only` picks a later call's.

  launch/gpu_next.sh [--out=DIR] [--report=DIR] [--budget=S] [--only=STAGE,...] [--rehearse] [--list]

The stages, in order (bound in seconds; each gets at most what is left of --budget, one with under 20 s left is
skipped):
  vit_b32_<gemm>, vit_b64_<gemm>   300  ViT-H/14 through `python -m visionfm_jax.main` (configs/vit_huge.py's form:
                                        straight-line, no remat; ddp; the embedded `shapes` source), batch 32 then 64,
                                        each with config.precision.gemm compute_dtype (bf16) and every FP8 recipe its
                                        domain names when the script runs (the delayed-scaling one first), 30 steps
                                        with a metric row every 10
  attention_w7, attention_w40       90  SwinV2-G's 42-block stage's window attention alone, forward and backward
                                        (`python -m visionfm_jax.bench.window_attention`): the Pallas kernel, cuDNN
                                        and the softmax path at 224 px (window 7, batch 32, shifted) and 640 px
                                        (window 40, batch 8: one window of 1,600 tokens)
  swin_step_<attention>            200  SwinV2-G's step at 224 px through `python -m visionfm_jax.bench` (batch 32,
                                        nothing_saveable, the rolled loop: BENCHMARKS.md's 0.249 row) with
                                        config.model.attention pallas, cudnn and softmax
  swin_form_<form>                 240  SwinV2-G's fastest form that compiles within its bound, through `bench`
                                        (cuDNN, batch 32): the 42-block stage in groups of 3 pairs, the short stages
                                        straight-line, no remat (`stage_scan_unrolls` (0, 0, 3, 0), where the
                                        config has that field), else stage 2 in loops of 7 pairs with
                                        nothing_saveable (`scan_unroll` 7); the first that runs ends the stage
What each reports: main's steps/s, img/s and MFU over its metric rows after the first (the first holds the
compile), `first_window_excess_s` (the first row's seconds beyond its steps at the later rows' rate: the compile
and the input's start) and the data wait; bench's step, img/s, MFU and `compile_s`; the attention harness's
forward+backward ms and compile per implementation. One JSON line per stage in REPORT/results.jsonl (status ok,
FAIL, timeout or skipped, seconds, figures), the table in REPORT/table.txt and on stdout, the last 30 lines of
every stage that did not pass in REPORT/failures.txt (REPORT defaults to OUT; point it at the device tool's $OUT:
three files). OUT holds the stages' logs and main's workdirs (each deleted once measured). A main run is ended
(SIGKILL) once its last metric row is written: its final checkpoint (7.6 GB for ViT-H/14) and evaluation measure
nothing here. The budget's default, 480 s, leaves a 540 s (9-minute) call room for the start-up and the table.

--rehearse runs the same stages on a CPU in a few minutes (tests/integration/test_gpu_next.py): a pico ViT and a
pico SwinV2 at 32 px, 4 steps, the window harness on pico's stages' windows, Pallas through its interpreter; cuDNN and
the window kernel inside a step are GPU only, so those stages are skipped as such. Exit status: 0 when every stage
that ran passed and none was skipped for the budget, 1 otherwise, 2 on bad arguments or (without --rehearse) when
JAX sees no GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from visionfm_jax import errors
from visionfm_jax.config_lib import model_schema, schema
from visionfm_jax.config_lib.domains import Choices
from visionfm_jax.errors import UserError

MIN_SECONDS = 20  # a stage with less of the budget left is skipped
GRACE_S = 15  # between a timed-out stage's TERM and its KILL
POLL_S = 0.5
DELAYED_FIRST = "delayed"  # the FP8 recipe the script exists to measure goes first among the FP8 ones
# main's input: the embedded shapes, drawn on the host (no files to prepare), with their 8 classes; a small eval split
MAIN_DATA = ("--config.data.source=shapes", "--config.model.num_classes=8", "--config.data.shapes_eval_size=64")


@dataclasses.dataclass
class Stage:
  name: str
  bound: int
  argv: list[str]
  kind: str  # main | bench | attention | skip
  workdir: str = ""
  skip_why: str = ""
  group: str = ""  # swin_form: the first of a group that passes ends the group


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What differs between a GPU call and the CPU rehearsal."""

  vit: tuple[str, ...]
  swin: tuple[str, ...]
  main_steps: tuple[str, ...]
  bench_steps: tuple[str, ...]
  attention: tuple[tuple[str, tuple[str, ...]], ...]  # (stage name, harness flags)
  swin_stage_forms: tuple[int, ...]  # stage_scan_unrolls of the grouped form
  batches: tuple[tuple[str, int], ...]  # (the stage's label: the GPU batch, the batch run)
  gpu: bool


GPU_SIZES = Sizes(
  vit=(),
  swin=(),
  batches=(("b32", 32), ("b64", 64)),
  gpu=True,
  main_steps=("--config.total_steps=30", "--config.log_every=10"),
  bench_steps=("--steps=10", "--warmup=2"),
  attention=(
    ("attention_w7", ("--window=7", "--windows=4", "--heads=64", "--head_dim=32", "--shifted", "--batch=32")),
    ("attention_w40", ("--window=40", "--windows=1", "--heads=64", "--head_dim=32", "--noshifted", "--batch=8")),
  ),
  swin_stage_forms=(0, 0, 3, 0),
)
REHEARSAL_SIZES = Sizes(
  vit=(
    "--config.model.variant=pico/4",
    "--config.model.image_size=32",
    "--config.data.image_size=32",
    "--config.data.num_workers=0",
  ),
  swin=(
    "--config.model.variant=pico",
    "--config.model.image_size=32",
    "--config.data.image_size=32",
    "--config.model.window_size=4",
  ),
  # both labels at one batch: the b64 stages load the b32 ones' programs from the rehearsal's compile cache (what
  # they rehearse is their flags, run and report, not a CPU's figure at a larger batch)
  batches=(("b32", 8), ("b64", 8)),
  gpu=False,
  main_steps=("--config.total_steps=4", "--config.log_every=2"),
  bench_steps=("--steps=2", "--warmup=1"),
  attention=(
    (
      "attention_w7",
      ("--window=4", "--windows=4", "--heads=2", "--head_dim=8", "--shifted", "--batch=2", "--dtype=float32"),
    ),
    (
      "attention_w40",
      ("--window=8", "--windows=1", "--heads=2", "--head_dim=8", "--noshifted", "--batch=2", "--dtype=float32"),
    ),
  ),
  swin_stage_forms=(0, 1),
)


def gemm_recipes() -> list[str]:
  """config.precision.gemm's names as this checkout's schema has them: compute_dtype, then the FP8 recipes, the
  delayed-scaling one first."""
  domain = schema.PRECISION["gemm"].domain
  assert isinstance(domain, Choices), domain
  names = list(domain.names)
  fp8 = sorted((n for n in names if n != "compute_dtype"), key=lambda n: DELAYED_FIRST not in n)
  return ["compute_dtype", *fp8]


def has_stage_forms() -> bool:
  return "stage_scan_unrolls" in model_schema.SWINV2


def stages(python: str, out: str, sizes: Sizes) -> list[Stage]:
  m = [python, "-m"]
  result = []
  for label, batch in sizes.batches:
    for gemm in gemm_recipes():
      name = f"vit_{label}_{gemm}"
      workdir = os.path.join(out, "run_" + name)
      result.append(
        Stage(
          name,
          300,
          [
            *m,
            "visionfm_jax.main",
            "--config=configs/vit_huge.py",
            f"--workdir={workdir}",
            "--config.strategy=ddp",
            f"--config.global_batch_size={batch}",
            f"--config.precision.gemm={gemm}",
            *MAIN_DATA,
            "--config.optim.warmup_steps=2",
            "--config.optim.lr=1e-4",
            "--config.progress_bar=False",
            *sizes.main_steps,
            *sizes.vit,
          ],
          "main",
          workdir,
        )
      )
  implementations = "pallas,cudnn,softmax" if sizes.gpu else "pallas,softmax"
  for name, flags in sizes.attention:
    result.append(
      Stage(
        name,
        90,
        [
          *m,
          "visionfm_jax.bench.window_attention",
          f"--implementations={implementations}",
          "--steps=10" if sizes.gpu else "--steps=2",
          *flags,
        ],
        "attention",
      )
    )
  swin = [
    *m,
    "visionfm_jax.bench",
    "--config=configs/swinv2_cls.py:G",
    "--devices=1",
    "--config.strategy=ddp",
    f"--config.global_batch_size={sizes.batches[0][1]}",
    *sizes.bench_steps,
    *sizes.swin,
  ]
  for attention in ("pallas", "cudnn", "softmax"):
    stage = Stage(
      f"swin_step_{attention}",
      200,
      [
        *swin,
        "--config.model.remat_policy=nothing_saveable",
        "--config.model.scan_unroll=1",
        f"--config.model.attention={attention}",
      ],
      "bench",
    )
    if not sizes.gpu and attention in ("pallas", "cudnn"):
      stage.kind, stage.skip_why = "skip", "GPU only (the rehearsal's CPU has no cuDNN, nor the window kernel in a run)"
    result.append(stage)
  attention = "cudnn" if sizes.gpu else "softmax"
  grouped = Stage(
    "swin_form_grouped",
    240,
    [
      *swin,
      "--config.model.remat_policy=none",
      f"--config.model.attention={attention}",
      "--config.model.stage_scan_unrolls=(" + ",".join(map(str, sizes.swin_stage_forms)) + ",)",
    ],
    "bench",
    group="swin_form",
  )
  if not has_stage_forms():
    grouped.kind, grouped.skip_why = "skip", "config.model has no stage_scan_unrolls in this checkout"
  result.append(grouped)
  result.append(
    Stage(
      "swin_form_unroll7",
      240,
      [
        *swin,
        "--config.model.remat_policy=nothing_saveable",
        f"--config.model.attention={attention}",
        "--config.model.scan_unroll=7" if sizes.gpu else "--config.model.scan_unroll=1",
      ],
      "bench",
      group="swin_form",
    )
  )
  return result


def run_bounded(argv: list[str], bound: int, log_path: str, done=lambda: False) -> tuple[int, str]:
  """(exit status, '' | 'timeout' | 'done') of `argv` run in its own process group under `bound` seconds, output
  to `log_path`; 'done': `done()` turned true first and the group was killed (SIGKILL: main takes a TERM for a
  preemption notice, and would save a checkpoint)."""
  deadline = time.monotonic() + bound
  with open(log_path, "wb") as log:
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while proc.poll() is None:
      if time.monotonic() > deadline:
        _kill(proc, signal.SIGTERM, GRACE_S)
        return proc.wait(), "timeout"
      if done():
        _kill(proc, signal.SIGKILL, None)
        return 0, "done"
      try:
        proc.wait(timeout=POLL_S)
      except subprocess.TimeoutExpired:
        pass
  return proc.returncode, ""


def _kill(proc: subprocess.Popen, sig: int, grace: float | None) -> None:
  """`sig` to `proc`'s process group, then SIGKILL after `grace` seconds if it still runs."""
  for each, wait in ((sig, grace), (signal.SIGKILL, None)):
    try:
      os.killpg(proc.pid, each)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=wait)
      return
    except subprocess.TimeoutExpired:
      continue


def last_row_written(workdir: str, last_step: int):
  """done() for main: its metrics.jsonl has the throughput row of `last_step` (written before the final checkpoint
  and evaluation, which measure nothing here: a ViT-H/14 checkpoint is 7.6 GB)."""
  path = os.path.join(workdir, "metrics.jsonl")
  return lambda: (
    os.path.exists(path) and any(r.get("step") == last_step and "train/img_per_sec" in r for r in json_lines(path))
  )


def json_lines(path: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      if line.startswith("{"):
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return rows


def main_figures(workdir: str, batch: int) -> dict:
  """Steps/s, img/s, MFU and data wait over main's metric rows after the first; the first row's excess seconds."""
  rows = [r for r in json_lines(os.path.join(workdir, "metrics.jsonl")) if "train/img_per_sec" in r]
  if len(rows) < 2:
    raise ValueError(f"{len(rows)} train/img_per_sec rows in {workdir}/metrics.jsonl: none after the first")
  steps = [r["step"] - prev for prev, r in zip([0] + [r["step"] for r in rows], rows)]
  seconds = [n * batch / r["train/img_per_sec"] for n, r in zip(steps, rows)]
  timed_steps, timed_s = sum(steps[1:]), sum(seconds[1:])
  step_s = timed_s / timed_steps
  mfus = [r.get("train/mfu") for r in rows[1:]]
  mfu = None if None in mfus else sum(m * s for m, s in zip(mfus, seconds[1:])) / timed_s
  wait = sum(r["train/data_wait_fraction"] * s for r, s in zip(rows[1:], seconds[1:])) / timed_s
  return dict(
    step_ms=round(1e3 * step_s, 2),
    steps_per_sec=round(1 / step_s, 3),
    img_per_sec=round(batch / step_s, 2),
    mfu=None if mfu is None else round(mfu, 4),
    first_window_excess_s=round(seconds[0] - steps[0] * step_s, 1),
    data_wait_fraction=round(wait, 4),
    steps_timed=timed_steps,
    final_loss=round(rows[-1]["train/loss"], 4),
  )


def bench_figures(log_path: str) -> dict:
  rows = [r for r in json_lines(log_path) if "img_per_sec" in r]
  if not rows:
    raise ValueError("no JSON line with img_per_sec in its output")
  r = rows[-1]
  figures = {k: r.get(k) for k in ("step_s", "img_per_sec", "mfu", "compile_s", "peak_bytes_in_use")}
  figures["step_ms"] = None if r.get("step_s") is None else round(1e3 * r["step_s"], 2)
  return figures


def attention_figures(log_path: str) -> dict:
  rows = [r for r in json_lines(log_path) if "implementation" in r]
  if not rows:
    raise ValueError("no implementation rows in its output")
  keys = ("fwd_bwd_ms", "compile_s", "tflops", "failed")
  shape = {k: rows[0][k] for k in ("window", "tokens", "windows", "heads", "head_dim", "batch", "shifted")}
  return dict(shape=shape, implementations={r["implementation"]: {k: r[k] for k in keys if k in r} for r in rows})


def flag_value(argv: list[str], flag: str) -> str:
  return next(a for a in argv if a.startswith(flag + "=")).split("=", 1)[1]


def figures(stage: Stage, log_path: str) -> dict:
  if stage.kind == "main":
    return main_figures(stage.workdir, int(flag_value(stage.argv, "--config.global_batch_size")))
  if stage.kind == "attention":
    return attention_figures(log_path)
  return bench_figures(log_path)


def why_failed(log_path: str, code: int) -> str:
  with open(log_path, encoding="utf-8", errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  if any("RESOURCE_EXHAUSTED" in line or "out of memory" in line.lower() for line in lines):
    return "out of memory"
  error = next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")
  return f"exit {code}: {error[:200]}"


def run_stage(stage: Stage, logs: str, left: float) -> dict:
  """The stage's row: status, seconds, figures or why not."""
  if stage.kind == "skip":
    return dict(status="skipped", seconds=0, why=stage.skip_why)
  bound = int(min(stage.bound, left))
  if bound < MIN_SECONDS:
    return dict(status="skipped", seconds=0, why=f"{int(left)} s of the budget left")
  log_path = os.path.join(logs, stage.name + ".log")
  print(f"== {stage.name} (at most {bound} s)", flush=True)
  start = time.monotonic()
  done = (
    last_row_written(stage.workdir, int(flag_value(stage.argv, "--config.total_steps")))
    if stage.workdir
    else (lambda: False)
  )
  code, ending = run_bounded(stage.argv, bound, log_path, done)
  row = dict(status="ok", seconds=round(time.monotonic() - start, 1), bound=bound)
  if ending == "timeout":
    row.update(status="timeout", why=f"timeout after {bound} s")
  elif code != 0 and stage.kind != "attention":  # the harness exits 1 when one implementation failed: its row says
    row.update(status="FAIL", why=why_failed(log_path, code))
  try:
    row.update(figures(stage, log_path))
  except (OSError, ValueError, KeyError, ZeroDivisionError, StopIteration) as e:
    if row["status"] == "ok":
      row.update(status="FAIL", why=f"its figures: {e}")
  if stage.workdir:
    shutil.rmtree(stage.workdir, ignore_errors=True)
  return row


def fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def table(rows: list[dict], header: str) -> str:
  lines = [
    header,
    f"  {'stage':28} {'status':8} {'s':>6} {'step ms':>9} {'img/s':>8} {'MFU':>6} {'compile s':>9}  detail",
  ]
  for r in rows:
    compile_s = r.get("compile_s", r.get("first_window_excess_s"))
    if "implementations" in r:
      detail = "; ".join(
        f"{name} "
        + (
          f"{f['fwd_bwd_ms']:.3f} ms (compile {f['compile_s']:.1f} s)"
          if "fwd_bwd_ms" in f
          else f"failed: {f.get('failed', '')[:60]}"
        )
        for name, f in r["implementations"].items()
      )
      detail = f"{r['shape']['windows']}x{r['shape']['tokens']} tokens, {r['shape']['heads']} heads: {detail}"
    elif "data_wait_fraction" in r:
      detail = f"{r['steps_per_sec']} steps/s, data wait {r['data_wait_fraction']}, compile = first row's excess"
    else:
      detail = r.get("why", "")
    lines.append(
      f"  {r['stage']:28} {r['status']:8} {r['seconds']:>6} {fmt(r.get('step_ms'), '9.2f')} "
      f"{fmt(r.get('img_per_sec'), '8.1f')} {fmt(r.get('mfu'), '6.3f')} {fmt(compile_s, '9.1f')}  {detail}"
    )
  return "\n".join(lines)


def device_of(python: str) -> str:
  """'<backend>: <device kind>' from a process of its own: this one never takes the GPU's memory."""
  proc = subprocess.run(
    [python, "-c", "import jax; print(f'{jax.default_backend()}: {jax.devices()[0].device_kind}')"],
    capture_output=True,
    text=True,
    check=False,
  )
  return proc.stdout.strip() or f"jax failed to start: {proc.stderr.strip()[-200:]}"


def parse_args(argv: list[str]) -> dict:
  args = dict(out="gpu_next_out", report="", budget=480, only="", rehearse=False, list=False)
  for arg in argv:
    key, _, value = arg.removeprefix("--").partition("=")
    if key in ("rehearse", "list") and not value:
      args[key] = True
    elif key in ("out", "report", "only") and value:
      args[key] = value
    elif key == "budget" and value.isdigit() and int(value) > 0:
      args[key] = int(value)
    else:
      raise UserError(
        f"{arg}: expected --out=DIR, --report=DIR, --budget=SECONDS (> 0), --only=STAGE,..., --rehearse or --list"
      )
  return args


def run(argv: list[str]) -> int:
  args = parse_args(argv)
  python = os.environ.get("PYTHON", sys.executable)
  sizes = REHEARSAL_SIZES if args["rehearse"] else GPU_SIZES
  out, report = args["out"], args["report"] or args["out"]
  plan = stages(python, out, sizes)
  if args["list"]:
    print("\n".join(f"{s.name} {s.bound}" for s in plan))
    return 0
  only = [n for n in args["only"].split(",") if n]
  unknown = [n for n in only if n not in {s.name for s in plan}]
  if unknown:
    raise UserError(f"--only: no stage {', '.join(unknown)} (the stages: {' '.join(s.name for s in plan)})")
  device = device_of(python)
  if not args["rehearse"] and not device.startswith("gpu:"):
    raise UserError(f"JAX sees no GPU ({device}); --rehearse runs the stages on a CPU")
  logs = os.path.join(out, "logs")
  os.makedirs(logs, exist_ok=True)
  os.makedirs(report, exist_ok=True)
  deadline = time.monotonic() + args["budget"]
  rows, done_groups = [], set()
  results = os.path.join(report, "results.jsonl")
  with open(results, "w", encoding="utf-8") as f:
    for stage in plan:
      if only and stage.name not in only:
        row = dict(status="skipped", seconds=0, why="not in --only")
      elif stage.group in done_groups:
        row = dict(status="skipped", seconds=0, why=f"an earlier {stage.group} form ran")
      else:
        row = run_stage(stage, logs, deadline - time.monotonic())
        if stage.group and row["status"] == "ok":
          done_groups.add(stage.group)
      row = dict(
        stage=stage.name,
        **row,
        device=device,
        rehearse=args["rehearse"],
        command=" ".join(stage.argv[1:]) if stage.argv else "",
      )
      rows.append(row)
      f.write(json.dumps(row) + "\n")
      f.flush()
  text = table(
    rows,
    f"gpu_next ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {device}"
    f"{', rehearsal' if args['rehearse'] else ''}):",
  )
  print(text)
  with open(os.path.join(report, "table.txt"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  write_failures(rows, logs, os.path.join(report, "failures.txt"))
  bad = [r for r in rows if r["status"] in ("FAIL", "timeout") or "budget" in str(r.get("why", ""))]
  return int(bool(bad))


def write_failures(rows: list[dict], logs: str, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      log_path = os.path.join(logs, r["stage"] + ".log")
      if r["status"] in ("FAIL", "timeout") and os.path.exists(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as log:
          tail = log.read().splitlines()[-30:]
        f.write(f"== {r['stage']}: {r.get('why', '')}\n" + "\n".join(tail) + "\n")


def main(argv: list[str]) -> int:
  try:
    return run(argv[1:])
  except UserError as e:
    errors.say(f"error: {e}")
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv))
