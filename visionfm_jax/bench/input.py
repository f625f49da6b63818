r"""Input-pipeline benchmark: images/s per CPU core of our host decode + augment path against a bare decode + resize.

  python -m visionfm_jax.bench.input --config=configs/vit_huge.py[:variant] [--source=arrayrecord:GLOB]
      [--synthetic=512] [--synthetic_size=500x375] [--images=512] [--workers=0,2] [--batch_size=32]

Without --source it writes --synthetic JPEGs (smooth colour fields + noise, ~ImageNet file sizes) to a temp
dir as one ArrayRecord file, and the same JPEGs as an indexed img2dataset tar (the `wds:` source, read in place).
Every measurement reads the same records (record bytes included) after a warm-up:

  baseline        Image.open + convert('RGB') + resize to image_size^2 (bilinear), one process
  baseline_draft  the same with Pillow's JPEG draft mode at image_size (as a tuned loader does)
  ours_ops        transforms.train_transforms with config.data.augment, op by op, one process, fixed rng: the
                  host's part (decode, crop, RandAugment, and drawing the flip and colour-jitter parameters;
                  the device applies those, with the normalisation, in the train step)
  ours_loader/wN  pipeline.make_train_loader with N grain workers; per core = per worker (1 for N=0)
  synthetic set only, the same JPEGs through the `wds:` source against the ArrayRecord one:
  read_arrayrecord, read_wds       fetching a record (ArrayRecord's read + msgpack; the tar's indexed preads)
  ours_ops_wds, ours_loader_wds_wN ours_ops and ours_loader reading the tar

baseline, baseline_draft and ours_ops run interleaved, record by record (who goes first rotating), so that load
from other jobs falls on all three alike; the ratios ours_ops / baseline compare images/s (wall) and, in
brackets, images per CPU second (above 1: ours faster). Pillow decodes and resizes on the calling thread, and grain
reads records on threads even with 0 workers: the cpu/wall column (process CPU time over wall time, this process only,
so ~0 for loaders with workers) shows whether a one-core figure really used one core, and below 1 that the process
waited for a core. On a shared machine, run it a few times: other load lowers every figure.
Then, for reference, the device part (data/transforms/device_augment.augment under jit, on this process's jax
backend) on --batch_size images: milliseconds per image.
Prints a table, then, as the last line, one JSON object with every figure and the machine. Bad input
(config, source, flags) prints one line and exits with status 2.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import json
import math
import os
import platform
import sys
import tarfile
import tempfile
import time
from typing import Sequence

from absl import flags
import grain
import jax
from ml_collections import config_flags
import numpy as np
import PIL
from PIL import Image

from visionfm_jax import cli, config_lib
from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.sources import records, wds
from visionfm_jax.data.sources import registry as sources
from visionfm_jax.data.transforms import device_augment
from visionfm_jax.data.transforms import host as transforms
from visionfm_jax.errors import UserError

WARMUP = 16  # images (ops) or batches-worth of images (loader) before the clock starts


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant'.", flag_values=fv, lock_config=True
  )
  flags.DEFINE_string("source", "", "config.data.source override; default: a synthetic JPEG set.", flag_values=fv)
  flags.DEFINE_integer("synthetic", 512, "Synthetic JPEGs to write (without --source).", flag_values=fv)
  flags.DEFINE_string("synthetic_size", "500x375", "Synthetic image size WxH.", flag_values=fv)
  flags.DEFINE_integer("images", 512, "Images timed per measurement (records are reused cyclically).", flag_values=fv)
  flags.DEFINE_list("workers", ["0"], "grain worker counts for ours_loader.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "ours_loader batch size.", flag_values=fv)
  return fv


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, tint=(0.0, 0.0, 0.0)) -> bytes:
  """Three octaves of bicubically upsampled random colour grids plus pixel noise, JPEG quality 90; `tint`, an RGB
  offset added to every pixel, gives a class a colour a model can learn it by."""
  image = np.broadcast_to(np.asarray(tint, np.float32), (height, width, 3)).copy()
  for cells, weight in ((4, 0.6), (16, 0.2), (64, 0.2)):
    grid = rng.integers(0, 256, (max(2, cells * height // width), cells, 3), dtype=np.uint8)
    image += weight * np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), np.float32)
  image += rng.normal(0, 14, image.shape).astype(np.float32)
  return records.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90)


def write_synthetic(directory: str, count: int, width: int, height: int) -> tuple[str, int]:
  """(the source spec, mean JPEG bytes) of `count` labelled synthetic JPEGs in one ArrayRecord file."""
  rng = np.random.default_rng(0)
  jpegs = [synthetic_jpeg(rng, width, height) for _ in range(count)]
  path = os.path.join(directory, "train-00000-of-00001.array_record")
  records.write_records(path, ({"image": jpeg, "label": i % 10} for i, jpeg in enumerate(jpegs)))
  write_synthetic_tar(os.path.join(directory, "00000.tar"), jpegs)
  return f"arrayrecord:{path}", round(sum(map(len, jpegs)) / count)


def write_synthetic_tar(path: str, jpegs: list[bytes]) -> None:
  """`jpegs` as an img2dataset tar (`<key>.jpg`, `<key>.txt`), indexed for the `wds:` source."""
  with tarfile.open(path, "w") as archive:
    for i, jpeg in enumerate(jpegs):
      for name, data in ((f"{i:09d}.jpg", jpeg), (f"{i:09d}.txt", f"synthetic image {i}".encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
  wds.write_index(path)


class WithLabel:
  """A source whose records all have 'label' (0 when missing), so pair records fit the classification loader."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> dict:
    record = self.source[index]
    return record if "label" in record else {**record, "label": 0}

  def __repr__(self) -> str:
    return f"WithLabel({self.source!r})"


def bare_decode(record: dict, size: int, draft: bool) -> np.ndarray:
  with Image.open(io.BytesIO(record["image"])) as image:
    if draft:
      image.draft("RGB", (size, size))
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))


def apply_ops(ops: list, record: dict, rng: np.random.Generator, op_seconds: list) -> dict:
  for i, op in enumerate(ops):
    start = time.perf_counter()
    record = op.random_map(record, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(record)
    op_seconds[i] += time.perf_counter() - start
  return record


def _figures(count: int, cores: int, wall: float, cpu: float) -> dict:
  return dict(
    images=count,
    cores=cores,
    wall_s=round(wall, 4),
    cpu_s=round(cpu, 4),
    cpu_per_wall=round(cpu / wall, 3),
    images_per_s=round(count / wall, 2),
    images_per_s_per_core=round(count / wall / cores, 2),
  )


def _clocked(step, steps: int, cores: int) -> dict:
  """Calls step(i) for i < steps (each returns its image count); wall and process CPU time, images/s (/core)."""
  wall, cpu = time.perf_counter(), time.process_time()
  count = sum(step(i) for i in range(steps))
  return _figures(count, cores, time.perf_counter() - wall, time.process_time() - cpu)


def time_interleaved(fns: dict, count: int, images: int) -> dict:
  """{name: figures} of each fn(index) (which reads its record) on indexes 0, 1, ... (cyclically, below `count`),
  in this process, interleaved: every index goes through all of them in turn (who runs first rotating), so that
  load from other jobs falls on all alike. WARMUP untimed rounds, then `images` timed; each fn's own wall and
  process CPU time."""
  names = list(fns)
  for i in range(min(WARMUP, images)):
    for fn in fns.values():
      fn(i % count)
  wall, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
  for i in range(images):
    for k in range(len(names)):
      name = names[(i + k) % len(names)]
      w, c = time.perf_counter(), time.process_time()
      fns[name](i % count)
      wall[name] += time.perf_counter() - w
      cpu[name] += time.process_time() - c
  return {name: _figures(images, 1, wall[name], cpu[name]) for name in names}


def ops_timer(data_cfg) -> tuple:
  """(fn(record) running train_transforms' host ops with a fixed rng, fn(images) -> the mean milliseconds per
  image of each op)."""
  ops = transforms.train_transforms(data_cfg.image_size, data_cfg.augment, pipeline.train_decode_side(data_cfg))
  rng, op_seconds = np.random.default_rng(0), [0.0] * len(ops)

  def op_ms(images: int) -> dict:
    scale = 1e3 / (images + min(WARMUP, images))  # the warm-up rounds are in op_seconds too
    return {f"{i}:{type(op).__name__}": round(s * scale, 3) for i, (op, s) in enumerate(zip(ops, op_seconds))}

  return (lambda record: apply_ops(ops, record, rng, op_seconds)), op_ms


def time_device(data_cfg, images: int, batch_size: int) -> dict:
  """Milliseconds per image of device_augment.augment (jit, this process's default jax backend) on uint8
  batches of `batch_size` with the parameters the loader draws, after a compile + warm-up call."""
  rng = np.random.default_rng(0)
  side = data_cfg.image_size
  batch = {
    "image": rng.integers(0, 256, (batch_size, side, side, 3), dtype=np.uint8),
    **transforms.random_device_params(data_cfg.augment, batch_size, rng),
  }
  mean, std = (np.asarray(v, np.float32) * 255.0 for v in (data_cfg.mean, data_cfg.std))
  batch = jax.device_put(batch)
  fn = jax.jit(lambda b: device_augment.augment(b["image"], b, mean, std))
  fn(batch).block_until_ready()
  steps = math.ceil(images / batch_size)
  start = time.perf_counter()
  for _ in range(steps):
    fn(batch).block_until_ready()
  return dict(
    backend=jax.default_backend(),
    batch_size=batch_size,
    ms_per_image=round((time.perf_counter() - start) * 1e3 / (steps * batch_size), 4),
  )


def time_loader(data_cfg, source, images: int, workers: int, batch_size: int) -> dict:
  """ours_loader: ceil(images / batch_size) batches, timed after a warm-up and after the batches the workers
  prefetched meanwhile (their buffers would flatter the rate). The workers stop when the iterator is freed."""
  data_cfg = data_cfg.copy_and_resolve_references()
  data_cfg.num_workers = workers
  loader = pipeline.make_train_loader(
    data_cfg, batch_size=batch_size, seed=0, process_index=0, process_count=1, source=WithLabel(source)
  )
  iterator = iter(loader)
  for _ in range(math.ceil(WARMUP / batch_size) + workers * data_cfg.prefetch):
    next(iterator)
  return _clocked(lambda i: len(next(iterator)["image"]), math.ceil(images / batch_size), cores=max(1, workers))


def machine() -> dict:
  model = ""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  versions = {name: importlib.metadata.version(name) for name in ("grain", "numpy", "array_record")}
  return dict(
    cpu_count=os.cpu_count(),
    cpus_usable=len(os.sched_getaffinity(0)),
    cpu_model=model,
    python=platform.python_version(),
    pillow=PIL.__version__,
    **versions,
  )


def load_config(fv):
  if not fv["config"].present:
    raise UserError("--config: required (a config file, e.g. configs/vit_huge.py)")
  try:
    fv.config.data  # pylint: disable=pointless-statement; a config file that failed to load raises here
  except OSError as e:
    raise UserError(f"--config: {cli.last_line(e)}") from e
  config_lib.check_domains(fv.config)  # the --config.* overrides
  return fv.config


def _parse_args(fv) -> tuple[list[int], tuple[int, int]]:
  try:
    workers = [int(w) for w in fv.workers]
    width, height = (int(x) for x in fv.synthetic_size.lower().split("x"))
  except ValueError:
    raise UserError(
      f"--workers={','.join(fv.workers)} / --synthetic_size={fv.synthetic_size}: expected "
      f"integers like 0,2 and WxH like 500x375"
    ) from None
  if min(workers, default=0) < 0 or min(fv.images, fv.batch_size, fv.synthetic, width, height) <= 0:
    raise UserError("--workers must be >= 0; --images, --batch_size, --synthetic and its size positive")
  return workers, (width, height)


def run(
  config,
  source_spec: str,
  *,
  synthetic: int,
  size: tuple[int, int],
  images: int,
  workers: Sequence[int],
  batch_size: int,
) -> dict:
  data_cfg = config.data.copy_and_resolve_references()
  with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
    jpeg_bytes = None
    if not source_spec:
      source_spec, jpeg_bytes = write_synthetic(tmp, synthetic, *size)
    data_cfg.source = source_spec
    source = sources.build_source(source_spec, data_cfg.train_split, data_cfg)
    if not len(source) or not isinstance(source[0].get("image"), bytes):
      raise UserError(f"--source={source_spec}: no records, or records without encoded image bytes")
    side, count = data_cfg.image_size, len(source)
    ours, op_ms = ops_timer(data_cfg)
    fns = {
      "baseline": lambda i: bare_decode(source[i], side, False),
      "baseline_draft": lambda i: bare_decode(source[i], side, True),
      "ours_ops": lambda i: ours(source[i]),
    }
    tar_source = WithLabel(wds.WdsSource(os.path.join(tmp, "*.tar"))) if jpeg_bytes is not None else None
    if tar_source is not None:
      fns.update(
        read_arrayrecord=lambda i: source[i],
        read_wds=lambda i: tar_source[i],
        ours_ops_wds=lambda i: ours(tar_source[i]),
      )
    results = time_interleaved(fns, count, images)
    for w in workers:
      results[f"ours_loader_w{w}"] = time_loader(data_cfg, source, images, w, batch_size)
      if tar_source is not None:
        results[f"ours_loader_wds_w{w}"] = time_loader(data_cfg, tar_source, images, w, batch_size)
  device = time_device(data_cfg, images, batch_size)
  ratio = lambda key, base: round(results["ours_ops"][key] / results[base][key], 3)
  per_cpu_s_ratio = round(results["baseline"]["cpu_s"] / results["ours_ops"]["cpu_s"], 3)  # same image count
  return dict(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    machine=machine(),
    source=source_spec,
    records=count,
    image_size=side,
    augment=data_cfg.augment.to_dict(),
    decode_side=pipeline.train_decode_side(data_cfg),
    batch_size=batch_size,
    synthetic=None
    if jpeg_bytes is None
    else dict(count=synthetic, size=f"{size[0]}x{size[1]}", mean_jpeg_bytes=jpeg_bytes),
    results=results,
    ours_ops_ms_per_image=op_ms(images),
    device_augment=device,
    ratio_ours_ops_to_baseline=ratio("images_per_s", "baseline"),
    ratio_ours_ops_to_baseline_draft=ratio("images_per_s", "baseline_draft"),
    ratio_ours_ops_to_baseline_images_per_cpu_s=per_cpu_s_ratio,
    ratio_wds_to_arrayrecord=wds_ratios(results),
  )


def wds_ratios(results: dict) -> dict | None:
  """{measurement: its `wds:` figure's images/s per core over its ArrayRecord one's}; None without `wds:` ones."""
  pairs = {"read_arrayrecord": "read_wds", "ours_ops": "ours_ops_wds"}
  pairs.update(
    {name: name.replace("ours_loader_w", "ours_loader_wds_w") for name in results if name.startswith("ours_loader_w")}
  )
  ratios = {
    name: round(results[other]["images_per_s_per_core"] / results[name]["images_per_s_per_core"], 3)
    for name, other in pairs.items()
    if name in results and other in results
  }
  return ratios or None


def print_report(report: dict) -> None:
  print(f"{'measurement':<16} {'images':>6} {'cores':>5} {'images/s':>9} {'/core':>9} {'cpu/wall':>8}")
  for name, r in report["results"].items():
    print(
      f"{name:<16} {r['images']:>6} {r['cores']:>5} {r['images_per_s']:>9.1f} {r['images_per_s_per_core']:>9.1f} "
      f"{r['cpu_per_wall']:>8.2f}"
    )
  print(
    f"ours_ops / baseline = {report['ratio_ours_ops_to_baseline']:.3f} (images per CPU second: "
    f"{report['ratio_ours_ops_to_baseline_images_per_cpu_s']:.3f}), / baseline_draft = "
    f"{report['ratio_ours_ops_to_baseline_draft']:.3f}"
  )
  print("ours_ops ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in report["ours_ops_ms_per_image"].items()))
  if report["ratio_wds_to_arrayrecord"]:
    print(
      "wds / arrayrecord images/s per core: "
      + ", ".join(f"{k} {v:.3f}" for k, v in report["ratio_wds_to_arrayrecord"].items())
    )
  device = report["device_augment"]
  print(
    f"device part (device_augment.augment, jit on {device['backend']}, batch {device['batch_size']}): "
    f"{device['ms_per_image']:.3f} ms per image"
  )
  print(json.dumps(report, sort_keys=True))


def _main(fv, rest: list[str]) -> None:
  del rest
  config = load_config(fv)
  workers, size = _parse_args(fv)
  print_report(
    run(
      config, fv.source, synthetic=fv.synthetic, size=size, images=fv.images, workers=workers, batch_size=fv.batch_size
    )
  )


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), runs the benchmark, prints the report; returns the exit status."""
  return cli.run(argv, make_flags(), __doc__, _main)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
