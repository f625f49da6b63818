r"""Filters image-text pairs by CLIP score, as LAION's filter did: keeps the pairs whose image and caption
embeddings under a trained CLIP (or Aurora) have a cosine similarity >= --threshold.

  python -m visionfm_jax.datatools.filter_clip_score --checkpoint=WORKDIR --input=GLOB --output=DIR --threshold=T
      [--batch_size=256] [--step=N] [--draft_decode]

WORKDIR is the training workdir of a 'contrastive' or 'aurora' run (config.json + checkpoints/<step>; the newest
checkpoint unless --step), or a published CLIP: a transformers CLIPModel directory (config.json +
model.safetensors + tokenizer.json, e.g. OpenAI's ViT-B/32, with which LAION filtered at 0.28) or what
tools.import_hf made of one (trained/loader.py). The score is the dot product of the L2-normalised embeddings the
contrastive loss uses, without the logit scale; images are decoded and centrally cropped at config.data.image_size
(config.data.eval_preprocess) as in evaluation, captions tokenised with the run's tokenizer. Images are decoded at full
size, so a published CLIP's scores equal transformers' on its own preprocessing; --draft_decode decodes large JPEGs at a
reduced DCT scale (Pillow's draft mode, at least the resize side across), faster and slightly off.

Input: the ArrayRecord files matching GLOB (records.py's format; .json files are passed over), in name
order. With several processes (jax.distributed, joined from the environment as visionfm_jax.main does), process
i of n filters files i, i + n, ...
Written to DIR, which every process must see:

  <input basename>   the kept records of that input file, every field as read plus 'score' (via <name>.tmp)
  <input basename>.json
                     that file's counts and score histogram, written before its records file is renamed into
                     place (as datatools.prepare_data's sidecars): a records file in DIR is finished, and a rerun
                     skips it (resuming an interrupted run) but still has its counts
  histogram.json     (process 0, once all are done) the counts of all scored pairs in 200 bins over [-1, 1]
                     ('bin_edges', 'counts'), 'kept', 'total' (pairs scored), 'undecodable', 'uncaptioned',
                     'threshold', 'decode' ('full' or 'draft')
  histogram.txt      the same as a text bar chart, with quantiles
  dataset.json       kind 'pairs': per split its kept 'records' and its 'shards' (file names), the other fields
                     of the input's split entry (but 'class_counts') and the input's 'classes' copied, and
                     'clip_filter' (the counts and settings). An input file's split is the one whose list of
                     shards in the dataset.json next to it names it, else its name's prefix before the first
                     '-' (as in records.shard_name's '<split>-00000-of-00008.array_record'), else 'train'.

Corrupt records and images that do not decode are dropped and counted as undecodable; records without a
caption (uncaptioned images, which a mixture trains on unfiltered) are dropped and counted as uncaptioned.
Prints a line per file, then `kept K of N pairs (F) at threshold T; U undecodable; C uncaptioned; S s` (N
counts the pairs scored). Errors print one line naming the culprit and exit with status 2.

On the devices: params replicated on each of this process's devices (so the model must fit on one), every
batch split across them, one jitted function for all batches (the last one padded to --batch_size, which is
rounded up to a multiple of the local device count).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Callable, Sequence

from absl import flags
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from visionfm_jax import atomic, cli, output_folder
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources import records
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import UserError
from visionfm_jax.parallel import distributed
from visionfm_jax.trained import clip_config, loader

FILTERED_COUNTS = ("records", "shards", "class_counts")  # split entry fields that filtering changes
BINS = 200
HISTOGRAM_JSON, HISTOGRAM_TXT = "histogram.json", "histogram.txt"
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
CHART_BINS_PER_ROW, CHART_WIDTH = 5, 50  # histogram.txt: rows 0.05 wide, the longest bar 50 characters


def make_flags() -> flags.FlagValues:
  """This tool's flags, on their own FlagValues: importing the module (tests) defines no global flags."""
  fv = flags.FlagValues()
  flags.DEFINE_string(
    "checkpoint",
    None,
    "Training workdir of a CLIP (or Aurora) run, a transformers CLIPModel "
    "directory or a tools.import_hf directory of one.",
    flag_values=fv,
  )
  flags.DEFINE_string("input", None, "Glob of the ArrayRecord files to filter.", flag_values=fv)
  flags.DEFINE_string("output", None, "Directory for the kept records, histogram and dataset.json.", flag_values=fv)
  flags.DEFINE_float("threshold", None, "Keep pairs whose CLIP score (cosine similarity) is >= this.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 256, "Pairs per forward pass on this process's devices.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.", flag_values=fv)
  flags.DEFINE_bool(
    "draft_decode",
    False,
    "Decode large JPEGs at a reduced DCT scale (Pillow's draft mode): "
    "faster; scores then differ from transformers' by up to ~1e-3.",
    flag_values=fv,
  )
  return fv


# ------------------------------------------------------------------------------------------------- scoring


def _local_mesh() -> Mesh:
  return Mesh(np.array(jax.local_devices()), ("data",))


class ClipScorer:
  """Cosine similarities of image-text pairs under a CLIP or Aurora task's params, by one jitted function on
  this process's devices: params replicated, each batch of `batch_size` rows split across the devices. Images
  are decoded at full size (as evaluation decodes them), or with `draft_decode` at a reduced JPEG scale."""

  def __init__(
    self, task, params, batch_size: int, *, checkpoint: str = "", step: int | None = None, draft_decode: bool = False
  ):
    mesh = _local_mesh()
    self.task, self.checkpoint, self.step, self.draft_decode = task, checkpoint, step, draft_decode
    self.tokenizer = task.tokenizer
    self.image_size = task.config.data.image_size
    self.preprocess = task.config.data.eval_preprocess
    self.batch_size = -(-batch_size // mesh.size) * mesh.size
    replicated, self._rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    self.params = jax.device_put(params, replicated)
    self._cosine = jax.jit(self._cosine_fn, in_shardings=(replicated, self._rows, self._rows), out_shardings=replicated)

  def _cosine_fn(self, params, images, tokens):
    return jnp.sum(self.task.embed_images(params, images) * self.task.embed_texts(params, tokens), axis=-1)

  def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    """float32 (batch_size,) scores of a batch {'image': uint8 (batch_size, S, S, 3), 'text': int32 tokens}."""
    images, tokens = (jax.device_put(batch[k], self._rows) for k in ("image", "text"))
    return np.asarray(jax.device_get(self._cosine(self.params, images, tokens)))


def load_scorer(path: str, step: int | None, batch_size: int, draft_decode: bool = False) -> ClipScorer:
  """The ClipScorer of the CLIP at `path` (trained/loader.py: a workdir's checkpoint `step`, None: the
  newest; an import_hf or transformers CLIPModel directory); UserError for anything else."""
  config = loader.checkpoint_config(path, clip_config.CLIP_TASKS)
  loaded = loader.load(path, step, NamedSharding(_local_mesh(), P()), config=config)
  loaded.task.tokenizer  # pylint: disable=pointless-statement  (a bad config.data.tokenizer fails here)
  return ClipScorer(
    loaded.task, loaded.params, batch_size, checkpoint=loaded.origin, step=loaded.step, draft_decode=draft_decode
  )


# -------------------------------------------------------------------------------------------- one file


def bin_edges() -> np.ndarray:
  return np.linspace(-1.0, 1.0, BINS + 1)


def score_histogram(scores) -> np.ndarray:
  """Counts of `scores` in the BINS bins over [-1, 1] (rounding just past +-1 lands in the end bins)."""
  return np.histogram(np.clip(np.asarray(scores, np.float64), -1.0, 1.0), bins=bin_edges())[0]


class _RememberingSource:
  """One input file's records for pipeline.EvalReader, each record it reads kept in `read` (the fields of
  the kept pairs go to the output). A record without a caption reads as an undecodable one. Its image comes
  decoded (EvalReader's decoder passes arrays on): in full, or with `draft_side` in Pillow's JPEG draft mode at
  that side at least (transforms.decode_image)."""

  def __init__(self, path: str, draft_side: int = 0):
    self.source = records.ArrayRecordSource(glob.escape(path))
    self.decode = transforms.Decode(draft_side)
    self.read = {}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> dict:
    record = self.read[int(index)] = self.source[index]
    if "caption" not in record:
      return {"image": None}
    return self.decode.map(record)


def _is_uncaptioned(record: dict) -> bool:
  """An image without a caption (a corrupt record's placeholder has no image)."""
  return "caption" not in record and record.get("image") is not None


def _decode_threads() -> int:
  return min(32, os.cpu_count() or 2)


def _kept_record(record: dict, score: float) -> bytes:
  fields = {k: v for k, v in record.items() if k not in ("image", "score")}
  return records.pack_record(record["image"], **fields, score=float(score))


def filter_file(scorer: ClipScorer, path: str, out_path: str, threshold: float, stats_path: str) -> dict:
  """Writes the pairs of `path` scoring >= `threshold` to `out_path`, and its stats (see `file_stats`) to
  `stats_path` before `out_path` appears; returns the stats."""
  draft_side = transforms.eval_resize_side(scorer.image_size, scorer.preprocess) if scorer.draft_decode else 0
  source = _RememberingSource(path, draft_side)
  example = transforms.SelectPair(scorer.tokenizer, with_label=False)
  reader = pipeline.EvalReader(source, scorer.image_size, example, preprocess=scorer.preprocess)
  total, size = len(source), scorer.batch_size
  batches = pipeline.eval_batches(reader, range(total), -(-total // size), size, threads=_decode_threads())
  histogram, uncaptioned = np.zeros(BINS, np.int64), 0
  with records.RecordWriter(out_path) as writer:
    for start, batch in zip(range(0, total, size), batches):
      read = [source.read.pop(i) for i in range(start, min(start + size, total))]
      uncaptioned += sum(map(_is_uncaptioned, read))
      valid = batch["mask"][: len(read)]
      scores = scorer(batch)[: len(read)].astype(np.float64)  # compared in float64: exactly the stored scores
      for record, score, ok in zip(read, scores, valid):
        if ok and score >= threshold:
          writer.write(_kept_record(record, score))
      histogram += score_histogram(scores[valid])
    stats = file_stats(
      path,
      scorer,
      threshold,
      kept=writer.count,
      histogram=histogram,
      undecodable=total - int(histogram.sum()) - uncaptioned,
      uncaptioned=uncaptioned,
    )
    _write_json(stats_path, stats)
  return stats


def file_stats(
  path: str, scorer: ClipScorer, threshold: float, *, kept: int, histogram, undecodable: int, uncaptioned: int
) -> dict:
  """What the sidecar of one input file holds: its counts ('total': pairs scored), score histogram, and what
  filtered it."""
  return {
    "input": path,
    "kept": int(kept),
    "total": int(np.sum(histogram)),
    "undecodable": int(undecodable),
    "uncaptioned": int(uncaptioned),
    "histogram": [int(c) for c in histogram],
    "threshold": float(threshold),
    "checkpoint": scorer.checkpoint,
    "step": scorer.step,
    "decode": _decode_mode(scorer),
  }


def _decode_mode(scorer: ClipScorer) -> str:
  return "draft" if scorer.draft_decode else "full"


def _uncaptioned(stats: dict) -> int:
  """A file's uncaptioned count (0 in sidecars written before it was counted apart from the undecodable)."""
  return stats.get("uncaptioned", 0)


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic.write_json(path, value, indent=1)


def _read_json(path: str) -> dict | None:
  """The JSON object in `path`; None when there is no such file."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable ({e}); delete it and its records file to redo that input") from e


def output_paths(output: str, path: str) -> tuple[str, str]:
  """(records file, stats sidecar) in `output` of the input file `path`."""
  out_path = os.path.join(output, os.path.basename(path))
  return out_path, records.sidecar_path(out_path)


def _finished_stats(scorer: ClipScorer, path: str, output: str, threshold: float) -> dict | None:
  """The stats of `path` when an earlier run finished it into `output`; None when it is still to do."""
  out_path, stats_path = output_paths(output, path)
  stats = _read_json(stats_path) if os.path.exists(out_path) else None
  if stats is None:
    return None
  # a sidecar without 'decode' is a draft-decoded file's
  done = (stats.get("threshold"), stats.get("checkpoint"), stats.get("step"), stats.get("decode", "draft"))
  if done != (threshold, scorer.checkpoint, scorer.step, _decode_mode(scorer)):
    raise UserError(
      f"--output={output}: {os.path.basename(out_path)} was filtered at threshold {done[0]} by "
      f"{done[1]} step {done[2]} with {done[3]} decoding, not at {threshold} by {scorer.checkpoint} "
      f"step {scorer.step} with {_decode_mode(scorer)} decoding; write to another directory"
    )
  return stats


def filter_files(
  scorer: ClipScorer,
  files: Sequence[str],
  output: str,
  threshold: float,
  *,
  process_index: int = 0,
  process_count: int = 1,
  progress: Callable[[str], None] | None = None,
) -> dict[str, dict]:
  """Filters this process's share of `files` (sorted: files i, i + n, ...) into `output`, skipping the ones a
  previous run finished; returns {input path: its stats}."""
  results = {}
  for path in files[process_index::process_count]:
    stats = _finished_stats(scorer, path, output, threshold)
    note = "finished earlier"
    if stats is None:
      began, (out_path, stats_path) = time.perf_counter(), output_paths(output, path)
      stats = filter_file(scorer, path, out_path, threshold, stats_path)
      note = f"{time.perf_counter() - began:.1f} s"
    results[path] = stats
    if progress:
      progress(
        f"{path}: kept {stats['kept']} of {stats['total']} pairs, {stats['undecodable']} undecodable, "
        f"{_uncaptioned(stats)} uncaptioned ({note})"
      )
  return results


# ----------------------------------------------------------------------------------------- the summary


def histogram_quantiles(counts, quantiles=QUANTILES) -> list[float]:
  """Quantiles of the scores counted in `counts` (BINS bins over [-1, 1]), interpolated within a bin."""
  counts = np.asarray(counts, np.float64)
  cumulative, edges = np.cumsum(counts), bin_edges()
  out = []
  for q in quantiles:
    target = q * cumulative[-1]
    i = min(int(np.searchsorted(cumulative, target)), BINS - 1)
    within = (target - (cumulative[i] - counts[i])) / counts[i] if counts[i] else 0.0
    out.append(float(edges[i] + within * (edges[i + 1] - edges[i])))
  return out


def histogram_text(summary: dict) -> str:
  """histogram.txt: the counts, the quantiles and a bar chart of `summary` (histogram.json's dict)."""
  total, threshold = summary["total"], summary["threshold"]
  lines = [
    f"CLIP scores of {total} pairs from {summary['files']} files ({summary['checkpoint']}, step "
    f"{summary['step']}); {summary['undecodable']} undecodable and {summary['uncaptioned']} uncaptioned "
    "records",
    f"threshold {threshold:g}: kept {summary['kept']} ({summary['kept_fraction']:.2%})",
  ]
  if not total:
    return "\n".join(lines + ["no pairs scored"]) + "\n"
  lines.append(
    "quantiles: " + "  ".join(f"{q:g}: {v:+.3f}" for q, v in zip(QUANTILES, histogram_quantiles(summary["counts"])))
  )
  lines.append("")
  rows = np.asarray(summary["counts"]).reshape(-1, CHART_BINS_PER_ROW).sum(1)
  edges = bin_edges()[::CHART_BINS_PER_ROW]
  used = np.flatnonzero(rows)
  width = len(str(rows.max()))
  for r in range(used[0], used[-1] + 1):
    bar = "#" * round(CHART_WIDTH * rows[r] / rows.max())
    at = edges[r] <= threshold < edges[r + 1] or (threshold == 1.0 and r == len(rows) - 1)
    marker = "  <- threshold" if at else ""
    lines.append(f"[{edges[r]:+.2f}, {edges[r + 1]:+.2f}) {rows[r]:>{width}d} {bar}{marker}".rstrip())
  return "\n".join(lines) + "\n"


def _input_split(path: str, metadata: dict | None) -> tuple[str, dict]:
  """(split name, the input's entry for it or {}) of the input file `path`; see the module docstring."""
  name = os.path.basename(path)
  splits = (metadata or {}).get("splits") or {}
  for split, entry in splits.items():
    if isinstance(entry.get("shards"), list) and name in entry["shards"]:
      return split, entry
  split = (name.split("-", 1)[0] if "-" in name else "") or "train"
  return split, splits.get(split, {})


def dataset_splits(files: Sequence[str], stats: dict[str, dict]) -> tuple[dict, list | None]:
  """(dataset.json 'splits' of the output, the inputs' class names or None)."""
  metadata = {d: records.read_metadata(d) for d in sorted({os.path.dirname(p) for p in files})}
  splits = {}
  for path in files:
    split, source_entry = _input_split(path, metadata[os.path.dirname(path)])
    entry = splits.setdefault(split, {k: v for k, v in source_entry.items() if k not in FILTERED_COUNTS})
    entry["records"] = entry.get("records", 0) + stats[path]["kept"]
    entry.setdefault("shards", []).append(os.path.basename(path))
  classes = next((m["classes"] for m in metadata.values() if m and m.get("classes")), None)
  return splits, classes


def write_summary(output: str, files: Sequence[str], threshold: float) -> dict:
  """Merges the stats of every file of `files` (all filtered into `output`) into histogram.json,
  histogram.txt and dataset.json; returns histogram.json's dict."""
  stats = {}
  for path in files:
    stats[path] = _read_json(output_paths(output, path)[1])
    if stats[path] is None:
      raise UserError(f"--output={output}: no stats of {path} there (did every process finish?)")
  counts = np.sum([s["histogram"] for s in stats.values()], axis=0, dtype=np.int64)
  first = stats[files[0]]
  kept, total = sum(s["kept"] for s in stats.values()), int(counts.sum())
  summary = {
    "threshold": threshold,
    "kept": kept,
    "total": total,
    "undecodable": sum(s["undecodable"] for s in stats.values()),
    "uncaptioned": sum(_uncaptioned(s) for s in stats.values()),
    "kept_fraction": kept / total if total else 0.0,
    "files": len(files),
    "checkpoint": first["checkpoint"],
    "step": first["step"],
    "decode": first.get("decode", "draft"),
    "bin_edges": [round(float(e), 6) for e in bin_edges()],
    "counts": counts.tolist(),
  }
  _write_json(os.path.join(output, HISTOGRAM_JSON), summary)
  with open(os.path.join(output, HISTOGRAM_TXT), "w", encoding="utf-8") as f:
    f.write(histogram_text(summary))
  splits, classes = dataset_splits(files, stats)
  records.write_metadata(
    output,
    kind="pairs",
    splits=splits,
    classes=classes,
    clip_filter={
      "threshold": threshold,
      "checkpoint": summary["checkpoint"],
      "step": summary["step"],
      "decode": summary["decode"],
      "kept": kept,
      "total": total,
      "undecodable": summary["undecodable"],
      "uncaptioned": summary["uncaptioned"],
    },
  )
  return summary


# ------------------------------------------------------------------------------------------------ the CLI

TOOL = "filter_clip_score"  # its name in the output folder's marker (output_folder.py)


def input_files(pattern: str, output: str) -> list[str]:
  """The sorted files matching --input; UserError when none do, or when their outputs would collide with
  each other or overwrite them."""
  files = sorted(
    f
    for f in glob.glob(os.path.expanduser(pattern), recursive=True)
    if os.path.isfile(f) and not f.endswith((".tmp", ".json"))
  )
  if not files:
    raise UserError(f"--input={pattern}: no files match")
  names = [os.path.basename(f) for f in files]
  clashes = sorted({n for n in names if names.count(n) > 1})
  if clashes:
    raise UserError(
      f"--input={pattern}: several files are named {clashes[0]} (in different directories); "
      "outputs are named by basename"
    )
  if any(os.path.realpath(os.path.dirname(f)) == os.path.realpath(output) for f in files):
    raise UserError(f"--output={output}: holds input files (matched by --input={pattern}); write elsewhere")
  return files


def run(
  workdir: str,
  pattern: str,
  output: str,
  threshold: float,
  *,
  batch_size: int = 256,
  step: int | None = None,
  draft_decode: bool = False,
  progress: Callable[[str], None] | None = None,
) -> dict | None:
  """Filters this process's share of the --input files into `output`; on process 0 then merges every
  process's stats and returns histogram.json's dict plus 'seconds' (None on the other processes)."""
  began = time.perf_counter()
  if not -1.0 <= threshold <= 1.0:
    raise UserError(f"--threshold={threshold}: must be within [-1, 1] (a cosine similarity)")
  if batch_size < 1:
    raise UserError(f"--batch_size={batch_size}: must be positive")
  output = os.path.expanduser(output)
  files = input_files(pattern, output)
  output_folder.check(output, TOOL, None, files, "--output")  # before the slow work; created once it succeeds
  scorer = load_scorer(workdir, step, batch_size, draft_decode)
  output_folder.claim_in_place(output, TOOL, reads=files, flag="--output")
  filter_files(
    scorer,
    files,
    output,
    threshold,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    progress=progress,
  )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("filter_clip_score: every file filtered")
  if jax.process_index() != 0:
    return None
  return {**write_summary(output, files, threshold), "seconds": time.perf_counter() - began}


def summary_line(summary: dict) -> str:
  return (
    f"kept {summary['kept']} of {summary['total']} pairs ({summary['kept_fraction']:.4f}) at threshold "
    f"{summary['threshold']:g}; {summary['undecodable']} undecodable; {summary['uncaptioned']} uncaptioned; "
    f"{summary['seconds']:.1f} s"
  )


def _main(fv, rest: list[str]) -> None:
  if rest:
    raise UserError(f"unexpected arguments {rest}; flags only")
  for name, what in (
    ("checkpoint", "a training workdir"),
    ("input", "a glob of ArrayRecord files"),
    ("output", "a directory"),
    ("threshold", "a CLIP score in [-1, 1]"),
  ):
    if fv[name].value in (None, ""):
      raise UserError(f"--{name}: required ({what})")
  distributed.initialize()
  summary = run(
    fv.checkpoint,
    fv.input,
    fv.output,
    fv.threshold,
    batch_size=fv.batch_size,
    step=fv.step,
    draft_decode=fv.draft_decode,
    progress=lambda line: print(line, flush=True),
  )
  if summary is not None:
    print(summary_line(summary))


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), filters, prints the summary; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
