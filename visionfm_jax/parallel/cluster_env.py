"""Where a process stands in a Kubernetes JobSet: jax.distributed's coordinator address, process count and id, from
what the JobSet gives its pod (launch/kubernetes/jobset.yaml).

The manifest runs one pod per node: a replicated job of N Jobs (`replicas: N`), each of one pod. The JobSet
controller puts its names and indexes on each pod as annotations, which the manifest passes into the container
through the downward API, and names the pods in DNS `<jobset>-<replicated job>-<job index>-<pod index>.<subdomain>`
(`network.enableDNSHostnames`; the subdomain is the JobSet's name unless `network.subdomain` says otherwise):

  JOBSET_NAME            jobset.sigs.k8s.io/jobset-name: set, this process runs in a JobSet
  JOBSET_REPLICATED_JOB  jobset.sigs.k8s.io/replicatedjob-name
  JOBSET_JOB_INDEX       jobset.sigs.k8s.io/job-index, 0 .. N-1: the process id
  JOBSET_REPLICAS        jobset.sigs.k8s.io/replicatedjob-replicas, N: the process count
  JOBSET_COORDINATOR     jobset.sigs.k8s.io/coordinator (set by `spec.coordinator`): the DNS name of process 0's
                         pod; unset, `<jobset>-<replicated job>-0-0.<JOBSET_SUBDOMAIN or jobset>`
  JOB_COMPLETION_INDEX   the Job controller's index of the pod within its Job: 0, one pod per Job
  JAX_COORDINATOR_PORT   the coordinator's port (jax's own variable; default 55527, jax's for Kubernetes)

JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, where set, win (parallel/distributed.py).

JAX's own detection (jax._src.clusters.k8s_cluster) asks the Kubernetes API for the pod, its Job and their
services, which needs the `kubernetes` package and a service account allowed to read them, and takes the process
count from one Job's parallelism; this reads the environment only, so a pod needs neither.
"""

from __future__ import annotations

import os

from visionfm_jax.errors import UserError

DEFAULT_PORT = 55527  # jax._src.clusters.k8s_cluster's: the same port whichever detection a pod uses


ANNOTATED = "launch/kubernetes/jobset.yaml passes it from the pod's JobSet annotations"


def _index(name: str, low: int = 0, high: int | None = None, source: str = ANNOTATED) -> int:
  value = os.environ.get(name)
  try:
    number = int(value) if value is not None else None
  except ValueError:
    number = None
  if number is None or number < low or (high is not None and number > high):
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    raise UserError(f"{name}={value!r}: expected {expected} ({source})")
  return number


def in_jobset() -> bool:
  """True when the environment names a JobSet (JOBSET_NAME)."""
  return bool(os.environ.get("JOBSET_NAME"))


def coordinator_host() -> str:
  """The DNS name of process 0's pod: JOBSET_COORDINATOR, else built from the JobSet's names."""
  given = os.environ.get("JOBSET_COORDINATOR", "").strip()
  if given:
    return given
  jobset, replicated = os.environ["JOBSET_NAME"], os.environ.get("JOBSET_REPLICATED_JOB", "")
  if not replicated:
    raise UserError(
      "JOBSET_REPLICATED_JOB is unset: without JOBSET_COORDINATOR it names the coordinator's pod "
      "(launch/kubernetes/jobset.yaml passes both)"
    )
  return f"{jobset}-{replicated}-0-0.{os.environ.get('JOBSET_SUBDOMAIN') or jobset}"


def jobset_kwargs() -> dict:
  """jax.distributed.initialize's coordinator_address, num_processes and process_id for this pod of a JobSet;
  {} outside one. UserError naming a variable that is missing or malformed, or a Job of several pods."""
  if not in_jobset():
    return {}
  if _index("JOB_COMPLETION_INDEX") != 0:
    raise UserError(
      f"JOB_COMPLETION_INDEX={os.environ['JOB_COMPLETION_INDEX']}: a Job of several pods; one process "
      f"per node is one Job per node (replicas: N, parallelism: 1, as launch/kubernetes/jobset.yaml)"
    )
  count, index = _index("JOBSET_REPLICAS", low=1), _index("JOBSET_JOB_INDEX")
  if index >= count:
    raise UserError(f"JOBSET_JOB_INDEX={index}: expected below JOBSET_REPLICAS={count}")
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    port = DEFAULT_PORT
    if os.environ.get("JAX_COORDINATOR_PORT"):
      port = _index("JAX_COORDINATOR_PORT", low=1, high=65535, source=f"the coordinator's port; unset, {DEFAULT_PORT}")
    address = f"{coordinator_host()}:{port}"
  return dict(coordinator_address=address, num_processes=count, process_id=index)
