r"""Converts a Hugging Face ViT, SwinV2 or CLIP into an `init_from` directory.

  python -m visionfm_jax.tools.import_hf --src=HF_DIR --out=OUT_DIR [--scan=false] [--overwrite]

HF_DIR is what transformers' `save_pretrained` writes for a `ViTModel`, `ViTForImageClassification`,
`Swinv2Model`, `Swinv2ForImageClassification` or `CLIPModel` (config.json + model.safetensors; a CLIP also
needs its tokenizer.json, which `CLIPTokenizerFast.save_pretrained` writes). Writes `OUT_DIR/params` (Orbax)
and `OUT_DIR/model.json` (a CLIP's also `OUT_DIR/tokenizer.json`), then prints the `--config...` overrides that
build the matching model (a CLIP's start from `configs/swinv2_g_clip.py:vit`). An imported CLIP is a
`--checkpoint` of datatools.filter_clip_score and tools.export_hf as it is.
`--scan` must match `config.model.scan` (the layout of the blocks). A weight that is not floating point is refused.
OUT_DIR is written whole, as tools.export_hf writes its own (output_folder.py): a new or empty folder, or one
this tool wrote before that holds nothing else, unless --overwrite. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Sequence

from absl import flags, logging

from visionfm_jax import cli, models, output_folder
from visionfm_jax.convert import from_hf, hf_files
from visionfm_jax.errors import UserError
from visionfm_jax.models.backbone import ImageBackbone
from visionfm_jax.trained import clip_config, imported
from visionfm_jax.training import stored


def make_flags() -> flags.FlagValues:
  """This tool's flags, on their own FlagValues: importing the module (tests) defines no global flags."""
  fv = flags.FlagValues()
  flags.DEFINE_string("src", None, "Directory written by transformers' save_pretrained.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory for params + model.json.", flag_values=fv)
  flags.DEFINE_boolean("scan", True, "Scanned block layout (config.model.scan=True) or unrolled.", flag_values=fv)
  flags.DEFINE_boolean(
    "overwrite",
    False,
    "Replace --out and everything in it (a training workdir excepted), whatever wrote it.",
    flag_values=fv,
  )
  return fv


def metadata(model: ImageBackbone, src: str) -> dict[str, Any]:
  """What a config needs to build `model` (its `checkpoint_fields`, models/backbone.py), plus the HF image
  normalisation when the directory has it."""
  meta = models.checkpoint_fields(model)
  meta.update(description=models.description(model), source=os.path.abspath(src))
  meta.update(hf_files.read_normalisation(src))
  return meta


def overrides(meta: dict[str, Any], out: str) -> tuple[list[str], list[str]]:
  """`--config...` flags that build the converted ViT or SwinV2 and feed it (every field `visionfm_jax.load` builds
  it from: trained/imported.py), and notes on what a training run must add."""
  fields = imported.backbone_fields(models.from_checkpoint_fields(meta), meta)
  flags_ = [f"--config.model.name={meta['name']}", *(f"--config.{k}={_flag(v)}" for k, v in fields.items())]
  notes = []
  if not meta["num_classes"]:
    flags_.append("--config.init_from_skip=head")
    notes.append("the checkpoint has no head: also set --config.model.num_classes to your number of classes")
  return [*flags_, f"--config.init_from={os.path.abspath(out)}"], notes


def clip_metadata(model, src: str, out: str) -> dict[str, Any]:
  """model.json of an imported CLIP: the config fields that build and feed it (trained/clip_config.py)."""
  tokenizer = os.path.join(out, clip_config.TOKENIZER)
  return dict(
    name="clip",
    description=models.description(model),
    source=os.path.abspath(src),
    config=clip_config.clip_fields(model, tokenizer, src),
  )


def convert(src: str, out: str, scan: bool = True, overwrite: bool = False) -> dict[str, Any]:
  """Converts `src` into the folder `out` (module docstring); returns the metadata written to `out/model.json`."""
  out = os.path.expanduser(out)
  with output_folder.claim(out, "import_hf", overwrite, reads=(os.path.expanduser(src),)) as tmp:
    model, variables = from_hf(src, scan=scan)
    is_clip = models.name_of(model) == "clip"
    tokenizer = os.path.join(src, clip_config.TOKENIZER)
    if is_clip and not os.path.exists(tokenizer):
      raise UserError(
        f"{src}: no {clip_config.TOKENIZER}: a CLIP needs its own tokenizer (save it with "
        "transformers' CLIPTokenizerFast.save_pretrained)"
      )
    if not is_clip and not isinstance(model, ImageBackbone):
      raise UserError(
        f"{src}: a {type(model).__name__} is not a whole model a config trains; import_hf takes ViT, "
        "SwinV2 and CLIP directories (use visionfm_jax.convert.from_hf for the others)"
      )
    meta = clip_metadata(model, src, out) if is_clip else metadata(model, src)
    stored.save_params(tmp, variables["params"], meta)
    if is_clip:
      shutil.copyfile(tokenizer, os.path.join(tmp, clip_config.TOKENIZER))
  return meta


def _flag(value) -> str:
  return f'"{value}"' if isinstance(value, tuple) else str(value)


def clip_overrides(meta: dict[str, Any], out: str) -> list[str]:
  """The flags that train from an imported CLIP: its fields over configs/swinv2_g_clip.py:vit, init_from it."""
  return (
    ["--config=configs/swinv2_g_clip.py:vit"]
    + [f"--config.{k}={_flag(tuple(v) if isinstance(v, list) else v)}" for k, v in meta["config"].items()]
    + [f"--config.init_from={os.path.abspath(out)}"]
  )


def _main(fv, rest: list[str]) -> None:
  cli.check_args(fv, rest, ("src", "out"))
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level  # not get_verbosity(): before absl's flags are parsed it says WARNING for NOTSET
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save at INFO
  try:
    meta = convert(fv.src, fv.out, fv.scan, fv.overwrite)
  finally:  # called in-process (tests, notebooks), it must not silence the caller's INFO lines for good
    absl_logger.setLevel(level)
  flags_, notes = (clip_overrides(meta, fv.out), []) if meta["name"] == "clip" else overrides(meta, fv.out)
  print(f"wrote {fv.out}: {meta['description']}")
  print(" ".join(flags_))
  for note in notes:
    print(f"note: {note}")


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), converts; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
