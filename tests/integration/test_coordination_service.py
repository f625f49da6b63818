"""JAX's coordination service hosted by the launcher (visionfm_jax/parallel/coordination.py): process 0 joins it as
a client instead of starting its own, and the service ends with the process that started it. The coordinator's
death in a two-process job through launch/local.sh is tests/integration/test_multiprocess.py's
`test_sigkills_and_preemption_notices_along_one_chain_of_reruns_that_ends_bitwise`."""

import os
import signal
import subprocess
import sys
import time

from visionfm_jax.parallel import coordination

from conftest import ROOT

JOIN = """
import jax
from visionfm_jax.parallel import distributed
distributed.initialize("on")
from jax._src import distributed as jax_distributed
assert jax_distributed.global_state.service is None, "process 0 started a service of its own"
print("joined", jax.process_index(), jax.process_count(), int(jax.numpy.arange(4).sum()), flush=True)
"""


def _serve(tmp_path, parent_argv=None) -> tuple[subprocess.Popen, int]:
  """Starts the service for one process (under a shell parent when `parent_argv`); returns (process, port)."""
  ready = tmp_path / "ready"
  argv = [sys.executable, "-m", "visionfm_jax.parallel.coordination", "--processes=1", f"--ready_file={ready}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # "; exit" keeps bash from becoming the service (exec) so that it stays its parent
  proc = subprocess.Popen(parent_argv + [" ".join(argv) + "; exit"] if parent_argv else argv, cwd=ROOT, env=env,
                          start_new_session=True)
  deadline = time.monotonic() + 60
  while not ready.exists():
    assert proc.poll() is None and time.monotonic() < deadline, "the service did not start"
    time.sleep(0.05)
  return proc, int(ready.read_text())


def test_process_0_joins_the_launchers_service_instead_of_starting_one(tmp_path):
  service, port = _serve(tmp_path)
  try:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="1",
               JAX_PROCESS_ID="0", **{coordination.SERVICE_ENV: "launcher"})
    joined = subprocess.run([sys.executable, "-c", JOIN], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
  finally:
    service.terminate()
    assert service.wait(timeout=30) == 0
  assert joined.returncode == 0, joined.stderr[-4000:]
  assert "joined 0 1 6" in joined.stdout


def test_the_service_ends_when_the_launcher_that_started_it_is_killed(tmp_path):
  launcher, _ = _serve(tmp_path, parent_argv=["bash", "-c"])
  with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children", encoding="utf-8") as f:
    service = [int(p) for p in f.read().split()]
  assert len(service) == 1
  os.kill(launcher.pid, signal.SIGKILL)
  launcher.wait()
  deadline = time.monotonic() + 15
  while os.path.exists(f"/proc/{service[0]}") and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not os.path.exists(f"/proc/{service[0]}") or _zombie(service[0]), "the service outlived its launcher"


def _zombie(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().split(")")[-1].split()[0] == "Z"
  except FileNotFoundError:
    return True
