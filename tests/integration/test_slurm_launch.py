"""launch/slurm.sbatch run as written, through the fake SLURM in tests/fake_slurm (sbatch, srun and scontrol that
run the job here, in the foreground, on CPU): the documented line trains in two processes; the tasks get the CPUs
the job asked for; a process that gave up on a dead peer (exit 75) and a preemption notice (SIGTERM) requeue the
job; MODULE runs another program under the allocation. Most jobs run a small probe module instead of the trainer.
Also the fake itself, and config.data.num_workers=-1 resolved from the CPUs of the process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from visionfm_jax import config_lib
from visionfm_jax.data.loader import pipeline
from visionfm_jax.errors import ConfigError

from conftest import FAST_COMPILE_FLAGS, ROOT, kill_session

FAKE_SLURM = os.path.join(ROOT, "tests", "fake_slurm")
CPUS = len(os.sched_getaffinity(0))

# A task of the job: prints what it was given as one `probe {json}` line, then exits with --exit's status (with
# --only_task=K: task K does, the others hang as a wedged process would), or with --wait_for_term=DIR marks
# DIR/<task> and waits for SIGTERM, then exits 0.
PROBE = textwrap.dedent("""\
    import json, os, signal, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    names = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID",
             "SLURM_CPUS_PER_TASK", "JAX_PLATFORMS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION", "JAX_COORDINATOR_ADDRESS",
             "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "XLA_FLAGS", "GPU")
    report = {"argv": sys.argv[1:], "cpus": len(os.sched_getaffinity(0)), "env": {n: os.environ.get(n) for n in names}}
    os.write(1, ("probe " + json.dumps(report) + "\\n").encode())  # one write: the tasks share the output
    signal.alarm(120)  # never outlive a failed test
    task = os.environ["SLURM_PROCID"]
    if "wait_for_term" in args:
        signal.signal(signal.SIGTERM, lambda *_: (print("probe got TERM", flush=True), sys.exit(0)))
        open(os.path.join(args["wait_for_term"], task), "w").close()
    if "wait_for_term" in args or args.get("only_task", task) != task:
        while True:
            signal.pause()
    if "signal" in args:
        os.kill(os.getpid(), getattr(signal, "SIG" + args["signal"]))
    sys.exit(int(args.get("exit", 0)))
    """)
# srun as a cluster's reports a job whose task 0 it had to kill (SIGKILL) after another task failed: by the signal,
# whatever the failed task's status.
SRUN_REPORTING_THE_KILLED_TASK = textwrap.dedent(f"""\
    #!/usr/bin/env bash
    {FAKE_SLURM}/srun "$@" && exit 0
    exit 137
    """)


@pytest.fixture
def slurm(tmp_path):
  """Runs commands with the fake SLURM first on PATH, the probe module importable and no launch environment of
  the caller's; `.requeued()`: the job ids requeued."""
  (tmp_path / "probe_task.py").write_text(PROBE)
  return Slurm(tmp_path / "requeued", pythonpath=tmp_path)


class Slurm:
  def __init__(self, log, pythonpath):
    self.log = log
    path = os.pathsep.join([FAKE_SLURM, os.path.dirname(sys.executable), os.environ["PATH"]])
    self.env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("SLURM_", "SRUN_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    }
    self.env.update(
      PATH=path, PYTHONPATH=str(pythonpath), FAKE_SLURM_LOG=str(log), XLA_FLAGS=FAST_COMPILE_FLAGS, JAX_PLATFORMS="cpu"
    )

  def start(self, *argv, **env) -> subprocess.Popen:
    return subprocess.Popen(
      argv,
      cwd=ROOT,
      env=dict(self.env, **env),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )

  def run(self, *argv, timeout=120, **env) -> tuple[int, str]:
    return self.finish(self.start(*argv, **env), timeout)

  @staticmethod
  def finish(proc: subprocess.Popen, timeout=120) -> tuple[int, str]:
    """(exit status, output) of a started command."""
    try:
      out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      kill_session(proc.pid)
      pytest.fail(f"{' '.join(proc.args)} timed out:\n{proc.communicate()[0][-6000:]}")
    return proc.returncode, out

  def requeued(self) -> list[str]:
    return self.log.read_text().split() if self.log.exists() else []


def probes(out: str) -> list[dict]:
  """The probe tasks' reports, by task id."""
  reports = [json.loads(line[len("probe ") :]) for line in out.splitlines() if line.startswith("probe {")]
  return sorted(reports, key=lambda r: int(r["env"]["SLURM_PROCID"]))


def job_id(out: str) -> str:
  first = out.splitlines()[0]
  assert first.startswith("Submitted batch job "), out
  return first.split()[-1]


# ------------------------------------------------------------------------------------------- the fake itself


def test_fake_srun_outside_a_job_starts_jax_processes_on_cpu(slurm):
  code, out = slurm.run(
    "srun",
    "--nodes=1",
    "--ntasks=2",
    "--label",
    "python",
    "-m",
    "probe_task",
    "--x=1",
    FAKE_SLURM_DEVICES_PER_NODE="3",
    XLA_FLAGS="--xla_force_host_platform_device_count=8 --a=1",
  )
  assert code == 0, out
  tasks = probes(out)
  assert [t["env"]["SLURM_PROCID"] for t in tasks] == [t["env"]["JAX_PROCESS_ID"] for t in tasks] == ["0", "1"]
  for task in tasks:
    env = task["env"]
    assert task["argv"] == ["--x=1"]
    assert (env["SLURM_NTASKS"], env["SLURM_STEP_NUM_TASKS"], env["SLURM_NNODES"], env["JAX_NUM_PROCESSES"]) == (
      "2",
      "2",
      "1",
      "2",
    )
    assert (env["JAX_PLATFORMS"], env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"]) == ("cpu", "gloo")
    assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=3"
    assert env["JAX_COORDINATOR_ADDRESS"] == tasks[0]["env"]["JAX_COORDINATOR_ADDRESS"]
    assert env["SLURM_JOB_ID"] and env["JAX_LOCAL_DEVICE_IDS"] is None
  assert [t["env"]["SLURM_LOCALID"] for t in tasks] == ["0", "1"]  # both on the one node
  assert all(t["cpus"] == 1 for t in tasks)  # no -c: one CPU each, as Slurm binds them


def test_fake_srun_kills_the_other_tasks_on_a_bad_exit_and_returns_its_status(slurm):
  script = "if [ $SLURM_PROCID = 1 ]; then exit 3; fi; exec sleep 60"
  start = time.monotonic()
  code, out = slurm.run("srun", "-n", "2", "--kill-on-bad-exit=1", "bash", "-c", script)
  assert code == 3 and time.monotonic() - start < 30, out


def test_fake_sbatch_gives_the_script_an_allocation(slurm, tmp_path):
  script = tmp_path / "job.sh"
  script.write_text(
    "#!/bin/bash\n#SBATCH --cpus-per-task=512 --job-name=probe\n#SBATCH --exclusive\n"
    'echo "$SLURM_JOB_NUM_NODES $SLURM_NNODES $SLURM_GPUS_ON_NODE $SLURM_CPUS_PER_TASK '
    '$SLURM_SUBMIT_DIR $NODES $SLURM_JOB_NAME $*"\nexit 5\n'
  )
  code, out = slurm.run(
    "sbatch", "--nodes=8", "-o", "ignored.out", str(script), "a", "b", NODES="16", FAKE_SLURM_MAX_NODES="3"
  )
  assert code == 5, out
  assert out.splitlines()[1] == f"3 3 4 {CPUS} {ROOT} 16 probe a b"
  first, second = job_id(out), job_id(slurm.run("sbatch", "--wrap", "echo $SLURM_JOB_ID")[1])
  assert first != second


def test_fake_sbatch_runs_an_array_task_by_task_and_returns_the_highest_status(slurm, tmp_path):
  script = tmp_path / "array.sh"
  script.write_text(
    '#!/bin/bash\n#SBATCH --array=0-99\necho "task $SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT '
    '$SLURM_ARRAY_TASK_MIN $SLURM_ARRAY_TASK_MAX $SLURM_ARRAY_JOB_ID $SLURM_JOB_ID"\n'
    "exit $((SLURM_ARRAY_TASK_ID == 3 ? 4 : SLURM_ARRAY_TASK_ID == 5 ? 1 : 0))\n"
  )
  code, out = slurm.run("sbatch", "--wait", "--array=1-5:2,8%2", str(script))  # the command line wins
  assert code == 4, out
  tasks = [line.split() for line in out.splitlines() if line.startswith("task ")]
  assert [t[1] for t in tasks] == ["1", "3", "5", "8"], out
  assert {tuple(t[2:6]) for t in tasks} == {("4", "1", "8", job_id(out))}
  assert len({t[6] for t in tasks} | {job_id(out)}) == 5  # each task a job of its own
  assert slurm.run("sbatch", "--array=2-x", str(script))[0] == 1


def test_tool_sbatch_names_the_missing_module(slurm):
  code, out = slurm.run("sbatch", "--wait", "launch/tool.sbatch", "--input=x")
  assert code == 2 and "error: MODULE names no tool" in out, out


# -------------------------------------------------------------------------------------------- slurm.sbatch


def test_sbatch_gives_each_task_the_cpus_of_the_job_and_runs_another_module(slurm):
  """#SBATCH --cpus-per-task reaches srun through SRUN_CPUS_PER_TASK (Slurm 22.05 and later bind a task to one CPU
  otherwise); MODULE's program gets the arguments as they are, without main's --distributed=on."""
  if CPUS < 2:
    pytest.skip("one CPU here: a task bound to one CPU looks the same as one given the job's")
  code, out = slurm.run(
    "sbatch",
    "--nodes=2",
    "launch/slurm.sbatch",
    "--checkpoint=/ckpt/x",
    "--out=/tmp/y",
    MODULE="probe_task",
    GPU="a100",
  )
  assert code == 0, out
  tasks = probes(out)
  assert len(tasks) == 2, out
  for task in tasks:
    assert task["cpus"] == CPUS, out
    assert task["argv"] == ["--checkpoint=/ckpt/x", "--out=/tmp/y"]
    assert task["env"]["GPU"] == "a100" and task["env"]["SLURM_CPUS_PER_TASK"] == str(CPUS)
  assert not slurm.requeued()


@pytest.mark.parametrize(
  "ending, requeued",
  [
    ("--exit=75", True),
    ("--signal=KILL", True),
    ("--signal=ABRT", True),
    ("--exit=3", False),
    ("--signal=TERM", False),
  ],
)
def test_sbatch_requeues_a_job_whose_process_gave_up_on_a_dead_peer_or_died(slurm, tmp_path, ending, requeued):
  """Task 1 exits 75 (faults.HUNG_EXIT_CODE: it gave up waiting on task 0, which hangs), or its python alone is
  killed (the OOM killer) or aborts (JAX's client when the coordinator died), and requeues the job, although srun
  then kills task 0 and reports its signal; the job's status stays srun's. Another failure is not requeued, nor a
  TERM (the preemption path requeues those)."""
  shim = tmp_path / "bin" / "srun"
  shim.parent.mkdir()
  shim.write_text(SRUN_REPORTING_THE_KILLED_TASK)
  shim.chmod(0o755)
  code, out = slurm.run(
    "sbatch",
    "--nodes=2",
    "launch/slurm.sbatch",
    ending,
    "--only_task=1",
    f"--workdir={tmp_path}",
    MODULE="probe_task",
    PATH=os.pathsep.join([str(shim.parent), slurm.env["PATH"]]),
  )
  assert code == 137, out
  assert slurm.requeued() == ([job_id(out)] if requeued else []), out
  assert ("python died by SIG" in out) == (ending.startswith("--signal=") and ending != "--signal=TERM"), out


def test_sbatch_caps_the_requeues_after_a_hang_and_no_others(slurm, tmp_path):
  """MAX_REQUEUES caps the attempts that ended on exit 75, counted in <workdir>/requeues, not every requeue
  (SLURM_RESTART_COUNT also counts preemptions and time limits): a job requeued 7 times at its time limit is requeued
  after a hang; the tasks of one attempt count once; the hang after MAX_REQUEUES such requeues ends the job with one
  error line; a new job on the workdir counts afresh."""

  def attempt(job, restarts):
    return slurm.run(
      "sbatch",
      "--nodes=1",
      "launch/slurm.sbatch",
      "--exit=75",
      f"--workdir={tmp_path}",
      MODULE="probe_task",
      MAX_REQUEUES="2",
      FAKE_SLURM_JOB_ID=job,
      FAKE_SLURM_RESTART_COUNT=str(restarts),
    )

  record = tmp_path / "requeues"
  assert attempt("1001", 7)[0] == 75 and slurm.requeued() == ["1001"]
  with open(record, "a", encoding="utf-8") as f:
    f.write("1001 7\n")  # the attempt's other task, which exited 75 too
  assert attempt("1001", 8)[0] == 75 and slurm.requeued() == ["1001"] * 2
  code, out = attempt("1001", 9)
  assert code == 75 and slurm.requeued() == ["1001"] * 2, out
  assert (
    f"error: job 1001: 3 attempts ended on a hang, a lost peer or a dead process ({record}), more than "
    f"MAX_REQUEUES=2: not requeueing it"
  ) in out
  assert attempt("1002", 0)[0] == 75 and slurm.requeued() == ["1001"] * 2 + ["1002"]
  assert record.read_text().splitlines() == ["1001 7", "1001 7", "1001 8", "1001 9", "1002 0"]


def test_sbatch_passes_a_preemption_notice_on_then_requeues(slurm, tmp_path):
  """SIGTERM to the batch script reaches every process; once they have saved and exited 0 the job is requeued and
  ends with their status."""
  proc = slurm.start(
    "sbatch",
    "--nodes=2",
    "launch/slurm.sbatch",
    f"--wait_for_term={tmp_path}",
    f"--workdir={tmp_path}",
    MODULE="probe_task",
  )
  deadline = time.monotonic() + 60
  while not all((tmp_path / str(i)).exists() for i in range(2)) and time.monotonic() < deadline:
    assert proc.poll() is None, proc.communicate()[0]
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGTERM)  # sbatch became the batch script: its shell gets the notice (--signal=B:TERM)
  code, out = slurm.finish(proc)
  assert code == 0, out
  assert out.count("probe got TERM") == 2, out
  assert slurm.requeued() == [job_id(out)]
  assert not (tmp_path / "requeues").exists()  # not a requeue after a hang: MAX_REQUEUES does not count it


def test_sbatch_trains_the_documented_line_in_two_processes(slurm, tmp_path, warm_python):
  """`sbatch --nodes=2 launch/slurm.sbatch --config=... --workdir=...` (the tiny ViT): two processes, joined by
  jax.distributed, each driving its node's 4 CPU devices, train 2 steps and write the checkpoint. Their `python` is
  the warm interpreter (tests/warm_python.py), which serves only a PYTHONPATH like its own (not the probe's) and
  runs a command on its own CPUs: every CPU, as #SBATCH --cpus-per-task gives each task."""
  slurm.env = warm_python.env(
    {k: v for k, v in slurm.env.items() if k != "PYTHONPATH"}
    | {k: v for k, v in os.environ.items() if k == "PYTHONPATH"}
  )
  workdir = tmp_path / "run"
  code, out = slurm.run(
    "sbatch",
    "--nodes=2",
    "launch/slurm.sbatch",
    "--config=configs/vit_huge.py:demo",
    f"--workdir={workdir}",
    "--config.model.variant=pico/4",
    "--config.model.image_size=16",
    "--config.data.image_size=16",
    "--config.global_batch_size=16",
    "--config.optim.warmup_steps=1",
    "--config.total_steps=2",
    "--config.checkpoint_every=2",
    "--config.data.eval_examples=16",
    "--config.progress_bar=False",
    timeout=300,
  )
  assert code == 0, out[-6000:]
  assert "2 processes, 8 devices (cpu)" in out, out[-6000:]
  assert (workdir / "checkpoints" / "2").is_dir(), out[-6000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [2]  # the demo logs every 50 steps and the last
  assert not slurm.requeued()


# ------------------------------------------------------------------------------------------ data.num_workers


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 1), (9, 8), (96, pipeline.MAX_AUTO_WORKERS)])
def test_auto_data_workers_follow_the_cpus_of_the_process(monkeypatch, cpus, workers):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
  assert pipeline.worker_count(-1) == workers
  assert pipeline.worker_count(3) == 3 and pipeline.worker_count(0) == 0  # a number of one's own wins


def test_auto_is_the_default_and_the_only_negative_worker_count():
  config = config_lib.base_config()
  assert config.data.num_workers == -1
  config_lib.check(config)
  config.data.num_workers = -2
  with pytest.raises(ConfigError, match="data.num_workers"):
    config_lib.check(config)


def test_local_sh_gives_each_gpu_process_its_slice_of_the_cpus(tmp_path):
  """launch/local.sh N on a GPU machine binds process i to the i-th N-th of the CPUs, so that num_workers=-1 counts
  its share (here: a fake nvidia-smi with 2 GPUs, and a `python` that reports each process's CPUs in one write, which
  the other process's line cannot split)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\necho 'GPU 1: fake'\n")
  report = (
    'import os; os.write(1, ("cpus %s %s\\n" % (os.environ["JAX_PROCESS_ID"], '
    "sorted(os.sched_getaffinity(0)))).encode())"
  )
  (bin_dir / "python").write_text(
    textwrap.dedent(f"""\
      #!/bin/sh
      if [ "$1" = -m ]; then
        exec {sys.executable} -c '{report}'
      fi
      exec {sys.executable} "$@"
      """)
  )
  for program in bin_dir.iterdir():
    program.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  env.pop("JAX_PLATFORMS", None)
  out = subprocess.run(
    ["launch/local.sh", "2", "--config=configs/vit_huge.py:demo"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  slices = dict(line.split(" ", 2)[1:] for line in out.stdout.splitlines() if line.startswith("cpus "))
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < 2:
    pytest.skip("one CPU: nothing to split")
  half = len(cpus) // 2
  assert slices == {"0": str(cpus[:half]), "1": str(cpus[half : 2 * half])}, out.stdout
