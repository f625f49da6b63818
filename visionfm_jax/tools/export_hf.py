r"""Exports a ViT or SwinV2 (with its classification head, if any) as a Hugging Face transformers directory.

  python -m visionfm_jax.tools.export_hf --checkpoint=DIR --out=OUT_DIR [--step=N] [--ema] [--overwrite]

DIR is a training workdir (config.json + checkpoints/<step>; the newest step unless --step; its EMA of the params
with --ema, for a run with config.optim.ema_decay set) or a directory
written by tools.import_hf (params/ + model.json). OUT_DIR gets config.json and model.safetensors (float32) of a
ViTForImageClassification / Swinv2ForImageClassification when the model has a head (a ViT's head on mean-pooled
tokens, pool='gap': a Dinov2ForImageClassification), else of a ViTModel / Swinv2Model, plus
preprocessor_config.json when DIR says how images were normalised: the run's evaluation view
(config.data.eval_preprocess: the shorter side resized, the central crop, mean and std) as a BitImageProcessor
('inception') or CLIPImageProcessor ('clip') computes it, so that

  transformers.AutoImageProcessor.from_pretrained(OUT_DIR)  # backend="pil" where torchvision is installed
  transformers.AutoModelForImageClassification.from_pretrained(OUT_DIR)  # AutoModel for a backbone

compute from the same decoded image (a PIL image, a uint8 array, or an image file decoded in full, as the run's
evaluation and visionfm_jax.load decode it) what the run's evaluation computes from it: our `tokens`, `pooled` and
`logits` as last_hidden_state, pooler_output and logits (fp32). One image differs: one of
exactly the model's size, which the run's 'inception' view takes as it is (data/transforms/host.py's EvalTransform)
and the processor resizes and crops like any other.
OUT_DIR is written whole: only a new or empty folder, or one this tool wrote before (its .visionfm_jax.json
marker) that holds nothing else, unless --overwrite (which replaces the folder, a training workdir excepted); the
export is written beside it and renamed into place.
A ViTModel's pooler is the identity on the class token; a backbone whose pooled features are not its pooler_output
(pool='gap') gets, as the last line printed, what to compute from its outputs instead. A CLIP whose ViT tower has
CLIP's pre-norm (an imported one, with its tokenizer.json) exports whole as a CLIPModel. Other CLIP and Aurora
workdirs export their image tower (config.model.image) or SwinV2 encoder (config.model.encoder) as a backbone;
projections, text towers and other heads stay behind. Every field of the model is one its converter writes, one
that changes nothing the export computes, or one it exports at one value only (convert/fields.py): what
transformers cannot compute (a ViT's pre_norm=True or MAP head after a class token, SwinV2's extra main-branch norms
of the H and G sizes, per-stage windows it would clamp otherwise) is an error naming the config field and its value.
Errors print one line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Any, Sequence

from absl import flags

from visionfm_jax import cli, convert, data, models, output_folder, tasks
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.data.transforms import naflex
from visionfm_jax.errors import ConfigError, DataError, UserError
from visionfm_jax.models import backbone as backbone_lib
from visionfm_jax.trained import clip_config, loader
from visionfm_jax.trained import workdir as workdir_lib
from visionfm_jax.training import stored

LAYOUTS = stored.LAYOUTS


@dataclasses.dataclass
class Source:
  """What DIR holds: the model to export, its params, and what the HF directory can say about it."""

  model: Any  # vit.ViT or swinv2.SwinV2
  params: Any
  fields: str  # prefix of the model's field names in messages: 'config.model.', '<dir>/model.json: ', ...
  origin: str  # 'step 1000 of DIR', ...
  notes: list[str]
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  image_size: int | None = None  # config.data.image_size: the evaluation crop
  preprocess: str = "inception"  # config.data.eval_preprocess
  labels: list[str] | None = None
  tokenizer: str | None = None  # a CLIP's tokenizer.json, copied next to the weights
  naflex: tuple[int, int] | None = None  # config.data.naflex's (patch size, token budget) when on


def make_flags() -> flags.FlagValues:
  """This tool's flags, on their own FlagValues: importing the module (tests) defines no global flags."""
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, f"Directory to export: {LAYOUTS}.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory (config.json + model.safetensors).", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir; default: the newest.", flag_values=fv)
  flags.DEFINE_bool(
    "ema",
    False,
    "Export a training workdir's EMA of the params (config.optim.ema_decay) instead of the params.",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace --out and everything in it (a training workdir excepted), whatever wrote it.",
    flag_values=fv,
  )
  return fv


def backbone(model) -> tuple[Any, str | None]:
  """(the model to export, the name its params live under in `model`'s, or None): `model` itself when its
  converter (`convert.converter`) can express it (a CLIP as a CLIPModel when its ViT tower has CLIP's pre-norm:
  `hf_clip.unexportable`), else its image tower (`backbone.image_tower`: CLIP's 'image', Aurora's 'encoder')
  when that names a converter; UserError otherwise."""
  module = convert.converter(model)
  if module is not None and not getattr(module, "unexportable", lambda _: None)(model):
    return model, None
  tower = backbone_lib.image_tower(model)
  if tower is None or convert.converter(tower[0]) is None:
    raise UserError(
      f"a {type(model).__name__} model has no image backbone that exports; exportable are vit and "
      f"swinv2 models (with their heads) and the image towers of clip and aurora models"
    )
  return tower


def _class_names(config) -> list[str] | None:
  try:
    return data.train_class_names(config.data)
  except (DataError, ConfigError):
    return None


def _from_workdir(path: str, step: int | None, use_ema: bool = False) -> Source:
  config = workdir_lib.load_config(path, tuple(tasks.TASKS), "a model of this project")
  workdir_lib.checkpoint_step(path, step)  # no checkpoint, or no such step: said before the model is built
  try:
    task = tasks.build(config)
  except ValueError as e:  # ConfigError included
    raise UserError(f"--checkpoint={path}: its config.json does not build a model: {e}") from e
  try:
    model, name = backbone(task.model)
  except UserError as e:
    raise UserError(f"--checkpoint={path}: config.model.name={config.model.name!r}: {e}") from e
  step, params = workdir_lib.intact_params(task, path, step, use_ema=use_ema)  # as a resume takes it
  fields, notes = "config.model.", []
  if name:
    params, fields = params[name], f"config.model.{name}."
    notes.append(
      f"exported {fields[:-1]} only (params '{name}' of the {type(task.model).__name__} model): the "
      f"rest of it has no transformers counterpart here"
    )
  labels = _class_names(config) if model is task.model and getattr(model, "num_classes", 0) else None
  weights = "the EMA of the params of " if use_ema else ""
  return Source(
    model,
    params,
    fields,
    f"{weights}step {step} of {path}",
    notes,
    mean=config.data.mean,
    std=config.data.std,
    image_size=config.data.image_size,
    preprocess=config.data.eval_preprocess,
    labels=labels,
    naflex=naflex.settings(config.data),
  )


def _from_import_dir(path: str, step: int | None) -> Source:
  """A tools.import_hf directory as `visionfm_jax.load` opens it (trained/imported.py): the model its model.json
  builds, fed as the task config derived from it says."""
  if step is not None:
    raise UserError(f"--step={step}: {path} is a tools.import_hf directory (one set of params, no steps)")
  loaded = loader.load(path)
  data_cfg, file = loaded.task.config.data, os.path.join(path, stored.MODEL)
  tokenizer = data_cfg.tokenizer if loaded.task.config.model.name == "clip" else None
  return Source(
    loaded.task.model,
    loaded.params,
    f"{file}: ",
    path,
    [],
    mean=data_cfg.mean,
    std=data_cfg.std,
    image_size=data_cfg.image_size,
    preprocess=data_cfg.eval_preprocess,
    tokenizer=tokenizer,
  )


def load(path: str, step: int | None = None, use_ema: bool = False) -> Source:
  """The model and params of `path` (a training workdir or a tools.import_hf directory, as `stored.kind_of`
  recognises them; the EMA of a workdir's params with `use_ema`); UserError otherwise."""
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise UserError(f"--checkpoint={path}: no such directory (expected {LAYOUTS})")
  kind = stored.kind_of(path)
  if kind == stored.IMPORT and os.path.exists(os.path.join(path, stored.MODEL)):
    if use_ema:
      raise UserError(f"--ema: {path} is a tools.import_hf directory (one set of params, no EMA of them)")
    return _from_import_dir(path, step)
  if kind == stored.HF:
    model_type = convert.hf_files.read_config(path).get("model_type")
    raise UserError(
      f"--checkpoint={path}: a transformers directory already (model_type={model_type!r}); expected {LAYOUTS}"
    )
  if kind == stored.WORKDIR and os.path.exists(os.path.join(path, stored.CONFIG)):
    return _from_workdir(path, step, use_ema)
  raise UserError(f"--checkpoint={path}: neither {LAYOUTS}")


# config.data.eval_preprocess -> the transformers image processor whose defaults are that view
PROCESSORS = {"inception": "BitImageProcessor", "clip": "CLIPImageProcessor"}


def write_preprocessor(out: str, source: Source) -> None:
  """`out`/preprocessor_config.json: the evaluation view of `source`'s run (transforms.EvalTransform, or with NaFlex
  inputs the whole image at its grid, naflex.Patches), exactly."""
  if source.naflex:
    patch, budget = source.naflex
    convert.hf_files.write_naflex_preprocessor(
      out, patch_size=patch, max_num_patches=budget, mean=source.mean, std=source.std
    )
    return
  view = transforms.check_eval_preprocess(source.preprocess)
  convert.hf_files.write_preprocessor(
    out,
    PROCESSORS[view],
    shortest_edge=transforms.eval_resize_side(source.image_size, view),
    crop_size=source.image_size,
    resample=transforms.EVAL_FILTERS[view],
    mean=source.mean,
    std=source.std,
  )


def export(
  path: str, out: str, step: int | None = None, use_ema: bool = False, overwrite: bool = False
) -> tuple[str, Source]:
  """Writes the model of `path` to the folder `out` (module docstring; the EMA of a workdir's params with
  `use_ema`); returns (its transformers architecture, what was exported)."""
  out = os.path.expanduser(out)
  with output_folder.claim(out, "export_hf", overwrite, reads=(os.path.expanduser(path),)) as tmp:
    source = load(path, step, use_ema)
    try:
      arch, notes = convert.to_hf(source.model, source.params, tmp, labels=source.labels)
    except ConfigError as e:
      raise ConfigError(f"--checkpoint={path}: {source.fields}{e}") from e
    source.notes += [f"{source.fields}{note}" for note in notes]
    if source.mean is not None and source.std is not None:
      write_preprocessor(tmp, source)
    if source.tokenizer:
      shutil.copyfile(source.tokenizer, os.path.join(tmp, clip_config.TOKENIZER))
  return arch, source


def _main(fv, rest: list[str]) -> None:
  cli.check_args(fv, rest, ("checkpoint", "out"))
  arch, source = export(fv.checkpoint, fv.out, fv.step, fv.ema, fv.overwrite)
  auto = "AutoModelForImageClassification" if arch.endswith("ForImageClassification") else "AutoModel"
  print(f"wrote {fv.out}: {arch} ({models.description(source.model)}) from {source.origin}")
  print(f"load it with transformers.{auto}.from_pretrained({fv.out!r})")
  for note in source.notes:
    print(f"note: {note}")


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), exports; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
