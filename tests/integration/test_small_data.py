"""docs/your_data.md's first commands on a few photos a class, as a new user types them: `prepare_data` with the
doc's `--holdout_per_class=50`, then `python -m visionfm_jax.main --config=configs/vit_huge.py:small`. Each thing
to change is one line that names it: the holdout capped at half of each class, a batch larger than the data
(with the flag to lower and the holdout that took the rest), a data path that matches nothing (before anything
the data would size), a folder of files of which none decodes."""

import os
import re
import subprocess

from conftest import ROOT
import standins


def _run(module, *args, warm):
  return subprocess.run(
    ["python", "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=warm.env(dict(os.environ, JAX_PLATFORMS="cpu")),
  )


def _one_line(proc, level: str) -> str:
  """The one `level:` line of `proc`'s stderr, which holds no traceback."""
  lines = [line for line in proc.stderr.splitlines() if re.match(rf"(\d\d:\d\d:\d\d )?{level}: ", line)]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return lines[0]


def test_a_few_photos_a_class_through_the_doc_s_commands(tmp_path, warm_python):
  standins.write_my_photos(tmp_path / "raw")  # 4 classes of 8
  out = tmp_path / "my_photos"
  prepared = _run(
    "visionfm_jax.datatools.prepare_data",
    "--format=folders",
    f"--input={tmp_path / 'raw'}",
    f"--output={out}",
    "--holdout_per_class=50",
    "--resize_shorter=256",
    "--num_workers=0",
    warm=warm_python,
  )
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  assert prepared.stdout.startswith("prepare_data: train 16, validation 16 records")
  capped = [line for line in prepared.stderr.splitlines() if "--holdout_per_class" in line]
  assert len(capped) == 1 and re.match(
    r"\d\d:\d\d:\d\d warning: prepare_data: --holdout_per_class=50: 4 of the 4 "
    r"classes have fewer than 100 images; each holds out half",
    capped[0],
  ), capped

  source = f"arrayrecord:{out}/{{split}}-*.array_record"
  train = (
    "visionfm_jax.main",
    "--config=configs/vit_huge.py:small",
    f"--workdir={tmp_path / 'run'}",
    "--config.data.num_workers=0",
  )
  small = _run(*train, f"--config.data.source={source}", warm=warm_python)
  assert small.returncode == 2
  assert _one_line(small, "error") == (
    f"error: config.data.source={source!r} split 'train' has 16 records: fewer than one batch of "
    f"--config.global_batch_size=32; train with a --config.global_batch_size of at most 16, or on more data; "
    f"prepare_data held 16 records of {tmp_path / 'raw'} out into split 'validation' (--holdout_per_class=50): a "
    f"smaller --holdout_per_class leaves more to train on"
  )

  mistyped = source.replace("my_photos", "my_fotos")
  typo = _run(*train, f"--config.data.source={mistyped}", warm=warm_python)
  assert typo.returncode == 2
  assert _one_line(typo, "error") == (
    f"error: config.data.source={mistyped!r} split 'train': no files match "
    f"'{tmp_path}/my_fotos/train-*.array_record'; see docs/data_preparation.md"
  )


def test_a_folder_of_undecodable_files_is_one_error_line(tmp_path, warm_python):
  for name in ("beach", "forest"):
    for i in range(2):
      (tmp_path / "raw" / name).mkdir(parents=True, exist_ok=True)
      (tmp_path / "raw" / name / f"IMG_{i}.jpg").write_bytes(b"<html>a login page, saved as a photo</html>")
  prepared = _run(
    "visionfm_jax.datatools.prepare_data",
    "--format=folders",
    f"--input={tmp_path / 'raw'}",
    f"--output={tmp_path / 'out'}",
    "--holdout_per_class=50",
    "--resize_shorter=256",
    "--num_workers=0",
    warm=warm_python,
  )
  assert prepared.returncode == 2 and prepared.stdout == ""
  assert _one_line(prepared, "error") == (
    f"error: --input={tmp_path / 'raw'}: none of its 4 image files could be read (4 undecodable)"
  )
  assert not (tmp_path / "out").exists()
