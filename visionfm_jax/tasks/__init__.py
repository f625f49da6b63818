"""Tasks: what differs per training objective. `build(config)` picks one by `config.task`; the contract they
answer is tasks/base.py's `Task` (and `SplitLossTask`)."""

from visionfm_jax.errors import ConfigError
from visionfm_jax.tasks.aurora import AuroraTask
from visionfm_jax.tasks.base import EvalContext, SplitLossTask, Task
from visionfm_jax.tasks.classification import ClassificationTask
from visionfm_jax.tasks.contrastive import ContrastiveTask
from visionfm_jax.tasks.detection import DetectionTask
from visionfm_jax.tasks.segmentation import SegmentationTask

TASKS = {
  "classification": ClassificationTask,
  "contrastive": ContrastiveTask,
  "aurora": AuroraTask,
  "segmentation": SegmentationTask,
  "detection": DetectionTask,
}


def task_class(config) -> type[Task]:
  """The class of `config.task`; ConfigError for an unknown one."""
  if config.task not in TASKS:
    raise ConfigError(f"config.task={config.task!r}: known tasks are {sorted(TASKS)}")
  return TASKS[config.task]


def build(config, mesh=None, class_names=None) -> Task:
  """The task of `config.task` on `mesh`; `class_names`, the training data's as sizing read them
  (training/sizing.py), are its `class_names`, not read again."""
  task = task_class(config)(config, mesh)
  if class_names is not None:
    task.class_names = list(class_names)  # the cached property's value
  return task
