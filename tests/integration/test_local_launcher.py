"""launch/local.sh after the job's first failure: the process that failed first is named, and a process still
running GRACE_S seconds later (frozen, or waiting on a peer that is gone) is killed and named, so the launcher
never waits on a process that cannot finish. The trainers are stand-ins (a `python` first on PATH): process 1
gives up on its peers (exit 75), process 0 hangs."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

STAND_IN = f"""#!/usr/bin/env bash
# the launcher's own questions (the CPUs it may use) and its coordination service
[ "$1" = -c ] || [ "$2" = visionfm_jax.parallel.coordination ] && exec {sys.executable} "$@"
echo "$$" >"$PIDS/$JAX_PROCESS_ID"
if [ "$JAX_PROCESS_ID" = 1 ]; then
  echo "error: process 0 stopped answering" >&2
  exit 75
fi
exec sleep 300   # process 0: frozen
"""


@pytest.mark.slow
def test_a_process_still_running_after_the_first_failure_is_killed_and_named(tmp_path):
  bin_dir, pids = tmp_path / "bin", tmp_path / "pids"
  bin_dir.mkdir()
  pids.mkdir()
  (bin_dir / "python").write_text(STAND_IN)
  (bin_dir / "python").chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PIDS=str(pids), GRACE_S="2", JAX_PLATFORMS="cpu")
  start = time.monotonic()
  proc = subprocess.run(
    ["bash", "launch/local.sh", "2", "--config=configs/vit_huge.py:demo", f"--workdir={tmp_path}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert time.monotonic() - start < 30
  assert proc.returncode == 75, proc.stderr
  frozen, gave_up = ((pids / name).read_text().strip() for name in ("0", "1"))
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert lines[0] == "error: process 0 stopped answering"
  assert lines[1].startswith(f"error: process 1 of 2 (pid {gave_up}) ended first, with status 75 (requeue), at")
  assert lines[2] == (
    f"error: process 0 of 2 (pid {frozen}) still ran 2 s (GRACE_S) after the first failure: "
    f"killed; it was frozen, or waiting on a peer that is gone"
  )
  assert len(lines) == 3
  assert not os.path.exists(f"/proc/{frozen}") or "Z" in open(f"/proc/{frozen}/stat").read().split()[2]
