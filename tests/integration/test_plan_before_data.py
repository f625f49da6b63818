"""A cluster job is planned before its data arrives: each runbook's first command, "Plan the job before the data",
run as its rehearsal runs it (tests/integration/test_runbooks.py: the documented roots moved under an empty
folder, its rehearsal arguments added) and so with no data at all, plans the job from the config and names the
data folders it did not find, where the same dry run after the data is prepared opens it (the rehearsal runs
both)."""

import os
import pathlib
import re
import subprocess

import pytest

from conftest import cpu_env
from test_runbooks import ROOT, bash_commands, rehearsal_rules, rehearsed

RUNBOOKS = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
SECTION = "## Plan the job before the data"


def planning_command(runbook: pathlib.Path):
  """The runbook's command under SECTION, the first of the runbook, before any data is prepared."""
  markdown = runbook.read_text()
  start = markdown.index(SECTION)
  line = markdown[:start].count("\n") + 1
  commands = bash_commands(markdown)
  assert commands[0].line > line, f"{runbook.name}: a command comes before {SECTION!r}"
  return commands[0], rehearsal_rules(markdown)


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=lambda p: p.stem)
def test_a_runbook_plans_its_cluster_job_without_the_data(runbook, tmp_path, warm_python):
  command, rules = planning_command(runbook)
  assert "launch/slurm.sbatch" in command.text and "--dry_run" in command.text, command.text
  proc = subprocess.run(
    ["bash", "-c", rehearsed(command, rules, tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=warm_python.env(cpu_env(1)),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "can start; nothing was trained or written" in proc.stdout, proc.stdout
  [data] = [line for line in proc.stdout.splitlines() if line.startswith("data: ")]
  folders = re.match(
    r"data: (.+) (?:does|do) not exist yet: planned without it, an example's shapes from the "
    r"config \(image ",
    data,
  )
  assert folders, data
  assert all(f.startswith(f"{tmp_path}/data/") for f in folders.group(1).split(", ")), data
  assert not os.path.exists(tmp_path / "ckpt"), "a dry run writes nothing"
  assert "examples per epoch: " not in proc.stdout
  assert "its evaluators open their data, which is not there yet" in proc.stdout
