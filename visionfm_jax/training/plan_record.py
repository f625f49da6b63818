"""plan.json, the record of what a run derived from its config (training/plan.py writes it beside config.json),
read back wherever a workdir's model is rebuilt from its config.json: the tools (tools/workdir.py) and a later
run's init_from (training/init_from.py). config.json is the config as given; the fields the run derived (e.g. a
SwinV2's pretrained windows from its own init_from) are only in plan.json, so a reader of config.json alone would
rebuild another model."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from visionfm_jax import config_lib

PLAN_FILE = "plan.json"


def derived_in(workdir: str) -> dict[str, Any]:
  """{dotted config path: value} of what the run in `workdir` derived; {} when it wrote no plan.json."""
  try:
    with open(os.path.join(workdir, PLAN_FILE), encoding="utf-8") as f:
      derived = json.load(f).get("derived")
  except (OSError, json.JSONDecodeError, AttributeError):
    return {}
  return dict(derived) if isinstance(derived, dict) else {}


def as_trained(config_json: dict, workdir: str) -> dict:
  """A copy of `config_json` (the workdir's config.json) with the fields its run derived, as it trained."""
  return config_lib.set_paths(copy.deepcopy(config_json), derived_in(workdir))
