"""Every command of each runbook (docs/runbooks/*.md) runs, in order, as one shell script.

The script is the runbook's ```bash blocks as written, with three changes and nothing else:
- the documented roots `/raw`, `/data`, `/models`, `/ckpt` move under a temporary folder, in the commands and in
  the paths the configs they run hold by default (written back as `--config.<field>=` overrides);
- the arguments of the runbook's own ```rehearsal block are appended to each command containing its left side
  (a model variant, steps, batch: what makes a job a few steps of the recipe at a tiny size), or, for a rule
  `--x=A => --x=B` on an option the command holds, set in its place (an array's size before sbatch's script);
- programs that need a cluster or the network are local stand-ins on PATH: `sbatch`, `srun` and `scontrol` from
  tests/fake_slurm/ (a job runs in the foreground on one node of NODE_DEVICES CPU devices, an array's tasks one
  after another), `hf`, which copies a miniature of the named model from the test's hub folder, and `img2dataset`,
  which copies the miniature of its LAION output (`test_the_laion_download_keeps_what_the_recipes_need` checks
  the options the real one is given).
The releases the runbooks start from are written as miniatures of their published layouts by tests/standins.py; a
runbook gets only those its ```inputs block lists, where it lists them.
A command that fails, reads what nothing wrote, or writes what the next command cannot read fails the test with
the runbook's file:line and the tail of the output.
"""

import ast
import dataclasses
import json
import os
import pathlib
import re
import shlex
import stat
import subprocess

import pytest

from visionfm_jax import config_lib

from conftest import compilation_cache_env, cpu_env, kill_session

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNBOOKS = [*sorted((ROOT / "docs" / "runbooks").glob("*.md")), ROOT / "docs" / "your_data.md"]
DOCUMENTED_ROOTS = ("raw", "data", "models", "ckpt")
# A documented root at the start of a path: after a quote, '=', ':', '(', ',' or a space, or at the start.
ROOT_PATH = re.compile(r"(?<![\w.~/-])/(" + "|".join(DOCUMENTED_ROOTS) + r")(?=/|\b)")
FAKE_SLURM = ROOT / "tests" / "fake_slurm"
# The rehearsal's cluster: one node of one CPU device. The runbooks' commands are what it checks; sharded programs
# are the other tests' business (on 8 devices), and each device costs XLA threads on the CI's 2 cores: the three
# runbooks take 307 CPU s on one device, 387 on 4. (On 2 devices the detection step's host-side matching, a
# pure_callback under shard_map, stalls XLA CPU's all-gather rendezvous until it aborts.) The dry runs plan for a
# node of 4 (the rehearsal blocks' --dry_run_devices), which needs no devices.
NODE_DEVICES = 1


@dataclasses.dataclass
class Command:
  line: int
  text: str


def bash_commands(markdown: str) -> list[Command]:
  """The commands of the ```bash blocks, continuation lines joined, each with the line it starts on."""
  commands, in_block, pending, start = [], False, "", 0
  for number, raw in enumerate(markdown.splitlines(), 1):
    if raw.startswith("```"):
      in_block = raw.strip() == "```bash"
      continue
    if not in_block:
      continue
    if not pending:
      start = number
    if raw.endswith("\\"):
      pending += raw[:-1] + " "
      continue
    text, pending = (pending + raw).strip(), ""
    if text and not text.startswith("#"):
      commands.append(Command(start, text))
  return commands


def rehearsal_rules(markdown: str) -> list[tuple[str, str]]:
  """(text a command contains, arguments appended to it) of the ```rehearsal block."""
  block = re.search(r"^```rehearsal\n(.*?)^```", markdown, re.M | re.S)
  assert block, "the runbook has no ```rehearsal block"
  rules = []
  for line in block.group(1).splitlines():
    if line.strip():
      match, arrow, args = line.partition(" => ")
      assert arrow, f"rehearsal line without ' => ': {line!r}"
      rules.append((match.strip(), args.strip()))
  return rules


def moved(text: str, root: pathlib.Path) -> str:
  return ROOT_PATH.sub(lambda m: f"{root}/{m.group(1)}", text)


def _moved_value(value, root):
  if isinstance(value, str):
    return moved(value, root)
  if isinstance(value, (tuple, list)):
    return type(value)(_moved_value(v, root) for v in value)
  return value


def main_arguments(argv: list[str], env: dict) -> list[str] | None:
  """The arguments `visionfm_jax.main` gets from this command line, or None when it runs something else."""
  if env.get("MODULE", "visionfm_jax.main") != "visionfm_jax.main":
    return None
  if argv[:3] == [argv[0], "-m", "visionfm_jax.main"] and re.search(r"python[0-9.]*$", argv[0]):
    return argv[3:]
  for i, arg in enumerate(argv):
    if arg == "launch/slurm.sbatch" and (argv[0] == "sbatch" or argv[:1] == ["bash"]):
      return argv[i + 1 :]
    if arg == "launch/local.sh" and i == 0:
      return argv[2:]
  return None


def config_path_overrides(args: list[str], root: pathlib.Path) -> list[str]:
  """`--config.<field>=<value>` for each field of the command's config whose default holds a documented root and
  that the command does not set itself: the config's own paths, moved as the command's are."""
  spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  if spec is None:
    return []
  config = config_lib.load(str(ROOT / spec))
  given = {a.split("=", 1)[0][len("--config.") :] for a in args if a.startswith("--config.")}
  overrides = []
  for path, value in config_lib.fields(config):
    if path in given or any(path.startswith(g + ".") for g in given):
      continue
    new = _moved_value(value, root)
    if new != value:
      text = new if isinstance(new, str) else repr(new)
      overrides.append(f"--config.{path}={text}")
  return overrides


def split_environment(argv: list[str]) -> tuple[dict, list[str]]:
  env = {}
  while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
    key, _, value = argv.pop(0).partition("=")
    env[key] = value
  return env, argv


def _option_name(word: str) -> str | None:
  return word.split("=", 1)[0] if re.fullmatch(r"--[\w.-]+=\S*", word) else None


def replaces_in_place(match: str, args: str) -> bool:
  """A rule `--x=A => --x=B` sets one option the command holds to another value where it stands (an option of a
  launcher such as sbatch's --array must stay before the script); any other rule appends."""
  return _option_name(match) is not None and _option_name(match) == _option_name(args)


def _whole_word(match: str) -> re.Pattern:
  return re.compile(rf"(?<!\S){re.escape(match)}(?!\S)")


def applies(rule: tuple[str, str], command: str) -> bool:
  match, args = rule
  return bool(_whole_word(match).search(command)) if replaces_in_place(match, args) else match in command


def rehearsed(command: Command, rules, root: pathlib.Path) -> str:
  """The command as the rehearsal runs it: roots moved, the config's own paths moved, rehearsal arguments added."""
  text = moved(command.text, root)
  extra = []
  for match, args in rules:
    if replaces_in_place(match, args):
      text = _whole_word(match).sub(args, text)
    elif match in command.text:
      extra.append(args)
  try:
    env, argv = split_environment(shlex.split(text))
  except ValueError:
    env, argv = {}, []
  main_args = main_arguments(argv, env) if argv else None
  appended = []
  if main_args is not None:
    appended += [shlex.quote(a) for a in config_path_overrides(main_args, root)]
  appended += extra
  if not appended:
    return text
  assert not re.search(r"[|;&<>]|\bdo\b", text), (
    f"line {command.line}: a command with rehearsal arguments must be one simple command: {command.text}"
  )
  return " ".join([text, *appended])


def fake_hub_program(bin_dir: pathlib.Path, hub: pathlib.Path) -> None:
  """`hf download REPO --local-dir=DIR`: copies the test hub's miniature of REPO to DIR."""
  program = bin_dir / "hf"
  program.write_text(
    "#!/usr/bin/env bash\nset -euo pipefail\n"
    '[ "$1" = download ] || { echo "hf: only download is rehearsed" >&2; exit 2; }\n'
    'repo=$2; dir=""; shift 2\n'
    'for a in "$@"; do case $a in --local-dir=*) dir=${a#--local-dir=};; esac; done\n'
    f'[ -d "{hub}/$repo" ] || {{ echo "hf: no miniature of $repo" >&2; exit 1; }}\n'
    f'mkdir -p "$dir" && cp -r "{hub}/$repo/." "$dir/"\n'
  )
  program.chmod(program.stat().st_mode | stat.S_IXUSR)


def fake_img2dataset_program(bin_dir: pathlib.Path, output: pathlib.Path) -> None:
  """`img2dataset --url_list=PATH ... --output_folder=DIR`: copies the stand-in of img2dataset's LAION output
  (`output`) to DIR, keeping the files there (img2dataset's incremental mode: a rerun resumes); PATH must exist."""
  program = bin_dir / "img2dataset"
  program.write_text(
    "#!/usr/bin/env bash\nset -euo pipefail\nurls=''; out=''\n"
    'for a in "$@"; do case $a in\n'
    "  --url_list=*) urls=${a#--url_list=};;\n  --output_folder=*) out=${a#--output_folder=};;\nesac; done\n"
    '[ -e "$urls" ] || { echo "img2dataset: no url list $urls" >&2; exit 1; }\n'
    f'mkdir -p "$out" && cp -rn "{output}/." "$out/"\n'
  )
  program.chmod(program.stat().st_mode | stat.S_IXUSR)


def script_of(runbook: pathlib.Path, root: pathlib.Path, label: str | None = None) -> str:
  """The runbook as one bash script; before each command, and at the end, a `>>> file:line time` marker on
  stderr."""
  markdown = runbook.read_text()
  rules = rehearsal_rules(markdown)
  commands = bash_commands(markdown)
  unused = [match for match, args in rules if not any(applies((match, args), c.text) for c in commands)]
  assert not unused, f"{runbook.name}: rehearsal rules that match no command: {unused}"
  label = label or str(runbook.relative_to(ROOT))
  lines = ["set -euo pipefail", f"cd {shlex.quote(str(ROOT))}"]
  for command in commands:
    lines += [f'echo ">>> {label}:{command.line} $(date +%s.%N)" >&2', rehearsed(command, rules, root)]
  lines.append('echo ">>> end $(date +%s.%N)" >&2')
  return "\n".join(lines) + "\n"


def inputs_of(markdown: str) -> list[str]:
  """The paths of the runbook's ```inputs block: what a person places by hand (the releases it starts from)."""
  block = re.search(r"^```inputs\n(.*?)^```", markdown, re.M | re.S)
  assert block, "the runbook has no ```inputs block"
  return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def place_inputs(runbook: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  """Writes every stand-in under root/releases and moves the runbook's inputs from there to where it reads them,
  so that a command reading a release the runbook does not list fails; returns the stand-ins' hub folder."""
  import standins  # pylint: disable=g-import-not-at-top

  releases = root / "releases"
  standins.write_all(releases, models="hf download" in runbook.read_text())
  for path in inputs_of(runbook.read_text()):
    source, target = releases / path.lstrip("/"), root / path.lstrip("/")
    assert source.exists(), f"{runbook.name}: no stand-in of the input {path} (tests/standins.py)"
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  return releases / "hub"


def run_runbook(runbook: pathlib.Path, root: pathlib.Path, cache: str, warm_python) -> subprocess.CompletedProcess:
  hub = place_inputs(runbook, root)
  bin_dir = root / "bin"
  bin_dir.mkdir()
  fake_hub_program(bin_dir, hub)
  fake_img2dataset_program(bin_dir, hub.parent / "raw" / "laion")
  script = root / f"{runbook.stem}.sh"
  script.write_text(script_of(runbook, root))
  env = cpu_env(
    NODE_DEVICES,
    PATH=f"{FAKE_SLURM}:{bin_dir}:{os.environ['PATH']}",
    FAKE_SLURM_MAX_NODES="1",
    FAKE_SLURM_DEVICES_PER_NODE=str(NODE_DEVICES),
    FAKE_SLURM_LOG=str(root / "slurm.log"),
    PYTHONUNBUFFERED="1",
    **compilation_cache_env(cache),
  )
  env = warm_python.env(env)  # the runbook's `python -m visionfm_jax.*` commands start warm
  # its own session: a timeout kills every job of the fake cluster too (srun's tasks have process groups of their own)
  proc = subprocess.Popen(
    ["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
  )
  try:
    out, err = proc.communicate(timeout=900)
  except subprocess.TimeoutExpired:
    kill_session(proc.pid)
    out, err = proc.communicate()
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


MARKER = re.compile(r"^>>> (\S+) ([0-9.]+)$", re.M)


def command_seconds(stderr: str) -> list[tuple[str, float]]:
  """(file:line, seconds) of each command that ran to its end."""
  marks = [(where, float(at)) for where, at in MARKER.findall(stderr)]
  return [(where, later - at) for (where, at), (_, later) in zip(marks, marks[1:])]


def failure_report(result: subprocess.CompletedProcess) -> str:
  markers = [where for where, _ in MARKER.findall(result.stderr)]
  where = markers[-1] if markers else "before the first command"
  tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
  return f"{where} failed (exit {result.returncode}):\n{tail}"


@pytest.mark.slow
@pytest.mark.parametrize("runbook", RUNBOOKS, ids=lambda p: p.stem)
def test_every_command_of_the_runbook_runs_in_order(runbook, tmp_path, compilation_cache, warm_python):
  result = run_runbook(runbook, tmp_path, compilation_cache, warm_python)
  assert result.returncode == 0, failure_report(result)
  assert MARKER.findall(result.stderr)[-1][0] == "end", "the script stopped before its end"
  assert_each_evaluation_drew_its_panel(tmp_path)
  print("\n".join(f"{seconds:6.1f} s  {where}" for where, seconds in command_seconds(result.stderr)))


# The tasks that draw a panel at each evaluation (their `panel`: evaluate/panels.py); the dense fine-tunes do not.
PANEL_TASKS = ("classification", "contrastive", "aurora")


def assert_each_evaluation_drew_its_panel(root) -> None:
  """Every workdir that the rehearsal trained a panel-drawing task in holds the panel of each step it evaluated."""
  for metrics in pathlib.Path(root).rglob("metrics.jsonl"):
    if json.loads((metrics.parent / "config.json").read_text())["task"] not in PANEL_TASKS:
      continue
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evaluated = {row["step"] for row in rows if any(key.startswith("eval/") for key in row)}
    drawn = set(os.listdir(metrics.parent / "panels")) if (metrics.parent / "panels").is_dir() else set()
    assert {f"step_{step}.png" for step in evaluated} <= drawn, (metrics.parent, sorted(evaluated), sorted(drawn))


# ---- the rehearsal machinery itself ----


def test_roots_move_in_commands_and_in_config_defaults(tmp_path):
  rules = [("configs/vit_huge.py", "--config.total_steps=2")]
  command = Command(
    1,
    "sbatch --nodes=8 launch/slurm.sbatch --config=configs/vit_huge.py "
    "--workdir=/ckpt/vit_huge --config.data.eval_source=arrayrecord:/data/x",
  )
  text = rehearsed(command, rules, tmp_path)
  argv = shlex.split(text)
  assert f"--workdir={tmp_path}/ckpt/vit_huge" in argv
  assert f"--config.data.eval_source=arrayrecord:{tmp_path}/data/x" in argv
  # the config's default source moves; the field the command sets is left as the command sets it
  assert f"--config.data.source=arrayrecord:{tmp_path}/data/imagenet21k/{{split}}-*.array_record" in argv
  assert argv[-1] == "--config.total_steps=2"
  assert (
    moved("cp /rawfile /raw/a:/data/b x/data/c", tmp_path) == f"cp /rawfile {tmp_path}/raw/a:{tmp_path}/data/b x/data/c"
  )


def test_tuple_fields_move_as_python_literals(tmp_path):
  text = rehearsed(
    Command(1, "python -m visionfm_jax.main --config=configs/aurora_xl.py --workdir=/ckpt/a"), [], tmp_path
  )
  mixture = next(a for a in shlex.split(text) if a.startswith("--config.data.mixture="))
  entries = ast.literal_eval(mixture.split("=", 1)[1])
  assert all(spec.startswith(f"arrayrecord:{tmp_path}/data/") for spec, _ in entries), entries


def test_a_failing_command_is_reported_with_its_runbook_line(tmp_path):
  book = tmp_path / "book.md"
  book.write_text("```bash\ntrue\nfalse\ntrue\n```\n```rehearsal\n```\n")
  result = subprocess.run(["bash", "-c", script_of(book, tmp_path, label="book.md")], capture_output=True, text=True)
  assert result.returncode != 0 and failure_report(result).startswith("book.md:3 failed")
  book.write_text("```bash\ntrue\n```\n```rehearsal\n```\n")
  result = subprocess.run(["bash", "-c", script_of(book, tmp_path, label="book.md")], capture_output=True, text=True)
  assert [where for where, _ in command_seconds(result.stderr)] == ["book.md:2"]


def test_a_rule_setting_an_option_the_command_holds_sets_it_in_place(tmp_path):
  rules = [("--array=0-999", "--array=0-2"), ("--num_workers=32", "--num_workers=0"), ("tool.sbatch", "--x=1")]
  text = rehearsed(
    Command(1, "MODULE=m sbatch --wait --array=0-999 launch/tool.sbatch --num_workers=32 --y=2"), rules, tmp_path
  )
  assert text == "MODULE=m sbatch --wait --array=0-2 launch/tool.sbatch --num_workers=0 --y=2 --x=1"
  assert rehearsed(Command(1, "run --array=0-9999"), rules, tmp_path) == "run --array=0-9999"


# ---- the LAION download ----

LAION_RUNBOOKS = ("swinv2_g_clip", "aurora_xl")  # the runbooks that train on LAION


def largest_image_size(markdown: str) -> int:
  """The largest data.image_size of the configs the runbook's commands name (`--config=configs/<file>[:variant]`)."""
  specs = set(re.findall(r"--config=(configs/[\w./:]+)", markdown))
  return max(config_lib.load(str(ROOT / spec)).data.image_size for spec in specs)


@pytest.mark.parametrize("name", LAION_RUNBOOKS)
def test_the_laion_download_keeps_what_the_recipes_need(name):
  """img2dataset's defaults (256x256 with white borders, no LAION scores) would train the largest stage on
  letterboxed, upsampled squares and leave `index_tars --keep` no score to select by, after a weeks-long download;
  the rehearsal's stand-in copies a miniature, so the options are checked here."""
  markdown = (ROOT / "docs" / "runbooks" / f"{name}.md").read_text()
  downloads = [c for c in bash_commands(markdown) if c.text.startswith("img2dataset ")]
  assert len(downloads) == 1, f"{name}.md: expected one img2dataset command, found {len(downloads)}"
  options = dict(arg.partition("=")[::2] for arg in shlex.split(downloads[0].text)[1:])
  assert options["--output_format"] == "webdataset"
  assert options["--resize_mode"] == "keep_ratio"  # the shorter side becomes --image_size, the aspect ratio kept
  assert options["--resize_only_if_bigger"] == "True"  # never enlarged
  assert int(options["--image_size"]) >= largest_image_size(markdown) >= 448
  assert {"similarity", "pwatermark", "punsafe"} <= set(json.loads(options["--save_additional_columns"]))
  assert options["--url_list"] in inputs_of(markdown)
  selections = [c.text for c in bash_commands(markdown) if "index_tars" in c.text and "--keep=" in c.text]
  assert selections and all(
    f"--input='{options['--output_folder']}/*.tar'" in text and "--expect_samples=" in text for text in selections
  ), selections
