r"""Prepares TFDS' `imagenet2012` in ArrayRecord format from ImageNet's own tars, without TensorFlow.

  python -m visionfm_jax.datatools.build_tfds --name=imagenet2012 --data_dir=/data/tfds [--splits=validation]

reads `<data_dir>/downloads/manual/ILSVRC2012_img_train.tar` (a tar of one tar per synset) and
`ILSVRC2012_img_val.tar` (50,000 flat JPEGs), or only the one of each split --splits names (zero-shot evaluation
needs only the validation split and its 6.4 GB tar, not the 138 GB training tar), and writes
`<data_dir>/imagenet2012/5.1.0/`, which
`--config.data.source=tfds:imagenet2012` (and the CLIP recipe's zero-shot evaluation) reads with
`tfds.data_source`. `tfds build imagenet2012` writes the same dataset but needs TensorFlow (its split generators
call `tf.io.gfile`); this builder declares TFDS' name, version and features (image, label over TFDS' 1000
WordNet ids, file_name) and fills them from the tars: a training image's label is its synset tar's name, a
validation image's is the line of TFDS' shipped `validation_labels.txt` numbered as its file
(`ILSVRC2012_val_00000042.JPEG` is line 42). Images are stored as their bytes; the input pipeline decodes them
with Pillow, which reads the release's few CMYK and PNG-in-JPEG files as they are. A rerun over a finished
build does nothing (TFDS reuses a prepared dataset). A missing tar is one `error:` line naming the folder it was
looked for in.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
import re
import sys
import tarfile
import tempfile
from typing import Iterator, Sequence

from absl import flags

from visionfm_jax import cli
from visionfm_jax.errors import UserError

NAMES = ("imagenet2012",)
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
SPLIT_TARS = {"train": TRAIN_TAR, "validation": VAL_TAR}
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_enum("name", None, NAMES, "The TFDS dataset to prepare.", flag_values=fv)
  flags.DEFINE_string(
    "data_dir",
    None,
    "TFDS data directory: reads <data_dir>/downloads/manual/, writes <data_dir>/<name>/<version>/.",
    flag_values=fv,
  )
  flags.DEFINE_list("splits", list(SPLIT_TARS), "The splits to build.", flag_values=fv)
  return fv


def _synset_examples(path: Path) -> Iterator[tuple[str, bytes, str]]:
  """(file name, bytes, WordNet id) of every image of a tar of synset tars."""
  with tarfile.open(path) as archive:
    for member in archive:
      if not member.isfile() or not member.name.endswith(".tar"):
        continue
      wnid = Path(member.name).stem
      with tarfile.open(fileobj=io.BytesIO(archive.extractfile(member).read())) as synset:
        for image in synset:
          if image.isfile():
            yield Path(image.name).name, synset.extractfile(image).read(), wnid


def _validation_examples(path: Path, labels: Sequence[str]) -> Iterator[tuple[str, bytes, str]]:
  """(file name, bytes, WordNet id) of every image of the flat validation tar."""
  with tarfile.open(path) as archive:
    for member in archive:
      name = Path(member.name).name
      match = VAL_NAME.fullmatch(name)
      if not member.isfile() or not match:
        continue
      number = int(match.group(1))
      if not 1 <= number <= len(labels):
        raise UserError(f"{path}: {name} is not one of ImageNet's {len(labels)} validation images")
      yield name, archive.extractfile(member).read(), labels[number - 1]


def build_imagenet2012(data_dir: Path, splits: Sequence[str] = tuple(SPLIT_TARS)) -> Path:
  """Writes imagenet2012 5.1.0 (ArrayRecord) with `splits` under `data_dir`; returns its folder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(splits) - set(SPLIT_TARS))
  if unknown or not splits:
    raise UserError(f"--splits={','.join(splits)}: expected some of {', '.join(SPLIT_TARS)}")
  manual = data_dir / "downloads" / "manual"
  missing = [SPLIT_TARS[split] for split in splits if not (manual / SPLIT_TARS[split]).is_file()]
  if missing:
    raise UserError(f"--data_dir={data_dir}: no {' or '.join(missing)} in {manual} (ImageNet's tars, placed by hand)")
  package = tfds.core.tfds_path("datasets/imagenet2012")
  validation_labels = (package / "validation_labels.txt").read_text().split()

  class Imagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS' imagenet2012, generated from the manual tars."""

    VERSION = tfds.core.Version("5.1.0")

    @classmethod
    def _get_dataset_name(cls) -> str:
      return "imagenet2012"

    code_path = None  # TFDS would look for checksums beside this module through a backport not installed here

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names_file=str(package / "labels.txt")),
            "file_name": tfds.features.Text(),
          }
        ),
        supervised_keys=("image", "label"),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      # generators: a split's tar is opened only when its examples are read
      examples = {
        "train": _synset_examples(manual / TRAIN_TAR),
        "validation": _validation_examples(manual / VAL_TAR, validation_labels),
      }
      return {split: self._generate_examples(examples[split]) for split in splits}

    def _generate_examples(self, examples):
      for name, data, wnid in examples:
        yield name, {"image": data, "label": wnid, "file_name": name}

  with _scratch_temporary_folder():
    builder = Imagenet2012(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
  return Path(builder.data_dir)


@contextlib.contextmanager
def _scratch_temporary_folder() -> Iterator[None]:
  """Python's temporary folder moved into a scratch folder of its own, removed after: a new builder makes a folder
  there for the metadata it would fetch from TFDS' bucket (`DatasetInfo.initialize_from_bucket`, GCS disabled) and
  leaves it behind, one per run."""
  with tempfile.TemporaryDirectory(prefix="build_tfds_") as scratch:
    previous, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      yield
    finally:
      tempfile.tempdir = previous


def _main(fv, rest: list[str]) -> None:
  cli.check_args(fv, rest, ("name", "data_dir"))
  folder = build_imagenet2012(Path(fv.data_dir), fv.splits)
  print(f"{fv.name}: wrote {folder}")


def main(argv: Sequence[str]) -> int:
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
