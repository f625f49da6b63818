r"""Retrieval benchmarks: images with several captions each (COCO, Flickr30k), read from their released layouts.

`config.eval.retrieval_benchmarks` names them by spec, `<kind>:<root>[:<option>]`:

  | spec                                  | captions                              | images                         |
  |---------------------------------------|---------------------------------------|--------------------------------|
  | coco_karpathy:<root>[:<split>]        | <root>/dataset_coco.json (Karpathy's  | <root>/<filepath>/<filename>,  |
  |                                       | splits); split 'test' (5,000 images,  | e.g. <root>/val2014/COCO_...   |
  |                                       | the papers' COCO 5k) unless given     |                                |
  | coco_captions:<root>[:<folder>]       | <root>/annotations/captions_<folder>  | <root>/<folder>/<file_name>    |
  |                                       | .json; folder 'val2017' unless given  |                                |
  | flickr30k:<root>[:<split>]            | <root>/dataset_flickr30k.json         | <root>/flickr30k-images/       |
  |                                       | (Karpathy's); split 'test' (1,000,    | <filename>                     |
  |                                       | the papers' Flickr30k 1k) by default  |                                |
  | flickr30k_tokens:<root>[:<test list>] | <root>/results_20130124.token, lines  | <root>/flickr30k-images/<file> |
  |                                       | '<file>#<n>\t<caption>' (the release);|                                |
  |                                       | the images named in <test list> (a    |                                |
  |                                       | file name a line; a path, absolute or |                                |
  |                                       | relative to <root>), else every image |                                |

Karpathy's splits are 'train', 'restval', 'val' and 'test'; only the chosen one is read, in file order. The
COCO captions file is read in increasing image id, the token file in the order of its lines (or of the test
list). Every caption an image has is kept, in file order: most have five, some COCO images have six or seven
(the Karpathy 5k test split has 25,010 captions), and the metric (evaluate/retrieval.py) takes any count. An
image with no caption at all cannot be retrieved from and is left out. Captions are stripped of surrounding
whitespace, nothing else.

Nothing is downloaded: a missing folder, file or image, or an image name (from a captions or list file) that is
absolute or climbs out with '..' (`limits.unsafe_name`), is a DataError naming the path, raised when the set is
opened (at start-up: every image file's existence is checked then). An image that exists but cannot be read
later is counted (`transforms.count_failure`) and served with image=None, which the evaluator leaves out.

A `CaptionSet` is also the random-access image source of the eval pipeline: record i is {'image': encoded
bytes, 'index': i}.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from visionfm_jax.data import limits
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.data.transforms import naflex
from visionfm_jax.errors import DataError

KARPATHY_SPLITS = ("train", "restval", "val", "test")
FLICKR_IMAGES = "flickr30k-images"
FLICKR_TOKENS = "results_20130124.token"
SPEC_FORMS = (
  "coco_karpathy:<root>[:<split>]",
  "coco_captions:<root>[:<folder>]",
  "flickr30k:<root>[:<split>]",
  "flickr30k_tokens:<root>[:<test list>]",
)


@dataclasses.dataclass(frozen=True, eq=False)
class CaptionSet:
  """Images and their captions: caption c describes image caption_image[c]."""

  spec: str
  image_paths: tuple[Path, ...]
  captions: tuple[str, ...]
  caption_image: np.ndarray  # int32 (C,), increasing

  def __len__(self) -> int:
    return len(self.image_paths)

  def __getitem__(self, index) -> dict:
    index = int(index)
    record = {"image": None, "index": np.int32(index)}
    path = self.image_paths[index]
    try:
      record["image"] = path.read_bytes()
    except OSError as e:
      transforms.count_failure(f"image {path}", e)
    return record

  def __repr__(self) -> str:
    return f"CaptionSet({self.spec!r}, images={len(self)}, captions={len(self.captions)})"


class SelectImage:
  """The record -> example op of a CaptionSet in the eval pipeline (data/loader/pipeline.py EvalReader): the
  decoded, cropped 'image' and the record's 'index' (-1 in padding rows)."""

  def map(self, element: dict) -> dict:
    return {"image": element["image"], "index": np.int32(element["index"])}

  def spec(self, image_size: int) -> dict:
    return {"image": ((image_size, image_size, 3), np.uint8), "index": ((), np.int32, -1)}


class CaptionTokens:
  """The eval pipeline's reader of a caption set's tokens: example i is {'text': tokens[i], 'index': i}."""

  def __init__(self, tokens: np.ndarray):
    self.tokens = tokens

  def __call__(self, index: int) -> dict:
    return {"text": self.tokens[index], "index": np.int32(index)}

  def spec(self) -> dict:
    return {"text": (self.tokens.shape[1:], np.int32), "index": ((), np.int32, -1)}


def image_batches(caption_set: CaptionSet, data_cfg, *, batch_size: int, process_index: int, process_count: int):
  """This process's batches {'image', 'index', 'mask'} of every image of `caption_set`: the eval pipeline's
  shares and padding (pipeline.eval_shares, eval_batches) and its image preprocessing for `data_cfg`
  (pipeline.EvalReader). An undecodable image is a padding row (mask False)."""
  share, num_batches = pipeline.eval_shares(len(caption_set), batch_size, process_index, process_count)
  reader = pipeline.EvalReader(
    caption_set,
    data_cfg.image_size,
    SelectImage(),
    preprocess=data_cfg.eval_preprocess,
    naflex_budget=naflex.settings(data_cfg),
  )
  return pipeline.eval_batches(reader, share, num_batches, batch_size, threads=pipeline.eval_threads(data_cfg))


def caption_batches(tokens: np.ndarray, *, batch_size: int, process_index: int, process_count: int):
  """This process's batches {'text', 'index', 'mask'} of every row of `tokens` (int32 (C, L)), sharded and
  padded as image_batches."""
  share, num_batches = pipeline.eval_shares(len(tokens), batch_size, process_index, process_count)
  return pipeline.eval_batches(CaptionTokens(tokens), share, num_batches, batch_size, threads=1)


def open_caption_set(spec: str) -> CaptionSet:
  """The benchmark of `spec` (module docstring), its files read and its images checked; DataError naming the
  spec and the path when something is missing or malformed."""
  kind, _, rest = spec.partition(":")
  root, _, option = rest.partition(":")
  readers = {
    "coco_karpathy": _coco_karpathy,
    "coco_captions": _coco_captions,
    "flickr30k": _flickr30k,
    "flickr30k_tokens": _flickr30k_tokens,
  }
  if kind not in readers or not root:
    raise DataError(f"retrieval benchmark {spec!r}: expected one of {', '.join(SPEC_FORMS)}")
  root_path = Path(root).expanduser()
  try:
    if not root_path.is_dir():
      raise DataError(f"no folder {root_path}")
    images, captions = readers[kind](root_path, option)
    return _caption_set(spec, images, captions)
  except DataError as e:
    raise DataError(
      f"retrieval benchmark {spec!r}: {e}; see docs/data_preparation.md, 'Retrieval benchmarks: COCO and Flickr30k'"
    ) from e


def _caption_set(spec: str, images: list[Path], captions: list[list[str]]) -> CaptionSet:
  """Leaves out images without captions, checks that every image file exists."""
  keep = [i for i, c in enumerate(captions) if c]
  images, captions = [images[i] for i in keep], [captions[i] for i in keep]
  if not images:
    raise DataError("no captioned images")
  missing = [p for p in images if not p.is_file()]
  if missing:
    shown = ", ".join(str(p) for p in missing[:3])
    raise DataError(f"{len(missing)} of its {len(images)} images are missing: {shown}{', ...' * (len(missing) > 3)}")
  counts = [len(c) for c in captions]
  return CaptionSet(
    spec=spec,
    image_paths=tuple(images),
    captions=tuple(c for cs in captions for c in cs),
    caption_image=np.repeat(np.arange(len(images), dtype=np.int32), counts),
  )


def _image(folder: Path, *names: str) -> Path:
  """`folder` / `names`; DataError when a name (read out of a captions or list file) is absolute or has a '..'
  component: the benchmark reads no image outside its folder."""
  for name in names:
    if limits.unsafe_name(str(name)):
      raise DataError(f"names an image outside {folder}: {name!r}")
  return folder.joinpath(*names)


def _file(path: Path) -> Path:
  if not path.is_file():
    raise DataError(f"no file {path}")
  return path


def _folder(path: Path) -> Path:
  if not path.is_dir():
    raise DataError(f"no image folder {path}")
  return path


def _load_json(path: Path):
  try:
    with open(_file(path), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read {path} as JSON: {type(e).__name__}: {e}") from e


def _karpathy(path: Path, split: str, image_path) -> tuple[list[Path], list[list[str]]]:
  """Images and captions of one split of Karpathy's JSON; `image_path(entry)` gives an image's file."""
  if split not in KARPATHY_SPLITS:
    raise DataError(f"unknown split {split!r} of {path.name}; expected one of {KARPATHY_SPLITS}")
  data = _load_json(path)
  images, captions = [], []
  try:
    for entry in data["images"]:
      if entry["split"] == split:
        images.append(image_path(entry))
        captions.append([str(s["raw"]).strip() for s in entry["sentences"]])
  except (KeyError, TypeError) as e:
    raise DataError(
      f"{path}: an entry lacks a field of Karpathy's layout (images[].split, filename, "
      f"sentences[].raw): {type(e).__name__}: {e}"
    ) from e
  if not images:
    raise DataError(f"{path} has no images of split {split!r}")
  return images, captions


def _coco_karpathy(root: Path, split: str):
  return _karpathy(
    root / "dataset_coco.json",
    split or "test",
    lambda entry: _image(root, entry.get("filepath", ""), entry["filename"]),
  )


def _flickr30k(root: Path, split: str):
  folder = _folder(root / FLICKR_IMAGES)
  return _karpathy(root / "dataset_flickr30k.json", split or "test", lambda entry: _image(folder, entry["filename"]))


def read_coco_captions(path: Path) -> list[tuple[int, str, list[str]]]:
  """(image id, file_name, its captions in file order) of every image of a COCO captions file
  (captions_<folder>.json), in increasing id; DataError naming `path` when it is malformed."""
  data = _load_json(path)
  try:
    file_of = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
    captions = {i: [] for i in file_of}
    for a in data["annotations"]:
      captions[int(a["image_id"])].append(str(a["caption"]).strip())
  except KeyError as e:
    raise DataError(
      f"{path}: an image or annotation lacks a field (images[].id, file_name, annotations[]."
      f"image_id, caption) or names an unknown image id ({e})"
    ) from e
  except (ValueError, TypeError) as e:
    raise DataError(f"{path}: malformed captions file: {type(e).__name__}: {e}") from e
  return [(i, file_of[i], captions[i]) for i in sorted(file_of)]


def _coco_captions(root: Path, folder: str):
  folder = folder or "val2017"
  entries = read_coco_captions(root / "annotations" / f"captions_{folder}.json")
  image_dir = _folder(root / folder)
  return [_image(image_dir, name) for _, name, _ in entries], [captions for _, _, captions in entries]


def _flickr30k_tokens(root: Path, test_list: str):
  path = _file(root / FLICKR_TOKENS)
  folder = _folder(root / FLICKR_IMAGES)
  captions: dict[str, list[str]] = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      key, tab, caption = line.rstrip("\n").partition("\t")
      name, hash_, n = key.partition("#")
      if not (tab and hash_ and name and n.isdigit()):
        raise DataError(f"{path} line {number}: expected '<file>.jpg#<n>\\t<caption>', got {line.strip()[:80]!r}")
      captions.setdefault(name, []).append(caption.strip())
  names = list(captions)
  if test_list:
    list_path = _file(root / Path(test_list).expanduser())  # an absolute path stays itself
    with open(list_path, encoding="utf-8") as f:
      names = [line.strip() for line in f if line.strip()]
    if len(set(names)) < len(names):
      raise DataError(f"{list_path} names an image more than once")
    unknown = [n for n in names if n not in captions]
    if unknown:
      raise DataError(
        f"{list_path} names {len(unknown)} images that {path} has no captions for: "
        f"{', '.join(unknown[:3])}{', ...' * (len(unknown) > 3)}"
      )
  return [_image(folder, n) for n in names], [captions[n] for n in names]
