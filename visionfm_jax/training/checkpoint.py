"""Orbax checkpoints: the train state and the data-iterator state, saved together, asynchronously, with the
config they were trained with.

Layout: `<workdir>/checkpoints/<step>/{state,data,config,schedule_anchor}`. Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save leaves the previous steps intact and `latest_step` only
sees complete ones; opening the directory again deletes such leftover `<step>.orbax-checkpoint-tmp*` directories,
with a warning naming them (`_warn_of_unfinished_saves`). The data-iterator state is captured synchronously at save
time (before training moves the iterator on) and written per process by grain's handler
(`data/process_<i>-of-<n>.json`). The state restores onto any mesh and strategy; the data iterator replays its
batches bitwise with the same number of processes, and with another number it continues the global stream after
every old process's position (`data/loader/resume.py`). An unreadable newest checkpoint is skipped for the newest
readable one (`restore_newest_readable`). `config/config.json` is what a resume compares its config with
(`saved_config`, training/resume.py), `schedule_anchor/schedule_anchor.json` where its learning-rate schedule decays
from, when a resume anchored it (`saved_schedule_anchor`). `digests/process_<i>-of-<n>.json`: the digests of the
state's arrays (training/checkpoint_digests.py), written before the step commits and compared at every restore and
`stored.load_params`; an array whose bytes changed on disk makes the checkpoint unreadable. A config file deleted or
emptied reads as none (`missing_config` says why), which a resume refuses unless told.

A step's folder is named by its number alone (Orbax's standard name, `committed_steps`). Anything else in the
directory that the run did not put there (a renamed step such as `120.bad`, a `best` folder, a file) is named in
one warning at start-up and ignored (`_warn_of_strays`); the run's own set-asides (`<step>.<why>`, `SET_ASIDE_AS`)
are not. A step's folder whose state holds another step (renamed to another number) is refused at its restore,
naming both (`_check_step_name`). A save never meets a folder of its step's name: one there (a renamed or
copied-in step brought back while this run restored an older one) is moved aside to `<step>.replaced` first, as
Orbax refuses to save a step it lists (`_make_way_for`).

A model's params, read alone (init_from, the tools, `visionfm_jax.load`), are training/stored.py's: it reads them
with `restore_on_host` and checks them with `check_digests`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from typing import Collection, Sequence

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from visionfm_jax import cli
from visionfm_jax.errors import CheckpointError
from visionfm_jax.training import checkpoint_digests as digests
from visionfm_jax.training.infra import faults, workdir

_CONFIG_ITEM, _CONFIG_FILE = "config", "config.json"  # <step>/config/config.json: the config it was trained with
_HEALTH_ITEM, _HEALTH_FILE = "health", "health.json"  # <step>/health/health.json: its rollbacks (training/health.py)
_ANCHOR_ITEM, _ANCHOR_FILE = "schedule_anchor", "schedule_anchor.json"  # its schedule's anchor (training/resume.py)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how tensorstore reports the errno of a failed write
_PATH_IN_MESSAGE = re.compile(r'Failed (?:writing|to write)[^"]*"([^"]+)"')


def _storage_failure(error: BaseException) -> OSError | None:
  """The OSError behind `error` (itself, a cause in its chain, or one tensorstore describes in its message), or
  None when the storage did not cause it."""
  seen: BaseException | None = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return seen
    match = _OS_ERROR_CODE.search(str(seen))
    if match:
      code = int(match.group(1))
      path = _PATH_IN_MESSAGE.search(str(seen))
      return OSError(code, os.strerror(code), path.group(1) if path else None)
    seen = seen.__cause__ or seen.__context__
  return None


def first_line(error: BaseException) -> str:
  """The first line of the message, with the next one when it ends in a colon ('tree structures do not
  match:'), cut at 300 characters."""
  lines = [line.strip() for line in (str(error).strip() or type(error).__name__).splitlines() if line.strip()]
  line = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
  return line if len(line) <= 300 else line[:300] + " ..."


_STEP_NAME = re.compile(r"0|[1-9][0-9]*")  # Orbax's standard step name: the number alone, no padding
# What the run moves aside to `<step>.<why>[.<n>]`: unreadable at a restore, rolled back or trained after a change
# (training/health.py), superseded (health's line that brings a set-aside checkpoint back), replaced by a save of
# the same step, and foreign (a step of another run, as resume.py's refusal says to move it)
SET_ASIDE_AS = ("unreadable", "rolled_back", "after_change", "superseded", "replaced", "foreign")
_SET_ASIDE_NAME = re.compile(rf"[0-9]+\.(?:{'|'.join(SET_ASIDE_AS)})(?:\.[0-9]+)?")


def _is_step_dir(path: epath.Path) -> bool:
  return bool(_STEP_NAME.fullmatch(path.name)) and path.is_dir()


def committed_steps(directory) -> list[int]:
  """The steps saved under `directory` (a checkpoints folder), oldest first: Orbax renames a step's directory to
  its number once the save has committed, and lists those."""
  directory = epath.Path(directory)
  return sorted(int(p.name) for p in directory.iterdir() if _is_step_dir(p)) if directory.exists() else []


def newest_committed_step(directory) -> int | None:
  """The newest step saved under `directory` (a checkpoints folder), None when none is."""
  return max(committed_steps(directory), default=None)


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files cannot be read or whose arrays' bytes differ from their digests: damaged at rest,
  where an older step may be intact. `damage` says what, naming the step's folder and the part."""

  def __init__(self, message: str, damage: str | None = None):
    super().__init__(message)
    self.damage = damage or message


class MisnamedStepError(CheckpointError):
  """A step's folder whose state was saved at another step (`_check_step_name`)."""


def _check_step_name(directory, step: int, saved: int | None) -> None:
  """MisnamedStepError when the folder of `step` under `directory` holds a state saved at step `saved`. Orbax
  orders, keeps and deletes steps by their folders' numbers, and a resume reads the schedule's anchor and the
  health record by it, while training goes on from the state's own step: renamed, the folder resumes neither as
  the step it holds nor as the one it is called. Which of the two was meant is the user's to say, so nothing is
  moved."""
  if saved is None or saved == step:
    return
  where, named = f"{directory}/{step}", f"{directory}/{saved}"
  fix = (
    f"move it out of {directory} ({named} is there already)"
    if os.path.lexists(named)
    else f"rename it to its step (mv -T {where} {named}) or move it out of {directory}"
  )
  raise MisnamedStepError(
    f"checkpoint {where} holds step {saved} (the step saved in its state), not {step}: a "
    f"step's folder renamed or copied in under another number; {fix}"
  )


def _state_step(state) -> int | None:
  """The step counter of a restored state (a TrainState, or a dict of its fields); None when it has none."""
  value = state.get("step") if isinstance(state, dict) else getattr(state, "step", None)
  if value is None:
    return None
  return int(np.asarray(value.addressable_data(0) if isinstance(value, jax.Array) else value))


def _strays(directory: epath.Path) -> list[str]:
  """The entries of `directory` that are neither a step, nor one the run set aside, nor an unfinished save."""
  return sorted(
    p.name
    for p in directory.iterdir()
    if not (_is_step_dir(p) or _SET_ASIDE_NAME.fullmatch(p.name) or ocp.path.atomicity_types.TMP_DIR_SUFFIX in p.name)
  )


def _warn_of_strays(directory: epath.Path) -> None:
  """Names, on process 0, what in `directory` is no checkpoint the run knows (`_strays`): Orbax and the resume
  ignore it, so a renamed step is not resumed from, and a person should know that."""
  if jax.process_index() != 0 or not directory.exists():
    return
  strays = _strays(directory)
  if strays:
    example = next((name for name in strays if re.search(r"[0-9]", name)), strays[0])
    logging.warning(
      "%s holds %d entr%s that no resume reads, ignored: %s (a checkpoint's folder is named by its "
      "step number alone); to resume from one, rename it to its step, newer than any step there "
      "(mv -T %s %s/<step>)",
      directory,
      len(strays),
      "y" if len(strays) == 1 else "ies",
      ", ".join(strays),
      directory / example,
      directory,
    )


def saved_config(directory, step: int) -> dict | None:
  """The config the run that saved `step` under `directory` was trained with (a JSON dict), None when the
  checkpoint holds none to compare with (`missing_config` says why)."""
  return _read_config(epath.Path(directory) / str(step) / _CONFIG_ITEM / _CONFIG_FILE)[0]


def missing_config(directory, step: int) -> str | None:
  """Why the checkpoint of `step` under `directory` holds no config to compare with, naming its file ('<file> is
  missing', '<file> holds no config ('{}')', ...); None when it holds one."""
  return _read_config(epath.Path(directory) / str(step) / _CONFIG_ITEM / _CONFIG_FILE)[1]


def _read_config(path: epath.Path) -> tuple[dict | None, str | None]:
  """(the saved config, None) or (None, why there is none)."""
  if not path.exists():
    return None, f"{path} is missing"
  try:
    text = path.read_text()
    saved = json.loads(text) if text.strip() else None
  except (OSError, ValueError) as e:
    return None, f"{path} cannot be read ({e})"
  if not saved or not isinstance(saved, dict):  # emptied: '', '{}', 'null'
    return None, f"{path} holds no config ({text.strip()[:20]!r})"
  return saved, None


def saved_schedule_anchor(directory, step: int) -> dict | None:
  """The schedule anchor ({'step', 'lr'}) saved with `step` under `directory`, None when it has none."""
  return _saved_json(epath.Path(directory) / str(step) / _ANCHOR_ITEM / _ANCHOR_FILE)


def saved_health(directory, step: int) -> dict | None:
  """The health record (rollbacks so far) saved with `step` under `directory`, None when it has none."""
  return _saved_json(epath.Path(directory) / str(step) / _HEALTH_ITEM / _HEALTH_FILE)


def _saved_json(path: epath.Path) -> dict | None:
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}, saved with {path.parent.parent}: {e}") from e


class _CapturedIteratorState:
  """Holds an iterator's state taken at save time, for grain's Orbax handler (which calls get_state())."""

  def __init__(self, iterator):
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


def _warn_of_unfinished_saves(directory: epath.Path) -> None:
  """Names, on process 0, the temporary directories of saves that never committed (a crash, a full disk): the
  CheckpointManager about to open `directory` deletes them (cleanup_tmp_directories, in the background, done
  before its first save), as it takes every non-link directory with Orbax's temporary suffix in its name."""
  if jax.process_index() != 0 or not directory.exists():
    return
  unfinished = sorted(
    p.name
    for p in directory.iterdir()
    if ocp.path.atomicity_types.TMP_DIR_SUFFIX in p.name and p.is_dir() and not os.path.islink(p)
  )
  if unfinished:
    logging.warning(
      "removing %d unfinished save(s) from %s, left by a run that stopped while saving: %s",
      len(unfinished),
      directory,
      ", ".join(unfinished),
    )


# Orbax's replica-parallel save has each replica of a replicated array write a slice of it. That spreads the writes
# of replicated state over the hosts of a multi-host job, but each slice is an XLA program compiled for its device:
# about 100 compiles (2.3 CPU s) for the first save of a pico ViT on 8 CPU devices, nothing gained within one
# host, and none worth it for a small array.
_MIN_REPLICA_SLICE_BYTES = 16 << 20


@functools.cache
def write_replicated_arrays_in_parallel_only_across_hosts() -> None:
  handler = ocp.type_handlers.ArrayHandler(
    use_replica_parallel=jax.process_count() > 1, min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES
  )
  # Orbax warns of any override, this intended one included.
  quiet = lambda record: not str(record.msg).startswith("Type handler registry")
  logging.get_absl_logger().addFilter(quiet)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    logging.get_absl_logger().removeFilter(quiet)


class Checkpointer:
  """Saves/restores {state, data-iterator} (and saves the run's config) under `directory` with an async Orbax
  CheckpointManager; storage faults are WorkdirErrors naming the path and errno."""

  def __init__(
    self,
    directory: str,
    *,
    keep: int = 3,
    keep_period: int = 0,
    async_save: bool = True,
    run_config: dict | None = None,
    schedule_anchor: dict | None = None,
    with_digests: bool | None = None,
  ):
    """Keeps the newest `keep` checkpoints and, when `keep_period` > 0, every one whose step is a multiple of it
    (Orbax's keep_period). `run_config`: the run's config as a JSON dict, saved with every checkpoint
    (`saved_config`). `schedule_anchor`: the run's schedule anchor as a JSON dict, saved with every checkpoint
    when the run has one (`saved_schedule_anchor`). `with_digests`: save the arrays' digests with every
    checkpoint and check them at every restore; None: as the run_config's checkpoint_digests says (on without one)."""
    self.directory = epath.Path(directory)
    self._run_config = run_config
    self._schedule_anchor = schedule_anchor
    self._with_digests = (
      with_digests if with_digests is not None else bool((run_config or {}).get("checkpoint_digests", True))
    )
    self._vouched: set[int] = set()  # steps this run saved with digests, or restored with its digests matching
    _warn_of_unfinished_saves(self.directory)
    _warn_of_strays(self.directory)
    write_replicated_arrays_in_parallel_only_across_hosts()
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_period:
      policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_period))
    options = ocp.CheckpointManagerOptions(
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        _CONFIG_ITEM: ocp.JsonCheckpointHandler(filename=_CONFIG_FILE),
        _HEALTH_ITEM: ocp.JsonCheckpointHandler(filename=_HEALTH_FILE),
        _ANCHOR_ITEM: ocp.JsonCheckpointHandler(filename=_ANCHOR_FILE),
        digests.ITEM: digests.DigestHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None, health: dict | None = None) -> None:
    """Starts the asynchronous save of `step`, once every process has checked that the directory takes it (a
    WorkdirError on all of them otherwise, before anything is written). A failure of this or an earlier save
    in flight is a WorkdirError naming the path and the errno when the storage caused it. `health`: the run's
    health record (`saved_health`)."""
    workdir.check_storage(self.directory, workdir.tree_bytes(state))
    self._make_way_for(step)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_CapturedIteratorState(data_iterator))
    if self._run_config is not None:
      items[_CONFIG_ITEM] = ocp.args.JsonSave(self._run_config)
    if self._schedule_anchor is not None:
      items[_ANCHOR_ITEM] = ocp.args.JsonSave(self._schedule_anchor)
    if health is not None:
      items[_HEALTH_ITEM] = ocp.args.JsonSave(health)
    if self._with_digests:
      items[digests.ITEM] = digests.DigestSave(state)
    with self._storage_faults_named():
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)  # the loop decides when, not Orbax
    if self._with_digests:
      self._vouched.add(step)

  def _make_way_for(self, step: int) -> None:
    """Moves aside to `<step>.replaced` whatever holds `step`'s name already (a step folder renamed back or copied
    in while this run restored an older one, a folder without its commit marker, a file): Orbax refuses to save a
    step it lists (StepAlreadyExistsError) and cannot rename its new folder onto another, so every requeue would
    stop at this step. Every process calls it at the same save."""
    path = self.directory / str(step)
    if faults.agreed(not os.path.lexists(path) and step not in self.all_steps()):
      return
    if not os.path.lexists(path):  # listed, but gone from the disk since Orbax last looked
      self._manager.reload()
      return
    self._set_aside(step, "replaced", f"; this run saves step {step} again, and Orbax never overwrites a step")

  def vouched_steps(self) -> set[int]:
    """The committed steps this run saved itself with their digests, or restored with their digests matching,
    after the saves in flight commit: the ones a stop line may call good (`last_good_text`). None without
    digests: a restore of such a checkpoint reads whatever bytes are there."""
    self.wait()
    return self._vouched & set(self.all_steps())

  def failed_save(self) -> Exception | None:
    """The error of a save in flight that has failed on this process (a WorkdirError for a storage fault): a
    cheap look at the finished background writes. The loop raises it on every process (`faults.raise_together`)."""
    try:
      with self._storage_faults_named():
        self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      return e
    return None

  @contextlib.contextmanager
  def _storage_faults_named(self):
    """Turns an exception of Orbax caused by the storage (an OSError, or tensorstore's message carrying an
    os_error_code) into a WorkdirError naming the path and the errno; others pass unchanged. The save's
    temporary directory is left for the next run to clean (`_warn_of_unfinished_saves`): the committed checkpoints
    are untouched."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      failure = _storage_failure(e)
      if failure is None:
        raise
      self._abandon()
      raise workdir.storage_error("cannot save a checkpoint to", self.directory, failure) from e

  def _abandon(self) -> None:
    """Waits for the failed save's other threads to end (their errors are the one already reported)."""
    with contextlib.suppress(Exception):
      self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state into `abstract_state`'s shapes and shardings, and the iterator in place: from this
    process's saved state, or, when the checkpoint was saved by another number of processes, by continuing
    the global data stream after all of theirs (`data_iterator.continue_from`). The state's arrays are checked
    against the digests saved with them: a CheckpointError names the first that differs."""
    target, absent = self._saved_fields_of(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(target)}
    other_processes = None
    if data_iterator is not None:
      other_processes = self._data_states_of_other_process_count(step)
      if other_processes is None and (self.directory / str(step) / "data").exists():
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      if other_processes:
        data_iterator.continue_from(other_processes)
    except Exception as e:  # pylint: disable=broad-except  # orbax reports a truncated array as a bare Exception
      raise CheckpointError(f"cannot restore {self.directory / str(step)}: {first_line(e)}") from e
    verified = self._with_digests and check_digests(
      self.directory / str(step), restored["state"], f"cannot restore {self.directory / str(step)}"
    )
    _check_step_name(self.directory, step, _state_step(restored["state"]))  # readable, and so named?
    if verified:
      self._vouched.add(step)
    if target is abstract_state:
      return restored["state"]
    return abstract_state.replace(**restored["state"], **{name: None for name in absent})

  def _saved_fields_of(self, step: int, abstract_state):
    """(the restore target, the fields absent from `step`): `abstract_state` itself, or, when it is a dataclass
    (the TrainState) with optional fields (default None) that `step` was saved without (absent: by a version
    before them; None: by a run without them, e.g. an EMA turned on since), a dict of its fields with those
    left out or None; they restore as None."""
    fields = getattr(abstract_state, "__dataclass_fields__", None)
    if fields is None:
      return abstract_state, []
    try:
      saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
    except Exception:  # pylint: disable=broad-except  # the restore names what is wrong with the checkpoint
      return abstract_state, []
    optional = [name for name, field in fields.items() if field.default is None]
    absent = [name for name in optional if name not in saved]
    saved_none = [name for name in optional if name in saved and saved[name] is None]
    if not absent and not saved_none:
      return abstract_state, []
    return {
      name: None if name in saved_none else getattr(abstract_state, name) for name in fields if name not in absent
    }, absent

  def _data_states_of_other_process_count(self, step: int) -> list[bytes] | None:
    """The data-iterator states of all processes when `step` was saved by another number of them than run
    now; None when this process's own state is there (or no data state at all)."""
    data_dir = self.directory / str(step) / "data"
    own = digests.process_file_name(jax.process_index(), jax.process_count())
    if not data_dir.exists() or (data_dir / own).exists():
      return None
    files = digests.every_process_file(data_dir, f"cannot restore {data_dir}")
    logging.info(
      "%s was saved by %d processes and %d run now: the data stream continues after all of their positions",
      data_dir,
      len(files),
      jax.process_count(),
    )
    return [path.read_bytes() for path in files]

  def restore_newest_readable(self, abstract_state, data_iterator=None):
    """(step, state) of the newest checkpoint that every process can restore, or None when there are none.

    An unreadable checkpoint (truncated or garbled files) is skipped with a warning naming it and why; once an
    older one restores, the unreadable newer ones are moved aside to `<step>.unreadable` (kept for a look,
    and out of the way of the steps the run saves again). When none restores, a CheckpointError names the
    directory and nothing is moved.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, error = self.restore(step, abstract_state, data_iterator), None
      except MisnamedStepError:
        raise  # readable, under the wrong name: the user's to put right, not to be set aside
      except CheckpointError as e:
        state, error = None, e
      if faults.agreed(error is None):
        for bad, _ in failures:
          self._set_aside(bad)
        return step, state
      reason = str(error) if error else "another process could not restore it"
      logging.warning("checkpoint %s/%d is unreadable, trying the previous one: %s", self.directory, step, reason)
      failures.append((step, reason))
    if failures:
      raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored (steps "
        f"{', '.join(str(s) for s, _ in failures)}; the newest: {failures[0][1]}); move the "
        f"directory away to start afresh"
      )
    return None

  def set_aside_after(self, step: int, why: str) -> list[str]:
    """Moves every checkpoint after `step` aside to `<step>.<why>` (kept, out of the way of the steps the run
    saves again); every process calls it. Returns their new names."""
    return [self._set_aside(later, why) for later in sorted(s for s in self.all_steps() if s > step)]

  def _set_aside(self, step: int, why: str = "unreadable", because: str = "") -> str:
    """Moves checkpoint `step` to `<step>.<why>` (`.<n>` added when taken; `why` one of SET_ASIDE_AS) and returns
    that name, the same on every process: each names it before process 0 renames. `because` ends the warning."""
    source = self.directory / str(step)
    target = self.directory / f"{step}.{why}"
    n = 1
    while target.exists():
      target, n = self.directory / f"{step}.{why}.{n}", n + 1
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint named aside {step}")
    if jax.process_index() == 0:
      source.rename(target)
      logging.warning("moved the %s checkpoint %s to %s%s", why.replace("_", " "), source, target, because)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
    self._manager.reload()
    self._vouched.discard(step)
    return target.name

  def wait(self) -> None:
    with self._storage_faults_named():
      self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()


def last_good_text(directory, steps: Sequence[int], vouched: Collection[int]) -> str:
  """What a stop line names as the last good checkpoint among the committed `steps` under `directory`: the newest
  one verified (`Checkpointer.vouched_steps`), with the newest committed one, when newer, named as unverified;
  'none' when there are no `steps`."""
  good = max((s for s in steps if s in vouched), default=None)
  newest = max(steps, default=None)
  if good is None:
    return f"none verified (the newest committed, unverified: {directory}/{newest})" if steps else "none"
  assert newest is not None  # `good` is one of `steps`
  newer = f" (a newer one, unverified: {directory}/{newest})" if newest > good else ""
  return f"{directory}/{good}{newer}"


def check_digests(step_dir: epath.Path, tree, failure: str, subtree: str = "") -> bool:
  """Compares `tree` (restored from `step_dir`'s state, or its `subtree`) with the digests saved in `step_dir`: a
  CheckpointError '<failure>: <the slices that differ>'; a checkpoint without digests, or slices this process cannot
  rebuild after a reshard, get one warning line. True when it was checked against digests."""
  saved = digests.read(step_dir / digests.ITEM)
  if saved is None:
    logging.warning(
      "checkpoint %s carries no digests (saved before checkpoints had them, or with "
      "config.checkpoint_digests=False): read unverified",
      step_dir,
    )
    return False
  verdict = digests.verify(saved, tree, prefix=subtree)
  if verdict.mismatched:
    raise DamagedCheckpointError(f"{failure}: {digests.mismatch_text(verdict)}")
  if verdict.unverified:
    logging.warning("checkpoint %s: %s", step_dir, digests.unverified_text(verdict))
  logging.info("checkpoint %s: %d slices of %d arrays match their digests", step_dir, verdict.matched, verdict.arrays)
  return True


# ------------------------------------------------------------------------------- a step's items on the host


def restore_on_host(directory: epath.Path, subtree: str | None = None):
  """A pytree checkpoint (only its top-level `subtree` when given) as host numpy arrays, whatever devices wrote it:
  a restore without a target would place arrays by the saved shardings, which fails on another device count."""
  checkpointer = ocp.PyTreeCheckpointer()
  cli.ignore_closed_event_loops()  # a failed read's late callbacks
  with _quiet_about_the_steps_own_metadata():
    metadata = checkpointer.metadata(directory).item_metadata
    if metadata is None:  # Orbax logs and returns None for a missing or unparsable _METADATA
      raise DamagedCheckpointError(f"{directory.name}/_METADATA is missing or unreadable")
    tree = metadata.tree
    if subtree is not None and subtree not in tree:
      return None
    item = (
      tree
      if subtree is None
      else {k: v if k == subtree else jax.tree.map(lambda _: ocp.PLACEHOLDER, v) for k, v in tree.items()}
    )
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
  return restored if subtree is None else restored[subtree]


@contextlib.contextmanager
def _quiet_about_the_steps_own_metadata():
  """Orbax warns 'Metadata file does not exist: <step>/state/_CHECKPOINT_METADATA' when one item of a step is read
  as a checkpoint of its own, as here: that file lives in the step folder, and nothing is wrong."""

  def keep(record) -> bool:  # and its 'Failed to get item metadata' line, which restore_on_host says in its error
    return not record.getMessage().startswith(("Metadata file does not exist", "Failed to get item metadata"))

  logger = logging.get_absl_logger()
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)
