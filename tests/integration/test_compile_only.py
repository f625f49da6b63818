"""`python -m visionfm_jax.main --compile_only`: the run's programs compiled into its cache, which the run then
loads; and the train step of a run compiled exactly once over its first steps, an evaluation and a save among
them."""

import json
import re
import shutil

import jax
import pytest

from visionfm_jax.training import train
from visionfm_jax.training.infra import compile_cache

from conftest import tiny_vit_config
from test_bad_input import TINY, run_main_in_process

_COMPILED = "/jax/core/compile/backend_compile_duration"  # each program compiled, or loaded from the cache


class _Programs:
  """The programs compiled or loaded from the persistent cache while listening: (name, loaded) in their order. JAX
  reports a load as a hit, then as a compile of the program's name."""

  def __init__(self):
    self.seen, self._hit = [], False

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._compiled)
    jax.monitoring.register_event_listener(self._loaded)
    return self

  def __exit__(self, *_):
    jax.monitoring.unregister_event_duration_listener(self._compiled)
    jax.monitoring.unregister_event_listener(self._loaded)

  def of(self, name: str) -> list[bool]:
    """Whether each compile of `name` was a load."""
    return [loaded for seen, loaded in self.seen if seen == name]

  def _compiled(self, event, _, fun_name="", **__):
    if event == _COMPILED:
      self.seen.append((fun_name, self._hit))
      self._hit = False

  def _loaded(self, event, **_):
    if event == compile_cache.HIT:
      self._hit = True


def _entries(cache):
  """The cache's entries of the init and the train step (JAX's `<program>-<key>-cache` files)."""
  return {p.name for p in cache.glob("*-cache") if p.name.startswith(("jit_init-", "jit_train_step-"))}


@pytest.mark.slow
def test_compile_only_fills_the_cache_that_the_run_then_loads(tmp_path, monkeypatch, capsys):
  """A compile-only start writes the init and the train step into <workdir>/compile_cache and nothing else; the run
  of the same config then loads both (nothing compiled under their names, no entry added for them); a second
  compile-only start finds them there."""
  workdir, flags = tmp_path / "run", [*TINY, "--config.eval_every=4", "--config.checkpoint_every=4"]
  jax.clear_caches()
  status, out, err = run_main_in_process([*flags, f"--workdir={workdir}", "--compile_only"], monkeypatch, capsys)
  assert status == 0, err
  cache = workdir / "compile_cache"
  assert re.fullmatch(
    rf"compile only: init \d+\.\d s \(compiled\), train_step \d+\.\d s \(compiled\), for 8 cpu "
    rf"devices in 1 process; cache {cache}; nothing was trained",
    out.strip(),
  ), out
  assert sorted(p.name for p in workdir.iterdir()) == ["compile_cache"]
  written = _entries(cache)
  assert {name.split("-")[0] for name in written} == {"jit_init", "jit_train_step"}

  jax.clear_caches()  # the run starts with no program in memory, as a new process does
  with _Programs() as programs:
    status, _, err = run_main_in_process([*flags, f"--workdir={workdir}"], monkeypatch, capsys)
  assert status == 0, err
  assert programs.of("jit(init)") == programs.of("jit(train_step)") == [True], programs.seen
  assert _entries(cache) == written  # loaded, not added
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 4

  jax.clear_caches()
  status, out, _ = run_main_in_process([*flags, f"--workdir={workdir}", "--compile_only"], monkeypatch, capsys)
  assert status == 0
  assert "init" in out and out.count("(loaded: already in the cache)") == 2, out


@pytest.mark.parametrize(
  "args, named",
  [
    (["--compile_only", "--dry_run"], ["--compile_only", "--dry_run"]),
    (["--compile_only", "--config.compile_cache=off"], ["config.compile_cache", "off"]),
  ],
  ids=["with_dry_run", "cache_off"],
)
def test_compile_only_refuses_what_fills_no_cache(tmp_path, monkeypatch, capsys, args, named):
  status, _, err = run_main_in_process([*TINY, f"--workdir={tmp_path / 'run'}", *args], monkeypatch, capsys)
  assert status == 2
  line = err.strip().splitlines()[-1]
  assert line.startswith("error: ") and all(n in line for n in named), err
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_train_step_compiles_once_over_a_runs_first_steps(tmp_path):
  """Four steps with an evaluation and a checkpoint save after the second, the state with the recipes' optional
  parts (fp16's loss scale, the health guard's statistics, an EMA, evaluated too): the train step is compiled once
  (a recompile, from a state or batch that comes back from a save, an evaluation or the first step in another
  layout or type, would take minutes at the seeds' size)."""
  config = tiny_vit_config(
    total_steps=4,
    log_every=1,
    eval_every=2,
    checkpoint_every=2,
    compile_cache="off",
    **{"precision.compute_dtype": "float16", "health.enabled": True, "optim.ema_decay": 0.5},
  )
  config.data.num_workers = 0
  config.data.eval_examples = 16
  jax.clear_caches()
  with _Programs() as programs:
    last = train.run(config, str(tmp_path / "run"))
  assert last["step"] == 4
  assert {"eval/val/top1", "eval/ema/val/top1", "train/loss_scale", "health/rollbacks"} <= set(last)
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
  assert programs.of("jit(train_step)") == [False], programs.seen


def _tripled(x):
  return x * 3.0


def _load_count(setting: str, workdir: str) -> int:
  """The programs loaded from the cache of `compile_cache.in_use(setting, workdir)` by one fresh compile."""
  jax.clear_caches()
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # written, though it compiles in under 1 s
  try:
    with _Programs() as programs, compile_cache.in_use(setting, workdir):
      assert float(jax.jit(_tripled)(2.0)) == 6.0
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
  return sum(loaded for _, loaded in programs.seen)


def test_the_caches_folder_is_part_of_its_key_and_named_absolutely(tmp_path, monkeypatch):
  """JAX keys each program with the folder of its cache (the GPU's per-fusion autotune cache is a folder in it), so a
  cache copied elsewhere compiles afresh: the jobs and the compile-only start name one path. A relative workdir
  names it from the folder it is started in: `run` and `./run` there are one cache."""
  monkeypatch.chdir(tmp_path)
  assert _load_count("", "run") == 0
  assert _load_count("", "./run") == 1
  assert _load_count("", str(tmp_path / "run")) == 1
  shutil.copytree(tmp_path / "run" / "compile_cache", tmp_path / "elsewhere")
  assert _load_count(str(tmp_path / "elsewhere"), "unused") == 0


@pytest.mark.slow
def test_a_two_process_job_loads_what_its_compile_only_start_wrote(tmp_path, warm_python):
  """launch/local.sh 2, ddp over 2 x 2 devices: the compile-only start prints one line for the job (process 0's)
  and writes the init and the train step; the job then compiles neither again (process 0, the writer, adds no
  entry: a program it compiled would be written under its own key)."""
  from test_multiprocess import DDP_FLAGS, _Job  # pylint: disable=g-import-not-at-top

  workdir, flags = tmp_path / "run", [f for f in DDP_FLAGS if not f.startswith("--config.total_steps")]
  flags.append("--config.total_steps=2")
  code, out = _Job(workdir, "--compile_only", base=flags, warm=warm_python).finish()
  assert code == 0, out[-6000:]
  assert (
    len(
      re.findall(r"^compile only: init .* train_step .*, for 4 cpu devices in 2 processes; cache ", out, re.MULTILINE)
    )
    == 1
  ), out[-3000:]
  written = _entries(workdir / "compile_cache")
  assert {name.split("-")[0] for name in written} == {"jit_init", "jit_train_step"}

  code, out = _Job(workdir, base=flags, warm=warm_python).finish()
  assert code == 0, out[-6000:]
  assert _entries(workdir / "compile_cache") == written
  assert '"step": 2' in (workdir / "metrics.jsonl").read_text()
