r"""What a checkpoint's digests cost (training/checkpoint_digests.py): hashing speed, and the time of a save and a
restore with and without them, on a train state of ViT-H/14's shapes.

  python -m visionfm_jax.bench.checkpoint_digests [--params=632e6] [--repeats=3] [--dir=/tmp/visionfm_digests]

The state is what AdamW trains a ViT-H/14 with: its params in fp32 (blocks stacked as `nn.scan` stacks them, 1280
wide, MLP 5120, as many blocks as `--params` asks for: 32 for ViT-H/14's 632M) and the two moments mu and nu of the
same shapes, filled with random bytes, on this process's devices. Printed, one line each, then one JSON line:

  digest GB/s       the state's bytes over the time to digest them all, on one thread and on the threads a save
                    and a restore use
  save blocking     seconds `Checkpointer.save` holds the caller (the training thread), with and without digests
  save committed    seconds until the step has committed (`Checkpointer.wait`), with and without
  restore           seconds of `Checkpointer.restore` of the same checkpoint, checking its digests or not
  verify            seconds of the check alone (`checkpoint_digests.verify` on a restored state)

Each save writes a fresh step under `--dir` (deleted after); each figure is the best of `--repeats` (the range in
brackets), the kinds taking turns to go first. The restores
read a checkpoint just written, from the page cache as far as it holds it: a cold read from a disk or a cluster
file system adds the same read time to both.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time

from absl import flags
import jax
import numpy as np

from visionfm_jax import cli
from visionfm_jax.errors import UserError
from visionfm_jax.training import checkpoint, checkpoint_digests

WIDTH, MLP, PATCH_INPUTS, TOKENS = 1280, 5120, 14 * 14 * 3, 257  # ViT-H/14 at 224 px
_BLOCK_SHAPES = {
  "qkv/kernel": (WIDTH, 3 * WIDTH),
  "qkv/bias": (3 * WIDTH,),
  "out/kernel": (WIDTH, WIDTH),
  "out/bias": (WIDTH,),
  "fc1/kernel": (WIDTH, MLP),
  "fc1/bias": (MLP,),
  "fc2/kernel": (MLP, WIDTH),
  "fc2/bias": (WIDTH,),
  "norm1/scale": (WIDTH,),
  "norm1/bias": (WIDTH,),
  "norm2/scale": (WIDTH,),
  "norm2/bias": (WIDTH,),
}
_OTHER_SHAPES = {
  "patch_embed/kernel": (PATCH_INPUTS, WIDTH),
  "patch_embed/bias": (WIDTH,),
  "pos_embed": (TOKENS, WIDTH),
  "cls_token": (WIDTH,),
  "norm/scale": (WIDTH,),
  "norm/bias": (WIDTH,),
}


def _count(shape) -> int:
  return int(np.prod(shape))


def param_shapes(params: float) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a ViT of width 1280 with as many stacked blocks as come closest to `params` (at least one)."""
  per_block = sum(_count(s) for s in _BLOCK_SHAPES.values())
  rest = sum(_count(s) for s in _OTHER_SHAPES.values())
  depth = max(1, round((params - rest) / per_block))
  return {**{f"blocks/{k}": (depth,) + s for k, s in _BLOCK_SHAPES.items()}, **_OTHER_SHAPES}


def make_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
  """{'params', 'opt_state': {'mu', 'nu'}} of fp32 arrays of `shapes`, random, on the default device, built one
  array at a time (the host copy of each freed before the next)."""
  rng = np.random.default_rng(seed)

  def tree():
    return {path: jax.device_put(rng.random(shape, dtype=np.float32)) for path, shape in shapes.items()}

  return {"params": tree(), "opt_state": {"mu": tree(), "nu": tree()}}


def _nbytes(state) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def digest_rates(state) -> dict[str, float]:
  """GB/s of digesting `state` (its host copies as a save takes them) on one thread and on the save's threads."""
  arrays = checkpoint_digests.host_arrays(state)
  size = _nbytes(state) / 1e9
  start = time.perf_counter()
  for array in arrays.values():
    for piece in array.pieces.values():
      checkpoint_digests.digest(piece)
  one = size / (time.perf_counter() - start)
  start = time.perf_counter()
  checkpoint_digests.record(arrays)
  threads = size / (time.perf_counter() - start)
  return {"digest_gb_per_s_1_thread": one, f"digest_gb_per_s_{checkpoint_digests.HASH_THREADS}_threads": threads}


def time_save(state, directory: str, with_digests: bool) -> tuple[float, float]:
  """(seconds save() blocks, seconds until committed) of one asynchronous save of `state` to a fresh `directory`."""
  shutil.rmtree(directory, ignore_errors=True)
  ckpt = checkpoint.Checkpointer(directory, keep=1, with_digests=with_digests)
  start = time.perf_counter()
  ckpt.save(1, state)
  blocking = time.perf_counter() - start
  ckpt.wait()
  committed = time.perf_counter() - start
  ckpt.close()
  return blocking, committed


def time_restore(directory: str, target, with_digests: bool) -> tuple[float, float]:
  """(seconds of one restore of `directory`'s step 1 into `target`, seconds of checking the restored state against
  its digests alone: within the first `with_digests`, after it otherwise)."""
  ckpt = checkpoint.Checkpointer(directory, keep=1, with_digests=with_digests)
  start = time.perf_counter()
  restored = ckpt.restore(1, target)
  jax.block_until_ready(restored)
  seconds = time.perf_counter() - start
  ckpt.close()
  start = time.perf_counter()
  verdict = checkpoint_digests.verify(
    checkpoint_digests.read(os.path.join(directory, "1", checkpoint_digests.ITEM)), restored
  )
  checking = time.perf_counter() - start
  assert not verdict.mismatched and not verdict.unverified, verdict
  del restored
  gc.collect()
  return seconds, checking


def run(params: float, repeats: int, directory: str) -> dict:
  shapes = param_shapes(params)
  state = make_state(shapes)
  result = {
    "params": sum(_count(s) for s in shapes.values()),
    "state_gb": _nbytes(state) / 1e9,
    "devices": jax.device_count(),
    "cpus": os.cpu_count(),
    **digest_rates(state),
  }
  saves = {True: [], False: []}
  for round_ in range(repeats):
    for kind in (False, True) if round_ % 2 else (True, False):  # each kind first in every other round
      saves[kind].append(time_save(state, os.path.join(directory, "with" if kind else "without"), kind))
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  del state
  gc.collect()
  restores = {True: [], False: []}
  for round_ in range(repeats):
    for kind in (False, True) if round_ % 2 else (True, False):
      restores[kind].append(time_restore(os.path.join(directory, "with"), target, kind))
  shutil.rmtree(directory, ignore_errors=True)
  for kind, name in ((True, "with"), (False, "without")):
    for figure, values in (
      ("save_blocking_s", [b for b, _ in saves[kind]]),
      ("save_committed_s", [c for _, c in saves[kind]]),
      ("restore_s", [r for r, _ in restores[kind]]),
    ):
      result[f"{figure}_{name}"] = min(values)
      result[f"{figure}_{name}_all"] = values
  result["verify_s"] = min(v for _, v in restores[False] + restores[True])
  return result


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_float(
    "params",
    632e6,
    "parameters of the ViT whose fp32 params and AdamW moments are saved",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "repeats", 3, "saves and restores of each kind (the best is reported)", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_string(
    "dir", "/tmp/visionfm_digests", "where the checkpoints are written (deleted after)", flag_values=fv
  )
  return fv


def _body(fv, rest):
  cli.check_args(fv, rest)
  if os.path.exists(fv.dir) and os.listdir(fv.dir):
    raise UserError(f"--dir={fv.dir}: not empty (the benchmark writes and deletes checkpoints there)")
  result = run(fv.params, fv.repeats, fv.dir)
  print(
    f"state: {result['params']:,} params, {result['state_gb']:.2f} GB with AdamW's mu and nu (fp32), "
    f"{result['devices']} device(s), {result['cpus']} CPUs"
  )
  for name, value in result.items():
    if name.startswith("digest_"):
      print(f"{name}: {value:.2f}")
  for kind in ("save_blocking_s", "save_committed_s", "restore_s"):
    spread = {
      name: "-".join(f"{v:.2f}" for v in (min(result[f"{kind}_{name}_all"]), max(result[f"{kind}_{name}_all"])))
      for name in ("with", "without")
    }
    print(
      f"{kind}: {result[kind + '_with']:.2f} with digests ({spread['with']}), {result[kind + '_without']:.2f} "
      f"without ({spread['without']})"
    )
  print(f"verify_s: {result['verify_s']:.2f} (the restored state's digests computed and compared, alone)")
  print(json.dumps(result))


def main(argv) -> int:
  return cli.run(argv, make_flags(), __doc__, _body)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
