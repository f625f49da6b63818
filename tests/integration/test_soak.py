"""The soak benchmark (bench/soak.py): the training input pipeline over 3,000 shards under a soft limit of 256 open
files holds its descriptors, memory, threads, processes and bytes read per record flat; its probe charges an interval
with what the pipeline read in it; and its verdicts (bench/trends.py) call a growing series growing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from visionfm_jax.bench import proc_probe, soak, synthetic_shards, trends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_pipeline_over_thousands_of_shards_grows_nothing_under_256_open_files(tmp_path):
  """Globally shuffled reads touch nearly every shard; a reader that keeps each one open dies of 'Too many open
  files' within the first steps here. Throughput is not judged: a few seconds on a shared machine cannot."""
  command = (
    f"ulimit -Sn 256 && exec {sys.executable} -m visionfm_jax.bench.soak --preset=laion --shards=3000 "
    f"--records_per_shard=2 --steps=300 --every=25 --batch_size=8 --num_workers=1 --data_dir={tmp_path} "
    f"--config.data.image_size=32 --throughput_tolerance=1"
  )
  result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 0, errors or result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["sources"] == [{"name": "laion", "kind": "pairs", "shards": 3000, "classes": 0}]
  assert report["failure"] is None and report["workers"] == 1
  # the shard index tells the records per shard: building the loader reads the first record alone (its shard
  # checked against its row, then opened)
  assert report["start_up"]["shards_opened"] == 1 and not report["start_up"]["overflowed"]
  verdicts = {v["quantity"]: v for v in report["verdicts"]}
  assert set(verdicts) == {
    "descriptors (main)",
    "descriptors (children)",
    "RSS MB (main)",
    "RSS MB (children)",
    "threads (main)",
    "threads (children)",
    "processes",
    "/dev/shm entries",
    "bytes read per record",
  }
  assert not [q for q, v in verdicts.items() if v["growing"]]
  assert report["samples"][-1]["step"] == 300
  # 300 batches of 8 read from some 2,000 of the 3,000 shards; the worker holds a bounded few of them
  assert max(sum(c["fds"] for c in s["children"]) for s in report["samples"]) < 200
  # each record drawn opens a shard of 128 KiB or finds it open: tens of KiB read per record, not megabytes
  assert 1024 < verdicts["bytes read per record"]["last"] < 4 << 20


def test_the_shards_are_written_once_and_reused(tmp_path):
  layout = synthetic_shards.SourceLayout("pairs", "pairs", 100)
  specs, _, reused = synthetic_shards.prepare_sources(str(tmp_path), [layout], 3, links=True)
  assert not reused and specs == [f"arrayrecord:{tmp_path}/pairs-100x3/{{split}}-*.array_record"]
  folder = tmp_path / "pairs-100x3"
  assert len(list(folder.glob("train-*.array_record"))) == 100
  assert os.stat(folder / "train-00099-of-00100.array_record").st_nlink > 1  # a link to one of the templates
  _, _, reused = synthetic_shards.prepare_sources(str(tmp_path), [layout], 3, links=True)
  assert reused
  (folder / "train-00007-of-00100.array_record").unlink()
  _, _, reused = synthetic_shards.prepare_sources(str(tmp_path), [layout], 3, links=True)
  assert not reused and (folder / "train-00007-of-00100.array_record").exists()
  from visionfm_jax.data.sources import records, shard_index  # pylint: disable=g-import-not-at-top

  source = records.ArrayRecordSource(str(folder / "train-*.array_record"))
  assert len(source) == 300 and source[299]["caption"].startswith("a synthetic photo")
  name = "train-00005-of-00100.array_record"  # its index row is its template's: what its footer says
  count, size, digest = shard_index.measure(str(folder / name))
  assert source.identity()["shards"][5] == [name, count, size, shard_index.hex_digest(digest)]


def test_a_mixture_preset_scales_every_source_to_the_shards_asked_for():
  scaled = synthetic_shards.scaled(synthetic_shards.PRESETS["aurora"].sources, 3000)
  assert [s.name for s in scaled] == ["laion", "coco", "vg", "aurora_images"]
  assert 2990 <= sum(s.shards for s in scaled) <= 3010 and min(s.shards for s in scaled) >= 1
  assert synthetic_shards.scaled(synthetic_shards.PRESETS["laion"].sources, 0)[0].shards == 232_000


def _sample(step: int, seconds: float, fds: int, rss_mb: float = 200.0, shm: int = 30) -> proc_probe.Sample:
  child = {"pid": 2, "role": "worker", "fds": fds, "threads": 20, "rss_mb": rss_mb, "cpu_s": seconds}
  main = {"pid": 1, "role": "other", "fds": 30, "threads": 80, "rss_mb": 250.0, "cpu_s": 1.0}
  return proc_probe.Sample(step, seconds, 0.0, 5000.0, main, [child], shm, shm, cpu_s=seconds + 1, load=1.0)


def test_the_verdicts_call_growth_growing_and_noise_flat():
  rng = np.random.default_rng(0)
  steps = np.arange(100, 2001, 100)
  noisy = 40 + rng.integers(-6, 7, len(steps))  # a bounded cache, in use by some threads at each sample
  assert not trends.judge("descriptors (children)", steps, noisy, trends.TOLERANCES["descriptors"]).growing
  leaking = 40 + steps * 0.7  # a shard kept open every ~1.4 steps
  verdict = trends.judge("descriptors (children)", steps, leaking, trends.TOLERANCES["descriptors"])
  assert verdict.growing and verdict.slope_per_1000 == pytest.approx(700) and verdict.rise == pytest.approx(1330)
  # RSS: 16 MB of noise or 4 MB per 1000 steps, whichever is more
  assert not trends.judge("RSS MB (main)", steps, 300 + steps * 0.003, trends.TOLERANCES["RSS MB"]).growing
  assert trends.judge("RSS MB (main)", steps, 300 + steps * 0.02, trends.TOLERANCES["RSS MB"]).growing
  long_run = np.arange(1000, 100_001, 1000)
  assert trends.judge("RSS MB (main)", long_run, 300 + long_run * 0.005, trends.TOLERANCES["RSS MB"]).growing
  assert trends.judge("processes", steps, np.where(steps > 1000, 3, 2), trends.TOLERANCES["processes"]).growing
  # a leak that begins late is a leak: a level's slope is least squares' (most pairs of a late step rise by 0)
  assert trends.judge("processes", steps, np.where(steps > 1600, 3, 2), trends.TOLERANCES["processes"]).growing
  late = np.where(steps > 1600, 40 + (steps - 1600) * 0.2, 40)  # 80 descriptors kept over the last 400 steps
  assert trends.judge("descriptors (children)", steps, late, trends.TOLERANCES["descriptors"]).growing


def test_bytes_read_per_record_may_rise_a_tenth_of_their_mean():
  steps, tolerance = np.arange(100, 2001, 100), trends.TOLERANCES["bytes read per record"]
  noisy = 160_000 * (1 + np.random.default_rng(0).uniform(-0.03, 0.03, len(steps)))  # as 200 records of 3,000 shards
  assert not trends.judge("bytes read per record", steps, noisy, tolerance).growing
  rereading = 160_000 + steps * 12  # an index read again a little more often at every step
  verdict = trends.judge("bytes read per record", steps, rereading, tolerance)
  assert verdict.growing and verdict.allowed == pytest.approx(0.1 * rereading.mean())
  assert not trends.judge("bytes read per record", steps, 900 + steps * 0.5, tolerance).growing  # under 1 KiB
  # the worker refilling its prefetch buffer in the last interval after the consumer stalled on a loaded machine:
  # 325 more records' reads charged to its 200. A least-squares line through it rises two thirds of the mean.
  steps = np.arange(50, 301, 25)
  refill = np.where(steps == 300, 423_634, noisy[: len(steps)])
  assert not trends.judge("bytes read per record", steps, refill, tolerance).growing
  week = np.arange(10, 1_000_001, 10)  # a soak sampled every 10 steps: the robust slope reads 1,000 of its samples
  assert trends.robust_slope(week, 160_000 + week * 0.25) == pytest.approx(0.25)
  assert trends.judge("bytes read per record", week, 160_000 + week * 0.25, tolerance).growing


def test_the_probe_charges_an_interval_with_what_the_tree_read_in_it_and_not_with_its_own_reads(tmp_path):
  data = tmp_path / "data"
  data.write_bytes(b"x" * 1_000_000)
  probe = proc_probe.Probe()
  with open(data, "rb") as f:
    assert len(f.read()) == 1_000_000
  read = probe.sample(1, 1.0, records=1000, interval_s=2.0)
  idle = probe.sample(2, 2.0, records=1000, interval_s=2.0)
  assert read.records_per_s == 500 and read.series()["bytes read per record"] == read.bytes_per_record
  assert 1000 <= read.bytes_per_record < 1010 and idle.bytes_per_record < 5
  assert read.main["rchar"] >= 1_000_000


def test_the_time_spent_probing_is_no_interval_s(monkeypatch):
  sample = proc_probe.Probe.sample

  def slow(self, *args, **kwargs):
    time.sleep(0.2)
    return sample(self, *args, **kwargs)

  monkeypatch.setattr(proc_probe.Probe, "sample", slow)
  run = soak.soak(iter(range(1000)), steps=30, every=10, batch_size=1)
  assert [s.step for s in run.samples] == [1, 10, 20, 30]
  assert min(s.records_per_s for s in run.samples[1:]) > 200  # 10 records in far less than the probe's 0.2 s


def test_the_warm_up_is_not_judged_and_the_error_names_what_grew():
  filling = [_sample(s, s / 100, fds=min(40, s)) for s in (1, 10, 20, 30, 40, 60, 80, 100)]
  findings = trends.assess(filling, warmup=40, batch_size=8, window_s=60, tolerance=0.1, failed=False)
  assert [s.step for s in findings.judged] == [40, 60, 80, 100] and not findings.grown()
  run = soak.Run(filling, 0.5, None, None)
  assert soak.error_line(run, findings, 100) is None

  leaking = [_sample(s, s / 100, fds=40 + 2 * s, rss_mb=200 + s) for s in range(100, 1001, 100)]
  findings = trends.assess(leaking, warmup=100, batch_size=8, window_s=60, tolerance=0.1, failed=False)
  line = soak.error_line(soak.Run(leaking, 0.5, None, None), findings, 1000)
  assert line.startswith("error: grew over steps 100..1000: descriptors (children) 240 -> 2,040")
  assert "RSS MB (children) 300 -> 1,200" in line and "descriptors (main)" not in line

  failed = soak.Run(leaking[:2], 0.5, "OSError: [Errno 24] Too many open files", 230)
  line = soak.error_line(failed, trends.assess(leaking[:2], 100, 8, 60, 0.1, failed=True), 1000)
  assert line.startswith("error: the input pipeline failed at step 230 of 1000: OSError: [Errno 24] Too many open")
  assert "(RLIMIT_NOFILE soft " in line and "at step 200 descriptors (main) 30, descriptors (children) 440" in line


def test_throughput_falls_when_the_last_window_reads_fewer_records_per_second_and_per_cpu_second():
  seconds, steps = np.arange(0, 301, 10), np.arange(0, 3001, 100)
  steady = trends.judge_throughput(seconds, steps, cpu_s=seconds * 1.5, batch_size=8, window_s=60, tolerance=0.1)
  assert not steady.falling and steady.first == pytest.approx(80) and steady.last == pytest.approx(80)
  assert steady.first_per_cpu_s == pytest.approx(80 / 1.5)
  slower = np.concatenate([np.arange(0, 150, 10), 150 + np.arange(0, 301, 20)])  # half as fast after 150 s
  steps = np.arange(len(slower)) * 100
  costlier = trends.judge_throughput(slower, steps, cpu_s=slower, batch_size=8, window_s=60, tolerance=0.1)
  assert costlier.falling and costlier.last == pytest.approx(costlier.first / 2)
  # the same wall-clock fall while each record costs the same CPU time: other jobs took the cores
  crowded = trends.judge_throughput(slower, steps, cpu_s=steps / 100, batch_size=8, window_s=60, tolerance=0.1)
  assert not crowded.falling and crowded.last == pytest.approx(crowded.first / 2)
  short = trends.judge_throughput(
    seconds=[0, 1, 2, 3, 4, 5, 6],
    steps=[0, 10, 20, 30, 40, 50, 60],
    cpu_s=[0, 1, 2, 3, 4, 5, 6],
    batch_size=1,
    window_s=60,
    tolerance=0.1,
  )
  assert short.window_s == pytest.approx(2) and not short.falling


@pytest.mark.parametrize(
  "args, says",
  [
    (["--steps=0"], "--steps=0"),
    (["--steps=20", "--every=10"], "at least 3 are needed"),
    (["--num_workers=-2"], "--num_workers=-2"),
    (["--preset=cifar"], "--preset=cifar: expected one of aurora, imagenet21k, laion"),
    (["--shards=3", "--data_dir={file}/soak"], "--data_dir={file}/soak: cannot write the laion shards"),
  ],
)
def test_bad_flags_are_one_error_line(args, says, capsys, tmp_path):
  (tmp_path / "file").write_text("not a folder")
  fill = lambda text: text.format(file=tmp_path / "file")  # noqa: E731
  assert soak.main(["soak", *map(fill, args)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and fill(says) in err[0]
