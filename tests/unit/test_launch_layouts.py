"""Every multi-node launch of a recipe that the docs and launch/ show runs the layout its runbook runs.

The recipes keep the papers' sharding over all devices, which any device count takes; on a cluster the runbooks
shard within each node of 8 GPUs and keep the nodes data-parallel (`--config.mesh.fsdp=8 --config.mesh.data=-1`,
docs/launching.md, "Planning for a GPU on a machine without one"). So the launch examples pass the same flags:
docs/launching.md's SLURM, container and Kubernetes lines, launch/slurm.sbatch's and entrypoint.sh's usage lines
and launch/kubernetes/jobset.yaml's args. A launch's layout is its `--config.mesh.*` and `--config.strategy`
flags; it is multi-node when its job has more than one process.
"""

import pathlib
import re

import pytest
import yaml

from test_docs_commands import Command, cluster_of, commands_of, main_args, python_module, split_commands

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNBOOKS = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
USAGE_SCRIPTS = [ROOT / "launch" / "slurm.sbatch", ROOT / "launch" / "kubernetes" / "entrypoint.sh"]
JOBSET = ROOT / "launch" / "kubernetes" / "jobset.yaml"


def _main_args(command: Command) -> list[str] | None:
  """What visionfm_jax.main gets from a command: through a launcher, srun, entrypoint.sh or python -m."""
  args = main_args(command)
  if args is None and command.argv[:2] == ["bash", "launch/kubernetes/entrypoint.sh"]:
    args = command.argv[2:]
  if args is None and (python_module(command.argv) or ("",))[0] == "visionfm_jax.main":
    args = python_module(command.argv)[1]
  return args


def layout(args: list[str]) -> dict[str, str]:
  return {
    name: value
    for name, value in (a[2:].split("=", 1) for a in args if "=" in a)
    if name.startswith("config.mesh.") or name == "config.strategy"
  }


def config_of(args: list[str]) -> str:
  return next(a.split("=", 1)[1] for a in args if a.startswith("--config="))


def usage_commands(script: pathlib.Path) -> list[Command]:
  """The command lines of a launch script's usage comment (`#   command \\` and its continuations)."""
  commands, pending, start = [], "", 0
  for number, raw in enumerate(script.read_text().splitlines(), 1):
    match = re.match(r"#\s{3,}(\S.*)$", raw)
    if not match:
      continue
    text, start = match.group(1), start if pending else number
    if text.endswith("\\"):
      pending += text[:-1] + " "
      continue
    for env, argv in split_commands(pending + text):
      commands.append(Command(str(script.relative_to(ROOT)), start, env, argv))
    pending = ""
  return commands


def multi_node_launches(commands: list[Command]) -> list[tuple[str, list[str]]]:
  """(where, main's args) of each command that launches visionfm_jax.main as a cluster job of several processes
  (or plans one): not launch/local.sh's processes on one machine; entrypoint.sh runs a pod of the JobSet."""
  found = []
  for command in commands:
    args = _main_args(command)
    pod = command.argv[:2] == ["bash", "launch/kubernetes/entrypoint.sh"]
    if args is not None and command.argv[0] != "launch/local.sh" and (pod or cluster_of(command)[1] > 1):
      found.append((f"{command.doc}:{command.line}", args))
  return found


def jobset_launch() -> tuple[str, list[str]]:
  [replicated] = yaml.safe_load(JOBSET.read_text())["spec"]["replicatedJobs"]
  [container] = replicated["template"]["spec"]["template"]["spec"]["containers"]
  assert container["command"] == ["bash", "launch/kubernetes/entrypoint.sh"] and replicated["replicas"] > 1
  return str(JOBSET.relative_to(ROOT)), container["args"]


def runbook_layouts() -> dict[str, dict[str, str]]:
  """{config (file and variant): the layout its runbook's multi-node launches run}; a runbook's launches of one
  config agree."""
  layouts = {}
  for where, args in multi_node_launches([c for book in RUNBOOKS for c in commands_of(book)]):
    config = config_of(args)
    assert layouts.setdefault(config, layout(args)) == layout(args), f"{where}: {layout(args)} != {layouts[config]}"
  return layouts


EXAMPLES = (
  multi_node_launches(commands_of(ROOT / "docs" / "launching.md"))
  + multi_node_launches([c for script in USAGE_SCRIPTS for c in usage_commands(script)])
  + [jobset_launch()]
)


def test_the_examples_are_found_where_they_are_shown():
  places = {where.split(":")[0] for where, _ in EXAMPLES}
  assert places == {
    "docs/launching.md",
    "launch/slurm.sbatch",
    "launch/kubernetes/entrypoint.sh",
    "launch/kubernetes/jobset.yaml",
  }, places
  assert sum(where.startswith("docs/launching.md") for where, _ in EXAMPLES) >= 4  # SLURM, dry runs, container, k8s


@pytest.mark.parametrize("where,args", EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_a_multi_node_example_runs_its_runbook_s_layout(where, args):
  layouts = runbook_layouts()
  config = config_of(args)
  assert config in layouts, f"{where}: {config} has no runbook launching it on several nodes"
  assert layout(args) == layouts[config], f"{where}: layout {layout(args)}, its runbook's {layouts[config]}"
  assert layouts[config] == {"config.mesh.fsdp": "8", "config.mesh.data": "-1"}, layouts
