"""A run whose grain workers decode a set with too many undecodable records stops with one `error:` line from the
main process, and that line is the last: the workers are stopped before it is printed, so none of their
'skipping an undecodable' warnings lands under it."""

import numpy as np
import pytest

from visionfm_jax.data.sources import records

from test_bad_input import TINY
from test_dry_run import _main


def _half_undecodable(directory, shards=2, per_shard=64) -> str:
  names = [records.shard_name("train", i, shards) for i in range(shards)]
  for name in names:
    records.write_records(
      str(directory / name),
      (
        {"image": b"not an image" if j % 2 else np.full((16, 16, 3), j, np.uint8), "label": j % 8}
        for j in range(per_shard)
      ),
    )
  records.write_metadata(
    directory,
    kind="classification",
    classes=[f"c{k}" for k in range(8)],
    splits={"train": {"records": shards * per_shard, "shards": names, "kind": "labelled"}},
  )
  return f"arrayrecord:{directory}/{{split}}-*.array_record"


@pytest.mark.slow  # 22 s: the workers' start and the first compile
def test_no_worker_warning_follows_the_main_processs_data_error(tmp_path, warm_python):
  source = _half_undecodable(tmp_path)
  run, _ = _main(
    *TINY,
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.source={source}",
    "--config.data.eval_source=shapes",
    "--config.model.num_classes=8",
    "--config.data.num_workers=2",
    "--config.data.skip_check_after=32",
    warm=warm_python,
  )
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 2, run.stderr[-3000:]
  errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
  assert len(errors) == 1 and "corrupt or undecodable" in lines[errors[0]], run.stderr[-3000:]
  assert any("skipping an undecodable" in line for line in lines[: errors[0]]), run.stderr[-3000:]
  assert errors[0] == len(lines) - 1, "\n".join(lines[errors[0] :][:10])
