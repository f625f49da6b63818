r"""How fast `visionfm_jax.load` answers in a notebook (trained/model.py): the time of the first call of a
size (its bucket's compile included) and of the next ones, and images/s, for each trained workdir given.

  python -m visionfm_jax.bench.notebook --workdir=/tmp/vit_demo,/tmp/clip_demo [--sizes=1,8,64] [--repeats=5]

A classifier is asked `classify(images)`, an image-text model `zero_shot(images, names)` with the 8 shapes as
names and OpenAI's 80 templates (its class embeddings timed first, on their own: `class_embeddings` once, then held).
The images are the shapes validation set's, rendered at `--image_side` px (each call resizes and crops them to the
run's view, as it would a photo). Printed, one line per workdir and size, then one JSON line:

  load_s         seconds of `visionfm_jax.load` (config, checkpoint restore)
  first_s        seconds of the first call with that many images (the compile of its bucket, the class
                 embeddings' first time not included)
  next_s         median seconds of the next `--repeats` calls (their range in brackets)
  img_per_s      images / next_s
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable

from absl import flags
import jax

from visionfm_jax import cli
from visionfm_jax.data.embedded import shapes
from visionfm_jax.errors import UserError
from visionfm_jax.trained import model as trained_model


def _seconds(call: Callable[[], object]) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def question(model: trained_model.TrainedModel) -> Callable[[list], object]:
  """What the model is asked of images: a classifier's classes, an image-text model's zero-shot shapes."""
  if model.config.task == "classification":
    return model.classify
  if model.config.task in trained_model.IMAGE_TEXT_TASKS:
    return lambda images: model.zero_shot(images, list(shapes.SHAPE_NAMES))
  raise UserError(
    f"--workdir={model.path}: a {model.config.task!r} model; the benchmark asks a classifier or an image-text model"
  )


def run(path: str, sizes: list[int], repeats: int, image_side: int) -> dict:
  """{'load_s', 'class_embeddings_s' (first, next; image-text), 'sizes': [{images, first_s, next_s, ...}]}."""
  start = time.perf_counter()
  model = trained_model.load(path)
  load_s = time.perf_counter() - start
  ask = question(model)
  result = {
    "workdir": path,
    "task": model.config.task,
    "model": model.config.model.name,
    "image_size": model.config.data.image_size,
    "buckets": list(model.buckets),
    "load_s": load_s,
  }
  if model.config.task in trained_model.IMAGE_TEXT_TASKS:
    embed = lambda: model.class_embeddings(list(shapes.SHAPE_NAMES))
    result["class_embeddings_s"] = [_seconds(embed), _seconds(embed)]
  source = shapes.ShapesSource("validation", max(sizes), image_side, seed=shapes.SEED)
  images = [source[i]["image"] for i in range(max(sizes))]
  result["sizes"] = []
  for n in sizes:
    first = _seconds(lambda: ask(images[:n]))
    times = [_seconds(lambda: ask(images[:n])) for _ in range(repeats)]
    next_s = statistics.median(times)
    result["sizes"].append(
      {
        "images": n,
        "first_s": first,
        "next_s": next_s,
        "next_range_s": [min(times), max(times)],
        "img_per_s": n / next_s,
      }
    )
  return result


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_list(
    "workdir", [], "trained workdirs (or import_hf / transformers CLIP directories), comma-separated", flag_values=fv
  )
  flags.DEFINE_list("sizes", ["1", "8", "64"], "images per call", flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "calls timed after the first of each size", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("image_side", 256, "side of the square images given (px)", lower_bound=8, flag_values=fv)
  return fv


def _sizes(values: list[str]) -> list[int]:
  try:
    sizes = [int(v) for v in values]
  except ValueError as e:
    raise UserError(f"--sizes={','.join(values)}: expected positive integers") from e
  if not sizes or min(sizes) < 1:
    raise UserError(f"--sizes={','.join(values)}: expected positive integers")
  return sizes


def _body(fv, rest):
  cli.check_args(fv, rest, required=("workdir",))
  sizes = _sizes(fv.sizes)
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s)")
  results = []
  for path in fv.workdir:
    result = run(path, sizes, fv.repeats, fv.image_side)
    results.append(result)
    embed = result.get("class_embeddings_s")
    print(
      f"{path}: {result['model']} {result['task']} at {result['image_size']} px, buckets {result['buckets']}, "
      f"load {result['load_s']:.2f} s"
      + (f", class embeddings {embed[0]:.2f} s then {embed[1] * 1e3:.1f} ms" if embed else "")
    )
    for row in result["sizes"]:
      low, high = row["next_range_s"]
      print(
        f"  {row['images']:>3} images: first {row['first_s']:.3f} s, next {row['next_s'] * 1e3:.1f} ms "
        f"[{low * 1e3:.1f}-{high * 1e3:.1f}], {row['img_per_s']:.1f} img/s"
      )
  print(json.dumps(results))


def main(argv) -> int:
  return cli.run(argv, make_flags(), __doc__, _body)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
