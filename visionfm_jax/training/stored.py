"""A model on disk, wherever this project wrote it: the one place its layouts are recognised and read.

  a training workdir       config.json (the run's config) + checkpoints/<step> (Orbax steps, `checkpoint.py`)
  its checkpoints folder   the numbered steps alone (config.init_from takes one; the run's config is beside it)
  a tools.import_hf folder params/ (one pytree, no steps) + model.json (how to build the model)
  a transformers folder    config.json with a `model_type`: not this project's; trained/loader converts a CLIP's

`Stored` answers for one path: its layout (`kind`), its committed steps (one listing rule:
`checkpoint.committed_steps`), a step's folder, the model's fields, the run's config fields, and the params (their
digests checked, `load_params`); `checkpoints_dir` is where a workdir keeps its steps. `warn_of_damaged_parts`
checks a step's other parts for a tool that reads the params alone; `save_params` writes an import_hf folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from visionfm_jax.errors import CheckpointError
from visionfm_jax.param_rules import ParamRules, path_str
from visionfm_jax.training import checkpoint
from visionfm_jax.training import checkpoint_digests as digests

CHECKPOINTS = "checkpoints"  # a workdir's folder of steps
CONFIG, MODEL, PARAMS = "config.json", "model.json", "params"
WORKDIR, CHECKPOINTS_FOLDER, IMPORT, HF = "workdir", "checkpoints", "import", "hf"  # the kinds of `Stored`
WORKDIR_TEXT = f"a training workdir ({CONFIG} + {CHECKPOINTS}/<step>)"
IMPORT_TEXT = f"a tools.import_hf directory ({PARAMS}/ + {MODEL})"
LAYOUTS = f"{WORKDIR_TEXT} or {IMPORT_TEXT}"  # this project's, as the tools name them


def checkpoints_dir(workdir) -> str:
  """The folder of a training workdir's steps."""
  return os.path.join(os.fspath(workdir), CHECKPOINTS)


def _load_json(file: str) -> tuple[Any, OSError | ValueError | None]:
  """(the JSON in `file`, None) or (None, why it cannot be read: an OSError, or a ValueError for no JSON)."""
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f), None
  except (OSError, ValueError) as e:
    return None, e


def _read_json(file: str) -> Any:
  """The JSON in `file`; None when it is missing or not JSON."""
  return _load_json(file)[0]


def _kind(path: str, config_json: Any) -> str | None:
  """The layout at `path` (module docstring) whose config.json holds `config_json`: IMPORT (a params/ folder,
  model.json beside it for a tool), HF (a config.json with a model_type), WORKDIR (another config.json, or a
  checkpoints/ folder), CHECKPOINTS_FOLDER (numbered steps alone); None for none of them."""
  if not os.path.isdir(path):
    return None
  if os.path.isdir(os.path.join(path, PARAMS)):
    return IMPORT
  if os.path.exists(os.path.join(path, CONFIG)):
    return HF if isinstance(config_json, dict) and "model_type" in config_json else WORKDIR
  if os.path.isdir(checkpoints_dir(path)):
    return WORKDIR
  return CHECKPOINTS_FOLDER if checkpoint.committed_steps(path) else None


def kind_of(path: str) -> str | None:
  """The layout at `path`, as `Stored.at(path).kind`."""
  return Stored.at(path).kind


@dataclasses.dataclass(frozen=True)
class Stored:
  """A model on disk at `path` (absolute) of layout `kind` (`_kind`); `config_json` is its config.json as read
  once here (a run's config, or a transformers folder's), None with `config_error` saying why when it has none
  that reads as JSON."""

  path: str
  kind: str | None
  config_json: Any = None
  config_error: OSError | ValueError | None = None

  @classmethod
  def at(cls, path: str) -> Stored:
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    config_json, error = _load_json(os.path.join(path, CONFIG))
    return cls(path, _kind(path, config_json), config_json, error)

  @property
  def steps_dir(self) -> epath.Path:
    """Where its steps are: a workdir's checkpoints/, or the path itself (a checkpoints folder)."""
    return epath.Path(checkpoints_dir(self.path) if self.kind == WORKDIR else self.path)

  def steps(self) -> list[int]:
    """Its committed steps, oldest first (none for a layout without steps)."""
    return checkpoint.committed_steps(self.steps_dir) if self.kind in (WORKDIR, CHECKPOINTS_FOLDER) else []

  def step_dir(self, step: int) -> epath.Path:
    return self.steps_dir / str(step)

  def config_fields(self) -> dict[str, Any] | None:
    """The run's config as written (a workdir's config.json, or the one beside a checkpoints folder); None without
    one."""
    if self.kind == WORKDIR:
      fields = self.config_json
    else:
      fields = _read_json(os.path.join(os.path.dirname(self.path), CONFIG)) if self.kind == CHECKPOINTS_FOLDER else None
    return fields if isinstance(fields, dict) else None

  def model_fields(self) -> dict[str, Any] | None:
    """The model's fields: its model.json (an import_hf folder's, or one that describes the params to come), else
    the run's config.model; None when neither says."""
    described = _read_json(os.path.join(self.path, MODEL))
    if described is not None:
      return described
    fields = self.config_fields()
    return fields.get("model") if fields is not None else None

  def raw_params(self, step: int | None = None, weights: str = "params", argument: str = "init_from"):
    """Its params (their EMA with `weights`='ema_params') as host arrays: an import_hf folder's, or a step's (the
    newest without `step`) with their digests checked."""
    if self.kind == IMPORT and step is None:
      if weights != "params":
        raise CheckpointError(
          f"{self.path!r} is a tools.import_hf directory: it holds one set of params and no EMA of them ({weights})"
        )
      return checkpoint.restore_on_host(epath.Path(self.path) / PARAMS)
    steps = self.steps()
    if not steps:
      raise CheckpointError(
        f"{argument}={self.path!r}: no 'params' directory (tools.import_hf) and no training "
        f"checkpoints (numbered step directories) found there"
      )
    if step is not None and step not in steps:
      raise CheckpointError(f"{argument}={self.path!r}: no checkpoint of step {step}; steps there: {steps}")
    step_dir = self.step_dir(steps[-1] if step is None else step)
    try:
      params = checkpoint.restore_on_host(step_dir / "state", weights)
    except Exception as e:  # pylint: disable=broad-except  # orbax reports unreadable files in many ways
      raise checkpoint.DamagedCheckpointError(
        f"checkpoint {step_dir}: cannot read its {weights}: {checkpoint.first_line(e)}"
      ) from e
    if params is None:
      if weights != "params":
        raise CheckpointError(
          f"{str(step_dir)!r} holds no EMA of the params ({weights}): its run trained with config.optim.ema_decay=0"
        )
      raise CheckpointError(f"{argument}={self.path!r}: step {step_dir.name} holds no 'params'")
    checkpoint.check_digests(step_dir, params, f"checkpoint {step_dir} is corrupt", subtree=weights)
    return params


def warn_of_damaged_parts(path: str, step: int, read: str = "params") -> list[str]:
  """Checks the parts of the train state saved at `step` in the workdir `path` (or its checkpoints folder) other
  than `read`, which `load_params` checks, against their digests, and warns in one line naming each that fails:
  a tool that reads the params alone tells a user deciding what to keep that a resume would skip this checkpoint.
  Each part is read onto the host in turn (the largest, AdamW's moments, twice the params). Returns the failures,
  '<part> (<why>)'."""
  step_dir = Stored.at(path).step_dir(step)
  saved = digests.read(step_dir / digests.ITEM) or {}
  parts = sorted({name.split("/", 1)[0] for name in saved} - {read})
  failures = []
  for part in parts:
    try:
      verdict = digests.verify(saved, checkpoint.restore_on_host(step_dir / "state", part), prefix=part)
      why = digests.mismatch_text(verdict) if verdict.mismatched else None
    except Exception as e:  # pylint: disable=broad-except  # orbax reports unreadable files in many ways
      why = f"unreadable: {checkpoint.first_line(e)}"
    if why:
      failures.append(f"{part} ({why})")
  if failures:
    logging.warning(
      "checkpoint %s: its %s are intact, not its %s; a resume skips this checkpoint as unreadable",
      step_dir,
      read,
      "; ".join(failures),
    )
  return failures


def _flatten(tree) -> dict[str, Any]:
  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_params(
  path: epath.PathLike,
  target_params,
  *,
  skip: str | Sequence[str] = (),
  step: int | None = None,
  adapt: Callable[[dict[str, Any], dict[str, tuple[int, ...]]], dict[str, Any]] | None = None,
  weights: str = "params",
  argument: str = "init_from",
):
  """Loads params from `path` into the structure, shapes and shardings of `target_params`.

  `weights`: the train state's subtree to read from a training checkpoint, 'params' or 'ema_params' (their EMA,
  training/ema.py; a CheckpointError when the checkpoint has none). `argument`: what named `path`, as the errors
  name it ('init_from', a tool's '--checkpoint', `visionfm_jax.load`'s 'path'); a checkpoint whose files cannot be
  read or whose arrays fail their digests is a DamagedCheckpointError, its `damage` naming the step and the part.

  A training workdir gives its newest checkpoint, or the one of `step` when given. `adapt({path: array},
  {path: model shape}) -> {path: array}` maps the checkpoint's params onto the model's first (init_from.adapt:
  prefixes, resized position embeddings).

  Params whose path matches a `skip` regex (`param_rules`) keep their value in `target_params` (e.g. a new head).
  Missing, unexpected or mis-shaped params are a CheckpointError that lists them.
  """
  path = epath.Path(os.path.expanduser(str(path)))
  if not path.exists():
    raise CheckpointError(f"{argument}={str(path)!r}: no such directory")
  try:
    source = _flatten(Stored.at(str(path)).raw_params(step, weights, argument))
  except checkpoint.DamagedCheckpointError as e:
    raise checkpoint.DamagedCheckpointError(f"{argument}={str(path)!r}: {e.damage}", e.damage) from e
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # orbax reports unreadable files in many ways
    damage = f"cannot read its params: {checkpoint.first_line(e)}"
    raise checkpoint.DamagedCheckpointError(f"{argument}={str(path)!r}: {damage}", f"{path}: {damage}") from e
  fresh = ParamRules.of_patterns(skip, field="skip")
  target_flat, treedef = jax.tree_util.tree_flatten_with_path(target_params)
  names = [path_str(p) for p, _ in target_flat]
  if adapt is not None:
    source = adapt(source, {n: tuple(v.shape) for n, (_, v) in zip(names, target_flat)})
  kept = {n for n in names if not fresh.matches(n)}
  missing = sorted(kept - set(source))
  unexpected = sorted(set(source) - set(names))
  mismatched = sorted(
    f"{n}: checkpoint {tuple(np.shape(source[n]))} vs model {tuple(v.shape)}"
    for n, (_, v) in zip(names, target_flat)
    if n in kept and n in source and tuple(np.shape(source[n])) != tuple(v.shape)
  )
  if missing or unexpected or mismatched:

    def show(xs):
      return ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")

    raise CheckpointError(
      f"init_from={str(path)!r} does not match the model: missing {show(missing) or 'none'}; unexpected "
      f"{show(unexpected) or 'none'}; shape mismatch {show(mismatched) or 'none'}. Set config.init_from_skip "
      f"to a regex of params to initialise fresh."
    )
  leaves = []
  for n, (_, v) in zip(names, target_flat):
    if n in kept:
      value = np.asarray(source[n], dtype=v.dtype)
      leaves.append(jax.make_array_from_callback(value.shape, v.sharding, value.__getitem__))
    else:
      leaves.append(v)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def save_params(directory: epath.PathLike, params, metadata: dict[str, Any] | None = None) -> None:
  """Writes `params` as `<directory>/params` (Orbax) plus `<directory>/model.json` (how to build the model)."""
  folder = epath.Path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  checkpoint.write_replicated_arrays_in_parallel_only_across_hosts()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(folder / PARAMS, params, force=True)
  checkpointer.wait_until_finished()
  if metadata is not None and jax.process_index() == 0:
    (folder / MODEL).write_text(json.dumps(metadata, indent=2))
