"""launch/Dockerfile kept honest without building it (CI has no container tool; BUILD.md records a build).

Its base is a build argument defaulting to a JAX CUDA image; it installs the project with BUILD.md's GPU install
command and nothing else; its smoke test is a training command BUILD.md carries, which
tests/integration/test_docs_commands.py parses and validates; the documented builds name it and only its build
arguments, and the pyxis/enroot launch of docs/launching.md runs the image they tag, where the Dockerfile puts the
project.
"""

import pathlib
import re

from test_docs_commands import commands_of, split_commands

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "launch" / "Dockerfile"
BUILD = ROOT / "BUILD.md"
LAUNCHING = ROOT / "docs" / "launching.md"
# The JAX CUDA images GPU clusters run: NVIDIA JAX-Toolbox's and NGC's.
JAX_CUDA_IMAGES = r"(ghcr\.io/nvidia/jax|nvcr\.io/nvidia/jax):\S+"


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
  """(INSTRUCTION, its arguments) of each Dockerfile instruction: comments dropped, continuations joined."""
  found, pending = [], ""
  for raw in path.read_text().splitlines():
    line = raw.strip()
    if not line or line.startswith("#"):
      continue
    if line.endswith("\\"):
      pending += line[:-1] + " "
      continue
    keyword, _, arguments = (pending + line).partition(" ")
    found.append((keyword.upper(), arguments.strip()))
    pending = ""
  return found


def runs() -> list[list[tuple[dict, list[str]]]]:
  """The commands of each RUN instruction."""
  return [split_commands(text) for keyword, text in instructions(DOCKERFILE) if keyword == "RUN"]


def build_args() -> dict[str, str]:
  """{name: default} of the Dockerfile's ARGs ('' without a default)."""
  pairs = (text.partition("=") for keyword, text in instructions(DOCKERFILE) if keyword == "ARG")
  return {name: default for name, _, default in pairs}


def test_the_base_is_a_build_argument_defaulting_to_a_jax_cuda_image():
  steps = instructions(DOCKERFILE)
  assert steps[0][0] == "ARG" and steps[1] == ("FROM", "${BASE}"), steps[:2]
  assert re.fullmatch(JAX_CUDA_IMAGES, build_args()["BASE"]), build_args()


def test_it_installs_the_project_as_build_md_does_for_gpus():
  installs = [argv for commands in runs() for _, argv in commands if argv[:2] == ["pip", "install"]]
  build_md = [c.argv for c in commands_of(BUILD) if c.argv[:2] == ["pip", "install"]]
  assert len(installs) == 1, f"launch/Dockerfile installs with one pip command, not {installs}"
  assert installs[0] in build_md and "cuda" in installs[0][-1], f"{installs[0]} is not BUILD.md's GPU install"


def test_its_smoke_test_is_a_documented_training_command_that_leaves_nothing_in_the_image():
  (env, argv), *rest = runs()[-1]
  assert argv[:3] == ["python", "-m", "visionfm_jax.main"], argv
  documented = [(c.env, c.argv) for c in commands_of(BUILD)]
  assert (env, argv) in documented, f"launch/Dockerfile's smoke test is not a BUILD.md command: {env} {argv}"
  workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
  assert rest == [({}, ["rm", "-rf", workdir])], rest


def test_documented_builds_name_the_dockerfile_and_only_its_build_arguments():
  builds = [c for doc in (BUILD, LAUNCHING) for c in commands_of(doc) if c.argv[1:2] == ["build"]]
  assert builds, "no `podman build` or `docker build` in BUILD.md or docs/launching.md"
  for build in builds:
    argv = build.argv
    assert argv[0] in ("podman", "docker") and argv[-1] == ".", build
    assert argv[argv.index("-f") + 1] == "launch/Dockerfile", build
    names = [argv[i + 1].split("=")[0] for i, arg in enumerate(argv) if arg == "--build-arg"]
    assert set(names) <= set(build_args()), f"{build}: {set(names) - set(build_args())} is no ARG of the Dockerfile"


def test_pyxis_runs_the_image_the_docs_build_where_the_dockerfile_puts_the_project():
  commands = commands_of(BUILD) + commands_of(LAUNCHING)
  tags = {c.argv[c.argv.index("-t") + 1] for c in commands if c.argv[1:2] == ["build"]}
  imports = [c.argv for c in commands if c.argv[:2] == ["enroot", "import"]]
  assert imports and all(re.fullmatch(r"(podman|dockerd)://(.+)", a[-1]).group(2) in tags for a in imports), imports
  squashfs = {a[a.index("-o") + 1] for a in imports}
  workdir = next(text for keyword, text in instructions(DOCKERFILE) if keyword == "WORKDIR")
  launches = [
    dict(a[2:].partition("=")[::2] for a in c.argv[1:] if a.startswith("--container-"))
    for c in commands
    if c.argv[0] == "srun"
  ]
  assert launches, "no srun --container-image line in docs/launching.md"
  for options in launches:
    assert options["container-image"] in squashfs, options
    assert options["container-workdir"] == workdir, options
