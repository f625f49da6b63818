r"""Training-step benchmark: median step time, img/s, MFU, device memory and compile time of a config's real
train step (training/step.py's jit, shardings, donation and optimizer) on synthetic batches of its layout.

  python -m visionfm_jax.bench --config=configs/vit_huge.py:S/16 --config.global_batch_size=8 \
      --config.precision.compute_dtype=float32 [--steps=10] [--warmup=2] [--compare=torch]

Any config field is overridable as in `main`. On CPU, `--cpu_dots=onednn|xnn|eigen` compiles the step with every
dot routed to that library instead of XLA's default choice (see bench/primitives.py). These are XLA's
experimental options: with jaxlib 0.10.2, `onednn` aborts the process ("partition compile failed") on some
graphs (the tiny ViT of the tests), while it compiles ViT-S/16 and SwinV2-T.

`--compare=torch` builds the PyTorch twin (HF transformers ViT or Swinv2 with the same architecture, batch,
dtype, clipping and AdamW; bench/torch_twin.py) on the same machine and interleaves its steps with ours, one of
each in turn (who goes first alternates), so that load from other jobs falls on both alike; `ratio` is our median
step time over its (below 1: we are faster), `cpu_ratio` the same for the CPU seconds the two processes spent per
step. On a shared machine the load drifts from one second to the next, so the report also takes the ratio within
each interleaved pair of steps: `ratio_paired` is their median and `ratio_ci90` a 90% bootstrap interval of that
median (resampling the pairs); `verdict` says "faster" or "slower" only when the whole interval lies on one side
of 1, else "within noise".

`--compare=plain` interleaves the same way with our own step traced with `kernels.forced('plain')` (every
backend trick of models/kernels.py off): the ratio says what those tricks buy (below 1: they pay).

`--profile=DIR` traces `--profile_steps` (3) more steps with jax.profiler and prints the busiest operations of
each device timeline (bench/profile.py): where the step's time goes, e.g. for the MFU gap on a GPU.

Figures:

  step_s           median wall seconds of one step after `--warmup` steps (also min and max)
  img_per_sec      global batch / step_s
  model_tflops     analytic training FLOPs per step (flops.py; 3 x forward, remat not counted) / step_s / 1e12
  mfu              model FLOP/s / (device peak x devices), when the device's 16-bit peak is known (flops.py)
  compile_s        lowering + compiling the step ahead of time
  memory_plan_bytes  per device, as compiled: arguments + outputs - donated + temporaries
  peak_bytes_in_use  per device, the allocator's peak (GPU; null on CPU)

The last line printed is one JSON object with every figure, the device and the versions.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from visionfm_jax import cli, models
from visionfm_jax.bench import primitives
from visionfm_jax.bench import profile as profile_lib
from visionfm_jax.bench import step as step_lib
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import kernels
from visionfm_jax.training import checks, flops


def make_flags(argv) -> flags.FlagValues:
  fv = flags.FlagValues()
  # config_flags defines one flag per `--config.<field>` override it finds in `sys_argv`.
  config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant'.", lock_config=True, flag_values=fv, sys_argv=list(argv)
  )
  flags.DEFINE_integer("steps", 10, "Timed steps (of each side with --compare).", flag_values=fv)
  flags.DEFINE_integer("devices", 0, "Use the first N devices (one process); 0: all.", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.", flag_values=fv)
  flags.DEFINE_string(
    "profile",
    "",
    "Directory for a profiler trace of --profile_steps more steps, summarised "
    "as the busiest operations per device timeline (bench/profile.py); '' = none.",
    flag_values=fv,
  )
  flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile.", flag_values=fv)
  flags.DEFINE_enum(
    "cpu_dots",
    "default",
    list(primitives.CPU_DOT_BACKENDS),
    "XLA CPU library for the step's dots (compiler options of this executable only).",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "compare",
    "",
    ["", "torch", "plain"],
    "Also time the PyTorch twin (classification with ViT or SwinV2), or our step with "
    "the plain forms of models/kernels.py.",
    flag_values=fv,
  )
  flags.DEFINE_list(
    "try_kernels",
    [],
    "Kernel candidates to trace the step with (models/kernels.py CANDIDATES: "
    + ", ".join(kernels.CANDIDATES)
    + "), in place of XLA's own kernels.",
    flag_values=fv,
  )
  return fv


def versions() -> dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  out = {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jax.lib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
  }
  if "torch" in sys.modules:
    out["torch"] = sys.modules["torch"].__version__
    out["transformers"] = sys.modules["transformers"].__version__
  return out


def device_name() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"cpu ({platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores)"
  return device.device_kind


def summarize(times: list[tuple[float, float]]) -> dict[str, float]:
  walls, cpus = [t[0] for t in times], [t[1] for t in times]
  return {
    "step_s": statistics.median(walls),
    "step_s_min": min(walls),
    "step_s_max": max(walls),
    "cpu_s": statistics.median(cpus),
  }


def paired_ratio(ours: list[float], theirs: list[float], *, resamples: int = 2000, seed: int = 0) -> dict:
  """The median of ours[i] / theirs[i] over interleaved pairs, a 90% percentile-bootstrap interval of it, and
  whether that interval lies below 1 ("faster"), above 1 ("slower") or across it ("within noise")."""
  ratios = np.asarray(ours, np.float64) / np.asarray(theirs, np.float64)
  rng = np.random.default_rng(seed)
  medians = np.median(ratios[rng.integers(0, len(ratios), (resamples, len(ratios)))], axis=1)
  low, high = np.quantile(medians, [0.05, 0.95])
  verdict = "faster" if high < 1 else "slower" if low > 1 else "within noise"
  return {"ratio_paired": float(np.median(ratios)), "ratio_ci90": [float(low), float(high)], "verdict": verdict}


def benchmark(
  config,
  *,
  steps: int,
  warmup: int,
  compare: str = "",
  name: str = "",
  devices: int = 0,
  cpu_dots: str = "default",
  profile: str = "",
  profile_steps: int = 3,
  try_kernels=(),
) -> dict:
  """Runs the benchmark on the first `devices` devices (0: all); returns the figures of the JSON line (with
  `profile`, a directory: 'profile' holds the trace file and its summary, bench/profile.py)."""
  if steps < 1 or warmup < 0 or profile_steps < 1:
    raise ConfigError(f"--steps={steps} and --profile_steps={profile_steps} must be >= 1 and --warmup={warmup} >= 0")
  if devices and (jax.process_count() > 1 or not 0 < devices <= jax.device_count()):
    raise ConfigError(f"--devices={devices}: a single process has {jax.device_count()} devices")
  try:
    kernels.check_candidates(try_kernels, "--try_kernels")
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if cpu_dots != "default" and jax.default_backend() != "cpu":
    raise ConfigError(f"--cpu_dots={cpu_dots} selects an XLA CPU library; this backend is {jax.default_backend()}")
  mesh_devices = jax.devices()[:devices] if devices else jax.devices()
  checks.validate(config, len(mesh_devices))
  if compare == "torch":  # a config without a twin fails before anything compiles
    from visionfm_jax.bench import torch_twin  # pylint: disable=g-import-not-at-top

    torch_twin.twin_architecture(config, models.build(config.model, jnp.float32, jax.default_backend()))
  ours = step_lib.JaxStep(config, mesh_devices, primitives.CPU_DOT_BACKENDS[cpu_dots], try_kernels=try_kernels)
  runners = {"ours": ours}
  if compare == "torch":
    runners["torch"] = torch_twin.TorchStep(config, ours.task.model, jax.device_get(ours.batch))
  if compare == "plain":
    runners["plain"] = step_lib.JaxStep(
      config, mesh_devices, primitives.CPU_DOT_BACKENDS[cpu_dots], kernel_forms="plain"
    )
  for _ in range(warmup):
    for runner in runners.values():
      runner.timed_step()
  times = {side: [] for side in runners}
  order = list(runners)
  for _ in range(steps):
    for side in order:
      times[side].append(runners[side].timed_step())
    order.reverse()  # neither side always runs right after the other

  result = {
    "config": name,
    "device": device_name(),
    "devices": len(mesh_devices),
    "global_batch": config.global_batch_size,
    "dtype": config.precision.compute_dtype,
    "steps": steps,
    "cpu_dots": cpu_dots,
    "try_kernels": sorted(try_kernels),
    **summarize(times["ours"]),
  }
  result["img_per_sec"] = config.global_batch_size / result["step_s"]
  flops_per_step = ours.flops_per_step()
  peak = flops.device_peak_flops(config.precision.compute_dtype)
  result["model_tflops"] = flops_per_step / result["step_s"] / 1e12 if flops_per_step else None
  result["mfu"] = flops_per_step / result["step_s"] / (peak * len(mesh_devices)) if flops_per_step and peak else None
  result["compile_s"] = ours.compile_seconds
  result.update(ours.memory())
  result["loss"] = ours.loss()
  if profile:
    trace = profile_lib.trace_steps(ours.timed_step, profile_steps, profile)
    timelines = profile_lib.add_step_shares(profile_lib.summarize(trace), profile_steps, result["step_s"])
    result["profile"] = {"trace": trace, "steps": profile_steps, "timelines": timelines}
  if compare:
    theirs = summarize(times[compare])
    result[compare] = {
      **theirs,
      "img_per_sec": config.global_batch_size / theirs["step_s"],
      "loss": runners[compare].loss(),
    }
    if compare == "torch":
      result[compare]["attention"] = runners[compare].attention
    result["ratio"] = result["step_s"] / theirs["step_s"]
    result["cpu_ratio"] = result["cpu_s"] / theirs["cpu_s"]
    result.update(paired_ratio([t[0] for t in times["ours"]], [t[0] for t in times[compare]]))
  result["versions"] = versions()
  return result


def _print_table(result: dict) -> None:
  rows = [("ours", result)] + ([(k, result[k]) for k in ("torch", "plain") if k in result])
  for name, r in rows:
    print(
      f"{name:>6}: step {r['step_s'] * 1e3:9.1f} ms (min {r['step_s_min'] * 1e3:.1f}, max "
      f"{r['step_s_max'] * 1e3:.1f})  {r['img_per_sec']:9.1f} img/s  cpu {r['cpu_s']:.3f} s/step  "
      f"loss {r['loss']:.4f}"
    )
  if result.get("mfu") is not None:
    print(f"   mfu: {result['mfu']:.3f} ({result['model_tflops']:.1f} TFLOP/s of model FLOPs)")
  if "ratio" in result:
    low, high = result["ratio_ci90"]
    print(f" ratio: {result['ratio']:.3f} (wall), {result['cpu_ratio']:.3f} (cpu seconds); below 1 = ours faster")
    print(
      f"        per interleaved pair: median {result['ratio_paired']:.3f}, 90% interval [{low:.3f}, {high:.3f}]"
      f" over {result['steps']} pairs: {result['verdict']}"
    )


def _body(name: str, fv, rest):
  del rest
  if fv.config is None:
    raise ConfigError("--config is required, e.g. --config=configs/vit_huge.py:S/16")
  result = benchmark(
    fv.config,
    steps=fv.steps,
    warmup=fv.warmup,
    compare=fv.compare,
    name=name,
    devices=fv.devices,
    cpu_dots=fv.cpu_dots,
    profile=fv.profile,
    profile_steps=fv.profile_steps,
    try_kernels=fv.try_kernels,
  )
  if jax.process_index() == 0:
    _print_table(result)
    if "profile" in result:
      print(f"profile: {result['profile']['trace']} (TensorBoard, XProf or ui.perfetto.dev open it)")
      profile_lib.print_summary(result["profile"]["timelines"], result["profile"]["steps"])
    print(json.dumps(result, sort_keys=True))


def main(argv) -> int:
  """Parses `argv` (program name first), runs the benchmark, prints the report; returns the exit status."""
  name = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  return cli.run(argv, make_flags(argv), __doc__, functools.partial(_body, name))


if __name__ == "__main__":
  sys.exit(main(sys.argv))
