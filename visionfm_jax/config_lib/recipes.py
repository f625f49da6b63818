"""Lines several recipes share: what a full-scale run on a cluster adds (`full_scale_run`), and the pretrained
backbone of a dense fine-tuning recipe (`finetune_backbone`)."""

from __future__ import annotations

import ml_collections

from visionfm_jax.config_lib.schema import model_config, set_fields


def full_scale_run(config: ml_collections.ConfigDict) -> None:
  """Guards a run of weeks in place: skips loss / gradient-norm spikes (6 std over 128 steps) and rolls back past
  bad data (config.health, training/health.py), and keeps a checkpoint every 20k steps for good beside the newest
  (docs/launching.md, "Checkpoint history", for the disk)."""
  config.health.enabled = True
  config.checkpoint_keep_period = 20_000


def finetune_backbone(
  config: ml_collections.ConfigDict,
  name: str,
  *,
  init_from: str,
  variant: str,
  image_size: int,
  drop_path: float,
  **model_fields,
) -> None:
  """Makes `config.model` in place the pretrained backbone of a dense head: a `name` (vit | swinv2) of `variant`
  without a classification head, at the training crop `image_size` (model and data alike), with stochastic depth
  `drop_path`, remat nothing_saveable and `model_fields`; its params come from `init_from` (a workdir of the
  pretraining recipe, or a tools.import_hf directory) and go under 'backbone'."""
  config.model = model_config(name)
  set_fields(
    config.model,
    variant=variant,
    num_classes=0,
    image_size=image_size,
    drop_path=drop_path,
    remat_policy="nothing_saveable",
    **model_fields,
  )
  config.data.image_size = image_size
  set_fields(config, init_from=init_from, init_from_prefix="backbone")
