r"""Plans a config's setup for a cluster from shapes only (nothing is allocated): per-device memory and FLOPs of
its train step on a simulated mesh, over remat policies x micro-batch counts x attention implementations, and
the cheapest setup that fits the devices' memory:

  python -m visionfm_jax.bench.memory_plan --config=configs/swinv2_g_clip.py --devices=128 --fit=80GB \
      [--remat=nothing_saveable,dots_saveable] [--micro_batches=1,2] [--attention=softmax] [--fsdp=all,8] \
      [--unroll=1,0] [--first_fit]

Each candidate is the config with `config.model.remat_policy`, `config.grad_accum_steps` (micro-batches) and
every `attention` field under `config.model` (all towers alike) set; its step is training/step.py's, lowered for
`--devices` simulated CPU devices (XLA_FLAGS --xla_force_host_platform_device_count; the tool re-executes
itself with it when the process has fewer devices) and compiled ahead of time. XLA's buffer assignment of the
partitioned program then gives what one device holds: the train state's shard (arguments; the donated state is
reused for the new one), the batch shard, and the temporaries (activations saved for the backward pass under
the remat policy, gathered parameters, gradients, collectives' buffers). The CPU compiler schedules and fuses
differently from the GPU one, so read the temporaries as an estimate (within tens of percent); the state bytes
are exact.

`--unroll` adds the block stacks' form to the sweep (`config.model.scan_unroll`: 1 a rolled loop, k blocks an
iteration, 0 straight-line code with each block's remat policy kept; models/layers.py `stack_blocks`): the params
are the same in every form, so it is a choice of program alone. A value of one number a stage, joined by `/`
(`0/0/3/0`), is a SwinV2 tower's form stage by stage (its `stage_scan_unrolls`: SwinV2-G's deep stage in groups of
block pairs, which compiles in bounded time, the short stages straight-line). Without it the config's own form is
planned.

`--fsdp` adds the layout to the sweep: `all` is FSDP / ZeRO over every device (`config.mesh.fsdp=-1`, data 1);
a number N shards over groups of N devices, a node's GPUs for N = 8, with the groups data-parallel
(`config.mesh.fsdp=N`, `config.mesh.data=-1`: hybrid sharding). Without it the config's own mesh is planned.

The cost of a candidate is XLA's cost-model FLOPs of one step on one device, remat's recomputation included.
XLA counts a while loop's body once; the tool multiplies each loop body (the scanned layers, the micro-batch
loop) by its known trip count, costing each body with the same cost model (`flops`; `xla_flops` is XLA's
figure as it comes). The cheapest setup is the one of fewest FLOPs among those that fit, then of fewer
micro-batches, then of fewer bytes. Compiled for a GPU `--target`, each candidate is also priced by the calibrated
roofline (bench/pricing.py: its kernels and collectives over NVLink within a node of 8 and the network across
nodes), and the fitting candidate of the shortest predicted step is chosen: layouts of equal FLOPs differ in
what their collectives leave exposed. Candidates are compiled in the order expected cheapest first (remat
policies from least to most recomputation, then fewer micro-batches); `--first_fit` stops at the first that
fits, which then is the choice, without compiling the rest. Attention implementations this backend cannot
compile (cuDNN off GPU: the simulated mesh is CPU) and micro-batch counts the config rejects (a micro-batch
that does not divide over the mesh) or that would change the loss (a contrastive task whose loss is not split
over micro-batches, tasks/base.py `couples_examples`) are not planned; a `skipped` line says why.

`--fit` is the memory of one device: `80GB` (GB = 1e9 bytes; also kB, MB, TB), `80GiB` (GiB = 2^30 bytes;
also KiB, MiB, TiB), or a number of bytes (`40e9`). Its default with `--target` is what a job launched with the
target's launch/ flags may allocate: the GPU's reported memory times their XLA_PYTHON_CLIENT_MEM_FRACTION (0.92 of
an A100 80GB's 79.2 GiB: 72.9 GiB; the rest is NCCL's and the CUDA libraries'); without a target, 80GB.

Prints one table row per candidate as it finishes (candidate, bytes per device, fits, GFLOPs), then the chosen
setup as the `--config.*` flags to pass to train, then one JSON object: devices, fit, fit_bytes, first_fit,
`candidates` (each with its setting and flags, mesh, strategy, global batch, state_params/state_opt bytes (analytic,
parallel.memory), argument/output/alias/temp bytes as compiled, total_bytes = arguments + outputs - aliased +
temporaries, flops, xla_flops, fits; with a target predicted_step_s and exposed_collective_s), `skipped` (flag: why) and
`chosen` (the chosen candidate, or null). When no candidate fits it says so on stderr and exits with status 2.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import re
import sys

from absl import flags, logging
from ml_collections import config_flags

from visionfm_jax import cli, config_lib
from visionfm_jax.bench import gpu_target, hlo_cost, pricing
from visionfm_jax.errors import ConfigError, UserError

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
GIB = 2**30
UNITS = {
  "": 1,
  "b": 1,
  "kb": 10**3,
  "mb": 10**6,
  "gb": 10**9,
  "tb": 10**12,
  "kib": 2**10,
  "mib": 2**20,
  "gib": 2**30,
  "tib": 2**40,
}
# jax.checkpoint policies from least to most recomputation in the backward pass: the order candidates compile in.
REMAT_BY_RECOMPUTE = (
  "none",
  "everything_saveable",
  "dots_saveable",
  "dots_with_no_batch_dims_and_attention_saveable",
  "dots_with_no_batch_dims_saveable",
  "nothing_saveable",
)


def make_flags(argv) -> flags.FlagValues:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant'.", lock_config=True, flag_values=fv, sys_argv=list(argv)
  )
  flags.DEFINE_integer(
    "devices", 8, "Simulated devices of the mesh (config.mesh resolves against them).", flag_values=fv
  )
  flags.DEFINE_string(
    "fit",
    "",
    "Memory of one device: 80GB (1e9 bytes per GB), 80GiB (2^30 per GiB), or "
    "bytes (40e9); empty: with --target, what a job launched with the target's launch/ flags may "
    "allocate (the GPU's memory times their XLA_PYTHON_CLIENT_MEM_FRACTION), else 80GB.",
    flag_values=fv,
  )
  flags.DEFINE_list("remat", ",".join(REMAT_BY_RECOMPUTE), "config.model.remat_policy values to plan.", flag_values=fv)
  flags.DEFINE_list("micro_batches", "1,2,4,8", "config.grad_accum_steps values to plan.", flag_values=fv)
  flags.DEFINE_list(
    "attention",
    "softmax,jax,cudnn",
    "Attention implementations to plan (models/kernels.py "
    "ATTENTION; a SwinV2's WINDOW_ATTENTION adds pallas), set in every attention field of "
    "config.model.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "target",
    "",
    "Compile for this GPU, deviceless (bench/gpu_target.py: "
    + ", ".join(sorted(gpu_target.TARGETS))
    + "; needs the gpu-aot extra); empty: simulated CPU "
    "devices.",
    flag_values=fv,
  )
  flags.DEFINE_list(
    "fsdp",
    "",
    "Layouts to plan: 'all' (config.mesh.fsdp=-1, data 1) or N (config.mesh.fsdp=N, "
    "data=-1: sharded within groups of N, e.g. a node's 8 GPUs, the groups data-parallel); empty: "
    "the config's mesh.",
    flag_values=fv,
  )
  flags.DEFINE_list(
    "unroll",
    "",
    "config.model.scan_unroll values to plan (blocks per iteration of the scanned "
    "stacks; 0: straight-line), or SwinV2 forms stage by stage (stage_scan_unrolls) as numbers "
    "joined by '/', e.g. 0/0/3/0; empty: the config's.",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "first_fit",
    False,
    "Stop at the first candidate that fits (in the expected-cheapest order) and choose it.",
    flag_values=fv,
  )
  return fv


def ensure_devices(count: int, argv, target: str = "", module: str = "visionfm_jax.bench.memory_plan") -> None:
  """Re-executes `module` in the environment its compile needs, unless this process has it: `count` simulated CPU
  devices, or for a GPU `target` the CPU platform with that GPU's XLA flags (gpu_target.environment). Must run
  before anything initialises a JAX backend."""
  if target:
    env = (
      gpu_target.environment(gpu_target.TARGETS[target], dict(os.environ)) if target in gpu_target.TARGETS else None
    )  # an unknown target is reported by the tool itself
  else:
    flag = f"{DEVICE_COUNT_FLAG}={count}"
    if flag in os.environ.get("XLA_FLAGS", ""):
      return
    import jax  # pylint: disable=g-import-not-at-top

    if jax.device_count() >= count:
      return
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(), JAX_PLATFORMS="cpu")
  if env is not None:
    os.execve(sys.executable, [sys.executable, "-m", module, *argv[1:]], env)


def parse_size(text: str, flag: str = "--fit") -> int:
  """Bytes of a size like '80GB' (1e9 bytes per GB), '80GiB' (2^30 per GiB) or '40e9'; ConfigError naming
  `flag` otherwise."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
  unit = match.group(2).lower() if match else None
  if unit not in UNITS or float(match.group(1)) <= 0:
    raise ConfigError(
      f"{flag}={text}: expected a positive size like 80GB (GB = 1e9 bytes), 80GiB (GiB = 2^30 bytes) or 40e9 (bytes)"
    )
  return int(float(match.group(1)) * UNITS[unit])


# ---------------------------------------------------------------------------------------------- candidates


def default_fit_bytes(target: str) -> int:
  """--fit's default: a job's share of the target GPU under its launch flags; 80 GB without a target."""
  return gpu_target.launch_memory_bytes(gpu_target.get(target)) if target else parse_size("80GB")


def fields_named(node, name: str, prefix: str = "model") -> dict[str, object]:
  """{dotted path: value} of every `name` field under config.model, nested towers included."""
  found = {}
  for key, value in node.items():
    path = f"{prefix}.{key}"
    if hasattr(value, "items"):
      found.update(fields_named(value, name, path))
    elif key == name:
      found[path] = value
  return found


def attention_fields(node) -> list[str]:
  return list(fields_named(node, "attention"))


def check_attention_names(config, attentions) -> None:
  """ConfigError unless every --attention name is one that every attention field of the config takes, by its
  row's domain: a SwinV2 tower's adds its window kernel ('pallas') to config_lib.ATTENTION."""
  paths = attention_fields(config.model)
  takes = [
    name
    for name in config_lib.WINDOW_ATTENTION
    if all(config_lib.domain_of(config, path).contains(name) for path in paths)
  ]
  unknown = [a for a in attentions if a not in takes]
  if unknown:
    raise ConfigError(
      f"--attention={','.join(attentions)}: {unknown} not in {tuple(takes)}, what "
      f"{', '.join(f'config.{path}' for path in paths)} take"
    )


def parse_counts(values: list[str]) -> list[int]:
  try:
    counts = sorted({int(v) for v in values})
  except ValueError:
    counts = []
  if not counts or counts[0] < 1:
    raise ConfigError(f"--micro_batches={','.join(values)}: expected positive integers")
  return counts


def layout_settings(config, devices: int, layouts) -> tuple[list[dict], dict[str, str]]:
  """`--fsdp` values as mesh settings ([{}]: the config's mesh), and those the config rejects as {flag: why}."""
  from visionfm_jax.training import checks  # pylint: disable=g-import-not-at-top

  settings, skipped = [], {}
  for value in dict.fromkeys(v.strip() for v in layouts):
    if value == "all":
      setting = {"mesh.fsdp": -1, "mesh.data": 1}
    elif value.isdigit() and int(value) > 0:
      setting = {"mesh.fsdp": int(value), "mesh.data": -1}
    else:
      raise ConfigError(f"--fsdp={','.join(layouts)}: {value!r} is neither 'all' nor a positive number of devices")
    try:
      checks.validate(apply(config, setting), devices)
    except ConfigError as e:
      skipped[f"--fsdp={value}"] = str(e)
      continue
    settings.append(setting)
  return (settings if layouts else [{}]), skipped


def candidate_settings(
  config, devices: int, remats, micro_batches, attentions, target: str = "", layouts=(), unrolls=()
):
  """The grid as {dotted config field: value}, expected cheapest first, and the values left out of it as
  {flag: why}: attention implementations this backend lacks, micro-batch counts or layouts the config rejects."""
  import jax  # pylint: disable=g-import-not-at-top

  from visionfm_jax.models import kernels  # pylint: disable=g-import-not-at-top
  from visionfm_jax.training import checks  # pylint: disable=g-import-not-at-top

  checks.validate(config)  # what the sweep does not vary must hold already
  unknown = [r for r in remats if r not in config_lib.REMAT_POLICIES]
  if unknown:
    raise ConfigError(f"--remat={','.join(remats)}: {unknown} not in {config_lib.REMAT_POLICIES}")
  by_stage = [
    (path, tuple(value)) for path, value in fields_named(config.model, "stage_remat_policies").items() if value
  ]
  if by_stage:
    path, value = by_stage[0]
    raise ConfigError(
      f"config.{path}={value}: its stages keep their own remat, which --remat (model.remat_policy) "
      f"would not change; price that form with bench.roofline, or plan with --config.{path}=()"
    )
  check_attention_names(config, attentions)
  skipped = {}
  if not target and jax.default_backend() != "gpu":
    for name in dict.fromkeys(a for a in attentions if a in kernels.GPU_ONLY_ATTENTION):
      skipped[f"--attention={name}"] = (
        f"GPU only, not planned on simulated {jax.default_backend()} devices "
        f"(--target=h100 plans it with the GPU compiler)"
      )
  counts = []
  for count in parse_counts(micro_batches):
    reason = why_not_micro_batches(config, count, devices)
    if reason:
      skipped[f"--micro_batches={count}"] = reason
    else:
      counts.append(count)
  fields = attention_fields(config.model)
  planned = [a for a in dict.fromkeys(attentions) if f"--attention={a}" not in skipped] if fields else [None]
  meshes, skipped_layouts = layout_settings(config, devices, layouts)
  skipped.update(skipped_layouts)
  grid = []
  for remat, count, unroll, attention, mesh in itertools.product(
    sorted(set(remats), key=REMAT_BY_RECOMPUTE.index), counts, parse_unrolls(unrolls), planned, meshes
  ):
    setting = {"model.remat_policy": remat, "grad_accum_steps": count}
    setting.update(unroll_setting(config.model, unroll))
    setting.update({path: attention for path in fields if attention is not None})
    grid.append({**setting, **mesh})
  return grid, skipped


def parse_unrolls(values) -> list[int | tuple[int, ...] | None]:
  """`--unroll` values as scan_unroll settings, a value of numbers joined by '/' as stage_scan_unrolls ([None]: the
  config's own)."""
  if not values:
    return [None]
  try:
    unrolls = list(dict.fromkeys(tuple(int(p) for p in v.split("/")) if "/" in v else int(v) for v in values))
  except ValueError:
    unrolls = [-1]
  if any(min(u) < 0 if isinstance(u, tuple) else u < 0 for u in unrolls):
    raise ConfigError(
      f"--unroll={','.join(values)}: expected blocks per loop iteration >= 1, or 0 (straight-line), "
      f"or one such number a stage joined by '/' (e.g. 0/0/3/0)"
    )
  return unrolls


def unroll_setting(model, unroll) -> dict[str, object]:
  """The config fields a `parse_unrolls` value sets: model.scan_unroll, or every stage_scan_unrolls field of the
  model's SwinV2 towers for a form stage by stage."""
  if unroll is None:
    return {}
  if not isinstance(unroll, tuple):
    return {"model.scan_unroll": unroll}
  paths = list(fields_named(model, "stage_scan_unrolls"))
  if not paths:
    raise ConfigError(
      f"--unroll={'/'.join(map(str, unroll))}: a form stage by stage is a SwinV2 tower's "
      f"(stage_scan_unrolls); this model has none"
    )
  return {path: unroll for path in paths}


def why_not_micro_batches(config, count: int, devices: int) -> str | None:
  """Why `count` micro-batches are no setup for `config`, or None: the config rejects them (a micro-batch that
  does not divide over the mesh), or they would change the loss of a task whose examples meet in it."""
  from visionfm_jax import tasks  # pylint: disable=g-import-not-at-top
  from visionfm_jax.training import checks  # pylint: disable=g-import-not-at-top

  try:
    checks.validate(apply(config, {"grad_accum_steps": count}), devices)
  except ConfigError as e:
    return str(e)
  task = tasks.TASKS[config.task]
  if count > 1 and task.couples_examples and not task.splits_loss:
    return (
      f"config.task={config.task}: its loss couples the examples of a batch and is not split "
      f"(tasks/base.py splits_loss), so each of {count} micro-batches would see only its own; the recipe "
      f"would change"
    )
  return None


def apply(config, setting: dict[str, object]):
  """A copy of `config` with the dotted fields of `setting` set."""
  return config_lib.set_paths(copy.deepcopy(config), setting)


def as_flags(setting: dict[str, object]) -> str:
  """The setting as --config flags a shell passes as they are (a tuple without spaces: `(0,0,3,0)`)."""
  return " ".join(
    f"--config.{path}=({','.join(map(str, value))})" if isinstance(value, tuple) else f"--config.{path}={value}"
    for path, value in setting.items()
  )


# --------------------------------------------------------------------------------------------------- FLOPs

LOOP = re.compile(r"\bwhile\([^\n]*?body=%?([\w.\-]+)[^\n]*?\"known_trip_count\":\{\"n\":\"(\d+)\"")
COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(", re.M)


def xla_flops(compiled) -> float:
  """XLA's cost-model FLOPs of a compiled program (a dict in jax 0.10, a list of one dict per program before)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    return float(sum(a.get("flops", 0.0) for a in analysis))
  return float(analysis.get("flops", 0.0))


def step_flops(compiled) -> float:
  """`loop_flops` of the compiled step; where this jaxlib lacks the private calls it needs, XLA's own count
  (loop bodies once, so scanned models look cheaper), with a warning saying so."""
  import jax  # pylint: disable=g-import-not-at-top

  try:
    return loop_flops(compiled.as_text(), jax.devices()[0].client)
  except (ImportError, AttributeError, TypeError) as e:
    logging.warning(
      "memory_plan: cannot count loop bodies per trip with this jaxlib (%s); FLOPs are XLA's "
      "own count, each loop body once",
      e,
    )
    return xla_flops(compiled)


def loop_flops(hlo_text: str, client) -> float:
  """XLA's cost-model FLOPs of a compiled module with each while loop's body counted `known_trip_count` times
  (XLA's own analysis counts it once). Each body is costed as the entry of a copy of the module's text, through
  jaxlib's HLO parser and cost analysis (private in jax 0.10). Loops without a known trip count stay counted
  once."""
  from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
  from jaxlib import _hlo  # pylint: disable=g-import-not-at-top

  header, _, body = hlo_text.partition("\n")
  name = header.split()[1].rstrip(",")
  marks = list(COMPUTATION.finditer(body))
  # each computation's text from its name on, without the ENTRY mark
  texts = {
    m.group(2): body[m.start() + len(m.group(1) or "") : nxt.start() if nxt else len(body)]
    for m, nxt in zip(marks, marks[1:] + [None])
  }
  entry_mark = next(m for m in marks if m.group(1))
  entry = entry_mark.group(2)
  without_entry = body[: entry_mark.start()] + body[entry_mark.start() + len(entry_mark.group(1)) :]
  once = {}

  def counted_once(computation: str) -> float:
    if computation not in once:
      text = without_entry.replace(texts[computation], "ENTRY " + texts[computation], 1)
      module = _hlo.hlo_module_from_text(f"HloModule {name}\n{text}")
      once[computation] = xla_client._xla.hlo_module_cost_analysis(client, module).get("flops", 0.0)  # pylint: disable=protected-access
    return once[computation]

  def unrolled(computation: str) -> float:
    total = counted_once(computation)
    for loop in LOOP.finditer(texts[computation]):
      loop_body, trips = loop.group(1), int(loop.group(2))
      total += trips * unrolled(loop_body) - counted_once(loop_body)
    return total

  return unrolled(entry)


# ---------------------------------------------------------------------------------------------------- plan


def compile_step(config, devices: int, target: str = "", try_kernels=()):
  """`config`'s train step compiled for its mesh over the first `devices` devices of this process, or over
  `devices` abstract GPUs of `target` (bench/gpu_target.py; deviceless). Returns (compiled, its task, the
  mesh)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from visionfm_jax import parallel, tasks  # pylint: disable=g-import-not-at-top
  from visionfm_jax.models import kernels  # pylint: disable=g-import-not-at-top
  from visionfm_jax.training import checks  # pylint: disable=g-import-not-at-top
  from visionfm_jax.training import step as step_lib

  gpu = gpu_target.get(target) if target else None
  if gpu:
    mesh_devices = gpu_target.devices(gpu, devices)
  elif jax.device_count() < devices:
    raise ConfigError(f"--devices={devices}: this process has {jax.device_count()} devices")
  else:
    mesh_devices = jax.devices()[:devices]
  checks.validate(config, devices)
  mesh = parallel.make_mesh(config.mesh, mesh_devices)
  task = tasks.build(config, mesh)
  task.check_training_devices()
  batch = task.synthetic_batch(1, np.random.default_rng(0))
  batch = {k: jax.ShapeDtypeStruct((config.global_batch_size,) + v.shape[1:], v.dtype) for k, v in batch.items()}
  # plan the program the accelerators run, not the simulating CPU's tricks; `try_kernels`: kernels.trying's
  memory = gpu_target.launch_memory(gpu) if gpu else contextlib.nullcontext()
  with kernels.forced("plain"), kernels.trying(try_kernels), memory:
    return step_lib.compile_train_step(config, mesh, batch, task), task, mesh


def plan(config, devices: int, target: str = "") -> dict:
  """Compiles `config`'s train step (`compile_step`); returns its per-device bytes and FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top

  from visionfm_jax import parallel  # pylint: disable=g-import-not-at-top
  from visionfm_jax.training import optim  # pylint: disable=g-import-not-at-top
  from visionfm_jax.training import step as step_lib

  compiled, task, mesh = compile_step(config, devices, target)
  tx, _ = optim.fresh_optimizer(config, task.model)
  abstract_boxed = jax.eval_shape(step_lib.make_init_fn(task, tx, config), jax.random.key(0))
  mesh_shape = dict(mesh.shape)
  state = parallel.bytes_per_device(
    abstract_boxed, mesh_shape, config.strategy, config.optimizer_over_data, config.sharding.overrides
  )
  analysis = compiled.memory_analysis()
  predicted = {}
  if target:  # no cost analysis for a deviceless GPU compile: the kernels' own FLOPs, loops by their trip counts
    program = hlo_cost.Program(compiled.as_text(), gpu_target.get(target).gpus_per_node)
    step, xla = program.total_flops(), None
    predicted = predicted_step(program, target)
  else:
    step, xla = step_flops(compiled), xla_flops(compiled)
  out = {
    "devices": devices,
    "target": target or "cpu",
    "mesh": mesh_shape,
    "strategy": config.strategy,
    "global_batch": config.global_batch_size,
    "grad_accum_steps": config.grad_accum_steps,
    "remat_policy": config.model.remat_policy,
    "compute_dtype": config.precision.compute_dtype,
    "state_params_bytes": state["params"],
    "state_opt_bytes": state["opt_state"],
    "argument_bytes": analysis.argument_size_in_bytes,
    "output_bytes": analysis.output_size_in_bytes,
    "alias_bytes": analysis.alias_size_in_bytes,
    "temp_bytes": analysis.temp_size_in_bytes,
    "xla_flops": xla,
    "flops": step,
    **predicted,
  }
  out["total_bytes"] = plan_bytes(analysis)
  return out


def predicted_step(program: hlo_cost.Program, target: str) -> dict[str, float]:
  """The calibrated roofline's step and exposed collectives of a program compiled for `target` (predictions)."""
  prices, record = pricing.load_prices()
  prediction = pricing.predict(program, gpu_target.get(target), prices, record.get("target"))
  return {"predicted_step_s": prediction["step_s"], "exposed_collective_s": prediction["exposed_collective_s"]}


def plan_bytes(analysis) -> int:
  """What one device holds at the step's peak, as compiled: arguments + outputs - donated + temporaries."""
  return (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + analysis.temp_size_in_bytes
  )


def plan_candidate(config, setting: dict[str, object], devices: int, fit_bytes: int, target: str = "") -> dict:
  row = {"setting": setting, "flags": as_flags(setting), **plan(apply(config, setting), devices, target)}
  return {**row, "fits": row["total_bytes"] <= fit_bytes}


def choose(rows: list[dict]) -> dict | None:
  """The fitting candidate of the shortest predicted step (GPU targets) or else of fewest FLOPs, then fewest
  micro-batches, then fewest bytes; None if none fits."""
  fitting = [r for r in rows if r.get("fits")]
  return min(
    fitting,
    key=lambda r: (r.get("predicted_step_s", 0.0), r["flops"], r["grad_accum_steps"], r["total_bytes"]),
    default=None,
  )


def describe(setting: dict[str, object]) -> str:
  attention = sorted({str(v) for k, v in setting.items() if k.endswith("attention")})
  layout = []
  if "mesh.fsdp" in setting:
    layout = ["fsdp all" if setting["mesh.fsdp"] == -1 else f"fsdp {setting['mesh.fsdp']} x data"]
  unroll = []
  if "model.scan_unroll" in setting:
    unroll = [f"unroll {setting['model.scan_unroll'] or 'all'}"]
  unroll += sorted({f"unroll {'/'.join(map(str, v))}" for k, v in setting.items() if k.endswith("stage_scan_unrolls")})
  return ", ".join(
    [str(setting["model.remat_policy"]), f"{setting['grad_accum_steps']} micro"] + unroll + attention + layout
  )


def print_row(row: dict) -> None:
  predicted = f" {row['predicted_step_s']:14.4g}" if "predicted_step_s" in row else ""
  print(
    f"{describe(row['setting']):<56} {row['total_bytes'] / GIB:10.3f} {'yes' if row['fits'] else 'no':>5} "
    f"{row['flops'] / 1e9:14.6g}{predicted}",
    flush=True,
  )


def sweep(
  config, grid, devices: int, fit_bytes: int, first_fit: bool, target: str = ""
) -> tuple[list[dict], dict | None]:
  """Plans the candidates in order, printing each row; returns the rows and the chosen one."""
  predicted = f" {'step s (pred.)':>14}" if target else ""
  print(
    f"{'candidate (remat, micro-batches, unroll, attention, layout)':<56} {'GiB/device':>10} {'fits':>5} "
    f"{'GFLOPs/device':>14}{predicted}",
    flush=True,
  )
  rows = []
  for setting in grid:
    rows.append(plan_candidate(config, setting, devices, fit_bytes, target))
    print_row(rows[-1])
    if first_fit and rows[-1]["fits"]:
      return rows, rows[-1]
  return rows, choose(rows)


def _body(fv, rest):
  del rest
  if fv.config is None:
    raise ConfigError("--config is required")
  if fv.target:
    gpu_target.require_compiler(gpu_target.get(fv.target))
  fit_bytes = parse_size(fv.fit) if fv.fit else default_fit_bytes(fv.target)
  grid, skipped = candidate_settings(
    fv.config, fv.devices, fv.remat, fv.micro_batches, fv.attention, fv.target, fv.fsdp, fv.unroll
  )
  for flag, reason in skipped.items():
    print(f"skipped {flag}: {reason}")
  rows, chosen = sweep(fv.config, grid, fv.devices, fit_bytes, fv.first_fit, fv.target)
  summary = {
    "devices": fv.devices,
    "target": fv.target or "cpu",
    "fit": fv.fit,
    "fit_bytes": fit_bytes,
    "first_fit": fv.first_fit,
    "candidates": rows,
    "skipped": skipped,
    "chosen": chosen,
  }
  if chosen is not None:
    step = f", {chosen['predicted_step_s']:.4g} s a step predicted" if "predicted_step_s" in chosen else ""
    print(
      f"chosen: {chosen['total_bytes'] / GIB:.3f} of {fit_bytes / GIB:.3f} GiB and {chosen['flops'] / 1e9:.6g} "
      f"GFLOPs per device and step{step} (mesh {chosen['mesh']}, {chosen['strategy']}, batch "
      f"{chosen['global_batch']}):"
    )
    print(f"  {chosen['flags']}")
  print(json.dumps(summary, sort_keys=True), flush=True)
  if chosen is None:
    smallest = min(rows, key=lambda r: r["total_bytes"], default=None)
    detail = (
      f"; the smallest is {describe(smallest['setting'])} at {smallest['total_bytes'] / GIB:.3f} GiB"
      if smallest
      else "; no candidate could be planned (see the skipped lines)"
    )
    fit = f"--fit={fv.fit}" if fv.fit else "the default --fit"
    raise UserError(f"no candidate fits {fit} ({fit_bytes / GIB:.3f} GiB per device) on {fv.devices} devices{detail}")


def main(argv) -> int:
  fv = make_flags(argv)
  if not any(a in cli.HELP_FLAGS for a in argv[1:]):
    try:
      fv(list(argv))
      ensure_devices(fv.devices, argv, fv.target)
    except flags.Error:
      pass  # cli.run reports it
  return cli.run(argv, make_flags(argv), __doc__, _body)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
