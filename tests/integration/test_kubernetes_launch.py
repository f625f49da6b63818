"""launch/kubernetes/jobset.yaml and its pods, as the fake SLURM tests launch/slurm.sbatch: the manifest is a JobSet
by JobSet's published schema, read as strictly as `kubectl apply` reads it (an unknown field is an error); its
failure policy restarts every pod on exit 75 and stops on bad input; the environment it gives a pod yields
jax.distributed's coordinator, process count and id (parallel/cluster_env.py); launch/kubernetes/entrypoint.sh
turns a save at a preemption notice into exit 75; and two processes started with its pods' environment (the
coordinator's name resolved to localhost) train, are preempted, restart and resume through `python -m
visionfm_jax.main`.

The schema is JobSet's CRD, config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml of kubernetes-sigs/jobset at
v0.9.1 (commit acea4e18c8d01b55023d74946237790105625ed4), gzipped in tests/data as it was published (CRD_SHA256).
"""

import copy
import functools
import gzip
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jsonschema
import pytest
import yaml

from visionfm_jax.errors import UserError
from visionfm_jax.parallel import cluster_env, coordination, distributed

from conftest import FAST_COMPILE_FLAGS, ROOT, kill_session
from test_frozen_coordinator import ABORT_SIGNS
from test_multiprocess import DDP_FLAGS, TOTAL_STEPS

MANIFEST = os.path.join(ROOT, "launch", "kubernetes", "jobset.yaml")
CRD = os.path.join(ROOT, "tests", "data", "jobset_v0.9.1_crd.yaml.gz")
CRD_SHA256 = "6307f9c78901dbebea69050e9da71e35e36743348d79235b870e7d263f8b7013"
LAUNCH_ENV = (
  "JAX_COORDINATOR_ADDRESS",
  "JAX_COORDINATOR_PORT",
  "JAX_NUM_PROCESSES",
  "JAX_PROCESS_ID",
  "JAX_LOCAL_DEVICE_IDS",
  "SLURM_NTASKS",
  "JOB_COMPLETION_INDEX",
)


def _manifest() -> dict:
  with open(MANIFEST, encoding="utf-8") as f:
    return yaml.safe_load(f)


def _strict(schema):
  """`schema` with every object that lists its properties closed to others, as the API server's strict field
  validation (kubectl's default) refuses an unknown field; objects that keep unknown fields stay open."""
  if isinstance(schema, list):
    return [_strict(item) for item in schema]
  if not isinstance(schema, dict):
    return schema
  closed = {key: _strict(value) for key, value in schema.items()}
  if (
    "properties" in closed
    and "additionalProperties" not in closed
    and not closed.get("x-kubernetes-preserve-unknown-fields")
  ):
    closed["additionalProperties"] = False
  return closed


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
  with open(CRD, "rb") as f:
    text = gzip.decompress(f.read())
  assert hashlib.sha256(text).hexdigest() == CRD_SHA256  # the published file, unchanged
  crd = yaml.load(text, Loader=yaml.CSafeLoader)
  [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
  return jsonschema.Draft4Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _errors(document) -> list[str]:
  return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in _validator().iter_errors(document)]


def test_the_manifest_is_a_jobset_by_its_published_schema():
  manifest = _manifest()
  assert (manifest["apiVersion"], manifest["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
  assert _errors(manifest) == []
  misspelt, quoted, unknown_action = (copy.deepcopy(manifest) for _ in range(3))
  misspelt["spec"]["failurePolcy"] = misspelt["spec"].pop("failurePolicy")
  quoted["spec"]["replicatedJobs"][0]["replicas"] = "2"
  unknown_action["spec"]["failurePolicy"]["rules"][0]["action"] = "Restart"
  assert [
    "failurePolcy" in " ".join(_errors(misspelt)),
    "'2' is not of type 'integer'" in " ".join(_errors(quoted)),
    "'Restart' is not one of" in " ".join(_errors(unknown_action)),
  ] == [True] * 3


def _job_failure_reason(job: dict, exit_code: int) -> str:
  """Why Kubernetes fails a Job of `job`'s spec whose pod's container `trainer` exits `exit_code` (backoffLimit 0:
  any failed pod fails the Job): its podFailurePolicy's first FailJob rule matching the code, else the limit."""
  for rule in job["podFailurePolicy"]["rules"]:
    codes = rule.get("onExitCodes")
    if codes and codes["containerName"] == "trainer" and (exit_code in codes["values"]) == (codes["operator"] == "In"):
      assert rule["action"] == "FailJob"
      return "PodFailurePolicy"
  assert job["backoffLimit"] == 0
  return "BackoffLimitExceeded"


def _jobset_action(spec: dict, reason: str) -> str:
  """What the JobSet controller does when a Job fails for `reason`: the first failure-policy rule that lists it (or
  lists none), else RestartJobSet."""
  for rule in spec["failurePolicy"]["rules"]:
    if not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]:
      return rule["action"]
  return "RestartJobSet"


def test_exit_75_and_a_dead_process_restart_every_pod_and_bad_input_stops_the_jobset():
  spec = _manifest()["spec"]
  job = spec["replicatedJobs"][0]["template"]["spec"]
  actions = {code: _jobset_action(spec, _job_failure_reason(job, code)) for code in (75, 134, 137, 2, 1)}
  assert actions == {75: "RestartJobSet", 134: "RestartJobSet", 137: "RestartJobSet", 2: "FailJobSet", 1: "FailJobSet"}
  disruption = [r for r in job["podFailurePolicy"]["rules"] if r.get("onPodConditions")]
  assert [(r["action"], r["onPodConditions"][0]["type"]) for r in disruption] == [("FailJob", "DisruptionTarget")]


def _pod_env(manifest: dict, number: int, **annotations) -> dict[str, str]:
  """The environment the trainer container of Job `number` gets: the manifest's env, its downward-API fields
  read from the annotations the JobSet controller puts on the pod (`annotations` replaces some), and the Job
  controller's JOB_COMPLETION_INDEX."""
  spec = manifest["spec"]
  [replicated] = spec["replicatedJobs"]
  name, coordinator = manifest["metadata"]["name"], spec["coordinator"]
  on_pod = {
    "jobset.sigs.k8s.io/jobset-name": name,
    "jobset.sigs.k8s.io/replicatedjob-name": replicated["name"],
    "jobset.sigs.k8s.io/job-index": str(number),
    "jobset.sigs.k8s.io/replicatedjob-replicas": str(replicated["replicas"]),
    "jobset.sigs.k8s.io/coordinator": (
      f"{name}-{coordinator['replicatedJob']}-{coordinator['jobIndex']}-{coordinator['podIndex']}.{name}"
    ),
    **{f"jobset.sigs.k8s.io/{key.replace('_', '-')}": value for key, value in annotations.items()},
  }
  [container] = replicated["template"]["spec"]["template"]["spec"]["containers"]
  env = {"JOB_COMPLETION_INDEX": "0"}
  for entry in container["env"]:
    if "value" in entry:
      env[entry["name"]] = entry["value"]
    else:
      key = re.fullmatch(r"metadata\.annotations\['(.+)'\]", entry["valueFrom"]["fieldRef"]["fieldPath"]).group(1)
      env[entry["name"]] = on_pod[key]
  return env


@pytest.fixture
def pod(monkeypatch):
  """Sets the environment of a pod of the manifest: pod(job number, **annotations it replaces)."""
  for name in LAUNCH_ENV:
    monkeypatch.delenv(name, raising=False)

  def enter(number, **annotations):
    for name, value in _pod_env(_manifest(), number, **annotations).items():
      monkeypatch.setenv(name, value)

  return enter


def test_a_pods_environment_gives_jax_distributed_its_place(pod, monkeypatch):
  assert not cluster_env.in_jobset() and cluster_env.jobset_kwargs() == {}
  for index in range(2):
    pod(index)
    assert distributed.launched_distributed()
    assert distributed.initialize_kwargs() == dict(
      coordinator_address="visionfm-trainer-0-0.visionfm:55527", num_processes=2, process_id=index
    )
  monkeypatch.delenv("JOBSET_COORDINATOR")  # a JobSet controller older than spec.coordinator: the pod's DNS name
  monkeypatch.setenv("JAX_COORDINATOR_PORT", "1234")
  assert cluster_env.jobset_kwargs()["coordinator_address"] == "visionfm-trainer-0-0.visionfm:1234"
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  assert distributed.initialize_kwargs()["num_processes"] == 1  # the explicit variables win


@pytest.mark.parametrize(
  "annotations, env, named",
  [
    ({"job_index": "2"}, {}, "JOBSET_JOB_INDEX=2: expected below JOBSET_REPLICAS=2"),
    ({"replicatedjob_replicas": "two"}, {}, "JOBSET_REPLICAS='two': expected an integer >= 1"),
    ({}, {"JOB_COMPLETION_INDEX": "1"}, "JOB_COMPLETION_INDEX=1: a Job of several pods"),
    ({}, {"JAX_COORDINATOR_PORT": "0"}, "JAX_COORDINATOR_PORT='0': expected an integer from 1 to 65535"),
    (
      {},
      {"JAX_COORDINATOR_ADDRESS": "localhost:70000"},
      "JAX_COORDINATOR_ADDRESS='localhost:70000': expected HOST:PORT with a port from 1 to 65535",
    ),
  ],
)
def test_a_malformed_pod_environment_is_a_user_error_naming_it(pod, monkeypatch, annotations, env, named):
  pod(1, **annotations)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(UserError, match=re.escape(named)):
    distributed.initialize_kwargs()


# A stand-in for the trainer (MODULE=probe_task): exits with --exit's status, or with --wait_for_term=FILE makes
# FILE, then saves at SIGTERM as the trainer does and exits 0.
PROBE = textwrap.dedent("""\
    import os, signal, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    signal.alarm(60)  # never outlive a failed test
    if "wait_for_term" in args:
        signal.signal(signal.SIGTERM, lambda *_: (print("probe saved", flush=True), sys.exit(0)))
        open(args["wait_for_term"], "w").close()
        while True:
            signal.pause()
    sys.exit(int(args["exit"]))
    """)


def _entrypoint(args, env, **popen):
  """The manifest's container command with `args` for its args, in a session of its own."""
  [replicated] = _manifest()["spec"]["replicatedJobs"]
  [container] = replicated["template"]["spec"]["template"]["spec"]["containers"]
  return subprocess.Popen(
    [*container["command"], *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
    **popen,
  )


def test_the_entrypoint_exits_75_after_a_save_at_a_preemption_notice_and_passes_other_statuses_on(tmp_path):
  (tmp_path / "probe_task.py").write_text(PROBE)
  env = dict(os.environ, MODULE="probe_task", PYTHONPATH=str(tmp_path))
  for status in (0, 2):
    proc = _entrypoint([f"--exit={status}"], env)
    assert proc.wait(timeout=60) == status, proc.communicate()[0]
  marker = tmp_path / "waiting"
  proc = _entrypoint([f"--wait_for_term={marker}"], env)
  deadline = time.monotonic() + 30
  while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGTERM)  # Kubernetes signals the container's first process: the entrypoint
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 75 and "probe saved" in out, out
  assert "saved at a preemption notice; exiting 75 so that the JobSet restarts the run" in out, out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_pods(workdir, warm) -> list[subprocess.Popen]:
  """The manifest's two pods as local processes with its entrypoint and environment, the coordinator's name
  resolved to localhost, each on one CPU device (test_multiprocess runs two a process), training the tiny ViT of
  test_multiprocess with ddp (`DDP_FLAGS`: the claim is the pods' restart, not ZeRO) in `workdir`; the entrypoint's
  `python` is the warm interpreter `warm` (tests/warm_python.py)."""
  base = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
  port = str(_free_port())
  pods = []
  for index in range(2):
    env = dict(
      base,
      **_pod_env(_manifest(), index, coordinator="localhost"),
      JAX_COORDINATOR_PORT=port,
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE_FLAGS}",
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )  # the restart loads the first start's programs
    pods.append(_entrypoint([*DDP_FLAGS, f"--workdir={workdir}"], warm.env(env)))
  return pods


def _finish(pods) -> list[tuple[int, str]]:
  results = []
  for proc in pods:
    try:
      out, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
      for other in pods:
        kill_session(other.pid)
      pytest.fail(f"a pod timed out:\n{proc.communicate()[0][-6000:]}")
    results.append((proc.returncode, out))
  return results


def _first_logged_step(workdir, pods) -> None:
  path, deadline = workdir / "metrics.jsonl", time.monotonic() + 300
  while time.monotonic() < deadline and all(p.poll() is None for p in pods):
    rows = [json.loads(line) for line in (path.read_text() if path.exists() else "").splitlines() if line.endswith("}")]
    if any("train/loss" in r for r in rows):
      return
    time.sleep(0.05)
  pytest.fail(f"no step was logged:\n{_finish(pods)[0][1][-6000:]}")


@pytest.mark.slow
def test_two_pods_train_are_preempted_restart_and_resume(tmp_path, warm_python):
  """Pod 0 gets the preemption notice once training runs: both save one agreed step; pod 0 exits 75, which the
  failure policy restarts the JobSet on, pod 1 exits 0. The restarted pods resume from that step and finish."""
  workdir = tmp_path / "run"
  pods = _start_pods(workdir, warm_python)
  try:
    _first_logged_step(workdir, pods)
    os.kill(pods[0].pid, signal.SIGTERM)
    (first, out0), (second, out1) = _finish(pods)
  finally:
    for proc in pods:
      if proc.poll() is None:
        kill_session(proc.pid)
  assert (first, second) == (75, 0), out0[-4000:] + out1[-4000:]
  saved = {int(s) for s in re.findall(r"preemption notice: saved step (\d+)", out0 + out1)}
  assert len(saved) == 1 and 0 < min(saved) < TOTAL_STEPS, out0[-4000:]
  [step] = saved

  restarted = _finish(_start_pods(workdir, warm_python))
  assert [code for code, _ in restarted] == [0, 0], restarted[0][1][-4000:] + restarted[1][1][-4000:]
  assert f"resuming from {workdir / 'checkpoints'}/{step}" in restarted[0][1], restarted[0][1][-4000:]
  assert "2 processes, 2 devices (cpu)" in restarted[0][1]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r][-1] == TOTAL_STEPS
  assert (workdir / "checkpoints" / str(TOTAL_STEPS)).is_dir()


# ------------------------------------------------------------------------------------- joins that fail


def _pod_main(index, workdir, warm, **env) -> subprocess.Popen:
  """`python -m visionfm_jax.main` through the entrypoint with the environment of the manifest's pod `index` (its
  coordinator's name resolved to localhost) and `env`, on one CPU device, in a session of its own."""
  base = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
  env = dict(
    base,
    **_pod_env(_manifest(), index, coordinator="localhost"),
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE_FLAGS}",
    **env,
  )
  return _entrypoint([*DDP_FLAGS, f"--workdir={workdir}"], warm.env(env))


def _ended(proc, timeout=120) -> tuple[int, list[str], str]:
  """(exit status, `error:` lines, output) of a pod, once it and every process of its session have ended."""
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    kill_session(proc.pid)
    pytest.fail(f"the pod did not end:\n{proc.communicate()[0][-6000:]}")
  deadline = time.monotonic() + 10
  while _in_session(proc.pid) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not _in_session(proc.pid), "a process of the pod outlived it"
  assert not [sign for sign in ABORT_SIGNS if sign in out], out[-6000:]
  return proc.returncode, [line for line in out.splitlines() if line.startswith("error:")], out


def _in_session(session: int) -> list[int]:
  """The live (not zombie) processes of `session`."""
  live = []
  for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
      continue
    if int(fields[3]) == session and fields[0] != "Z":
      live.append(int(entry))
  return live


REQUEUED = rf"Process 1 exits with code {coordination.REQUEUE_EXIT_CODE} so that the job is requeued; .*"


def test_a_bad_coordinator_port_is_one_line_and_exit_2(tmp_path, warm_python):
  """JAX_COORDINATOR_PORT=70000 was accepted: 300 s of silence, then SIGABRT with a fatal C++ line."""
  code, errors, out = _ended(_pod_main(1, tmp_path / "run", warm_python, JAX_COORDINATOR_PORT="70000"))
  assert code == 2 and errors == [
    "error: JAX_COORDINATOR_PORT='70000': expected an integer from 1 to 65535 (the coordinator's port; unset, 55527)"
  ], out


def test_a_coordinator_that_does_not_answer_is_one_line_naming_it_and_exit_75(tmp_path, warm_python):
  """No process 0 at the coordinator's address: 300 s of silence, then SIGABRT with a fatal C++ line and a stack
  dump. Now one line naming the address within VISIONFM_JOIN_TIMEOUT_S (2 s here) and the time jax's client takes
  to give up."""
  port = _free_port()
  start = time.monotonic()
  code, errors, out = _ended(
    _pod_main(1, tmp_path / "run", warm_python, JAX_COORDINATOR_PORT=str(port), **{distributed.JOIN_TIMEOUT_ENV: "2"})
  )
  assert code == coordination.REQUEUE_EXIT_CODE and len(errors) == 1, out[-6000:]
  assert re.fullmatch(
    rf"error: JAX's coordination service at localhost:{port} \(in process 0\) did not answer "
    rf"within 2s \({distributed.JOIN_TIMEOUT_ENV}\): connection refused. {REQUEUED}",
    errors[0],
  ), errors
  assert time.monotonic() - start < 60


@pytest.mark.slow
def test_two_pods_with_the_same_job_index_are_one_line_each_and_exit_75(tmp_path, warm_python):
  """Two pods with JOBSET_JOB_INDEX=1: the first to register aborted with a fatal C++ line (ALREADY_EXISTS) the moment
  the second did, and the second after 300 s (DEADLINE_EXCEEDED). Now the first names the refusal and the index,
  the second the index it waited on, each in one line."""
  ready = tmp_path / "ready"
  service = subprocess.Popen(
    [sys.executable, "-m", "visionfm_jax.parallel.coordination", "--processes=2", f"--ready_file={ready}"],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  try:
    deadline = time.monotonic() + 60
    while not ready.exists():
      assert service.poll() is None and time.monotonic() < deadline, "the service did not start"
      time.sleep(0.05)
    env = {
      "JAX_COORDINATOR_ADDRESS": f"localhost:{int(ready.read_text())}",
      coordination.SERVICE_ENV: "launcher",
      coordination.SERVICE_PID_ENV: str(service.pid),
      distributed.JOIN_TIMEOUT_ENV: "10",
    }
    pods = [_pod_main(1, tmp_path / f"run{i}", warm_python, **env) for i in range(2)]
    ended = [_ended(pod) for pod in pods]
  finally:
    service.terminate()
    service.wait(timeout=30)
  assert [code for code, _, _ in ended] == [coordination.REQUEUE_EXIT_CODE] * 2, [out[-3000:] for *_, out in ended]
  lines = sorted(errors[0] for _, errors, _ in ended if len(errors) == 1)
  service_name = rf"JAX's coordination service at localhost:\d+ \(pid {service.pid}, started by the launcher\)"
  assert len(lines) == 2 and re.fullmatch(
    rf"error: not all 2 processes of the job joined {service_name} within 10s \({distributed.JOIN_TIMEOUT_ENV}\): "
    rf"one did not start or cannot reach it, or two have the same index \(this one's JOBSET_JOB_INDEX=1\). "
    rf"{REQUEUED}",
    lines[1],
  ), lines
  assert re.fullmatch(
    rf"error: {service_name} refused this process as process 1 of 2 after \d+s: another process "
    rf"registered with the same index, JOBSET_JOB_INDEX=1 \(or the service runs a job of another "
    rf"size\). {REQUEUED}",
    lines[0],
  ), lines
