r"""Indexes img2dataset WebDataset tars for the `wds:` source, which trains from them in place, and picks the
LAION score threshold that keeps a given number of samples.

  python -m visionfm_jax.datatools.index_tars --input=GLOB [--index_dir=DIR] [--num_workers=P]
      [--task_index=I --task_count=N]
  python -m visionfm_jax.datatools.index_tars --input=GLOB [--index_dir=DIR] --keep=K [--max_pwatermark=W]
      [--max_punsafe=U] [--selection_out=FILE] [--expect_samples=E]

Writes next to each tar matching GLOB its `<tar>.index.npz` (`data.sources.wds.index_tar`: per sample with an image
its key, the offsets and sizes of its image, caption and .json members and LAION's scores from the .json;
about 1.1 MB per 10,000 samples, a fraction of a percent of the tar), via a temporary file renamed when
complete. With --index_dir=DIR the indexes go under DIR instead, at each tar's absolute path (/raw/laion/00000.tar:
DIR/raw/laion/00000.tar.index.npz), so that a read-only corpus is indexed and read in place; the `wds:` source
then takes the option `;index_dir=DIR`. An index that cannot be written (a read-only folder, no permission, a full
disk) is one error line naming it. Reads each tar's headers, captions and .json members once, decoding no image
(about 10,000 samples per CPU-second). A tar whose index was written for its current size is skipped, so a rerun
resumes. Across a cluster, task I of N indexes the tars I, I + N, ... of the sorted list of names matching GLOB
(`datatools.cluster_task`; default: from a SLURM job array), and stats, checks and writes only those: a task's load on
the file system's metadata is its share's, besides the one listing of GLOB. Then train with
`--config.data.source='wds:GLOB'`. Prints one summary line; errors print one line naming the culprit and exit with
status 2.

With --keep (after every tar is indexed; one process, no task flags), nothing is indexed: it reads the
`similarity` column of every index (never a tar) and prints the smallest `--min_similarity` that keeps at most K
samples (K: a count, or a fraction of all indexed samples when <= 1), with --max_pwatermark / --max_punsafe as
given, on one line, e.g.:

  keep: --min_similarity=0.3127 --max_punsafe=0.5 keeps 1,199,999,987 of 2,321,456,789 samples (51.69%; asked
  for 1,200,000,000); rejected: similarity 1,033,120,421, punsafe 88,336,381; 4 passes over 232,146 indexes, 1390.2 s

--expect_samples=E states how many indexed samples the --keep count was chosen for (a runbook's complete
download): with fewer, a warning line says so and what share of them K now keeps, since a partial download
otherwise changes the selection silently (a count keeps a larger share of fewer samples, at a lower threshold).

Those flags, given to prepare_data (or as options of the `wds:` source), keep exactly the printed count: it is
counted on the printed value with their comparison (`data.sources.wds.ScoreFilter`: similarity >= S in float64; a sample
without a score a condition needs fails it), before prepare_data drops undecodable images. Samples with equal
scores are kept or left out together, so a tie at the boundary keeps fewer than K. The printed value is the one
with the fewest digits that keeps that count. --selection_out=FILE writes the same as JSON (`flags`: the flags
to pass on; `min_similarity`, `kept`, `samples`, `keep`, `eligible`, `filtered`).

The selection is exact in bounded memory: scores map to 64-bit keys ordered as the floats are; a pass over the
indexes counts the keys by their top 16 bits (65,536 counters), which names the bin holding the boundary; each
further pass splits that bin by the next 16 bits until it holds at most 4M scores (LAION's float32 scores: after
the second), which one more pass collects and sorts. A last pass counts what the printed value keeps. A pass
reads the score columns only, about 1.5 ms per 10,000-sample index: some 6 minutes for LAION-2B's 230,000 tars.
"""

from __future__ import annotations

import collections
import dataclasses
import decimal
import math
import multiprocessing
import os
import sys
import time
from typing import Iterator, Sequence

from absl import flags
import numpy as np

from visionfm_jax import atomic, cli
from visionfm_jax.data.sources import wds
from visionfm_jax.datatools import cluster_task
from visionfm_jax.errors import DataError, UserError

SELECT_FLAGS = ("max_pwatermark", "max_punsafe", "selection_out", "expect_samples")
DIGIT_BITS = 16  # bits of the ordered score keys that one histogram pass resolves
COLLECT_LIMIT = 1 << 22  # scores the final pass holds in memory (32 MiB of keys)
_SIGN = np.uint64(1 << 63)


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("input", None, "A glob of img2dataset .tar files.", flag_values=fv)
  flags.DEFINE_string(
    "index_dir",
    None,
    "Write (and read) the indexes under this folder, at each tar's absolute "
    "path, instead of next to the tars (a read-only corpus).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_workers", None, "Processes indexing tars; 0 or 1: inline. Default: the CPU count.", flag_values=fv
  )
  cluster_task.define_flags(fv)
  flags.DEFINE_float(
    "keep",
    None,
    "Index nothing: print the --min_similarity that keeps at most this many "
    "indexed samples (a fraction of them when <= 1: --keep=1 keeps all).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "max_pwatermark",
    None,
    "--keep: count only samples whose 'pwatermark' is at most this (as prepare_data's flag).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "max_punsafe",
    None,
    "--keep: count only samples whose 'punsafe' is at most this (as prepare_data's flag).",
    flag_values=fv,
  )
  flags.DEFINE_string("selection_out", None, "--keep: also write the selection to this JSON file.", flag_values=fv)
  flags.DEFINE_float(
    "expect_samples",
    None,
    "--keep: warn when fewer samples than this are indexed (the count "
    "the --keep count was chosen for; fewer: a partial download).",
    flag_values=fv,
  )
  return fv


# --------------------------------------------------------------------------------------------- indexing


def _index_one(tar_and_dir: tuple[str, str | None]) -> dict:
  """Indexes one tar (`wds.write_index`); an index that cannot be written is a UserError naming it and the
  remedy."""
  tar, index_dir = tar_and_dir
  try:
    return wds.write_index(tar, index_dir)
  except OSError as e:
    remedy = (
      "another folder with --index_dir"
      if index_dir
      else "a writable folder with --index_dir=DIR (then train with 'wds:GLOB;index_dir=DIR')"
    )
    raise UserError(
      f"cannot write the index {wds.index_path(tar, index_dir)} ({e.strerror or e}); write the indexes to {remedy}"
    ) from None


def _matching_tars(pattern: str) -> list[str]:
  try:
    return wds.matching_tars(pattern)
  except DataError as e:
    raise UserError(f"--input={pattern}: {e}") from e


def task_tars(pattern: str, task: cluster_task.Task) -> list[str]:
  """`task`'s share of the .tar names matching `pattern` (their one listing), of which only these are stat'ed."""
  try:
    names = wds.tar_names(pattern)
  except DataError as e:
    raise UserError(f"--input={pattern}: {e}") from e
  return [tar for tar in task.share(names) if os.path.isfile(tar)]


def index_tars(
  pattern: str, *, task: cluster_task.Task = cluster_task.Task(), num_workers: int = 0, index_dir: str | None = None
) -> dict:
  """Indexes `task`'s share of the tars matching `pattern` that have no current index (next to them, or under
  `index_dir`); {tars (this task's), indexed (written now), samples, incomplete and left_out ({limits reason:
  samples}) (of those written now)}. UserError naming an index that cannot be written."""
  tars = task_tars(pattern, task)
  pending = [(tar, index_dir) for tar in tars if wds.read_index(tar, fields=(), index_dir=index_dir) is None]
  if num_workers <= 1 or len(pending) <= 1:
    results = list(map(_index_one, pending))
  else:
    with multiprocessing.get_context("spawn").Pool(min(num_workers, len(pending))) as pool:
      results = pool.map(_index_one, pending)
  left_out = collections.Counter()
  for result in results:
    left_out.update(result["left_out"])
  return {
    "tars": len(tars),
    "indexed": len(pending),
    "samples": sum(r["samples"] for r in results),
    "incomplete": sum(r["incomplete"] for r in results),
    "left_out": dict(left_out),
  }


# ---------------------------------------------------------------------------------- ordered score keys


def ordered_keys(values: np.ndarray) -> np.ndarray:
  """uint64 keys that order as the (non-NaN) float64 `values` do; -0.0 and 0.0, which compare equal, share one."""
  bits = (np.asarray(values, np.float64) + 0.0).view(np.uint64)
  return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_value(key: int) -> float:
  """The float64 of an `ordered_keys` key."""
  key = np.uint64(key)
  bits = key & ~_SIGN if key & _SIGN else ~key
  return float(np.asarray(bits, np.uint64).view(np.float64))


class ScoreScan:
  """Passes over the indexes of `tars` (next to them, or under `index_dir`): each reads every index's score column
  again, so that memory stays that of one index. `samples` counts the indexed samples of the last pass; a tar
  without a current index is a UserError naming `pattern`."""

  def __init__(self, pattern: str, tars: Sequence[str], others: wds.ScoreFilter, index_dir: str | None = None):
    self.pattern, self.tars, self.others, self.index_dir = pattern, list(tars), others, index_dir
    self.passes = self.samples = 0

  def scores(self) -> Iterator[np.ndarray]:
    """One pass: each tar's (n, 3) scores (wds.SCORES order)."""
    self.passes += 1
    self.samples, missing = 0, []
    for tar in self.tars:
      index = wds.read_index(tar, fields=("scores",), index_dir=self.index_dir)
      if index is None:
        missing.append(tar)
        continue
      self.samples += len(index["scores"])
      yield index["scores"]
    if missing:
      raise UserError(
        f"--input={self.pattern}: {len(missing)} of {len(self.tars)} tars have no current index "
        f"({missing[0]}{', ...' if len(missing) > 1 else ''}: looked for "
        f"{wds.index_path(missing[0], self.index_dir)}); {wds.INDEX_HINT}"
      )

  def keys(self) -> Iterator[np.ndarray]:
    """One pass: per tar the ordered keys of the similarities of the samples that have one and pass `others`."""
    similarity = wds.SCORES.index("similarity")
    for scores in self.scores():
      values = scores[:, similarity][self.others.reasons(scores) < 0]
      yield ordered_keys(values[~np.isnan(values)])


def _top_bits(keys: np.ndarray, bits: int) -> np.ndarray:
  return keys >> np.uint64(64 - bits)


def digit_counts(scan: ScoreScan, prefix: int = 0, known: int = 0) -> np.ndarray:
  """One pass: the counts of the keys whose top `known` bits are `prefix`, by their next DIGIT_BITS bits."""
  counts = np.zeros(1 << DIGIT_BITS, np.int64)
  shift, mask = np.uint64(64 - known - DIGIT_BITS), np.uint64((1 << DIGIT_BITS) - 1)
  for keys in scan.keys():
    keys = keys[_top_bits(keys, known) == np.uint64(prefix)] if known else keys
    counts += np.bincount(((keys >> shift) & mask).astype(np.intp), minlength=len(counts))
  return counts


def order_statistic(
  scan: ScoreScan, rank: int, counts: np.ndarray, collect_limit: int = COLLECT_LIMIT
) -> tuple[float, float]:
  """(the `rank`-th smallest similarity (0-based) of `scan`, the smallest one above it or inf), exactly.
  `counts`: `digit_counts(scan)`, the first pass's. Each further pass narrows the bin that holds it by
  DIGIT_BITS bits, until at most `collect_limit` keys (or a single key) are left in it."""
  prefix = known = 0
  while True:
    below = np.cumsum(counts)
    digit = int(np.searchsorted(below, rank, side="right"))
    rank -= int(below[digit - 1]) if digit else 0
    prefix, known = (prefix << DIGIT_BITS) | digit, known + DIGIT_BITS
    if known == 64 or counts[digit] <= collect_limit:
      return _settle(scan, prefix, known, rank)
    counts = digit_counts(scan, prefix, known)


def _settle(scan: ScoreScan, prefix: int, known: int, rank: int) -> tuple[float, float]:
  """One pass: `order_statistic`'s answer from the keys of the bin `prefix` (its top `known` bits), sorted
  (unless the bin is one key), and the smallest key above the bin."""
  inside, above = [], None
  for keys in scan.keys():
    top = _top_bits(keys, known)
    if known < 64:
      inside.append(keys[top == np.uint64(prefix)])
    later = keys[top > np.uint64(prefix)]
    if later.size:
      above = int(later.min()) if above is None else min(above, int(later.min()))
  value = prefix
  if known < 64:
    inside = np.sort(np.concatenate(inside))
    value = int(inside[rank])
    after = inside[np.searchsorted(inside, inside[rank], side="right") :]
    above = int(after[0]) if after.size else above
  return key_value(value), math.inf if above is None else key_value(above)


# ------------------------------------------------------------------------------------ the printed value


def _floor_digits(value: decimal.Decimal, digits: int) -> decimal.Decimal:
  quantum = decimal.Decimal(1).scaleb(value.adjusted() - digits + 1)
  return value.quantize(quantum, rounding=decimal.ROUND_FLOOR)


def shortest_decimal(low: float, high: float) -> str:
  """The decimal with the fewest significant digits whose float lies in (low, high] (high may be inf)."""
  for digits in range(1, 18):
    if math.isfinite(high):
      candidate = _floor_digits(decimal.Decimal(high), digits)
    elif math.isfinite(low):
      exact = decimal.Decimal(low)
      candidate = _floor_digits(exact, digits) + decimal.Decimal(1).scaleb(exact.adjusted() - digits + 1)
    else:
      return repr(high)
    if low < float(candidate) <= high:
      return format(candidate.normalize(), "f")
  return repr(high)


# -------------------------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class Selection:
  keep: int  # the count asked for
  threshold: str  # the printed --min_similarity
  kept: int  # what it keeps, counted by data.sources.wds.ScoreFilter
  samples: int  # indexed samples
  eligible: int  # samples with a similarity that pass the other filters
  filtered: dict  # {score: samples it rejects}, as prepare_data counts them
  score_filter: wds.ScoreFilter
  tars: int
  passes: int

  @property
  def flags(self) -> str:
    """The flags that keep `kept` samples, for prepare_data."""
    values = dataclasses.asdict(self.score_filter)
    return " ".join(
      f"--{name}={self.threshold if name == 'min_similarity' else repr(value)}"
      for name, value in values.items()
      if value is not None
    )

  def line(self, seconds: float) -> str:
    asked = f"asked for {self.keep:,}"
    if self.keep > self.eligible:
      asked += f", but only {self.eligible:,} have a similarity and pass the other filters"
    rejected = ", ".join(f"{name} {n:,}" for name, n in self.filtered.items())
    return (
      f"keep: {self.flags} keeps {self.kept:,} of {self.samples:,} samples ({self.kept / self.samples:.2%}; "
      f"{asked}); rejected: {rejected}; {self.passes} passes over {self.tars:,} indexes, {seconds:.1f} s"
    )

  def to_json(self) -> dict:
    return {
      "flags": self.flags,
      **dataclasses.asdict(self.score_filter),
      "kept": self.kept,
      "samples": self.samples,
      "keep": self.keep,
      "eligible": self.eligible,
      "filtered": self.filtered,
      "tars": self.tars,
    }


def _check_keep(keep: float) -> None:
  if not (keep > 0 and math.isfinite(keep)):
    raise UserError(f"--keep={keep:g}: expected a positive count of samples, or a fraction of them (<= 1)")
  if keep > 1 and keep != int(keep):
    raise UserError(f"--keep={keep:g}: a count above 1 must be whole (a fraction is at most 1)")


def keep_count(keep: float, samples: int) -> int:
  """--keep as a count of samples: itself, or the fraction it is of `samples` (rounded down) when <= 1."""
  count = math.floor(keep * samples) if keep <= 1 else int(keep)
  if count < 1:
    raise UserError(f"--keep={keep:g}: keeps no sample of the {samples:,} indexed")
  if count > samples:
    raise UserError(f"--keep={keep:g}: more than the {samples:,} indexed samples")
  return count


def _count_kept(scan: ScoreScan, score_filter: wds.ScoreFilter) -> tuple[int, dict]:
  """One pass: (the samples `score_filter` keeps, {score: samples it rejects})."""
  kept, filtered = 0, collections.Counter()
  for scores in scan.scores():
    reasons = score_filter.reasons(scores)
    kept += int(np.sum(reasons < 0))
    filtered.update(score_filter.count(reasons))
  return kept, {name: filtered[name] for name in score_filter.names}


def select(
  pattern: str,
  keep: float,
  others: wds.ScoreFilter = wds.ScoreFilter(),
  collect_limit: int = COLLECT_LIMIT,
  index_dir: str | None = None,
) -> Selection:
  """The --min_similarity that keeps the most samples of the indexed tars matching `pattern` (their indexes next
  to them, or under `index_dir`) not above `keep` (a count, or a fraction when <= 1), with `others`' pwatermark /
  punsafe conditions (its min_similarity unset)."""
  _check_keep(keep)
  tars = _matching_tars(pattern)
  scan = ScoreScan(pattern, tars, others, index_dir)
  counts = digit_counts(scan)
  count, eligible = keep_count(keep, scan.samples), int(counts.sum())
  if not eligible:
    raise UserError(
      f"--input={pattern}: none of the {scan.samples:,} indexed samples has a similarity"
      + (" and passes the other filters" if others else "")
    )
  if count >= eligible:
    low, high = -math.inf, order_statistic(scan, 0, counts, collect_limit)[0]
  else:
    low, high = order_statistic(scan, eligible - count - 1, counts, collect_limit)
  threshold = shortest_decimal(low, high)
  score_filter = dataclasses.replace(others, min_similarity=float(threshold))
  kept, filtered = _count_kept(scan, score_filter)
  return Selection(count, threshold, kept, scan.samples, eligible, filtered, score_filter, len(tars), scan.passes)


# ------------------------------------------------------------------------------------------------ the CLI


def shortfall_warning(selection: Selection, keep: float, expect: float) -> str | None:
  """The warning line when fewer samples are indexed than the `expect` the --keep value was chosen for: what
  share (or count) of them it keeps now, against what it would keep of `expect`; None when enough are."""
  if selection.samples >= expect:
    return None
  if keep <= 1:
    now, planned = f"{selection.kept:,} samples", f"{math.floor(keep * expect):,}"
  else:
    now, planned = f"{selection.kept / selection.samples:.2%} of them", f"{keep / expect:.2%}"
  return (
    f"warning: {selection.samples:,} samples indexed, fewer than the {int(expect):,} of --expect_samples (a "
    f"partial download?): --keep={keep:g} keeps {now}, not {planned}"
  )


def _check_expect(expect: float | None) -> None:
  if expect is not None and not (expect >= 1 and math.isfinite(expect) and expect == int(expect)):
    raise UserError(f"--expect_samples={expect:g}: expected a whole count of samples")


def _select_main(fv) -> None:
  explicit = [f"--{name}" for name in ("num_workers", "task_index", "task_count") if fv[name].present]
  if explicit:
    raise UserError(f"{', '.join(explicit)}: not with --keep (one process reads every index)")
  _check_expect(fv.expect_samples)
  start = time.monotonic()
  selection = select(
    fv.input, fv.keep, wds.ScoreFilter(None, fv.max_pwatermark, fv.max_punsafe), index_dir=fv.index_dir
  )
  if fv.selection_out:
    try:
      atomic.write_json(os.path.expanduser(fv.selection_out), {"input": fv.input, **selection.to_json()}, indent=1)
    except OSError as e:
      raise UserError(f"--selection_out={fv.selection_out}: cannot write ({e.strerror or e})") from e
  print(selection.line(time.monotonic() - start))
  warning = shortfall_warning(selection, fv.keep, fv.expect_samples) if fv.expect_samples else None
  if warning:
    print(warning, file=sys.stderr)


def _refused_text(left_out: dict) -> str:
  return f", {sum(left_out.values())} refused: {wds.reasons_text(left_out)}" if left_out else ""


def _index_main(fv) -> None:
  misplaced = [f"--{name}" for name in SELECT_FLAGS if fv[name].present]
  if misplaced:
    raise UserError(f"{', '.join(misplaced)}: only with --keep")
  start = time.monotonic()
  task = cluster_task.from_flags(fv)
  workers = (os.cpu_count() or 1) if fv.num_workers is None else fv.num_workers
  done = index_tars(fv.input, task=task, num_workers=workers, index_dir=fv.index_dir)
  print(
    f"index_tars: {task}: {done['indexed']} of its {done['tars']} tars indexed now ({done['samples']} samples, "
    f"{done['incomplete']} without an image left out{_refused_text(done['left_out'])}), the others were already, "
    f"{time.monotonic() - start:.1f} s"
  )


def _main(fv, rest: list[str]) -> None:
  if rest:
    raise UserError(f"unexpected arguments {rest}; all options are --flags")
  if not fv.input:
    raise UserError("--input: required (a glob of .tar files)")
  if fv.keep is None:
    _index_main(fv)
  else:
    _select_main(fv)


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), indexes or selects, prints the summary line; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
