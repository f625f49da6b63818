"""Every bad input to `python -m visionfm_jax.main` ends with exit status 2 and one `error:` line that names the
culprit, never a traceback: flags, config files and variants, field values outside their domain, data specs,
checkpoints, weights and a workdir that cannot be written. Config problems fail before jax is imported (well
under a second each). The tools summary, import_hf and train_tokenizer answer bad flags the same way.

Most cases run main in this process, through the parser and `main` that `python -m visionfm_jax.main` runs
(`run_main_in_process`): the same code turns the error into the line and the status. A few run as real
processes, one for each way a run fails (a flag, a config field, data, a checkpoint, a workdir, a tool's
flag), so the process-level contract (one line on stderr, exit status 2, nothing after it) is tested too."""

import functools
import os
import shutil
import subprocess
import sys

from absl import flags
from absl import logging as absl_logging
import flax.linen as nn
import jax
import numpy as np
import pytest

from visionfm_jax import config_lib, tasks
from visionfm_jax.training import checkpoint, checks, data_record, optim, resume, train
from visionfm_jax.training import step as step_lib

from conftest import ROOT, tiny_vit_config

DEMO = "--config=configs/vit_huge.py:demo"
TINY = [
  DEMO,
  "--config.model.variant=pico/4",
  "--config.model.image_size=16",
  "--config.data.image_size=16",
  "--config.global_batch_size=16",
  "--config.optim.warmup_steps=2",
  "--config.data.eval_examples=16",
  "--config.data.num_workers=0",
  "--config.progress_bar=False",
  "--config.total_steps=4",
]

# (id, arguments, what the error line must name). <good>: a workdir of the tiny ViT with a
# checkpoint at step 2; <garbled>: the same with that checkpoint's _METADATA garbled; <no_data_record>: the same
# without its data.json.
WORKDIRS = ("good", "garbled", "no_data_record")
CASES = [
  ("unknown_key", [DEMO, "--config.optim.lrr=1"], ["--config.optim.lrr", "'lr'"]),
  ("unknown_group", [DEMO, "--config.nosuch.x=1"], ["'nosuch'"]),
  ("unknown_variant", ["--config=configs/vit_huge.py:nope"], ["unknown variant 'nope'"]),
  ("unknown_variant_clip", ["--config=configs/swinv2_g_clip.py:demo,nope"], ["unknown variant 'demo,nope'"]),
  ("missing_config_file", ["--config=configs/nope.py"], ["configs/nope.py"]),
  ("no_config", [], ["--config"]),
  ("not_a_number", [DEMO, "--config.total_steps=abc"], ["--config.total_steps=abc"]),
  ("negative_lr", [DEMO, "--config.optim.lr=-1"], ["config.optim.lr=-1.0", "> 0"]),
  ("infinite_lr", [DEMO, "--config.optim.lr=inf"], ["config.optim.lr=inf", "a finite number > 0"]),
  ("infinite_eps", [DEMO, "--config.optim.eps=inf"], ["config.optim.eps=inf", "a finite number > 0"]),
  ("zero_eps", [DEMO, "--config.optim.eps=0"], ["config.optim.eps=0.0", "> 0"]),
  ("infinite_end_lr", [DEMO, "--config.optim.end_lr=inf"], ["config.optim.end_lr=inf", "a finite number >= 0"]),
  ("end_lr_above_lr", [DEMO, "--config.optim.end_lr=0.5"], ["config.optim.end_lr=0.5", "config.optim.lr="]),
  ("nan_weight_decay", [DEMO, "--config.optim.weight_decay=nan"], ["config.optim.weight_decay=nan"]),
  ("infinite_clip", [DEMO, "--config.optim.clip_norm=inf"], ["config.optim.clip_norm=inf"]),
  ("b1_one", [DEMO, "--config.optim.b1=1.0"], ["config.optim.b1=1.0", "[0, 1)"]),
  ("b2_negative", [DEMO, "--config.optim.b2=-0.1"], ["config.optim.b2=-0.1"]),
  ("negative_weight_decay", [DEMO, "--config.optim.weight_decay=-0.01"], ["config.optim.weight_decay"]),
  ("negative_clip", [DEMO, "--config.optim.clip_norm=-1"], ["config.optim.clip_norm"]),
  ("drop_path_one", [DEMO, "--config.model.drop_path=1.0"], ["config.model.drop_path=1.0", "[0, 1)"]),
  (
    "unknown_text_act",
    ["--config=configs/swinv2_g_clip.py:demo", "--config.model.text.act=relu"],
    ["config.model.text.act='relu'", "one of gelu, quick_gelu, gelu_pytorch_tanh"],
  ),
  (
    "unknown_swinv2_size",
    ["--config=configs/aurora_xl.py:demo", "--config.model.encoder.variant=XL"],
    ["config.model.encoder.variant='XL'", "one of pico, femto, mu, T, S, B, L, H, G"],
  ),
  (
    "unknown_text_size",
    ["--config=configs/swinv2_g_clip.py:demo", "--config.model.text.variant=12x12"],
    ["config.model.text.variant='12x12'", "one of pico, mu, B, L, H, XL, or '<width>x<depth>x<mlp>x<heads>'"],
  ),
  ("zero_batch", [DEMO, "--config.global_batch_size=0"], ["config.global_batch_size=0"]),
  ("zero_steps", [DEMO, "--config.total_steps=0"], ["config.total_steps=0"]),
  ("warmup_past_end", [DEMO, "--config.optim.warmup_steps=5000"], ["config.optim.warmup_steps=5000"]),
  ("zero_image_size", [DEMO, "--config.data.image_size=0"], ["config.data.image_size=0"]),
  ("crop_scale_reversed", [DEMO, "--config.data.augment.crop_scale=(0.9,0.1)"], ["config.data.augment.crop_scale"]),
  ("zero_mesh_axis", [DEMO, "--config.mesh.fsdp=0"], ["config.mesh.fsdp=0"]),
  ("skip_fraction", [DEMO, "--config.data.max_skipped_fraction=1.5"], ["config.data.max_skipped_fraction"]),
  ("negative_timeout", [DEMO, "--config.step_timeout_s=-5"], ["config.step_timeout_s"]),
  (
    "mask_ratio_one",
    ["--config=configs/aurora_xl.py:demo", "--config.data.mim.mask_ratio=1.0"],
    ["config.data.mim.mask_ratio=1.0"],
  ),
  ("unknown_strategy", [DEMO, "--config.strategy=zero4"], ["config.strategy='zero4'"]),
  ("unknown_dtype", [DEMO, "--config.precision.compute_dtype=float8"], ["config.precision.compute_dtype"]),
  ("unknown_remat", [DEMO, "--config.model.remat_policy=sometimes"], ["config.model.remat_policy"]),
  ("batch_over_devices", [*TINY, "--config.global_batch_size=12"], ["config.global_batch_size=12"]),
  ("unknown_source_kind", [*TINY, "--config.data.source=foo:bar"], ["config.data.source='foo:bar'"]),
  (
    "missing_arrayrecord",
    [*TINY, "--config.data.source=arrayrecord:/nonexistent/{split}-*.array_record"],
    ["/nonexistent/train-*.array_record", "docs/data_preparation.md"],
  ),
  (
    "default_source_not_prepared",
    ["--config=configs/vit_huge.py"],
    ["/data/imagenet21k/train-*.array_record", "docs/data_preparation.md"],
  ),
  ("missing_tfds", [*TINY, "--config.data.source=tfds:no_such_dataset"], ["no_such_dataset"]),
  ("missing_init_from", [*TINY, "--config.init_from=/nonexistent/weights"], ["init_from='/nonexistent/weights'"]),
  (
    "init_from_other_model",
    [*TINY, "--config.init_from=<good>", "--config.model.variant=mu/4"],
    ["init_from=", "cannot be resized"],
  ),
  ("init_from_garbled", [*TINY, "--config.init_from=<garbled>"], ["init_from=", "cannot read its params"]),
  (
    "no_readable_checkpoint",
    [*TINY, "--workdir=<garbled>", "--config.total_steps=2"],
    ["no checkpoint in", "can be restored"],
  ),
  (
    "resume_with_another_model",
    [*TINY, "--workdir=<good>", "--config.model.pool=cls"],
    ["cannot resume", "config.model.pool 'gap' -> 'cls'"],
  ),
  (
    "resume_with_another_schedule",
    [*TINY, "--workdir=<good>"],
    ["config.total_steps 2 -> 4", "--config.resume.allow_changes=total_steps"],
  ),
  (
    "resume_without_its_data_record",
    [*TINY, "--workdir=<no_data_record>", "--config.total_steps=2"],
    ["no_data_record/data.json is missing", "--config.resume.allow_changes=data.source"],
  ),
  ("unknown_allowed_change", [DEMO, "--config.resume.allow_changes=lr"], ["config.resume.allow_changes='lr'"]),
  (
    "unknown_tracker",
    [DEMO, "--config.report_to=tensorboard,comet"],
    ["config.report_to='tensorboard,comet'", "tensorboard, wandb, mlflow, or 'none'"],
  ),
  ("workdir_under_a_file", [*TINY, "--workdir=README.md/run"], ["README.md/run", "errno ENOTDIR"]),
  # --dry_run: the same checks, for the planned devices and processes, with nothing written
  ("dry_run_devices_without_dry_run", [*TINY, "--dry_run_devices=8"], ["--dry_run_devices", "--dry_run"]),
  (
    "dry_run_batch_over_planned_devices",
    [DEMO, "--dry_run", "--dry_run_devices=3"],
    ["config.global_batch_size=64", "3 data-parallel devices"],
  ),
  (
    "dry_run_resume_with_another_schedule",
    [*TINY, "--workdir=<good>", "--dry_run"],
    ["config.total_steps 2 -> 4", "--config.resume.allow_changes=total_steps"],
  ),
  ("dry_run_workdir_under_a_file", [*TINY, "--workdir=README.md/run", "--dry_run"], ["README.md/run", "a file"]),
]


# These cases run as real `python -m visionfm_jax.main` processes, one per way a run fails: a flag the parser
# refuses and a field main refuses (config), a data source, a checkpoint, and the workdir (whose error ends the
# process with os._exit, main._exit_with). The others run in this process (run_main_in_process).
SUBPROCESS_CASES = {
  "unknown_key",
  "negative_lr",
  "missing_arrayrecord",
  "no_readable_checkpoint",
  "workdir_under_a_file",
}


def _tiny_state_at_step_2(config):
  """The tiny ViT's TrainState as train.run lays it out, at step 2, its values zeros (from shapes: nothing is
  compiled), and a fresh data iterator."""
  task = tasks.build(config)
  tx = optim.make_optimizer(config.optim, optim.schedule(config.optim, config.total_steps), task.model)
  abstract = nn.unbox(jax.eval_shape(step_lib.make_init_fn(task, tx, config), jax.random.key(0)))
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract).replace(step=np.int32(2))
  loader = iter(
    task.train_loader(batch_size=config.global_batch_size, seed=config.seed, process_index=0, process_count=1)
  )
  return state, loader


def write_tiny_workdir(workdir):
  """Writes into `workdir` what train.run leaves after 2 steps of the tiny ViT (TINY with total_steps=2), without
  training: config.json, a checkpoint at step 2 (`_tiny_state_at_step_2`, its data iterator, the run's config)
  and data.json, the record of its training data as train.run writes it; returns the config."""
  config = tiny_vit_config(total_steps=2, checkpoint_every=2, eval_every=100)
  config.data.num_workers = 0
  config.data.eval_examples = 16
  checks.validate(config, jax.device_count(), 1)
  state, loader = _tiny_state_at_step_2(config)
  saver = checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False, run_config=resume.as_json(config))
  saver.save(2, state, loader)
  saver.close()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  data = tasks.build(config).train_loader(
    batch_size=config.global_batch_size, seed=config.seed, process_index=0, process_count=1
  )
  data_record.check(config, str(workdir), data.identity, None)
  return config


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """<good>: the workdir train.run leaves after 2 steps of the tiny ViT (TINY with total_steps=2): config.json and a
  checkpoint at step 2 of the state, its data iterator and the run's config, written without training; that
  train.run resumes it is checked here. <garbled>: the same with that checkpoint's _METADATA garbled;
  <no_data_record>: without its data.json."""
  root = tmp_path_factory.mktemp("bad_input")
  good = root / "good"
  config = write_tiny_workdir(good)
  shutil.copytree(good, root / "no_data_record")
  (root / "no_data_record" / data_record.FILE).unlink()
  shutil.copytree(good, root / "resumed")
  assert train.run(config.copy_and_resolve_references(), str(root / "resumed"))["step"] == 2  # and evaluates step 2
  shutil.copytree(good, root / "garbled")
  (root / "garbled" / "checkpoints" / "2" / "state" / "_METADATA").write_text("{garbled")
  return root


def _reset_main_flags() -> None:
  """Leaves absl's global flags as before a parse: main's at their defaults, no `--config.<field>` flags (the
  config flag defines one per override it parses)."""
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)


class _HardExit(SystemExit):
  """os._exit(code) of main, raised instead of ending this process."""


def _hard_exit(code):
  raise _HardExit(code)


def run_main_in_process(args, monkeypatch, capsys) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `python -m visionfm_jax.main ARGS`, run in this process by the flag parser and
  `main` that app.run calls there. os._exit, which main uses for workdir errors, raises instead."""
  from visionfm_jax import main as entry  # pylint: disable=g-import-not-at-top

  argv = ["visionfm_jax/main.py", *args]
  monkeypatch.chdir(ROOT)  # where the subprocesses run: the paths in ARGS are relative to it
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the --config.<field> overrides from sys.argv
  monkeypatch.setattr(os, "_exit", _hard_exit)
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # main replaces it
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false"))
  handler, logger = absl_logging.get_absl_handler(), absl_logging.get_absl_logger()
  filters, formatter, level = list(handler.filters), handler.formatter, logger.level
  capsys.readouterr()
  try:
    entry.main(entry._parse_flags(argv))  # pylint: disable=protected-access
    status = 0
  except SystemExit as e:
    status = e.code
  finally:
    _reset_main_flags()
    handler.filters[:] = filters
    handler.setFormatter(formatter)
    logger.setLevel(level)  # main's parsed --verbosity set it; later tests of this process log at their own
  out = capsys.readouterr()
  return status, out.out, out.err


def _main_in_a_process(args, env) -> tuple[int, str, str]:
  proc = subprocess.run(
    [sys.executable, "-m", "visionfm_jax.main", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
  "name,args,culprit", CASES, ids=[c[0] + ("-subprocess" if c[0] in SUBPROCESS_CASES else "") for c in CASES]
)
def test_bad_input_is_one_error_line_naming_the_culprit(name, args, culprit, tmp_path, request, monkeypatch, capsys):
  if any(f"<{name}>" in a for a in args for name in WORKDIRS):
    root = request.getfixturevalue("workdirs")
    args = [functools.reduce(lambda a, name: a.replace(f"<{name}>", str(root / name)), WORKDIRS, a) for a in args]
  if not any(a.startswith("--workdir=") for a in args):
    args = [*args, f"--workdir={tmp_path / 'run'}"]
  if name in SUBPROCESS_CASES:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=str(tmp_path / "tfds"))
    status, stdout, stderr = _main_in_a_process(args, env)
  else:
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    status, stdout, stderr = run_main_in_process(args, monkeypatch, capsys)
  output = stdout + stderr
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert status == 2, output[-4000:]
  assert "Traceback" not in output, output[-4000:]
  assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-4000:]
  for text in culprit:
    assert text in errors[0], errors[0]
  run = tmp_path / "run"  # a workdir this run created holds more than its lock, or is gone
  assert not run.exists() or os.listdir(run) != ["lock"], f"{run} holds only its lock"


# The tools beside main: (id, module and arguments, what the error line must name).
TOOL_CASES = [
  ("summary_unknown_key", ["visionfm_jax.tools.summary", DEMO, "--config.optim.lrr=1"], ["--config.optim.lrr", "'lr'"]),
  ("summary_bad_value", ["visionfm_jax.tools.summary", DEMO, "--config.optim.lr=-1"], ["config.optim.lr=-1.0"]),
  ("summary_bad_flag", ["visionfm_jax.tools.summary", DEMO, "--devices=x"], ["--devices=x"]),
  ("summary_no_config", ["visionfm_jax.tools.summary"], ["--config"]),
  (
    "import_hf_bad_flag",
    ["visionfm_jax.tools.import_hf", "--src=/nonexistent", "--out=/tmp/x", "--scan=maybe"],
    ["--scan=maybe"],
  ),
  ("import_hf_no_out", ["visionfm_jax.tools.import_hf", "--src=/nonexistent"], ["--out"]),
  (
    "train_tokenizer_bad_flag",
    ["visionfm_jax.datatools.train_tokenizer", "--vocab_size=abc", "--out=/tmp/x"],
    ["--vocab_size=abc"],
  ),
  ("train_tokenizer_unknown_flag", ["visionfm_jax.datatools.train_tokenizer", "--vocab=64", "--out=/tmp/x"], ["vocab"]),
]


# As above: these run as real processes, the others through the tool's `main(argv)` (what its __main__ exits with).
SUBPROCESS_TOOL_CASES = {"summary_unknown_key"}


@pytest.mark.parametrize(
  "name,args,culprit",
  TOOL_CASES,
  ids=[c[0] + ("-subprocess" if c[0] in SUBPROCESS_TOOL_CASES else "") for c in TOOL_CASES],
)
def test_tools_bad_input_is_one_error_line_naming_the_culprit(name, args, culprit, capsys):
  """As main's: these tools used absl's app.run, which printed a traceback or a FATAL flags error with status 1."""
  if name in SUBPROCESS_TOOL_CASES:
    proc = subprocess.run(
      [sys.executable, "-m", *args],
      cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=300,
    )
    status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
  else:
    module, *rest = args
    tool = __import__(module, fromlist=["main"])
    capsys.readouterr()
    status = tool.main([module, *rest])
    stdout, stderr = capsys.readouterr()
  output = stdout + stderr
  assert status == 2 and "Traceback" not in output, output[-4000:]
  assert stderr.strip().splitlines() == [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(stderr.strip().splitlines()) == 1, stderr[-4000:]
  for text in culprit:
    assert text in stderr, stderr


def test_every_config_shipped_is_valid_and_every_field_has_a_row():
  """The shipped configs and their variants pass validation, which refuses a field without its row in the schema of
  the config's family and task (its default, domain and doc): none is defined in a recipe alone."""
  specs = [
    "vit_huge.py",
    "vit_huge.py:demo",
    "swinv2_cls.py",
    "swinv2_cls.py:demo",
    "swinv2_g_clip.py",
    "swinv2_g_clip.py:demo,ft640",
    "swinv2_g_clip.py:demo,vit,ft640",
    "swinv2_g_clip.py:vit,siglip,flip",
    "swinv2_g_clip.py:demo,vit,flip_tune",
    "aurora_xl.py",
    "aurora_xl.py:demo",
    "finetune_ade20k.py",
    "finetune_ade20k.py:demo",
    "finetune_coco.py",
    "finetune_coco.py:swinv2",
  ]
  for spec in specs:
    checks.validate(config_lib.load(os.path.join(ROOT, "configs", spec)))
