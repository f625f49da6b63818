"""Zero-shot classification: class names x prompt templates -> one text embedding per class, then top-k.

Each class embedding is the mean of its L2-normalised prompt embeddings, normalised again (CLIP's prompt
ensembling). Images are classified by cosine similarity with the class embeddings; the counting (masked
padding rows, ties) is `classification.TopKEvaluator`'s.

Besides config.eval.zeroshot_classes on config.eval.zeroshot_source, config.eval.zeroshot_benchmarks names
further sets, ((name, source spec), ...), each logged as `eval/zeroshot_<name>/top1`, `top5`, `count`
(`benchmark_evaluators`): ImageNet's variants as papers report them (data/sources/imagenet_variants.py:
`imagenet_r:<root>` etc.), or any labelled source whose label names are ImageNet WordNet ids. Their classes get
OpenAI's curated names of those ImageNet classes and the templates of config.eval.zeroshot_benchmark_templates
('imagenet': OpenAI's 80, as papers report; 'imagenet_simple': 8 of them); every image of the set is scored
(ImageNet-A and -R against their own 200 classes only, as in their papers and CLIP's).

config.eval.zeroshot_classes names a shipped set (ZEROSHOT_SETS), a text file of the user's class names (one per
line, in label order), or 'data': the class names in the zero-shot data's own dataset.json (`zeroshot_classes`);
config.eval.zeroshot_templates, a text file of prompt templates (one per line, each with one '{}'), replaces the
set's templates ('' : a set's own, OpenAI's 80 for names from a file or the data). The zero-shot images are checked
for labels when the evaluator is built (`open_zeroshot_source`), so that unlabelled data stops a run at start-up,
not at its first evaluation.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from typing import Callable, Sequence
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax import data
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.loader.pipeline import first_readable_record
from visionfm_jax.data.sources import imagenet_variants
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.errors import ConfigError, DataError
from visionfm_jax.evaluate.classification import TopKEvaluator

ZEROSHOT_SETS = ("imagenet", "imagenet_simple", "shapes")
CLASSES_FIELD, TEMPLATES_FIELD, SOURCE_FIELD = (
  f"config.eval.zeroshot_{name}" for name in ("classes", "templates", "source")
)
FROM_DATA = "data"  # config.eval.zeroshot_classes: the class names of the zero-shot data's dataset.json


def read_lines(name: str) -> list[str]:
  """A shipped data file (`evaluate/assets/<name>`), one entry per line."""
  text = importlib.resources.files("visionfm_jax.evaluate").joinpath("assets", name).read_text(encoding="utf-8")
  return [line.strip() for line in text.splitlines() if line.strip()]


def class_names_and_templates(name: str) -> tuple[list[str], list[str]]:
  """(class names, prompt templates) of a zero-shot benchmark, the one place they come from.

  'imagenet': OpenAI's curated names of the 1000 ImageNet classes and its 80 prompt templates (CLIP, Radford et
  al. 2021) in OpenAI's order, the protocol behind published zero-shot figures (the assets are generated from
  open_clip's zero_shot_metadata.py; OpenAI names two classes 'missile' and two 'sunglasses'); 'imagenet_simple':
  the same names with 8 of those templates (faster, about a point lower); 'shapes': the embedded set's 8 shapes, with
  prompts in the grammar of its captions ('a large red {}'), every size and colour, so that the ensemble averages
  them out.
  """
  if name in ("imagenet", "imagenet_simple"):
    names = [line.split("\t", 1)[1] for line in read_lines("imagenet_classes.txt")]
    return names, read_lines("imagenet_templates.txt" if name == "imagenet" else "imagenet_simple_templates.txt")
  if name == "shapes":
    templates = [f"a {size} {colour} {{}}" for size in ("large", "small") for colour in shapes.COLOUR_NAMES]
    return list(shapes.SHAPE_NAMES), templates
  raise ConfigError(f"config.eval.zeroshot_classes={name!r}: expected one of {ZEROSHOT_SETS}")


def read_text_lines(path: str, field: str) -> list[str]:
  """The non-blank lines of the user's text file `path`, stripped; ConfigError naming `field` and the file when it
  cannot be read or has none."""
  try:
    with open(os.path.expanduser(path), encoding="utf-8") as f:
      lines = [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"{field}={path!r}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
  if not lines:
    raise ConfigError(f"{field}={path!r}: the file has no lines; expected one entry per line")
  return lines


def read_templates(path: str) -> list[str]:
  """The prompt templates of the file config.eval.zeroshot_templates, each with one '{}' for the class name."""
  templates = read_text_lines(path, TEMPLATES_FIELD)
  for number, template in enumerate(templates, 1):
    rest = template.replace("{}", "", 1)
    if "{}" not in template or "{" in rest or "}" in rest:
      raise ConfigError(
        f"{TEMPLATES_FIELD}={path!r}: line {number} {template!r} must hold exactly one '{{}}' "
        f"(where the class name goes) and no other braces"
      )
  return templates


def data_class_names(data_cfg, what: str) -> list[str]:
  """The class names (label order) of the zero-shot data (`data_cfg`'s eval source): its dataset.json's, OpenAI's
  names for ImageNet's WordNet ids."""
  spec = sources.eval_source_spec(data_cfg)
  try:
    names = data.class_names(spec, data_cfg, what=what)
  except DataError as e:
    raise ConfigError(f"{CLASSES_FIELD}={FROM_DATA!r}: {e}; name a file of class names instead") from e
  if sources.source_kind(spec) in imagenet_variants.KINDS:
    names = imagenet_class_names(names, what)
  return names


def zeroshot_classes(eval_cfg, data_cfg) -> tuple[list[str], list[str]] | None:
  """(class names, prompt templates) of config.eval.zeroshot_classes (`eval_cfg`) on the zero-shot data
  (`data_cfg`, contrastive.zeroshot_data_config); None when it is '' (no zero-shot). ConfigError naming the field or
  file when they cannot be read."""
  value = eval_cfg.zeroshot_classes
  if not value:
    return None
  if value in ZEROSHOT_SETS:
    names, templates = class_names_and_templates(value)
  elif value == FROM_DATA:
    names, templates = data_class_names(data_cfg, zeroshot_source_what(eval_cfg, data_cfg)), None
  elif os.path.isfile(os.path.expanduser(value)):
    names, templates = read_text_lines(value, CLASSES_FIELD), None
  else:
    raise ConfigError(
      f"{CLASSES_FIELD}={value!r}: no such file; expected one of {', '.join(ZEROSHOT_SETS)}, "
      f"{FROM_DATA!r} (the class names of the labelled eval data) or a text file of class names, "
      f"one per line"
    )
  templates_path = eval_cfg.zeroshot_templates
  if templates_path:
    templates = read_templates(templates_path)
  return names, templates or class_names_and_templates("imagenet")[1]


def zeroshot_source_what(eval_cfg, data_cfg) -> str:
  """How errors name the zero-shot images: config.eval.zeroshot_source when set, else the eval source's field."""
  if eval_cfg.zeroshot_source:
    return f"{SOURCE_FIELD}={eval_cfg.zeroshot_source!r}"
  return sources.eval_source_what(data_cfg)


def open_zeroshot_source(eval_cfg, data_cfg, open_source=data.open_eval_source):
  """The zero-shot images (`data_cfg`, contrastive.zeroshot_data_config), opened by `open_source` (an
  EvalContext's: shared with the other evaluators) and checked: ConfigError naming the fields to change when its
  records have no labels, so that the run stops at start-up, not at its first evaluation."""
  check_zeroshot_source(data_cfg)
  what = zeroshot_source_what(eval_cfg, data_cfg)
  source = open_source(data_cfg, what=what)
  record = first_readable_record(source)
  if record is not None and "label" not in record:
    raise ConfigError(
      f"{CLASSES_FIELD}={eval_cfg.zeroshot_classes!r} needs labelled eval images; the eval data "
      f"{what} split {data_cfg.eval_split!r} has none (keys {sorted(record)}): set "
      f"--{CLASSES_FIELD}= (no zero-shot) or name labelled images with --{SOURCE_FIELD}="
    )
  return source


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Class-major list: all templates of class 0, then class 1, ..."""
  return [t.format(name) for name in class_names for t in templates]


def class_embeddings(
  embed_texts: Callable, params, tokens: np.ndarray, num_classes: int, chunk: int = 1024
) -> jax.Array:
  """(num_classes, D) unit class embeddings from (num_classes * T, L) prompt tokens, embedded `chunk` rows at a
  time; the last chunk is padded with copies of its last row (embedded, then dropped), so that every call has one
  shape and the text tower compiles once."""
  if not len(tokens):
    raise ValueError("class_embeddings: no prompt tokens (a zero-shot set with no classes or no templates)")
  chunk = min(chunk, len(tokens))
  parts = []
  for i in range(0, len(tokens), chunk):
    rows = tokens[i : i + chunk]
    padded = np.concatenate([rows, np.repeat(rows[-1:], chunk - len(rows), axis=0)])
    parts.append(embed_texts(params, jax.device_put(padded)))
  return _unit_class_means(parts, len(tokens), num_classes)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unit_class_means(parts: list[jax.Array], rows: int, num_classes: int) -> jax.Array:
  """The unit mean of each class's unit prompt embeddings, from the padded chunks `class_embeddings` embedded: one
  program, where the same steps as separate array operations would each compile one of their own at a run's first
  evaluation."""
  emb = jnp.concatenate(parts)[:rows].astype(jnp.float32)
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  emb = emb.reshape(num_classes, -1, emb.shape[-1]).mean(axis=1)
  return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)


class ClassEmbeddings:
  """The unit class embeddings of zero-shot class sets, for one set of weights at a time: a run's zero-shot
  evaluators and its panel share one, so that each set's prompts go through the text tower once per evaluation,
  and a set whose classes another set of the same templates holds is read from it (ImageNet-V2's and -Sketch's
  1000 classes are the ImageNet zero-shot set's, -R's and -A's 200 are among them, the panel's are the zero-shot
  set's). For 1000 classes and OpenAI's 80 templates, each such set is 80,000 prompts."""

  def __init__(self, embed_texts: Callable, encode_texts: Callable):
    """`embed_texts(params, tokens)`: jitted; `encode_texts(prompts)`: their token rows."""
    self._embed_texts, self._encode_texts = embed_texts, encode_texts
    self._weights = lambda: None  # a weak reference to a leaf of the params the held embeddings are of
    self._held: dict[tuple, jax.Array] = {}  # (names, templates) -> (len(names), D), for those params
    self._tokens: dict[tuple, np.ndarray] = {}  # (names, templates) -> prompt tokens, for every evaluation

  def __call__(self, params, names: Sequence[str], templates: Sequence[str]) -> jax.Array:
    """(len(names), D) unit embeddings of the classes `names` under `templates`, by `params`."""
    leaf = jax.tree.leaves(params)[0]
    if self._weights() is not leaf:
      self._held, self._weights = {}, weakref.ref(leaf)
    key = (tuple(names), tuple(templates))
    if key not in self._held:
      held = self._from_held(*key)
      self._held[key] = (
        held if held is not None else class_embeddings(self._embed_texts, params, self._prompt_tokens(key), len(names))
      )
    return self._held[key]

  def _prompt_tokens(self, key: tuple) -> np.ndarray:
    if key not in self._tokens:
      self._tokens[key] = self._encode_texts(prompts(*key))
    return self._tokens[key]

  def _from_held(self, names: tuple, templates: tuple) -> jax.Array | None:
    for (held_names, held_templates), embeddings in self._held.items():
      if held_templates == templates and set(names) <= set(held_names):
        row = {name: i for i, name in enumerate(held_names)}
        return embeddings[np.asarray([row[name] for name in names])]
    return None


def scorer(embed_images: Callable, ctx, ks=(1, 5)) -> TopKEvaluator:
  """Top-k counts of images against the class embeddings passed with the params: one program for the zero-shot
  sets of one class count, whichever their classes (ImageNet's, ImageNet-V2's and -Sketch's 1000 share it)."""

  def predict(params_and_classes, images):
    params, classes = params_and_classes
    return embed_images(params, images).astype(jnp.float32) @ classes.T

  return TopKEvaluator(predict, ctx, ks)


class ZeroShotEvaluator:
  """top-1 / top-5 of images against text embeddings of their class names."""

  def __init__(self, score: TopKEvaluator, embeddings: ClassEmbeddings, names: Sequence[str], templates: Sequence[str]):
    """`score`: `scorer`'s; `embeddings`: the run's ClassEmbeddings."""
    self.score, self.embeddings, self.names, self.templates = score, embeddings, list(names), list(templates)

  def __call__(self, params, local_batches) -> dict[str, float]:
    """{'top1', 'top5', 'count'}: 'count' is the number of images scored, to check a protocol's coverage (the
    50,000 of ImageNet's validation split)."""
    classes = self.embeddings(params, self.names, self.templates)
    return self.score((params, classes), local_batches, with_count=True)


BENCHMARKS_FIELD = "config.eval.zeroshot_benchmarks"


def imagenet_class_names(wnids: Sequence[str], what: str) -> list[str]:
  """OpenAI's curated names of the ImageNet classes with these WordNet ids; DataError naming `what` (the source)
  when one is not an ImageNet-1k class."""
  index = {wnid: i for i, wnid in enumerate(imagenet_variants.imagenet_wnids())}
  unknown = [w for w in wnids if w not in index]
  if unknown:
    raise DataError(
      f"{what}: its label names must be ImageNet-1k WordNet ids (zero-shot uses OpenAI's names of "
      f"those classes); {len(unknown)} are not, e.g. {unknown[0]!r}"
    )
  names, _ = class_names_and_templates("imagenet")
  return [names[index[w]] for w in wnids]


def check_zeroshot_source(data_cfg) -> None:
  """ConfigError when the zero-shot source (config.eval.zeroshot_source, in `data_cfg`'s eval source) is an
  ImageNet variant with a class subset: its labels index its own 200 classes, not the 1000 names of
  config.eval.zeroshot_classes; config.eval.zeroshot_benchmarks scores it."""
  spec = sources.eval_source_spec(data_cfg)
  kind = sources.source_kind(spec)
  if kind in imagenet_variants.KINDS and len(imagenet_variants.class_wnids(kind)) != 1000:
    raise ConfigError(
      f"config.eval.zeroshot_source={spec!r} labels its images within its own "
      f"{len(imagenet_variants.class_wnids(kind))} classes, not ImageNet's 1000: evaluate it as "
      f"config.eval.zeroshot_benchmarks=(('{kind}', {spec!r}),)"
    )


def benchmark_data_config(data_cfg, spec: str):
  """A copy of config.data that evaluates every record of `spec`."""
  data_cfg = data_cfg.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.eval_source, data_cfg.eval_examples = spec, -1
  return data_cfg


def check_benchmarks(benchmarks) -> None:
  """ConfigError unless `benchmarks` is ((name, spec), ...) with distinct identifiers as names."""
  if not all(
    isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(x, str) and x for x in b) for b in benchmarks
  ):
    raise ConfigError(
      f"{BENCHMARKS_FIELD}={benchmarks!r}: expected ((name, spec), ...), e.g. "
      f"(('imagenet_r', 'imagenet_r:/data/imagenet-r'),)"
    )
  names = [name for name, _ in benchmarks]
  if len(set(names)) < len(names) or not all(name.isidentifier() for name in names):
    raise ConfigError(
      f"{BENCHMARKS_FIELD}: names {names} must be distinct identifiers (metrics eval/zeroshot_<name>/...)"
    )


def benchmark_evaluators(
  eval_cfg, data_cfg, score: TopKEvaluator, embeddings: ClassEmbeddings, ctx
) -> dict[str, Callable]:
  """{'zeroshot_<name>': evaluator} for each (name, spec) of config.eval.zeroshot_benchmarks (`eval_cfg`), scored
  by `score` (`scorer`'s) against class embeddings from `embeddings`. The sources are opened now, so that a missing
  set stops a run at start-up."""
  benchmarks = eval_cfg.zeroshot_benchmarks
  check_benchmarks(benchmarks)
  if not benchmarks:
    return {}
  template_set = eval_cfg.zeroshot_benchmark_templates
  if template_set not in ("imagenet", "imagenet_simple"):
    raise ConfigError(
      f"config.eval.zeroshot_benchmark_templates={template_set!r}: expected 'imagenet' (OpenAI's "
      f"80 templates) or 'imagenet_simple' (8 of them)"
    )
  _, templates = class_names_and_templates(template_set)
  out = {}
  for name, spec in benchmarks:
    what = f"{BENCHMARKS_FIELD} {name!r}={spec!r}"
    bench_cfg = benchmark_data_config(data_cfg, spec)
    source = ctx.open_eval_source(bench_cfg, what=what)
    names = imagenet_class_names(data.class_names(spec, bench_cfg, what=what), what)
    evaluator = ZeroShotEvaluator(score, embeddings, names, templates)
    batches = functools.partial(
      data.make_eval_iterator,
      bench_cfg,
      batch_size=ctx.local_batch_size,
      process_index=ctx.process_index,
      process_count=ctx.process_count,
      source=source,
    )
    out[f"zeroshot_{name}"] = lambda params, evaluator=evaluator, batches=batches: evaluator(params, batches())
  return out
