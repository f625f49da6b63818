"""Delayed FP8 scaling (config.precision.gemm=fp8_delayed) as XLA's GPU compiler builds it for an H100, deviceless
(`python -m visionfm_jax.bench.roofline --target=h100 --dump_hlo`): every qkv, fc1 and fc2 GEMM of the blocks a
cuBLASLt FP8 call, the attention's output projection in bf16, and no pass of its own that reads an activation only for
its max or only to cast it to FP8 (each fuses into the op producing the activation), but for fc2's output gradient,
which XLA 0.10.2's Triton LayerNorm-backward fusion produces (models/fp8.py): at most one max and one cast a block.
The passes are printed (`-s`); a weight's max, a pass over the weight once a step, is not an activation's."""

import collections
import re
import subprocess
import sys

import pytest

from visionfm_jax.bench import hlo_cost

from test_gpu_plan import HAS_GPU_COMPILER, ROOT

pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs XLA's CUDA compiler: pip install -e '.[gpu-aot]'"),
]
BLOCK_GEMMS = ("attn/qkv", "mlp/fc1", "mlp/fc2")
_FUSION = re.compile(r"%[\w.\-]+ = (\S+|\(.*?\)) fusion\(.*?\), kind=\w+, calls=%([\w.\-]+).*?op_name=\"([^\"]*)\"")
ACTIVATION = 1 << 16  # elements: a pico ViT's smallest activation is 3,144 x 32; its amax histories 16 a layer
_CAST_OPS = {
  "parameter",
  "constant",
  "broadcast",
  "bitcast",
  "convert",
  "divide",
  "multiply",
  "clamp",
  "minimum",
  "maximum",
}


def _computations(text: str) -> dict[str, list[str]]:
  """{name: its instruction lines} of an HLO module's computations."""
  bodies, current = {}, None
  for line in text.splitlines():
    opened = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
    if opened:
      current = bodies.setdefault(opened.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
  return bodies


def _elements(shapes: str) -> list[int]:
  return [eval("*".join(dims.split(",")) or "1") for dims in re.findall(r"\w+\[([\d,]*)\]", shapes)]  # pylint: disable=eval-used


def standalone_passes(text: str) -> collections.Counter:
  """{('max' | 'cast', forward or backward, part): count} of the block fusions that read an activation only for its
  max (a reduction whose outputs are a small fraction of its largest input) or only cast it to FP8 (nothing but
  scaling, clamping and converting a parameter)."""
  bodies, passes = _computations(text), collections.Counter()
  for line in text.splitlines():
    fusion = _FUSION.search(line)
    part = next((p for p in BLOCK_GEMMS if fusion and f"blocks/{p}/" in fusion.group(3)), None)
    if part is None:
      continue
    shape, callee, op_name = fusion.groups()
    body = bodies.get(callee, [])
    ops = {m.group(1) for m in (re.search(r"= \S+ ([\w\-]+)\(", l) for l in body) if m}
    largest_input = max(
      (n for l in body if " parameter(" in l for n in _elements(l.split(" parameter(")[0])), default=0
    )
    direction = "backward" if "transpose(" in op_name else "forward"
    if largest_input < ACTIVATION or all("state_" in o for o in line.split(" fusion(")[1].split(")")[0].split(", ")):
      continue  # an amax history's max, or a weight's own max or cast
    if "reduce" in ops and max(_elements(shape)) * 64 <= largest_input and "reduce_max" in op_name:
      passes["max", direction, part] += 1
    elif "f8" in shape and ops <= _CAST_OPS:
      passes["cast", direction, part] += 1
  return passes


def test_qkv_fc1_and_fc2_are_fp8_cublaslt_gemms_and_their_casts_and_maxes_fuse_into_their_producers(tmp_path):
  dump = tmp_path / "step.hlo"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "visionfm_jax.bench.roofline",
      "--config=configs/vit_huge.py",
      "--target=h100",
      "--config.model.variant=pico/8",
      "--config.precision.gemm=fp8_delayed",
      "--config.strategy=ddp",
      "--config.global_batch_size=4",
      f"--dump_hlo={dump}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = dump.read_text()
  gemms = [k for k in hlo_cost.Program(text).kernels if k.kind == "gemm" and "blocks/" in k.label]
  layers = len([k for k in gemms if "attn/out" in k.label]) // 3
  assert layers
  for part in BLOCK_GEMMS:  # forward e4m3 x e4m3, input gradient e5m2 x e4m3, weight gradient e4m3 x e5m2
    dtypes = collections.Counter(k.dtype for k in gemms if part in k.label)
    assert dtypes == collections.Counter({"f8e4m3fn": 2 * layers, "f8e5m2": layers}), (part, dtypes)
  assert {k.dtype for k in gemms if "attn/out" in k.label} == {"bf16"}
  assert text.count('custom_call_target="__cublas$lt$matmul$f8"') == 3 * len(BLOCK_GEMMS) * layers
  passes = standalone_passes(text)
  print(f"{layers} layers, standalone passes: {dict(passes)}")
  assert set(passes) <= {("max", "backward", "mlp/fc2"), ("cast", "backward", "mlp/fc2")}, passes
  assert max(passes.values(), default=0) <= layers, passes
