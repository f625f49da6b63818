"""Every command in README.md, BUILD.md and docs/ parses against the code it calls, so the docs cannot drift.

The runbooks (docs/runbooks/) are also executed, command by command, by tests/integration/test_runbooks.py; here their
commands are checked at the size they launch (the full recipe at its cluster's device and process count), which
the rehearsal, running them at a tiny size, does not.

Each shell command of a ```bash block is classified by what it runs:
- `python -m visionfm_jax.<module>`: the module exists, every flag is one the module defines, every
  `--config.<field>` override names a field of the config it loads (checked as `main` checks it), and a path
  it reads under the documented roots was written by an earlier command of the same document (or is one the
  document says a person places by hand);
- `launch/*.sh` and `sbatch ... launch/slurm.sbatch`: the script exists, an environment `GPU=` names a flags file,
  and the arguments it passes to `visionfm_jax.main` are checked as above;
- `pip install`: every extra it names exists in pyproject.toml;
- anything else must be one of the external programs the docs are allowed to name.
Every training command (direct, `launch/local.sh`, `sbatch`) is also validated as `main --dry_run` first validates
it, at the device and process count of the job it launches (16 nodes of 8 GPUs for `sbatch --nodes=16`).
`tests/integration/test_dry_run.py` runs the dry run itself on every demo config.
"""

import dataclasses
import functools
import importlib
import inspect
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from visionfm_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "BUILD.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNBOOKS = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
# Programs of other projects the docs may call; their arguments are theirs to check.
EXTERNAL = {"hf", "img2dataset", "nvidia-smi", "tensorboard", "tar", "rm", "podman", "docker", "enroot", "kubectl"}
# Where the docs keep data, checkpoints and models: a path under one of these that a command reads must have
# been written by an earlier command of the same document, unless the document places it by hand (below).
ROOTS = ("/data/", "/ckpt/", "/models/")
# Read paths a person unpacks or downloads by hand, as the document describes in prose (release archives of
# COCO, Flickr30k, ADE20K; TFDS' manual-download folder): the command that would write them is not ours.
PLACED_BY_HAND = (
  "/data/coco",
  "/data/flickr30k",
  "/data/ADEChallengeData2016",
  "/data/tfds/downloads/manual",
  "/data/imagenet_variants",
  "/raw/",
)
# Flags whose value is a path a command writes; every other path-valued flag is read.
WRITE_FLAGS = {"out", "output", "workdir", "local-dir", "data_dir", "selection_out"}


@dataclasses.dataclass
class Command:
  doc: str
  line: int
  env: dict
  argv: list

  def __str__(self):
    return f"{self.doc}:{self.line}: {shlex.join(self.argv)}"


def _strip_comment(line: str) -> str:
  """The line without a trailing `# comment` (a `#` inside quotes stays)."""
  quote = None
  for i, ch in enumerate(line):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch == "#" and (i == 0 or line[i - 1].isspace()):
      return line[:i].rstrip()
  return line.rstrip()


def commands_of(path: pathlib.Path) -> list[Command]:
  """The shell commands of a Markdown file's ```bash blocks: continuations joined, comments and `&&` split."""
  commands, in_block, pending, start = [], False, "", 0
  for number, raw in enumerate(path.read_text().splitlines(), 1):
    if raw.startswith("```"):
      in_block = raw.strip() == "```bash"
      continue
    if not in_block:
      continue
    line = _strip_comment(raw)
    if not pending:
      start = number
    if line.endswith("\\"):
      pending += line[:-1] + " "
      continue
    text, pending = (pending + line).strip(), ""
    for env, argv in split_commands(text):
      if not argv[0].startswith("--"):  # a line of flags alone shows options of the command above
        commands.append(Command(str(path.relative_to(ROOT)), start, env, argv))
  return commands


def split_commands(text: str) -> list[tuple[dict, list[str]]]:
  """(environment, argv) of each `&&`-joined command of one shell line (launch/Dockerfile's RUN lines too)."""
  commands = []
  for part in re.split(r"\s&&\s", text.strip()):
    argv = shlex.split(part)
    env = {}
    while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
      key, _, value = argv.pop(0).partition("=")
      env[key] = value
    if argv:
      commands.append((env, argv))
  return commands


ALL = [c for doc in DOCS for c in commands_of(doc)]


def python_module(argv: list[str]) -> tuple[str, list[str]] | None:
  """(module, its args) for `<some python> -m module args...`, also as the task of `srun --option=value ...` (the
  container launch of docs/launching.md), else None."""
  if argv[:1] == ["srun"]:
    argv = srun_task(argv)
  if len(argv) >= 3 and re.search(r"(^|/)python[0-9.]*$", argv[0]) and argv[1] == "-m":
    return argv[2], argv[3:]
  return None


def launched_args(command: Command) -> list[str] | None:
  """The arguments a launcher hands to the module it runs (launch/slurm.sbatch's MODULE, main by default;
  launch/tool.sbatch's MODULE, which it needs)."""
  argv = command.argv
  if argv[0] == "sbatch":
    script = next(i for i, a in enumerate(argv) if i and not a.startswith("-"))
    assert argv[script] in ("launch/slurm.sbatch", "launch/tool.sbatch"), command
    assert argv[script] == "launch/slurm.sbatch" or "MODULE" in command.env, f"tool.sbatch without MODULE: {command}"
    return argv[script + 1 :]
  if argv[0] == "bash" and argv[1:2] == ["launch/slurm.sbatch"]:
    return argv[2:]
  if argv[0] == "launch/local.sh":
    return argv[2:]
  return None


def srun_task(argv: list[str]) -> list[str]:
  """The program and arguments an `srun --option=value ... program args` line runs on each task."""
  return list(itertools.dropwhile(lambda arg: arg.startswith("-"), argv[1:]))


def launched_module(command: Command) -> str:
  return command.env.get("MODULE", "visionfm_jax.main")


def main_args(command: Command) -> list[str] | None:
  """The arguments a launcher hands to visionfm_jax.main, else None."""
  return launched_args(command) if launched_module(command) == "visionfm_jax.main" else None


def tool_launch(command: Command) -> tuple[str, list[str]] | None:
  """(module, its args) of a tool launch/slurm.sbatch runs under an allocation (`MODULE=... sbatch ...`)."""
  args = launched_args(command)
  return None if args is None or main_args(command) is not None else (launched_module(command), args)


def cluster_of(command: Command) -> tuple[int | None, int]:
  """(devices, processes) the command's job runs on: a SLURM job of N nodes drives 8 GPUs a node
  (launch/slurm.sbatch), local.sh N runs N processes of DEVICES_PER_PROCESS devices, main's --dry_run_* flags
  say it outright; a plain single-process command plans no device count."""
  argv, env = command.argv, command.env
  if argv[0] == "sbatch" and "launch/tool.sbatch" in argv:
    return None, 1  # a CPU job (or each task of an array of them)
  if argv[0] == "sbatch" or argv[:2] == ["bash", "launch/slurm.sbatch"]:
    nodes = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--nodes=")), env.get("NODES", 1)))
    return nodes * int(env.get("GPUS_PER_NODE", 8)), nodes
  if argv[0] == "launch/local.sh":
    return int(argv[1]) * int(env.get("DEVICES_PER_PROCESS", 1)), int(argv[1])
  if argv[0] == "srun":
    options = dict(split_flags(argv[: len(argv) - len(srun_task(argv))]))
    nodes = int(options.get("nodes", 1))
    return nodes * int(options.get("gpus-per-node", 1)), nodes * int(options.get("ntasks-per-node", 1))
  flags_ = dict(split_flags(argv))
  if "dry_run_devices" in flags_:
    return int(flags_["dry_run_devices"]), int(flags_.get("dry_run_processes") or 1)
  return None, 1


@functools.cache
def flags_of(module: str) -> frozenset[str]:
  """The flag names `python -m module` accepts (its absl flags, read in a fresh process)."""
  code = (
    "import importlib, sys\nfrom absl import flags\nimportlib.import_module(sys.argv[1])\n"
    "print('\\n'.join(flags.FLAGS))"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", code, module], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
  )
  assert out.returncode == 0, f"python -m {module}: {out.stderr.strip().splitlines()[-1:]}"
  return frozenset(out.stdout.split())


def split_flags(args: list[str]) -> list[tuple[str, str | None]]:
  """(name, value) of each `--name[=value]` argument (absl's `--noflag` form kept as written)."""
  pairs = []
  for arg in args:
    if arg.startswith("--"):
      name, eq, value = arg[2:].partition("=")
      pairs.append((name, value if eq else None))
  return pairs


# The config a tool that reads a checkpoint's own config (evaluate, probe) checks `--config.*` against when the
# checkpoint is a published CLIP rather than a workdir of this document: the CLIP recipe's ViT variant.
PUBLISHED_CLIP_CONFIG = "configs/swinv2_g_clip.py:vit"


def check_tool_flags(module: str, args: list[str], checkpoint_configs: dict | None = None) -> list[str]:
  """The tool's own parse (`make_flags` + `cli.parse`): flag names, values, the config and its overrides.
  A tool whose config comes from its --checkpoint gets the config of the command that wrote that workdir."""
  from visionfm_jax import cli
  from visionfm_jax.errors import UserError

  if _is_package(module):
    module += ".__main__"
  tool = importlib.import_module(module)
  argv = [module, *args]
  params = inspect.signature(tool.make_flags).parameters
  kwargs = {"argv": argv} if "argv" in params else {}
  if "config" in params:
    checkpoint = dict(split_flags(args)).get("checkpoint") or ""
    spec = (checkpoint_configs or {}).get(checkpoint.rstrip("/"), PUBLISHED_CLIP_CONFIG)
    kwargs["config"] = config_lib.load(str(ROOT / spec))
  try:
    cli.parse(tool.make_flags(**kwargs), argv)
  except (AttributeError, KeyError) as e:  # an override of a field the checkpoint's config lacks (as the tool says)
    return [f"--config: {cli.last_line(e)}"]
  except UserError as e:
    return [str(e)]
  return []


def check_flags(module: str, args: list[str], checkpoint_configs: dict | None = None) -> list[str]:
  if module != "visionfm_jax.main":
    return check_tool_flags(module, args, checkpoint_configs)
  problems = []
  known = flags_of(module)
  config_spec = None
  for name, value in split_flags(args):
    if name.startswith("config."):
      continue
    base = name[2:] if name.startswith("no") and name[2:] in known else name
    if base not in known:
      problems.append(f"--{name}: python -m {module} has no such flag")
    if name == "config":
      config_spec = value
  overrides = [a for a in args if a.startswith("--config.")]
  if overrides and config_spec:
    config = config_lib.load(str(ROOT / config_spec))
    for override in overrides:
      try:
        config_lib.check_override(config, override.split("=", 1)[0][2:])
      except Exception as e:  # the error main would print
        problems.append(f"{override}: {e}")
  return problems


def _is_package(module: str) -> bool:
  return (ROOT.joinpath(*module.split(".")) / "__init__.py").exists()


def _module_exists(module: str) -> bool:
  parts = module.split(".")
  base = ROOT.joinpath(*parts)
  return base.with_suffix(".py").exists() or (base / "__main__.py").exists()


def check_command(command: Command, checkpoint_configs: dict | None = None) -> list[str]:
  argv = command.argv
  if "GPU" in command.env and not (ROOT / f"launch/xla_flags_{command.env['GPU']}.sh").exists():
    return [f"GPU={command.env['GPU']}: no launch/xla_flags_{command.env['GPU']}.sh"]
  passed = main_args(command)
  if passed is not None:
    script = "launch/slurm.sbatch" if argv[0] in ("sbatch", "bash") else argv[0]
    if not (ROOT / script).exists():
      return [f"{script}: no such script"]
    return check_flags("visionfm_jax.main", passed)
  module = python_module(argv) or tool_launch(command)
  if module:
    name, args = module
    if name.startswith("visionfm_jax"):
      if not _module_exists(name):
        return [f"python -m {name}: no such module"]
      return check_flags(name, args, checkpoint_configs)
    return [] if name in ("pip", "venv", "pytest") else [f"python -m {name}: not a module the docs may call"]
  script = (srun_task(argv) if argv[0] == "srun" else argv)[0]
  if script.startswith("launch/"):
    return [] if (ROOT / script).exists() else [f"{script}: no such script"]
  if re.search(r"(^|/)pip$", argv[0]):
    return check_pip(argv)
  if re.search(r"(^|/)python[0-9.]*$", argv[0]):
    return [] if argv[1] in ("-c", "-m") else [f"{shlex.join(argv)}: a bare python call"]
  if argv[0] in EXTERNAL or argv[0] in ("sbatch", "srun", "cd", "export", "mkdir", "source", "for"):
    return []
  return [f"{argv[0]}: not a program the docs may call (tests/integration/test_docs_commands.py EXTERNAL)"]


@functools.cache
def extras() -> frozenset[str]:
  return frozenset(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_pip(argv: list[str]) -> list[str]:
  problems = []
  for arg in argv:
    m = re.fullmatch(r"\.?\[([\w,-]+)\]", arg.replace('"', "")) or re.fullmatch(r"\.\[([\w,-]+)\]", arg)
    if m:
      problems += [f"pip extra [{e}] is not in pyproject.toml" for e in m.group(1).split(",") if e not in extras()]
  return problems


def workdir_configs(doc: str) -> dict[str, str]:
  """{workdir: config spec} of the training commands of a document."""
  found = {}
  for command in (c for c in ALL if c.doc == doc):
    args = main_args(command)
    if args is None and (python_module(command.argv) or ("",))[0] == "visionfm_jax.main":
      args = python_module(command.argv)[1]
    flags_ = dict(split_flags(args or []))
    if flags_.get("workdir") and flags_.get("config"):
      found[flags_["workdir"].rstrip("/")] = flags_["config"]
  return found


@pytest.mark.parametrize("command", ALL, ids=lambda c: f"{c.doc}:{c.line}")
def test_command_parses_against_the_code(command):
  problems = check_command(command, workdir_configs(command.doc))
  assert not problems, f"{command}\n  " + "\n  ".join(problems)


def test_the_docs_have_the_commands_this_test_reads():
  modules = {python_module(c.argv)[0] for c in ALL if python_module(c.argv)}
  assert "visionfm_jax.main" in modules and "visionfm_jax.datatools.prepare_data" in modules, modules
  assert any(main_args(c) is not None and c.argv[0] == "sbatch" for c in ALL), "no SLURM launch line"


# ---- paths: what a command reads, an earlier command of the same document wrote ----


def _path_values(value: str) -> list[str]:
  """Absolute paths under ROOTS inside a flag value (a source spec, a glob, a mixture tuple)."""
  return re.findall(r"(/(?:data|ckpt|models)/[^\s'\",():*{}]+)", value)


def config_paths(args: list[str]) -> list[str]:
  """The paths a main command's config reads by default (data sources, tokenizer, init_from, benchmarks)."""
  spec = dict(split_flags(args)).get("config")
  if not spec:
    return []
  config = config_lib.load(str(ROOT / spec))
  overridden = {name for name, _ in split_flags(args)}
  found = []
  for path, value in config_lib.fields(config):
    if f"config.{path}" in overridden:
      continue
    found += _path_values(json.dumps(value) if not isinstance(value, str) else value)
  return found


def reads_and_writes(command: Command) -> tuple[list[str], list[str]]:
  passed = main_args(command)
  args = (
    passed if passed is not None else (python_module(command.argv) or tool_launch(command) or (None, command.argv))[1]
  )
  reads, writes = [], []
  for name, value in split_flags(args):
    if value is None:
      continue
    (writes if name.split(".")[-1] in WRITE_FLAGS else reads).extend(_path_values(value))
  if passed is not None or (python_module(command.argv) or ("",))[0] == "visionfm_jax.main":
    reads += config_paths(args)
  return reads, writes


def _written(path: str, written: list[str]) -> bool:
  """Whether path lies under (or is, or is a file named after) a path an earlier command wrote."""
  stem = re.sub(r"\.(model|vocab|json)$", "", path)
  if path.endswith("/") and any(w.startswith(path) for w in written):
    return True  # the folder part of a glob over several written folders ('/data/pairs/*/train-*')
  return any(p == w or p.startswith(w.rstrip("/") + "/") for w in written for p in (path, stem))


@pytest.mark.parametrize("doc", [d for d in DOCS if commands_of(d) and d not in RUNBOOKS], ids=lambda d: d.name)
def test_every_path_read_was_written_by_an_earlier_command(doc):
  # Each runbook is a path from raw data, run for real by tests/integration/test_runbooks.py; the other documents may
  # read what any runbook writes.
  written = [w for book in RUNBOOKS for c in commands_of(book) for w in reads_and_writes(c)[1]]
  missing = []
  for command in commands_of(doc):
    reads, writes = reads_and_writes(command)
    for path in reads:
      if not _written(path, written) and not path.startswith(PLACED_BY_HAND):
        missing.append(f"{command.doc}:{command.line} reads {path}, which no earlier command writes")
    written += writes
  assert not missing, "\n".join(missing)


def loaded_config(args: list[str]):
  """The config a main command runs: its file and variant with its --config.* overrides, parsed as main does."""
  from absl import flags
  from ml_collections import config_flags

  config_args = [a for a in args if a.startswith("--config")]
  argv = ["main", *[a.replace("--config=", f"--config={ROOT}/", 1) for a in config_args]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize(
  "command",
  [c for c in ALL if main_args(c) is not None or (python_module(c.argv) or ("",))[0] == "visionfm_jax.main"],
  ids=lambda c: f"{c.doc}:{c.line}",
)
def test_training_commands_validate_for_the_job_they_launch(command):
  """main's own checks (training/checks.validate, what --dry_run runs first) at the job's device and process
  count: the batch over the devices, micro-batches, the mesh and its batch axes over the processes."""
  from visionfm_jax.training import checks

  args = main_args(command)
  if args is None:
    args = python_module(command.argv)[1]
  devices, processes = cluster_of(command)
  config = loaded_config(args)
  if config_lib.is_sized(config, config_lib.NUM_CLASSES):  # the class count of data that this test does not have
    config.model.num_classes = 4
  checks.validate(config, devices, processes)


def test_hf_is_the_cli_the_hub_extra_installs():
  """The docs download published models with `hf download`: huggingface_hub's console script (2.x ships no
  huggingface-cli), which the `hub` extra installs."""
  from importlib import metadata

  hub = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hub"]
  assert any(re.match(r"huggingface_hub\b", requirement) for requirement in hub), hub
  scripts = {e.name for e in metadata.distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
  assert "hf" in scripts, scripts
  assert any(c.argv[:2] == ["hf", "download"] for c in ALL)
