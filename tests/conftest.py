"""Test session setup: 8 simulated CPU devices (multi-device sharding is tested on them), fp32 matmuls, and XLA's
CPU compiler set to compile fast (`FAST_COMPILE_FLAGS`)."""

import gc
import math
import os
import signal
import subprocess
import sys
import tempfile

# Where the environment sets PYTHONDONTWRITEBYTECODE (as this project's VM does), each of the suite's ~250 Python
# processes (workers, training jobs, tools, the runbooks' commands) compiles this package's sources again. The
# suite lets Python keep them in the checkout's __pycache__ folders (git-ignored), written once and read by every
# later process: the four runbook rehearsals took 206.5 / 213.8 CPU s with it against 215.6 / 226.1 without.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


def _known_to_xla(flags: str) -> bool:
  """XLA aborts a process that names a flag it does not know, and flags come and go between releases."""
  probe = subprocess.run(
    [sys.executable, "-c", "import jax; jax.devices()"],
    capture_output=True,
    check=False,
    env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
    timeout=120,
  )
  return probe.returncode == 0


# The tests' tiny models spend far longer compiling than running. XLA's CPU fusion emitters (the default) compile
# a tiny ViT's run in 5.1 CPU s, its older ones in 3.0 (a pico CLIP's: 15.5 and 9.9), from the same HLO
# program. Splitting the LLVM module into parallel codegen units buys nothing where each test process has about
# one core: a pico CLIP's train step compiles in 4.2 s split, 3.6 s whole (one core, 3 runs each). Flags come and
# go between releases (jaxlib 0.11 removed the fusion emitters' flag), so each is kept only where this XLA knows
# it. Decided once, by the first process of the session (xdist's workers and the tests' subprocesses inherit the
# decision); an XLA_FLAGS of your own is taken as it is. LLVM's expensive passes (vectorisers, loop unrolling)
# make code that runs faster, and the tests barely run their code: test_swinv2, test_contrastive and test_aurora
# took 221 s with them, 183 s without (`-n 2`, 2 cores). XLA hands some fp32 dots to YNNPACK, whose kernels are
# planned by the Slinky pipeline library (10.5% of a SwinV2 training test's CPU samples in `perf`); XLA's own dots
# cost test_contrastive and test_aurora 98.0 CPU s against 107.4 with YNNPACK.
YNNPACK_OFF = "--xla_cpu_experimental_ynn_fusion_type="
if "VISIONFM_TEST_XLA_FLAGS" not in os.environ:
  _WANTED = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
    "--xla_llvm_disable_expensive_passes=true",
    YNNPACK_OFF,
  )
  # One probe (a start-up of JAX, seconds before any worker starts) where this XLA knows them all; else one each.
  os.environ["VISIONFM_TEST_XLA_FLAGS"] = (
    ""
    if "XLA_FLAGS" in os.environ
    else " ".join(_WANTED)
    if _known_to_xla(" ".join(_WANTED))
    else " ".join(f for f in _WANTED if _known_to_xla(f))
  )
FAST_COMPILE_FLAGS = os.environ["VISIONFM_TEST_XLA_FLAGS"]


def cpu_env(devices: int, *, xla_dot_routing: bool = False, **extra) -> dict[str, str]:
  """The environment of a subprocess on `devices` simulated CPU devices, compiling as this suite does;
  `xla_dot_routing`: with the libraries XLA itself picks for dots (YNNPACK on)."""
  fast = [f for f in FAST_COMPILE_FLAGS.split() if not (xla_dot_routing and f == YNNPACK_OFF)]
  flags = " ".join([f"--xla_force_host_platform_device_count={devices}", *fast])
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)


os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}".strip())
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Skipping LLVM's expensive passes (XLA's HLO passes, which decide the program's fusions and layouts, still run)
# cut the two slowest tests from 214 to 157 s. Set in the environment so that the multi-process tests' children
# inherit it; export it as 0 to test the optimised code.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The trackers' runs stay on disk (no test reaches a network): W&B offline, its settings and caches under a temporary
# folder; MLflow in each workdir's own database.
os.environ.update(
  WANDB_MODE="offline",
  WANDB_SILENT="true",
  **{
    f"WANDB_{kind}_DIR": os.path.join(tempfile.gettempdir(), f"visionfm_tests_wandb_{kind.lower()}")
    for kind in ("CONFIG", "CACHE", "DATA", "ARTIFACT")
  },
)
os.environ.pop("MLFLOW_TRACKING_URI", None)
# A suite started as a background job (`pytest ... &` in a script, nohup) inherits SIGINT ignored, and every process
# it started would too, so the Ctrl-C tests' runs could not be interrupted: the tests start their processes as a
# terminal's foreground job has them (a handler, unlike an ignored signal, is reset to the default by exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def tiny_vit_config(**overrides):
  """The demo config shrunk to a 2-block ViT on 16 px images: fast enough for many tests."""
  from configs import vit_huge  # pylint: disable=g-import-not-at-top

  config = vit_huge.get_config("demo")
  config.model.variant = "pico/4"
  config.model.image_size = 16
  config.data.image_size = 16
  config.global_batch_size = 16
  config.total_steps = 10
  config.optim.warmup_steps = 2
  config.progress_bar = False
  return override(config, **overrides)


def override(config, **overrides):
  """Sets dotted config fields: override(config, **{"optim.lr": 1e-3})."""
  from visionfm_jax import config_lib  # pylint: disable=g-import-not-at-top

  return config_lib.set_paths(config, overrides)


def tiny_aurora_config(**overrides):
  """The Aurora demo shrunk to a pico SwinV2 (stride 8) and a pico text encoder/decoder on 16 px images."""
  from configs import aurora_xl  # pylint: disable=g-import-not-at-top

  config = aurora_xl.get_config("demo")
  config.global_batch_size = 64  # divides over 8 simulated devices in both micro-batches
  config.model.image_size = config.data.image_size = 16
  config.model.encoder.variant = "pico"  # C 16, depths 2,2, heads 2,4: maps 4, 2
  config.model.encoder.window_size = 2
  config.model.text.variant = "pico"
  config.model.embed_dim = 16
  config.model.caption_queries = 4
  config.model.decoder_depth = 2
  config.model.scan = True  # one compiled body per stack: compiles faster than the demo's unrolled layers
  config.data.mim.mask_patch_size = 4  # 4x4 grid, 10 masked
  config.global_batch_size = 16
  config.grad_accum_steps = 1
  config.total_steps = 10
  config.optim.warmup_steps = 2
  config.progress_bar = False
  return override(config, **overrides)


# The towers of `tiny_clip_config` at 16 px, as dotted config fields (test_wds passes them to main as flags): a femto
# SwinV2 (pico's first stage alone, a plain and a shifted block: 8x8 map, patch 2, window 4) and a text tower of
# pico's width, MLP and heads, one layer.
TINY_CLIP_TOWERS = {
  "model.image.variant": "femto",
  "model.image.patch_size": 2,
  "model.image.window_size": 4,
  "model.text.variant": "32x1x128x2",
  "model.embed_dim": 32,
  "model.image_size": 16,
  "data.image_size": 16,
}


def tiny_clip_config(*variant, **overrides):
  """The CLIP demo shrunk to `TINY_CLIP_TOWERS`, batch 16; `ft640`: at 32 px, window 8."""
  from configs import swinv2_g_clip  # pylint: disable=g-import-not-at-top

  config = override(swinv2_g_clip.get_config(",".join(("demo",) + variant)), **TINY_CLIP_TOWERS)
  if "ft640" in variant:
    config.model.image_size = config.data.image_size = 32
    config.model.image.window_size = 8
    config.model.image.pretrained_window_sizes = (4,)  # the window of the 16 px run it starts from
  config.global_batch_size = 16
  config.total_steps = 4
  config.optim.warmup_steps = 1
  config.log_every = 2
  config.eval_every = config.checkpoint_every = 4
  config.data.eval_examples = 48
  config.progress_bar = False
  return override(config, **overrides)


def read_the_loss_after_every_step(monkeypatch):
  """Makes train.run's step read its loss back after every step: the host stall the loop's transfer guard
  exists to catch (tests of the guard, emulated on CPU in test_train_loop, real in test_gpu)."""
  from visionfm_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  jit_train_step = step_lib.jit_train_step

  def stalling(*args, **kwargs):
    step = jit_train_step(*args, **kwargs)

    def run_and_read(state, batch):
      state, metrics = step(state, batch)
      float(metrics["train/loss"])
      return state, metrics

    return run_and_read

  monkeypatch.setattr(step_lib, "jit_train_step", stalling)


# A test worker's heap grows with every test it runs (the suite's imports, JAX's caches of traced and compiled
# programs), and each of Python's full collections rescans all of it; tracing a model allocates enough to set one
# off every few seconds. The heap is frozen once the tests are collected (their modules imported), and collections
# wait for 50,000 net allocations instead of 700.
gc.set_threshold(50_000, 20, 100)


def pytest_collection_finish(session):
  del session
  gc.collect()
  gc.freeze()


def pytest_unconfigure(config):
  """Under tests/suite_profile, this process's record is written here too: xdist may kill a worker slow to exit."""
  del config
  write_record = getattr(sys.modules.get("sitecustomize"), "write_record", None)
  if write_record is not None:
    write_record()


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run first (xdist hands them out before the rest, so that the two workers finish together
  instead of one running a long test while the other is idle); tests marked `gpu` (tests/gpu/test_gpu.py) run only
  where JAX's default backend is a GPU; elsewhere they skip."""
  del config
  items.sort(key=lambda item: "slow" not in item.keywords)  # stable: the order within each kind is kept
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason=f"needs a GPU (JAX backend: {jax.default_backend()})")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def assert_trees_close_to_scale(actual, expected, rtol: float) -> None:
  """Every entry within `rtol` of the largest magnitude in `expected` (pass logits and gradients apart). Two float
  orders of one sum (padded and unpadded tokens, sharded and plain reductions) differ by about eps x the sum of
  |terms|, so an entry that cancels to near zero (one entry, or a whole leaf such as the gradient of a bias ahead of
  a LayerNorm) carries the error of its terms, not of its value: a bound tuned to one machine's order fails on
  another's."""
  scale = max(float(np.max(np.abs(np.asarray(e, np.float64)), initial=0.0)) for e in jax.tree.leaves(expected))
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=rtol * scale
    ),
    actual,
    expected,
  )


def randomize_hf_params(model, seed: int) -> None:
  """Overwrites every parameter of a transformers (torch) model with noise: its init (norms 1 and 0, zero
  biases) would hide mapping errors. Norm scales ~ 1 + 0.3 N, biases and embeddings 0.3 N, matrices N / sqrt(fan_in)."""
  import torch  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if ("layer_norm" in name or "layrnorm" in name or "layernorm" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias") or "embedding" in name or p.ndim < 2:
        p.copy_(0.3 * noise)
      else:
        p.copy_(noise / math.sqrt(p[0].numel()))


@pytest.fixture(autouse=True)
def no_shared_wandb_service():
  """W&B's in-process runs (the trackers' tests) export WANDB_SERVICE, the address of this process's W&B service:
  a training subprocess that inherited it would join that service, where a killed run's id stays in use."""
  os.environ.pop("WANDB_SERVICE", None)
  yield
  os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def warm_python(tmp_path_factory):
  """This worker's warm interpreter (tests/warm_python.py): `warm_python.env(env)` runs a command's `python -m
  visionfm_jax.<module>` in a process forked from it, without importing the package again."""
  import warm_python as warm  # pylint: disable=g-import-not-at-top

  with warm.Server(dict(os.environ), folder=str(tmp_path_factory.mktemp("warm_python"))) as server:
    yield server


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache, on for one module's tests: a module whose runs compile the same programs
  (the same config trained again, resumed, or rerun with another data source) compiles each once. Yields the
  cache directory; `compilation_cache_env(directory)` shares it with the module's subprocess runs."""
  from jax.experimental.compilation_cache import compilation_cache as cache  # pylint: disable=g-import-not-at-top

  directory = str(tmp_path_factory.mktemp("compilation_cache"))
  before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  for name, value in _cache_options(directory).items():
    jax.config.update(name, value)
  cache.reset_cache()
  yield directory
  for name, value in before.items():
    jax.config.update(name, value)
  cache.reset_cache()


_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def _cache_options(directory):
  return dict(zip(_CACHE_OPTIONS, (directory, 0.0)))  # tiny programs compile in well under the default 1 s


def compilation_cache_env(directory):
  """The environment variables that give a subprocess the persistent compilation cache in `directory`."""
  return {name.upper(): str(value) for name, value in _cache_options(directory).items()}


def stop_after_writing(monkeypatch, step, times=1):
  """Sends the in-process run a SIGTERM (a preemption notice) once it has written its train metrics of `step`
  for the `times`-th time (log_every 1): it saves the next step and exits, with no change to its config."""
  from visionfm_jax.training.infra import metrics  # pylint: disable=g-import-not-at-top

  write, seen = metrics.MetricWriter.write, []

  def write_then_signal(self, at, values):
    write(self, at, values)
    if "train/loss" in values:
      seen.append(at)
      if at == step and seen.count(step) == times:
        os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics.MetricWriter, "write", write_then_signal)


def random_params(task, seed: int = 0):
  """Params of `task`'s model drawn at random by shape (shapes by jax.eval_shape of its init: no init compile).

  Kernels N(0, 1/fan_in) (fan_in from the logical axis names), LayerNorm scales 1 + N(0, 0.1^2), everything
  else N(0, 0.1^2): unlike the init (zero biases, identity-like blocks), every param changes the outputs.
  """
  return params_drawn_by_shape(lambda: task.init_variables(jax.random.key(0))["params"], seed)


def params_drawn_by_shape(init, seed: int = 0):
  """`random_params` of any init: `init()` returns boxed (logically named) params, as a Linen module's
  `init(...)["params"]` does; only its shapes are read (jax.eval_shape: no init compile)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  boxed = jax.eval_shape(init)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    shape, names = leaf.value.shape, leaf.names
    name = path[-1].key
    # Cast by numpy and placed by device_put: jnp.asarray compiles a program per shape (a conversion, or JAX's
    # `stage` of a host array).
    if name == "scale":
      return jax.device_put((1.0 + rng.normal(0.0, 0.1, shape)).astype(np.float32))
    std = 0.1
    if name == "kernel":
      axes = [i for i, n in enumerate(names) if n != "layers"]
      inputs = axes[:-1] if names[-1] == "embed" and len(axes) > 1 else axes[:1]
      std = math.prod(shape[i] for i in inputs) ** -0.5
    return jax.device_put(rng.normal(0.0, std, shape).astype(np.float32))

  return jax.tree_util.tree_map_with_path(draw, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def kill_session(session: int) -> None:
  """SIGKILLs every process of `session`: srun's tasks have process groups of their own, within it."""
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
        if int(f.read().rsplit(")", 1)[1].split()[3]) == session:
          os.kill(int(entry), signal.SIGKILL)
    except (ValueError, OSError):
      continue
