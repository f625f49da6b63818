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
import textwrap
import time

import jsonschema
import pytest
import yaml

from visionfm_jax.errors import UserError
from visionfm_jax.parallel import cluster_env, distributed

from conftest import FAST_COMPILE_FLAGS, ROOT, kill_session
from test_multiprocess import DDP_FLAGS, TOTAL_STEPS

MANIFEST = os.path.join(ROOT, "launch", "kubernetes", "jobset.yaml")
CRD = os.path.join(ROOT, "tests", "data", "jobset_v0.9.1_crd.yaml.gz")
CRD_SHA256 = "6307f9c78901dbebea69050e9da71e35e36743348d79235b870e7d263f8b7013"
LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "JAX_LOCAL_DEVICE_IDS", "SLURM_NTASKS", "JOB_COMPLETION_INDEX")


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
  if "properties" in closed and "additionalProperties" not in closed and not closed.get(
      "x-kubernetes-preserve-unknown-fields"):
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
  assert ["failurePolcy" in " ".join(_errors(misspelt)), "'2' is not of type 'integer'" in " ".join(_errors(quoted)),
          "'Restart' is not one of" in " ".join(_errors(unknown_action))] == [True] * 3


def _job_failure_reason(job: dict, exit_code: int) -> str:
  """Why Kubernetes fails a Job of `job`'s spec whose pod's container `trainer` exits `exit_code` (backoffLimit 0:
  any failed pod fails the Job): its podFailurePolicy's first FailJob rule matching the code, else the limit."""
  for rule in job["podFailurePolicy"]["rules"]:
    codes = rule.get("onExitCodes")
    if codes and codes["containerName"] == "trainer" and (exit_code in codes["values"]) == (
        codes["operator"] == "In"):
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
  assert actions == {75: "RestartJobSet", 134: "RestartJobSet", 137: "RestartJobSet", 2: "FailJobSet",
                     1: "FailJobSet"}
  disruption = [r for r in job["podFailurePolicy"]["rules"] if r.get("onPodConditions")]
  assert [(r["action"], r["onPodConditions"][0]["type"]) for r in disruption] == [("FailJob", "DisruptionTarget")]


def _pod_env(manifest: dict, number: int, **annotations) -> dict[str, str]:
  """The environment the trainer container of Job `number` gets: the manifest's env, its downward-API fields
  read from the annotations the JobSet controller puts on the pod (`annotations` replaces some), and the Job
  controller's JOB_COMPLETION_INDEX."""
  spec = manifest["spec"]
  [replicated] = spec["replicatedJobs"]
  name, coordinator = manifest["metadata"]["name"], spec["coordinator"]
  on_pod = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": replicated["name"],
            "jobset.sigs.k8s.io/job-index": str(number),
            "jobset.sigs.k8s.io/replicatedjob-replicas": str(replicated["replicas"]),
            "jobset.sigs.k8s.io/coordinator": (f"{name}-{coordinator['replicatedJob']}-{coordinator['jobIndex']}-"
                                               f"{coordinator['podIndex']}.{name}"),
            **{f"jobset.sigs.k8s.io/{key.replace('_', '-')}": value for key, value in annotations.items()}}
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
    assert distributed.initialize_kwargs() == dict(coordinator_address="visionfm-trainer-0-0.visionfm:55527",
                                                   num_processes=2, process_id=index)
  monkeypatch.delenv("JOBSET_COORDINATOR")  # a JobSet controller older than spec.coordinator: the pod's DNS name
  monkeypatch.setenv("JAX_COORDINATOR_PORT", "1234")
  assert cluster_env.jobset_kwargs()["coordinator_address"] == "visionfm-trainer-0-0.visionfm:1234"
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  assert distributed.initialize_kwargs()["num_processes"] == 1  # the explicit variables win


@pytest.mark.parametrize("annotations, env, named", [
    ({"job_index": "2"}, {}, "JOBSET_JOB_INDEX=2: expected below JOBSET_REPLICAS=2"),
    ({"replicatedjob_replicas": "two"}, {}, "JOBSET_REPLICAS='two': expected an integer >= 1"),
    ({}, {"JOB_COMPLETION_INDEX": "1"}, "JOB_COMPLETION_INDEX=1: a Job of several pods")])
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
  return subprocess.Popen([*container["command"], *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


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
    env = dict(base, **_pod_env(_manifest(), index, coordinator="localhost"), JAX_COORDINATOR_PORT=port,
               JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE_FLAGS}",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the restart loads the first start's programs
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
    rows = [json.loads(line) for line in (path.read_text() if path.exists() else "").splitlines()
            if line.endswith("}")]
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
