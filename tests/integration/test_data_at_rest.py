"""Stored data at the seeds' cardinalities and at rest: the shard readers hold a bounded number of open files whatever
they have touched, and open none at start-up but those they read (the shard index); the run raises its open-file
limit to what its pipeline needs (or says it cannot), a corrupt chunk is a skipped record, a shard that vanishes,
is truncated or replaced is an error naming it, and a resume on replaced data, or without its data.json, is refused
naming what changed unless allowed."""

import gc
import json
import os
import re
import resource
import subprocess
import sys
import threading

import numpy as np
from PIL import Image
import pytest

from visionfm_jax.bench import file_opens
from visionfm_jax.data.loader import identity, open_files
from visionfm_jax.data.loader import mixture as mixture_lib
from visionfm_jax.data.sources import open_shards, records, wds
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.datatools import index_tars
from visionfm_jax.errors import ConfigError, DataError, WorkdirError
from visionfm_jax.training import data_record, train

from conftest import ROOT, cpu_env, tiny_vit_config
from test_bad_input import run_main_in_process
from test_wds import write_tars

SHARDS, PER_SHARD = 300, 2


def _write_set(directory, shards=SHARDS, per_shard=PER_SHARD, shade=0):
  """A labelled set of `shards` tiny shards and its dataset.json, as datatools.prepare_data leaves it."""
  names = [records.shard_name("train", i, shards) for i in range(shards)]
  for i, name in enumerate(names):
    records.write_records(
      str(directory / name),
      (
        {"image": np.full((16, 16, 3), (shade + 7 * i + j) % 256, np.uint8), "label": (i + j) % 8}
        for j in range(per_shard)
      ),
    )
  records.write_metadata(
    directory,
    kind="classification",
    classes=[f"c{k}" for k in range(8)],
    splits={"train": {"records": shards * per_shard, "shards": names, "kind": "labelled"}},
  )
  return names


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
  """300 shards with their shard index, as datatools.prepare_data leaves them."""
  directory = tmp_path_factory.mktemp("many_shards")
  names = _write_set(directory)
  records.write_index(directory, "train")
  return directory, names


def _open_fds() -> int:
  return len(os.listdir("/proc/self/fd"))


def _handles():
  """A handle class counting its open instances (`Handle.opened`)."""

  class Handle:
    opened = 0

    def __init__(self, path):
      Handle.opened += 1
      self.path, self.closed = path, False

    def close(self):
      Handle.opened -= 1
      self.closed = True

  return Handle


def test_open_shards_keeps_at_most_its_limit_and_never_closes_one_in_use():
  handle_class = _handles()
  shards = open_shards.OpenShards(handle_class, limit=4)
  with shards.use("held") as held:
    for i in range(100):
      with shards.use(f"s{i}"):
        assert len(shards) <= 4
    assert not held.closed  # the least recently used, but in use
  assert len(shards) == handle_class.opened == 4
  with pytest.raises(open_shards.Unopenable):
    with open_shards.OpenShards(lambda path: open(path, "rb")).use("/nonexistent/shard"):
      pass


def test_open_shards_under_threads_stay_within_the_threads_and_the_limit():
  handle_class = _handles()
  shards, peak, lock = open_shards.OpenShards(handle_class, limit=3), [0], threading.Lock()

  def read(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
      with shards.use(f"s{rng.integers(50)}") as handle:
        assert not handle.closed
        with lock:
          peak[0] = max(peak[0], handle_class.opened)

  threads = [threading.Thread(target=read, args=(k,)) for k in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert peak[0] <= open_shards.bound(threads=6, limit=3) and len(shards) <= 3


def test_globally_shuffled_reads_of_many_shards_hold_a_bounded_number_of_files(many_shards):
  directory, _ = many_shards
  gc.collect()  # the files that earlier tests' garbage still holds close now, not while this one counts
  before = _open_fds()
  source = records.ArrayRecordSource(str(directory / "train-*.array_record"))
  assert _open_fds() == before  # the footers are read and closed
  for index in np.random.default_rng(0).permutation(len(source)):
    assert source[index]["image"] is not None
  assert _open_fds() - before <= open_shards.LIMIT  # one reading thread: the idle ones


def _corrupt_one_chunk(path) -> int:
  """Flips 16 bytes of the shard at `path` inside one record's chunk (as bit rot would); returns that record."""
  original = open(path, "rb").read()
  for at in range(0, 4096, 32):
    damaged = original[:at] + bytes(b ^ 0xFF for b in original[at : at + 16]) + original[at + 16 :]
    with open(path, "wb") as f:
      f.write(damaged)
    reader = records.array_record_module.ArrayRecordReader(path)
    failing = []
    for record in range(reader.num_records()):
      try:
        reader.read([record])
      except RuntimeError:
        failing.append(record)
    reader.close()
    if len(failing) == 1:
      return failing[0]
  raise AssertionError(f"no 16 bytes of {path}'s first 4 KiB spoil exactly one record")


def test_a_corrupt_chunk_is_a_skipped_and_counted_record(tmp_path):
  names = _write_set(tmp_path, shards=2, per_shard=3)
  spoilt = 3 + _corrupt_one_chunk(str(tmp_path / names[1]))
  source = records.ArrayRecordSource(str(tmp_path / "train-*.array_record"))
  failures = transforms.decode_failures()
  assert source[spoilt] == {"image": None, "label": 0}  # dataset.json says the records are labelled
  assert transforms.decode_failures() == failures + 1
  assert all(source[i]["image"] is not None for i in range(6) if i != spoilt)


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "footers"])
def test_a_shard_truncated_while_training_is_named_as_such_not_counted_as_corrupt(tmp_path, indexed):
  """Read, truncated, then opened again once the bounded set of open shards has closed it: checked against its
  index row (or the footer read at start-up)."""
  names = _write_set(tmp_path, shards=open_shards.LIMIT + 2, per_shard=2)
  if indexed:
    records.write_index(tmp_path, "train")
  source = records.ArrayRecordSource(str(tmp_path / "train-*.array_record"))
  assert source[0]["image"] is not None
  size = os.path.getsize(tmp_path / names[0])
  os.truncate(tmp_path / names[0], size // 2)
  for shard in range(1, len(names)):
    assert source[2 * shard]["image"] is not None
  against = r"its index .*train\.shards\.npy" if indexed else "the footer read when the source opened"
  with pytest.raises(
    records.ShardChanged,
    match=rf"{tmp_path / names[0]} is not the shard {against} describes: "
    rf"{size // 2:,} bytes, not {size:,} \(truncated or "
    rf"replaced\); prepare it again",
  ):
    source[1]


def test_a_shard_index_that_is_not_the_one_dataset_json_names_stops_the_source_naming_it(tmp_path):
  _write_set(tmp_path, shards=3, per_shard=2)
  records.write_index(tmp_path, "train")
  index = tmp_path / "train.shards.npy"
  rows = np.load(index)
  rows["records"][0] += 1
  np.save(index, rows)  # another index: of other shards, or damaged
  with pytest.raises(DataError, match=rf"^{index}: not the shard index dataset.json records \(another digest\)"):
    records.ArrayRecordSource(str(tmp_path / "train-*.array_record"))
  index.unlink()
  with pytest.raises(DataError, match=rf"^{index}: the shard index .*dataset.json names cannot be read"):
    records.ArrayRecordSource(str(tmp_path / "train-*.array_record"))


def test_a_shard_replaced_since_it_was_indexed_is_one_error_line_naming_it(tmp_path, monkeypatch, capsys):
  """Re-prepared under the same name with as many records: its bytes differ from its index row when the run first
  opens it (here the dry run, which reads its first record)."""
  names = _write_set(tmp_path, shards=4, per_shard=2)
  records.write_index(tmp_path, "train")
  records.write_records(
    str(tmp_path / names[0]), ({"image": np.full((24, 24, 3), 9, np.uint8), "label": 1} for _ in range(2))
  )
  status, _, err = run_main_in_process(
    [
      "--config=configs/vit_huge.py:demo",
      f"--workdir={tmp_path / 'run'}",
      "--dry_run",
      f"--config.data.source=arrayrecord:{tmp_path}/{{split}}-*.array_record",
      "--config.data.eval_source=shapes",
      "--config.data.num_workers=0",
    ],
    monkeypatch,
    capsys,
  )
  assert status == 2
  assert re.fullmatch(
    rf"error: arrayrecord source '{tmp_path}/train-\*\.array_record': {tmp_path / names[0]} is "
    rf"not the shard its index {tmp_path / 'train.shards.npy'} describes: its postscript \w+, "
    rf"not \w+ \(truncated or replaced\); prepare it again .*",
    err.strip().splitlines()[-1],
  )


def test_a_shard_that_vanishes_while_training_is_an_error_naming_it(tmp_path):
  names = _write_set(tmp_path, shards=3, per_shard=2)
  source = records.ArrayRecordSource(str(tmp_path / "train-*.array_record"))
  os.remove(tmp_path / names[2])
  with pytest.raises(DataError, match=rf"{tmp_path / names[2]} cannot be opened any more .*changed or vanished"):
    source[5]


def test_the_soft_open_file_limit_is_raised_to_the_need():
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
  try:
    open_files.ensure(300)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (300, hard)
    open_files.ensure(200)  # never lowered
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 300
  finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_hard_limit_below_the_need_is_one_line_before_training(tmp_path, many_shards):
  """--dry_run with 4 data workers over the shards: the main process's need (one source's open shards, 4 workers'
  pipes, the run's own files) is over a hard limit of 256."""
  directory, _ = many_shards
  need = open_shards.bound() + 4 * open_files.PER_WORKER + open_files.RUN_FILES
  args = [
    "--config=configs/vit_huge.py:demo",
    f"--workdir={tmp_path / 'run'}",
    "--dry_run",
    f"--config.data.source=arrayrecord:{directory}/{{split}}-*.array_record",
    "--config.data.eval_source=shapes",
    "--config.data.num_workers=4",
  ]
  command = f"ulimit -n 256 && exec {sys.executable} -m visionfm_jax.main " + " ".join(f"'{a}'" for a in args)
  proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: the input pipeline may hold {need} open files (its sources and config.data.num_workers, "
    f"data/loader/open_files.py) but this process may open at most 256 (hard RLIMIT_NOFILE): raise it "
    f"('ulimit -Hn {need}' where allowed, or the cluster's limits.conf)"
  )


def test_the_dry_run_reports_the_need_and_opens_only_the_shard_it_reads(tmp_path, many_shards, monkeypatch, capsys):
  """The loader over 300 indexed shards learns their records from the index: of the shards it opens only the first,
  whose first record it reads."""
  directory, _ = many_shards
  with file_opens.FileOpens([directory], ".array_record") as opens:
    status, out, _ = run_main_in_process(
      [
        "--config=configs/vit_huge.py:demo",
        f"--workdir={tmp_path / 'run'}",
        "--dry_run",
        f"--config.data.source=arrayrecord:{directory}/{{split}}-*.array_record",
        "--config.data.eval_source=shapes",
        "--config.data.num_workers=2",
      ],
      monkeypatch,
      capsys,
    )
    assert status == 0
    assert opens.opened() == 1 and opens.files == {b"train-00000-of-00300.array_record"} and not opens.overflowed
  need = open_shards.bound() + 2 * open_files.PER_WORKER + open_files.RUN_FILES
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  assert (
    f"open files: the input pipeline needs up to {need}; this shell's RLIMIT_NOFILE soft {soft}, hard {hard}"
  ) in out


def _tiny_run_config(directory, **overrides):
  return tiny_vit_config(
    **{
      "data.source": f"arrayrecord:{directory}/{{split}}-*.array_record",
      "data.eval_source": "shapes",
      "data.num_workers": 0,
      "model.num_classes": 8,
      "total_steps": 2,
      "checkpoint_every": 2,
      "eval_every": 100,
      **overrides,
    }
  )


@pytest.mark.slow
def test_a_resume_on_replaced_data_is_refused_naming_it_unless_allowed(tmp_path):
  data, workdir = tmp_path / "data", tmp_path / "run"
  data.mkdir()
  names = _write_set(data, shards=8, per_shard=4)
  train.run(_tiny_run_config(data), str(workdir))
  recorded = json.loads((workdir / data_record.FILE).read_text())
  assert recorded["entries"][0]["records"] == 32 and len(recorded["entries"][0]["shards"]) == 8

  records.write_records(
    str(data / names[3]), ({"image": np.full((24, 24, 3), 9, np.uint8), "label": 1} for _ in range(4))
  )  # re-prepared: same count, other bytes
  size = os.path.getsize(data / names[3])
  with pytest.raises(
    ConfigError,
    match=rf"^cannot resume {workdir}: its training data changed since the "
    rf"checkpoints were saved: "
    rf"config.data.source='arrayrecord:{data}/{{split}}-\*.array_record': "
    rf"1 shard\(s\) changed \({names[3]} \(4 records, {size:,} bytes, \w+ -> "
    rf"4 records, {size:,} bytes, \w+\)\); restore the data, or pass",
  ):
    train.run(_tiny_run_config(data), str(workdir))
  with pytest.raises(ConfigError, match=r"--config.resume.allow_changes=data.source to go on with this data"):
    train.run(_tiny_run_config(data), str(workdir))

  allowed = {"total_steps": 4, "resume.allow_changes": "total_steps,data.source"}
  last = train.run(_tiny_run_config(data, **allowed), str(workdir))
  assert last["step"] == 4
  record = json.loads((workdir / data_record.FILE).read_text())
  assert record["entries"][0]["shards"][3][2] == os.path.getsize(data / names[3]) and record["changed_after"] == 2


def test_a_resume_follows_changed_data_until_a_checkpoint_is_saved_on_it(tmp_path):
  """The record keeps the step after which the data changed: a resume from that step again (the run stopped before
  its next save) still continues by position, one from a later checkpoint replays."""
  config = tiny_vit_config(**{"data.source": "arrayrecord:/d/{split}-*", "resume.allow_changes": "data.source"})
  old, new = (
    {"entries": [{"what": "x", "source": "a", "records": 4}]},
    {"entries": [{"what": "x", "source": "a", "records": 5}]},
  )
  assert not data_record.check(config, str(tmp_path), old, None)  # a fresh run records its data
  assert data_record.check(config, str(tmp_path), new, 10)  # changed (allowed): follow
  assert data_record.check(config, str(tmp_path), new, 10)  # no save on the new data yet: follow again
  assert not data_record.check(config, str(tmp_path), new, 20)  # a checkpoint of the new data: replay


@pytest.mark.parametrize(
  "content,why",
  [
    (None, "is missing"),
    ("{}", "is empty"),
    ("{garbled", "cannot be read"),
    ('{"changed_after": null}', r"holds no record of training data"),
  ],
  ids=["missing", "empty", "garbled", "no_entries"],
)
def test_a_lost_data_record_stops_a_resume_until_allowed_then_is_rebuilt(tmp_path, content, why):
  """Missing, emptied or garbled, data.json guards nothing: a resume says so and names the override; with it, the
  record is rebuilt from this run's data, which is read from the saved stream position as changed data is."""
  config = tiny_vit_config(**{"data.source": "arrayrecord:/d/{split}-*", "resume.allow_changes": "total_steps"})
  data = {"entries": [{"what": "x", "source": "a", "records": 4}]}
  path = tmp_path / data_record.FILE
  if content is not None:
    path.write_text(content)
  with pytest.raises(
    WorkdirError,
    match=rf"^cannot resume {tmp_path}: {path} {why}.*; restore it, or pass "
    rf"--config.resume.allow_changes=total_steps,data.source to record this "
    rf"run's data anew",
  ):
    data_record.check(config, str(tmp_path), data, 10)
  assert path.read_text() if content is not None else not path.exists()  # left as it was
  config.resume.allow_changes = "data.source"
  assert data_record.check(config, str(tmp_path), data, 10)  # rebuilt; read by position
  assert json.loads(path.read_text()) == {**data, "changed_after": 10}
  assert not data_record.check(config, str(tmp_path), data, 20)  # a checkpoint saved on it: compared again


def test_the_identity_of_tars_in_place_names_a_tar_rewritten_and_reindexed(tmp_path):
  pattern = str(tmp_path / "in" / "*.tar")
  write_tars(tmp_path / "in", tars=3, per_tar=4)
  index_tars.index_tars(pattern)
  before = identity.of_mixture(_mixture_of(wds.WdsSource(pattern)))
  write_tars(tmp_path / "in", tars=3, per_tar=4, image_size=40)  # the same keys, other images
  index_tars.index_tars(pattern)
  source = wds.WdsSource(pattern)
  changed = identity.differences(before, identity.of_mixture(_mixture_of(source)))
  assert len(changed) == 1 and re.search(
    r"3 shard\(s\) changed \(.*00000\.tar \(4 records, [\d,]+ bytes -> 4 records", changed[0]
  )
  assert source.max_open_files == source.CACHED_INDEXES


def _mixture_of(source):
  return mixture_lib.Mixture((mixture_lib.Entry("config.data.source='wds:...'", source),), "config.data.source")


def _prepare(source, output, capsys) -> None:
  """`datatools.prepare_data --format=folders` of the class tree `source` into one shard of `output`."""
  from visionfm_jax.datatools.prepare_data import __main__ as prepare_data  # pylint: disable=g-import-not-at-top

  assert (
    prepare_data.main(
      [
        "prepare_data",
        "--format=folders",
        f"--input={source}",
        f"--output={output}",
        "--num_workers=0",
        "--progress=false",
      ]
    )
    == 0
  ), capsys.readouterr().err
  capsys.readouterr()


def _dry_run(output, workdir, monkeypatch, capsys) -> tuple[int, str]:
  status, _, err = run_main_in_process(
    [
      "--config=configs/vit_huge.py:demo",
      f"--workdir={workdir}",
      "--dry_run",
      "--config.global_batch_size=8",
      f"--config.data.source=arrayrecord:{output}/{{split}}-*.array_record",
      "--config.data.eval_source=shapes",
      "--config.model.num_classes=-1",
      "--config.data.num_workers=0",
    ],
    monkeypatch,
    capsys,
  )
  return status, err


@pytest.mark.parametrize("damage", ["foreign", "truncated"])
def test_the_refusals_advice_rewrites_a_foreign_or_truncated_shard(damage, tmp_path, monkeypatch, capsys):
  """A shard copied in from another preparation (as many records, other images), or truncated: the run refuses it
  and says to prepare it again; doing so rewrites it (its sidecar still matched: the shard was kept and indexed as
  found, and the next run trained on the other preparation's images, or the truncated one stayed refused)."""
  for tree, shade in (("ours", 40), ("theirs", 200)):
    for label in ("a", "b"):
      (tmp_path / tree / label).mkdir(parents=True)
      for i in range(8):
        Image.fromarray(np.full((8, 8, 3), shade + 8 * (label == "b") + i, np.uint8)).save(
          tmp_path / tree / label / f"{i}.png"
        )
  output, shard = tmp_path / "out", records.shard_name("train", 0, 1)
  _prepare(tmp_path / "ours", output, capsys)
  _prepare(tmp_path / "theirs", tmp_path / "their_out", capsys)
  ours = (output / shard).read_bytes()
  if damage == "foreign":
    (output / shard).write_bytes((tmp_path / "their_out" / shard).read_bytes())
  else:
    os.truncate(output / shard, len(ours) // 2)
  status, err = _dry_run(output, tmp_path / "run", monkeypatch, capsys)
  assert status == 2 and err.strip().splitlines()[-1].startswith("error: "), err[-3000:]
  assert f"{output / shard} is not the shard its index" in err and f"; {records.REPREPARE}" in err, err[-3000:]
  _prepare(tmp_path / "ours", output, capsys)  # the advice: prepare it again with the same command
  assert (output / shard).read_bytes() == ours
  status, err = _dry_run(output, tmp_path / "run2", monkeypatch, capsys)
  assert status == 0, err[-3000:]
