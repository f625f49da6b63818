r"""A per-kernel roofline of a config's train step as XLA compiles it for a GPU, on a machine without one:

  python -m visionfm_jax.bench.roofline --config=configs/vit_huge.py --target=h100 [--devices=N] [--top=15] \
      [--config.global_batch_size=128 ...]
  python -m visionfm_jax.bench.roofline --calibrate [--rows=ROWS.json] [--free=gemm_fp8]
  python -m visionfm_jax.bench.roofline --hlo=DUMP.hlo.gz --config=... --group='stage_\d'

The step is compiled deviceless for `--target` (bench/gpu_target.py; `pip install -e '.[gpu-aot]'`) over N GPUs
on nodes of 8, and its optimised program read kernel by kernel (bench/hlo_cost.py: loop bodies by their trip
counts). Each kernel is priced as

  max(FLOPs / (peak x efficiency of its class), bytes / (HBM bandwidth x memory efficiency)) + launch cost

with the 16-bit tensor-core peak for bf16/fp16 products, the FP8 peak for FP8 ones (their own efficiency) and the
TF32 peak for fp32 ones. A collective costs its
payload over the link its group crosses (NVLink within a node, the network across nodes: ring all-gather and
reduce-scatter send (n-1)/n of the gathered buffer, all-reduce twice that); an async collective is hidden by
the kernels the schedule places between its start and its done, and only what they do not cover adds to the
step. Collectives in flight together run one after another, as XLA issues them on one stream. The predicted step
is the sum over the compute stream plus that exposed time.

The efficiencies and launch cost are not guesses: `--calibrate` compiles every on-device row of
`gpu_targets/measured.json` (the GPU figures of BENCHMARKS.md), fits the numbers to their measured step times
(least squares on log(estimate / measured)) and writes `gpu_targets/calibration.json`; it prints estimate /
measured per row, also leaving each row out of its own fit, so the spread says how far a prediction can be
trusted. A row prices the program its code compiled: once the code has moved on, `--free=NAMES` fits only the
prices a new row exercises (FP8 GEMMs' `gemm_fp8`) on the rows the file does not hold, the others held. A target
without measured rows of its own (a100, h200) uses the efficiencies fitted on the others, its 16-bit GEMMs at that
efficiency times its own over the fitted GPU's at each GEMM's shape (M, N, K) from public cuBLAS figures
(bench/gemm_efficiency.py, gpu_targets/gemm_efficiency.json): a prediction, labelled as one.

`--group=REGEX` adds an account of the step by the part of each kernel's framework op (its label, e.g.
`bwd: SwinV2/stage_2/blocks/plain/mlp/fc1/dot_general`) that REGEX matches first (its first group, if it has
one), the kernels it does not match under `other`: `stage_\d` gives SwinV2's stages, `(attn/qkv|mlp/fc\d|cpb_mlp)`
a block's parts.

Prints the top kernels by predicted time, the share of each class, the plan's bytes per device, and a last line
of JSON: predicted_step_ms, predicted_mfu (analytic model FLOPs, training/flops.py, over the predicted step and
the target's peak), plan_gib, the classes' milliseconds and the calibration used. Every figure here is a
prediction; only `python -m visionfm_jax.bench` on a GPU measures.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import gzip
import hashlib
import json
import math
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from visionfm_jax import cli, config_lib
from visionfm_jax.bench import gpu_target, hlo_cost, memory_plan
from visionfm_jax.bench.pricing import CALIBRATION, Priced, Prices, load_prices, predict
from visionfm_jax.errors import ConfigError, UserError

HERE = os.path.dirname(os.path.abspath(__file__))
MEASURED = os.path.join(HERE, "gpu_targets", "measured.json")


# ------------------------------------------------------------------------------------------------ compiling


@dataclasses.dataclass
class Compiled:
  """One compiled setup: its kernels, its memory plan and the model FLOPs MFU counts."""

  program: hlo_cost.Program
  plan_bytes: int
  model_flops: float | None
  devices: int
  target: gpu_target.Target
  hlo_text: str = dataclasses.field(repr=False, default="")


def compile_setup(config, target: gpu_target.Target, devices: int, try_kernels=()) -> Compiled:
  compiled, task, _ = memory_plan.compile_step(config, devices, target.name, try_kernels)
  per_example = task.train_flops_per_example()
  text = compiled.as_text()
  return Compiled(
    hlo_cost.Program(text, target.gpus_per_node),
    memory_plan.plan_bytes(compiled.memory_analysis()),
    per_example * config.global_batch_size if per_example else None,
    devices,
    target,
    text,
  )


def dumped_setup(path: str, config, target: gpu_target.Target, devices: int) -> Compiled:
  """A program written by --dump_hlo; its memory plan is unknown (0), its model FLOPs those of `config` if given."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      text = f.read()
    program = hlo_cost.Program(text, target.gpus_per_node)
  except (OSError, ValueError) as e:
    raise UserError(f"--hlo={path}: not a readable HLO module ({e})") from e
  model_flops = None
  if config is not None:
    from visionfm_jax import tasks  # pylint: disable=g-import-not-at-top

    per_example = tasks.build(config).train_flops_per_example()
    model_flops = per_example * config.global_batch_size if per_example else None
  return Compiled(program, 0, model_flops, devices, target, text)


def write_text(path: str, text: str) -> None:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(text)


def mfu(setup: Compiled, step_s: float, compute_dtype: str) -> float | None:
  peak = setup.target.peak_flops_16bit if compute_dtype in ("bfloat16", "float16") else None
  return setup.model_flops / step_s / (peak * setup.devices) if setup.model_flops and peak else None


# ------------------------------------------------------------------------------------------------ reporting


def top_kernels(setup: Compiled, prediction: dict, top: int) -> list[dict]:
  """The kernels of most predicted time, those of one framework op and class taken together."""
  groups = collections.defaultdict(lambda: {"ms": 0.0, "launches": 0, "tflops": 0.0, "gb": 0.0})
  for kernel, seconds in zip(setup.program.kernels, prediction["per_kernel_s"]):
    group = groups[(kernel.kind, kernel.label or kernel.name)]
    group["ms"] += seconds * 1e3
    group["launches"] += kernel.count
    group["tflops"] += kernel.flops * kernel.count / 1e12
    group["gb"] += kernel.bytes * kernel.count / 1e9
  rows = [{"class": kind, "op": label, **values} for (kind, label), values in groups.items()]
  return sorted(rows, key=lambda r: -r["ms"])[:top]


def grouped_ms(setup: Compiled, prediction: dict, pattern: str) -> dict[str, float]:
  """Predicted milliseconds by the part of each kernel's label that `pattern` matches (`--group`), largest first;
  the collectives by their exposed time only, under `collectives (exposed)`."""
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise UserError(f"--group={pattern}: not a regular expression ({e})") from e
  groups = collections.Counter()
  for kernel, seconds in zip(setup.program.kernels, prediction["per_kernel_s"]):
    if kernel.kind == "collective":
      continue
    match = compiled.search(kernel.label or kernel.name)
    key = (match.group(1) if compiled.groups else match.group(0)) if match else "other"
    groups[key] += seconds * 1e3
  groups["collectives (exposed)"] = prediction["exposed_collective_s"] * 1e3
  return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def print_report(
  setup: Compiled, prediction: dict, config, top: int, prices: Prices, record: dict, group: str = ""
) -> dict:
  step_ms = prediction["step_s"] * 1e3
  print(f"{'class':<12} {'ms':>9} {'share':>7}  {'launches':>8} {'TFLOP':>8} {'GB':>8}  op")
  for row in top_kernels(setup, prediction, top):
    print(
      f"{row['class']:<12} {row['ms']:9.2f} {row['ms'] / step_ms:7.1%}  {row['launches']:8d} "
      f"{row['tflops']:8.2f} {row['gb']:8.2f}  {row['op'][:90]}"
    )
  print()
  for kind, seconds in sorted(prediction["by_class_s"].items(), key=lambda kv: -kv[1]):
    print(f"{kind:<20} {seconds * 1e3:9.2f} ms {seconds / prediction['step_s']:7.1%}")
  groups = grouped_ms(setup, prediction, group) if group else {}
  if groups:
    print(f"\nby --group={group}:")
    for name, ms in groups.items():
      print(f"{name[:40]:<40} {ms:9.2f} ms {ms / step_ms:7.1%}")
  if setup.program.uncounted_loops:
    print(
      f"note: {len(setup.program.uncounted_loops)} loops of unknown trip count are counted once "
      f"({', '.join(setup.program.uncounted_loops[:5])}): data-dependent loops (random sampling's rejection "
      f"loops) cost little; a loop over layers or micro-batches would be underestimated"
    )
  predicted_mfu = mfu(setup, prediction["step_s"], config.precision.compute_dtype) if config else None
  calibrated = record.get("target")
  basis = (
    f"calibrated on {len(record.get('rows', []))} {calibrated} rows"
    if calibrated == setup.target.name
    else f"efficiencies calibrated on {calibrated}, applied to {setup.target.name}"
    if calibrated
    else "uncalibrated default prices"
  )
  print(
    f"\npredicted (not measured) on {setup.devices} x {setup.target.description}: step {step_ms:.1f} ms "
    f"(exposed collectives {prediction['exposed_collective_s'] * 1e3:.1f} ms), MFU "
    f"{'n/a' if predicted_mfu is None else f'{predicted_mfu:.3f}'}, plan {setup.plan_bytes / 2**30:.3f} GiB "
    f"per device; {basis}"
  )
  summary = {
    "target": setup.target.name,
    "devices": setup.devices,
    "predicted_step_ms": step_ms,
    "uncounted_loops": len(setup.program.uncounted_loops),
    "predicted_mfu": predicted_mfu,
    "plan_gib": setup.plan_bytes / 2**30,
    "exposed_collective_ms": prediction["exposed_collective_s"] * 1e3,
    "class_ms": {k: v * 1e3 for k, v in prediction["by_class_s"].items()},
    "gemm_tflops": sum(k.flops * k.count for k in setup.program.kernels if k.kind == "gemm") / 1e12,
    "model_tflops": setup.model_flops / 1e12 if setup.model_flops else None,
    "prices": dataclasses.asdict(prices),
    "calibration": basis,
    **({"group_ms": groups} if groups else {}),
  }
  print(json.dumps(summary, sort_keys=True), flush=True)
  return summary


# ------------------------------------------------------------------------------------------------ calibrating


def row_config(row: dict, common: dict):
  config = config_lib.load(row["config"])
  return config_lib.set_paths(config, {**common, **row["overrides"]})


def cache_dir() -> str:
  return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "visionfm_jax", "programs")


def source_digest() -> str:
  """A digest of this package's Python sources: a program compiled from other code is another program."""
  package = os.path.dirname(HERE)
  digest = hashlib.sha256()
  for folder, _, files in sorted(os.walk(package)):
    for name in sorted(f for f in files if f.endswith(".py")):
      with open(os.path.join(folder, name), "rb") as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


def cached_setup(config, target: gpu_target.Target, devices: int, label: str, try_kernels=()) -> Compiled:
  """`compile_setup`, kept in `cache_dir()` under a key of everything that decides the program (the config, the
  target's description and its devices, the kernel candidates, jax's version, XLA_FLAGS, the package's code), so
  that a recalibration recompiles only new rows."""
  import jax  # pylint: disable=g-import-not-at-top

  with open(target.spec_file, encoding="utf-8") as f:
    spec = f.read()
  key = hashlib.sha256(
    json.dumps(
      [
        config.to_json_best_effort(sort_keys=True),
        target.name,
        spec,
        devices,
        sorted(try_kernels),
        jax.__version__,
        os.environ.get("XLA_FLAGS", ""),
        source_digest(),
      ]
    ).encode()
  ).hexdigest()[:20]
  path = os.path.join(cache_dir(), key)
  if os.path.exists(path + ".json"):
    with open(path + ".json", encoding="utf-8") as f:
      meta = json.load(f)
    with gzip.open(path + ".hlo.gz", "rt", encoding="utf-8") as f:
      text = f.read()
    print(f"{label}: compiled program from {path}.hlo.gz", flush=True)
    return Compiled(
      hlo_cost.Program(text, target.gpus_per_node), meta["plan_bytes"], meta["model_flops"], devices, target, text
    )
  print(f"{label}: compiling ...", flush=True)
  setup = compile_setup(config, target, devices, try_kernels)
  os.makedirs(cache_dir(), exist_ok=True)
  write_text(path + ".hlo.gz", setup.hlo_text)
  with open(path + ".json", "w", encoding="utf-8") as f:
    json.dump({"plan_bytes": setup.plan_bytes, "model_flops": setup.model_flops, "label": label}, f)
  return setup


PRICE_NAMES = tuple(field.name for field in dataclasses.fields(Prices))


def fit(setups: list[Compiled], measured_s: list[float], start: Prices, free=None) -> Prices:
  """Prices minimising the squared log-ratios of predicted to measured step times. `free` names the prices fitted
  (default: all, gemm_fp8 only where a row has FP8 GEMMs); the others stay at `start`'s."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import optimize  # pylint: disable=g-import-not-at-top

  priced = [Priced(s.program, s.target) for s in setups]
  has_fp8 = any(p.is_fp8.any() for p in priced)
  free = [n for n in (free or PRICE_NAMES) if n != "gemm_fp8" or has_fp8]
  # efficiencies in [0.02, 1], the launch cost in [0, 20] us
  bounds = {n: (0.0, 20.0) if n == "launch_us" else (0.02, 1.0) for n in PRICE_NAMES}
  fixed = dataclasses.asdict(start)
  if "gemm_fp8" not in free:
    fixed["gemm_fp8"] = fixed["gemm_fp8"] if has_fp8 else None

  def unpack(z):  # each free price through a logistic between its bounds
    z = np.clip(z, -30.0, 30.0)
    values = {n: float(bounds[n][0] + (bounds[n][1] - bounds[n][0]) / (1 + np.exp(-v))) for n, v in zip(free, z)}
    return Prices(**{**fixed, **values})

  def loss(z):
    prices = unpack(z)
    return sum(math.log(p.step_seconds(prices) / m) ** 2 for p, m in zip(priced, measured_s))

  def logit(name):
    value = fixed[name] if fixed[name] is not None else fixed["gemm"]
    low, high = bounds[name]
    share = (value - low) / (high - low)
    return math.log(share / (1 - share))

  if not free:  # nothing these rows could fit
    return unpack(np.zeros(0))
  result = optimize.minimize(
    loss,
    np.array([logit(n) for n in free]),
    method="Nelder-Mead",
    options={"xatol": 1e-5, "fatol": 1e-10, "maxiter": 4000},
  )
  return unpack(result.x)


def calibrate(rows_path: str, free=None) -> dict:
  """Fits the prices to the measured rows, each compiled at this code. With `free`, only those prices are fitted,
  the others held at the calibration on file, and only the rows it does not hold are compiled: rows measured
  at older code price with the programs that code compiled (recorded there), not with today's."""
  with open(rows_path, encoding="utf-8") as f:
    spec = json.load(f)
  rows, common = spec["rows"], spec.get("common_overrides", {})
  targets = {row["target"] for row in rows}
  if len(targets) != 1:
    raise ConfigError(f"{rows_path}: rows of one target per calibration, found {sorted(targets)}")
  target = gpu_target.get(next(iter(targets)))
  held, on_file = load_prices()
  kept = {r["label"]: r for r in on_file.get("rows", [])} if free else {}
  if free and on_file.get("target") != target.name:
    raise ConfigError(f"--free: the calibration on file is for {on_file.get('target')}, the rows for {target.name}")
  new = [row for row in rows if row["label"] not in kept]
  setups, measured = [], []
  for row in new:
    # a row measured with kernel candidates (a `bench --try_kernels` lead) names them
    setups.append(
      cached_setup(row_config(row, common), target, row["devices"], row["label"], row.get("try_kernels", ()))
    )
    measured.append(row["step_ms"] / 1e3)
  prices = fit(setups, measured, held if free else Prices(), free)
  results = dict(kept)
  for i, (row, setup) in enumerate(zip(new, setups)):
    held_out = fit(setups[:i] + setups[i + 1 :], measured[:i] + measured[i + 1 :], prices, free)
    results[row["label"]] = {
      "label": row["label"],
      "measured_ms": row["step_ms"],
      "estimate_ms": predict(setup.program, target, prices)["step_s"] * 1e3,
      "held_out_estimate_ms": predict(setup.program, target, held_out)["step_s"] * 1e3,
      "plan_gib": setup.plan_bytes / 2**30,
      "measured_peak_gib": row.get("peak_gib"),
    }
  import jax  # pylint: disable=g-import-not-at-top

  fitted = (
    {**on_file.get("fitted", {on_file.get("date"): list(PRICE_NAMES[:4])}), date_today(): free}
    if free
    else {date_today(): list(PRICE_NAMES)}
  )
  record = {
    "target": target.name,
    "prices": dataclasses.asdict(prices),
    "rows": [results[r["label"]] for r in rows],
    "jax": jax.__version__,
    "date": date_today(),
    "fitted": fitted,
    "xla_flags": gpu_target.launch_flags(target),
  }
  print(
    f"\n{'row':<48} {'measured':>9} {'estimate':>9} {'ratio':>6} {'held out':>9} {'ratio':>6} "
    f"{'plan GiB':>9} {'peak GiB':>9}"
  )
  for r in record["rows"]:
    print(
      f"{r['label']:<48} {r['measured_ms']:9.1f} {r['estimate_ms']:9.1f} "
      f"{r['estimate_ms'] / r['measured_ms']:6.3f} "
      f"{r['held_out_estimate_ms']:9.1f} {r['held_out_estimate_ms'] / r['measured_ms']:6.3f} "
      f"{r['plan_gib']:9.3f} {r['measured_peak_gib'] or float('nan'):9.1f}"
    )
  print(f"prices: {dataclasses.asdict(prices)}")
  return record


def date_today() -> str:
  return datetime.date.today().isoformat()


# ------------------------------------------------------------------------------------------------ entry


def make_flags(argv) -> flags.FlagValues:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant'.", lock_config=True, flag_values=fv, sys_argv=list(argv)
  )
  flags.DEFINE_string("target", "h100", f"GPU to compile for: {', '.join(sorted(gpu_target.TARGETS))}.", flag_values=fv)
  flags.DEFINE_integer("devices", 1, "GPUs of the mesh (nodes of 8).", flag_values=fv)
  flags.DEFINE_integer("top", 15, "Kernel groups to list.", flag_values=fv)
  flags.DEFINE_string(
    "dump_hlo", "", "Also write the compiled program's optimised HLO text here (.gz: gzipped).", flag_values=fv
  )
  flags.DEFINE_bool(
    "calibrate", False, "Fit the kernel prices to --rows and write gpu_targets/calibration.json.", flag_values=fv
  )
  flags.DEFINE_string("rows", MEASURED, "Measured rows to calibrate on.", flag_values=fv)
  flags.DEFINE_list(
    "free",
    [],
    f"With --calibrate: fit only these prices ({', '.join(PRICE_NAMES)}) on the rows "
    "the calibration on file does not hold, the others held at its values; [] fits every price on "
    "every row, each compiled at this code.",
    flag_values=fv,
  )
  flags.DEFINE_list(
    "try_kernels",
    [],
    "Kernel candidates to compile the step with (models/kernels.py CANDIDATES, e.g. pallas_layer_norm).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "group",
    "",
    "Also account for the step by the part of each kernel's op name this regular "
    "expression matches (its first group if any), e.g. 'stage_\\d'.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "hlo",
    "",
    "Price this dumped program (--dump_hlo's file) instead of compiling --config's step; "
    "with --config too, MFU counts that config's model FLOPs.",
    flag_values=fv,
  )
  return fv


def _body(fv, rest):
  cli.check_args(fv, rest)
  if fv.calibrate:
    unknown = sorted(set(fv.free) - set(PRICE_NAMES))
    if unknown:
      raise UserError(f"--free: no price {', '.join(unknown)} (the prices: {', '.join(PRICE_NAMES)})")
    target = gpu_target.get(fv.target)
    gpu_target.require_compiler(target)
    record = calibrate(fv.rows, fv.free or None)
    with open(CALIBRATION, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1, sort_keys=True)
      f.write("\n")
    print(f"wrote {CALIBRATION}")
    return
  target = gpu_target.get(fv.target)
  if fv.hlo:
    setup = dumped_setup(fv.hlo, fv.config, target, fv.devices)
  elif fv.config is None:
    raise UserError("--config is required (or --calibrate, or --hlo)")
  else:
    gpu_target.require_compiler(target)
    config_lib.check_domains(fv.config)
    from visionfm_jax.models import kernels  # pylint: disable=g-import-not-at-top  (after ensure_devices)

    try:
      kernels.check_candidates(fv.try_kernels, "--try_kernels")
    except ValueError as e:
      raise UserError(str(e)) from e
    setup = compile_setup(fv.config, target, fv.devices, fv.try_kernels)
    if fv.dump_hlo:
      write_text(fv.dump_hlo, setup.hlo_text)
  prices, record = load_prices()
  print_report(
    setup, predict(setup.program, target, prices, record.get("target")), fv.config, fv.top, prices, record, fv.group
  )


def main(argv) -> int:
  fv = make_flags(argv)
  if not any(a in cli.HELP_FLAGS for a in argv[1:]):
    try:
      fv(list(argv))
      memory_plan.ensure_devices(fv.devices, argv, fv.target, "visionfm_jax.bench.roofline")
    except flags.Error:
      pass  # cli.run reports it
  return cli.run(argv, make_flags(argv), __doc__, _body)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
