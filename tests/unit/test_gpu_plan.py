"""GPU planning without a GPU: the kernels of a compiled program (bench/hlo_cost.py), the roofline's prices and
their calibration (bench/roofline.py), the GPU targets (bench/gpu_target.py) and 'auto' attention.

The two programs under tests/data are XLA's own output: the train step of a pico ViT (2 blocks, width 32, bf16,
no remat, cuDNN attention by 'auto') compiled deviceless for one H100 and, under zero3, for 16 H100s on two
nodes, written by

  python -m visionfm_jax.bench.roofline --config=configs/vit_huge.py:demo --config.model.variant=pico/8 \
      --config.precision.compute_dtype=bfloat16 --config.model.remat_policy=none --config.strategy=ddp \
      --config.global_batch_size=4 --dump_hlo=tests/data/pico_vit_h100.hlo.gz
  (and --devices=16 --config.strategy=zero3 --config.global_batch_size=16 for the second)

with jax 0.10.2 and its CUDA plugin (`pip install -e '.[gpu-aot]'`). Tests that compile for a GPU themselves
skip where that plugin is absent (CI); BUILD.md ("Tested") records their run where it is present.
"""

import dataclasses
import gzip
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from visionfm_jax import config_lib, models
from visionfm_jax.bench import gpu_target, hlo_cost, memory_plan, roofline
from visionfm_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data")
HAS_GPU_COMPILER = any(
  importlib.util.find_spec(p.split(".")[0]) and importlib.util.find_spec(p) for p in gpu_target.PLUGINS
)


def _program(name: str) -> hlo_cost.Program:
  with gzip.open(os.path.join(DATA, name), "rt", encoding="utf-8") as f:
    return hlo_cost.Program(f.read())


def _pico_forward_flops(batch: int) -> tuple[float, float]:
  """(dense matmul FLOPs, attention FLOPs) of the pico ViT/8's forward pass at 32 px on `batch` images: width 32,
  2 blocks of MLP 64 and 2 heads, 16 patches + 1 class token, 8 classes, 8x8x3 patches. cuDNN takes even token
  counts, so the ViT pads its 17 tokens to 18 once before its blocks (kernels.pad_tokens): the blocks' products
  run on 18 tokens."""
  tokens, width, mlp, depth, classes = 18, 32, 64, 2, 8
  per_block = 2 * tokens * width * (3 * width + width + 2 * mlp)
  dense = batch * (depth * per_block + 2 * width * classes)
  patches = batch * 2 * 16 * (8 * 8 * 3) * width
  attention = batch * depth * 4 * tokens * tokens * width
  return dense, patches, attention


def test_loop_bodies_count_by_their_trip_counts():
  """A scan of 5 (32 x 64) @ (64 x 64) products, differentiated: 3 products per step (y, dx, dW), 5 steps."""

  def loss(weights, x):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, weights)[0].sum()

  compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((5, 64, 64)), jnp.ones((32, 64))).compile()
  program = hlo_cost.Program(compiled.as_text())
  assert program.total_flops() == 3 * 5 * 2 * 32 * 64 * 64
  assert {k.count for k in program.kernels if k.kind == "gemm"} == {5}


def test_the_gpu_program_holds_cublas_gemms_and_cudnn_attention_of_the_models_flops():
  program = _program("pico_vit_h100.hlo.gz")
  kinds = {k.kind for k in program.kernels}
  assert {"gemm", "attention", "convolution", "elementwise", "reduction"} <= kinds
  by_kind = lambda kind: sum(k.flops * k.count for k in program.kernels if k.kind == kind)
  dense, patches, attention = _pico_forward_flops(batch=4)
  # no remat: forward, input gradient and weight gradient of every product, the patch embedding's input
  # gradient excepted (images need none); attention: the forward and cuDNN's backward (2.5x the forward)
  assert by_kind("gemm") == pytest.approx(3 * dense, rel=1e-9)
  assert by_kind("convolution") == pytest.approx(2 * patches, rel=1e-9)
  assert by_kind("attention") == pytest.approx(3.5 * attention, rel=1e-9)
  assert all(k.dtype == "bf16" for k in program.kernels if k.kind == "attention")


def test_collectives_of_a_two_node_zero3_program_span_nodes_and_overlap_compute():
  program = _program("pico_vit_zero3_16xh100.hlo.gz")
  collectives = [k for k in program.kernels if k.kind == "collective"]
  assert {k.collective for k in collectives} >= {"all-gather", "reduce-scatter"}
  assert all(k.group_size == 16 and k.group_spans_nodes for k in collectives)
  gathers = [k for k in collectives if k.collective == "all-gather" and "blocks" in k.label]
  assert gathers and all(k.count == 2 for k in gathers)  # inside the 2-block scans
  assert any(k.overlap for k in gathers)


def test_the_planner_prices_a_gpu_program_with_the_roofline():
  """memory_plan ranks a GPU target's candidates by this prediction: the two-node zero3 program's gathers and
  reduce-scatters cross the network, so some of them stay exposed."""
  predicted = memory_plan.predicted_step(_program("pico_vit_zero3_16xh100.hlo.gz"), "h100")
  assert predicted["predicted_step_s"] > predicted["exposed_collective_s"] > 0


def test_mesh_replica_groups_name_their_devices():
  spans = lambda axes, grouped, per_node=8: hlo_cost._mesh_group(axes, grouped, per_node)  # pylint: disable=protected-access
  assert spans("'a'=2,'b'=8", "'b'") == (8, False)  # within a node
  assert spans("'a'=2,'b'=8", "'a'") == (2, True)  # devices 0 and 8
  assert spans("'a'=16", "'a'") == (16, True)


# As XLA's GPU compiler writes a (data 16 across nodes, fsdp 8 within) mesh's collectives: its mesh positions are the
# devices of a transposed iota, so fsdp's groups are 8 neighbours on one node and data's 16 devices 8 apart.
HYBRID_GROUPS = (
  "replica_groups=mesh['axis_0'=8,'axis_1'=1,'axis_2'=16], device_ids=([16,8]T(1,0)) {{'{axis}'}}, "
  "use_global_device_ids=true, to_apply=%add.4"
)


def test_mesh_replica_groups_over_reordered_devices_name_their_devices():
  group = lambda attrs: hlo_cost._group(attrs, 8)  # pylint: disable=protected-access
  assert group(HYBRID_GROUPS.format(axis="axis_0")) == (8, False)
  assert group(HYBRID_GROUPS.format(axis="axis_2")) == (16, True)
  assert hlo_cost._device_order("[16,8]T(1,0)", 128)[:3] == [0, 8, 16]  # pylint: disable=protected-access
  assert hlo_cost._device_order("[4,2]", 8) == list(range(8))  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="replica groups this reader does not know"):
    group("replica_groups=mesh['a'=8], devices=(?) {'a'}")


def test_a_collective_hidden_by_the_kernels_between_its_start_and_done_adds_nothing():
  target = gpu_target.get("h100")
  prices = roofline.Prices(gemm=0.5, attention=0.5, memory=0.5, launch_us=0.0)
  gemm = hlo_cost.Kernel("gemm", "gemm", 2e12, 0.0, 1, "", dtype="bf16")
  gather = hlo_cost.Kernel(
    "ag", "collective", 0.0, 8e9, 1, "", collective="all-gather", group_size=16, group_spans_nodes=True
  )
  program = type("P", (), {"kernels": [gather, gemm]})()  # the gather, then the GEMM it could hide behind
  compute = 2e12 / (989e12 * 0.5)
  transfer = 8e9 * 15 / 16 / target.network_bandwidth
  exposed = roofline.predict(program, target, prices)["exposed_collective_s"]
  assert exposed == pytest.approx(transfer)  # nothing between start and done
  gather.overlap = [1]
  assert roofline.predict(program, target, prices)["exposed_collective_s"] == pytest.approx(
    max(0.0, transfer - compute)
  )


def test_collectives_in_flight_together_run_one_after_another():
  """Two gathers started before one GEMM and done after it: the second transfers after the first (XLA's GPU runtime
  issues collectives on one stream), whether they cross one link or NVLink and the network."""
  target = gpu_target.get("h100")
  prices = roofline.Prices(gemm=0.5, attention=0.5, memory=0.5, launch_us=0.0)
  compute = 2e12 / (989e12 * 0.5)

  def exposed(spans_first: bool, spans_second: bool) -> float:
    gathers = [
      hlo_cost.Kernel(
        f"ag{i}",
        "collective",
        0.0,
        2e9,
        1,
        "",
        collective="all-gather",
        group_size=8,
        group_spans_nodes=spans,
        overlap=[2],
        done=3,
      )
      for i, spans in enumerate((spans_first, spans_second))
    ]
    program = type("P", (), {"kernels": [*gathers, hlo_cost.Kernel("gemm", "gemm", 2e12, 0.0, 1, "", dtype="bf16")]})()
    return roofline.predict(program, target, prices)["exposed_collective_s"]

  nvlink, network = (2e9 * 7 / 8 / bandwidth for bandwidth in (target.nvlink_bandwidth, target.network_bandwidth))
  assert nvlink < compute < 2 * nvlink  # hidden alone, not both one after the other
  assert exposed(False, False) == pytest.approx(2 * nvlink - compute)
  assert exposed(False, True) == pytest.approx(nvlink + network - compute)
  assert exposed(True, True) == pytest.approx(2 * network - compute)


def test_the_fit_recovers_the_prices_that_made_the_measurements():
  """Step times made with known prices from two real programs and scaled copies of their kernels: the fit returns
  prices that predict every one of them."""
  target = gpu_target.get("h100")
  truth = roofline.Prices(gemm=0.62, attention=0.41, memory=0.7, launch_us=4.0)
  setups = []
  for name in ("pico_vit_h100.hlo.gz", "pico_vit_zero3_16xh100.hlo.gz"):
    program = _program(name)
    for scale in (1.0, 3e4, 1e6):  # tiny programs are launch-bound, scaled ones bound by FLOPs or bytes
      scaled = type(
        "P",
        (),
        {
          "kernels": [
            dataclasses.replace(k, flops=k.flops * scale, bytes=k.bytes * scale**0.8) for k in program.kernels
          ]
        },
      )()
      setups.append(roofline.Compiled(scaled, 0, None, 1, target))
  measured = [roofline.predict(s.program, target, truth)["step_s"] for s in setups]
  fitted = roofline.fit(setups, measured, roofline.Prices())
  for setup, step in zip(setups, measured):
    assert roofline.predict(setup.program, target, fitted)["step_s"] == pytest.approx(step, rel=0.01)


def test_fp8_gemms_get_their_own_price_once_a_row_has_them():
  """Rows whose GEMMs run in FP8 beside rows in bf16 (scaled to be bound by their FLOPs): the fit finds FP8's own
  efficiency (of the FP8 peak), and without FP8 rows FP8 GEMMs are priced as bf16 ones are."""
  target = gpu_target.get("h100")
  truth = roofline.Prices(gemm=0.6, attention=0.4, memory=0.8, launch_us=3.0, gemm_fp8=0.3)
  program = _program("pico_vit_h100.hlo.gz")
  setups = []
  for scale, dtype in [(s, d) for s in (1.0, 3e4, 1e6) for d in ("bf16", "f8e4m3fn")]:
    kernels = [
      dataclasses.replace(
        k, flops=k.flops * scale, bytes=k.bytes * scale**0.6, dtype=dtype if k.kind == "gemm" else k.dtype
      )
      for k in program.kernels
    ]
    setups.append(roofline.Compiled(type("P", (), {"kernels": kernels})(), 0, None, 1, target))
  measured = [roofline.predict(s.program, target, truth)["step_s"] for s in setups]
  fitted = roofline.fit(setups, measured, roofline.Prices())
  assert fitted.gemm_fp8 == pytest.approx(0.3, rel=0.05) and fitted.gemm == pytest.approx(0.6, rel=0.05)
  # only gemm_fp8 free: the other prices stay as given
  partial = roofline.fit(setups, measured, dataclasses.replace(truth, gemm_fp8=None), free=["gemm_fp8"])
  assert partial.gemm_fp8 == pytest.approx(0.3, rel=0.02) and (partial.gemm, partial.memory) == (0.6, 0.8)
  bf16_only = roofline.fit(setups[::2], measured[::2], roofline.Prices())
  assert bf16_only.gemm_fp8 is None
  as_bf16 = dataclasses.replace(bf16_only, gemm_fp8=bf16_only.gemm)
  assert roofline.predict(setups[-1].program, target, bf16_only)["step_s"] == pytest.approx(
    roofline.predict(setups[-1].program, target, as_bf16)["step_s"]
  )


def test_the_calibration_on_file_covers_every_measured_row():
  prices, record = roofline.load_prices()
  with open(roofline.MEASURED, encoding="utf-8") as f:
    rows = __import__("json").load(f)["rows"]
  assert record["target"] == "h100" and [r["label"] for r in record["rows"]] == [r["label"] for r in rows]
  assert 0 < prices.gemm <= 1 and 0 < prices.attention <= 1 and 0 < prices.memory <= 1
  assert 0 < prices.gemm_fp8 <= 1  # an FP8 row is measured
  for row in record["rows"]:
    assert 0.5 < row["estimate_ms"] / row["measured_ms"] < 2.0


@pytest.mark.parametrize(
  "platform,dtype,attention",
  [
    ("gpu", jnp.bfloat16, "cudnn"),
    ("gpu", jnp.float16, "cudnn"),
    ("gpu", jnp.float32, "softmax"),
    ("cpu", jnp.bfloat16, "softmax"),
  ],
)
def test_auto_attention_resolves_for_the_mesh_platform_in_every_tower(platform, dtype, attention):
  model_cfg = config_lib.model_config("aurora")
  resolved = models.for_platform(model_cfg, platform, dtype)
  assert resolved.encoder.attention == resolved.text.attention == attention
  assert model_cfg.encoder.attention == "auto"  # the config itself is left as written
  clip = models.for_platform(config_lib.model_config("clip"), platform, dtype)
  assert clip.image.attention == clip.text.attention == attention
  explicit = config_lib.model_config("vit")
  explicit.attention = "softmax"
  assert models.for_platform(explicit, platform, dtype).attention == "softmax"


def test_a_module_reads_its_attention_and_never_resolves_auto_itself():
  """The backend is asked once, at build: a module given 'auto' (built around models.build) says so."""
  images = jnp.zeros((1, 8, 8, 3))
  model = vit.ViT(width=8, depth=1, mlp_dim=16, num_heads=1, patch_size=4, image_size=8, attention="auto")
  with pytest.raises(ValueError, match="models.build resolves it"):
    model.init(jax.random.key(0), images)
  built = models.build(config_lib.model_config("vit"), jnp.float32, platform="cpu")
  assert built.attention == "softmax"


def test_an_unknown_target_and_a_partial_node_are_config_errors():
  with pytest.raises(Exception, match="--target=b200: expected one of"):
    gpu_target.get("b200")
  with pytest.raises(Exception, match="--devices=12: not a whole number of 8-GPU nodes"):
    gpu_target.topology_string(12, 8)
  assert gpu_target.topology_string(4, 8) == "1x1x4" and gpu_target.topology_string(128, 8) == "1x16x8"


def test_each_target_names_launch_flags_this_xla_parses():
  for target in gpu_target.TARGETS.values():
    flags = gpu_target.launch_flags(target)
    assert any(f.startswith("--xla_gpu_enable_latency_hiding_scheduler=") for f in flags), target.name
    assert os.path.exists(target.spec_file)


def _fields(message: bytes) -> dict[int, list]:
  """A protobuf message's fields by number: varints as ints, length-delimited ones as bytes (the wire format)."""

  def varint(at):
    value, shift = 0, 0
    while True:
      byte = message[at]
      value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
      if byte < 0x80:
        return value, at

  fields, at = {}, 0
  while at < len(message):
    key, at = varint(at)
    if key & 7 == 0:
      value, at = varint(at)
    elif key & 7 == 2:
      length, at = varint(at)
      value, at = message[at : at + length], at + length
    else:  # fixed 64 (1) or 32 (5) bits: doubles and floats
      width = {1: 8, 5: 4}[key & 7]
      value, at = message[at : at + width], at + width
    fields.setdefault(key >> 3, []).append(value)
  return fields


def test_compile_options_carry_the_launch_memory_and_keep_their_other_fields():
  from jax._src import compiler  # pylint: disable=g-import-not-at-top

  options = compiler.get_compile_options(num_replicas=1, num_partitions=8)
  size = gpu_target.launch_memory_bytes(gpu_target.get("a100"))
  assert size == int(85051572224 * 0.92)
  patched = gpu_target.with_device_memory_size(options, size)
  assert patched.num_partitions == 8 and patched.executable_build_options.use_spmd_partitioning
  build = _fields(patched.SerializeAsString())[3]
  assert len(build) == 1 and _fields(build[0])[15] == [size]  # ExecutableBuildOptionsProto.device_memory_size
  assert 15 not in _fields(_fields(options.SerializeAsString())[3][0])
  with pytest.raises(ValueError, match="device memory size 0"):
    gpu_target.with_device_memory_size(options, 0)
  with gpu_target.launch_memory(gpu_target.get("a100")):
    inside = compiler.get_compile_options(num_replicas=1, num_partitions=8)
  assert _fields(_fields(inside.SerializeAsString())[3][0])[15] == [size]
  assert 15 not in _fields(_fields(compiler.get_compile_options(1, 8).SerializeAsString())[3][0])


@pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs XLA's CUDA compiler (pip install -e '.[gpu-aot]')")
def test_a_deviceless_compile_plans_within_the_memory_its_launch_may_use():
  """32 layers whose backward keeps 32 activations of 2 GiB, 64 GiB on an H100: over the 80% of its memory XLA
  assumes without a device, within the 92% the launch's allocator holds. Without the launch's figure XLA recomputes
  matmuls in the backward that the job would not."""
  device = jax.sharding.SingleDeviceSharding(gpu_target.devices(gpu_target.get("h100"), 1)[0])
  rows, width, depth = 1 << 18, 4096, 32

  def loss(x, weights):
    for w in weights:
      x = jnp.tanh(x @ w)
    return x.sum()

  lower = lambda: jax.jit(jax.grad(loss, argnums=1)).lower(  # lowered anew: JAX caches a lowering's executable
    jax.ShapeDtypeStruct((rows, width), jnp.bfloat16, sharding=device),
    [jax.ShapeDtypeStruct((width, width), jnp.bfloat16, sharding=device)] * depth,
  )
  dots = lambda compiled: compiled.as_text().count(" dot(")
  assumed = lower().compile()
  with gpu_target.launch_memory(gpu_target.get("h100")):
    launched = lower().compile()
  assert dots(launched) == 3 * depth  # forward, input and weight gradients: nothing recomputed
  assert dots(assumed) > dots(launched)
  assert launched.memory_analysis().temp_size_in_bytes >= depth * rows * width * 2
  assert assumed.memory_analysis().temp_size_in_bytes < launched.memory_analysis().temp_size_in_bytes


PEELED_LOOP = """HloModule peeled, is_scheduled=true

%fused_compare (param_0: s32[]) -> pred[] {
  %param_0 = s32[] parameter(0)
  %constant_7 = s32[] constant(7)
  ROOT %compare = pred[] compare(%param_0, %constant_7), direction=LT
}

%condition (cond_param: (s32[], f32[64,64])) -> pred[] {
  %cond_param = (s32[], f32[64,64]{1,0}) parameter(0)
  %counter = s32[] get-tuple-element(%cond_param), index=0
  ROOT %loop_compare_fusion = pred[] fusion(%counter), kind=kLoop, calls=%fused_compare
}

%body (body_param: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %body_param = (s32[], f32[64,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%body_param), index=0
  %x = f32[64,64]{1,0} get-tuple-element(%body_param), index=1
  %product = f32[64,64]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[64,64]{1,0}) tuple(%next, %product)
}

ENTRY %main (x: f32[64,64]) -> f32[64,64] {
  %x = f32[64,64]{1,0} parameter(0)
  %start = s32[] constant(1)
  %init = (s32[], f32[64,64]{1,0}) tuple(%start, %x)
  %loop = (s32[], f32[64,64]{1,0}) while(%init), condition=%condition, body=%body
  ROOT %result = f32[64,64]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_a_loop_without_a_known_trip_count_is_counted_from_its_condition():
  """XLA leaves `known_trip_count` off some loops (Aurora's 64-GPU program: the micro-batch loop, its first
  iteration peeled, runs `i < 7` from 0); counting such a body once undercounted that step 2.8x. Here the counter
  runs from 1 while i < 7: 6 trips."""
  program = hlo_cost.Program(PEELED_LOOP)
  assert program.total_flops() == 6 * 2 * 64**3 and not program.uncounted_loops
  unreadable = hlo_cost.Program(PEELED_LOOP.replace("direction=LT", "direction=NE"))
  assert unreadable.total_flops() == 2 * 64**3 and unreadable.uncounted_loops == ["loop"]


SLICED_THROUGH_A_BITCAST = """
HloModule sliced

%fused_slice (param_0: bf16[21,1,64,128], param_1: s32[]) -> bf16[128,1,1,64] {
  %param_0 = bf16[21,1,64,128]{2,1,0,3} parameter(0)
  %bitcast = bf16[128,21,1,64]{3,2,1,0} bitcast(%param_0)
  %zero = s32[] constant(0)
  %param_1 = s32[] parameter(1)
  ROOT %slice = bf16[128,1,1,64]{3,2,1,0} dynamic-slice(%bitcast, %zero, %param_1, %zero, %zero), \
dynamic_slice_sizes={128,1,1,64}
}

ENTRY %main (stack: bf16[21,1,64,128], i: s32[]) -> bf16[128,1,1,64] {
  %stack = bf16[21,1,64,128]{2,1,0,3} parameter(0)
  %i = s32[] parameter(1)
  ROOT %layer = bf16[128,1,1,64]{3,2,1,0} fusion(%stack, %i), kind=kLoop, calls=%fused_slice
}
"""


def test_a_layer_sliced_from_a_stack_through_a_bitcast_reads_the_layer_only():
  """A scanned stack's saved activations in a transposed layout reach their dynamic-slice through a bitcast
  (Aurora's hybrid-mesh program): the kernel reads one layer (and writes it), not the 21-layer stack."""
  layer = 128 * 64 * 2
  [kernel] = [k for k in hlo_cost.Program(SLICED_THROUGH_A_BITCAST).kernels if k.name == "layer"]
  assert kernel.bytes == 2 * layer + 4


CAST_THEN_SLICED = """
HloModule cast_then_sliced

%fused_quantize (param_0: f32[32,64,128]) -> (f8e4m3fn[64,128], f8e4m3fn[64,128]) {
  %param_0 = f32[32,64,128]{2,1,0} parameter(0)
  %convert = bf16[32,64,128]{2,1,0} convert(%param_0)
  %abs = bf16[32,64,128]{2,1,0} abs(%convert)
  %first = bf16[1,64,128]{2,1,0} slice(%abs), slice={[3:4], [0:64], [0:128]}
  %second = bf16[1,64,128]{2,1,0} slice(%abs), slice={[4:5], [0:64], [0:128]}
  %a = f8e4m3fn[1,64,128]{2,1,0} convert(%first)
  %b = f8e4m3fn[1,64,128]{2,1,0} convert(%second)
  %a2 = f8e4m3fn[64,128]{1,0} bitcast(%a)
  %b2 = f8e4m3fn[64,128]{1,0} bitcast(%b)
  ROOT %out = (f8e4m3fn[64,128]{1,0}, f8e4m3fn[64,128]{1,0}) tuple(%a2, %b2)
}

ENTRY %main (stack: f32[32,64,128]) -> (f8e4m3fn[64,128], f8e4m3fn[64,128]) {
  %stack = f32[32,64,128]{2,1,0} parameter(0)
  ROOT %layers = (f8e4m3fn[64,128]{1,0}, f8e4m3fn[64,128]{1,0}) fusion(%stack), kind=kLoop, calls=%fused_quantize
}
"""


def test_layers_statically_sliced_after_a_cast_of_the_stack_read_those_layers_only():
  """A straight-line stack (scan_unroll=0) quantizes each layer's weights from the stacked fp32 params: XLA writes
  the fusion as casts of the whole stack then static slices, and computes only the sliced elements. Two of 32
  layers read (fp32) and written (f8), not the stack."""
  layer = 64 * 128
  [kernel] = [k for k in hlo_cost.Program(CAST_THEN_SLICED).kernels if k.name == "layers"]
  assert kernel.bytes == 2 * layer * 4 + 2 * layer


def test_group_accounts_for_every_kernel_once_by_the_part_of_its_op_the_pattern_matches():
  """`bench.roofline --group=REGEX`: each compute kernel's predicted time under the first match of REGEX in its op
  (here the kernel's name: the program has no op metadata), the rest under `other`; the groups add up to the step's
  kernels, the exposed collectives beside them; a pattern that is no regular expression is one error line."""
  program = hlo_cost.Program(CAST_THEN_SLICED)
  target = gpu_target.get("h100")
  setup = roofline.Compiled(program, 0, None, 1, target, CAST_THEN_SLICED)
  prediction = roofline.predict(program, target, roofline.load_prices()[0])
  groups = roofline.grouped_ms(setup, prediction, r"(lay)ers")
  assert set(groups) == {"lay", "collectives (exposed)"}
  assert sum(groups.values()) == pytest.approx(prediction["step_s"] * 1e3)
  assert set(roofline.grouped_ms(setup, prediction, "nothing matches this")) == {"other", "collectives (exposed)"}
  with pytest.raises(roofline.UserError, match=r"--group=\(: not a regular expression"):
    roofline.grouped_ms(setup, prediction, "(")


GUARDED_UPDATE = """
HloModule guarded_update, input_output_alias={ {0}: (0, {}, may-alias), {1}: (1, {}, may-alias) }

%fused_update (param_0: f32[64], param_1: f32[64], param_2: f32[64], param_3: pred[]) -> (f32[64], f32[64]) {
  %param_0 = f32[64]{0} parameter(0)
  %param_1 = f32[64]{0} parameter(1)
  %param_2 = f32[64]{0} parameter(2)
  %param_3 = pred[] parameter(3)
  %mu = f32[64]{0} add(%param_1, %param_2), metadata={op_name="jit(train_step)/add"}
  %stepped = f32[64]{0} subtract(%param_0, %mu), metadata={op_name="jit(train_step)/sub"}
  %ok = pred[64]{0} broadcast(%param_3), dimensions={}
  %held = f32[64]{0} select(%ok, %stepped, %param_0), metadata={op_name="jit(train_step)/_where/select_n"}
  ROOT %out = (f32[64]{0}, f32[64]{0}) tuple(%held, %mu)
}

ENTRY %main (w: f32[64], mu: f32[64], g: f32[64], ok: pred[]) -> (f32[64], f32[64]) {
  %w = f32[64]{0} parameter(0), metadata={op_name="state.params[\\'fc\\'][\\'kernel\\']"}
  %mu = f32[64]{0} parameter(1), metadata={op_name="state.opt_state[0].mu[\\'fc\\'][\\'kernel\\']"}
  %g = f32[64]{0} parameter(2), metadata={op_name="grads"}
  %ok = pred[] parameter(3), metadata={op_name="ok"}
  %update = (f32[64]{0}, f32[64]{0}) fusion(%w, %mu, %g, %ok), kind=kLoop, calls=%fused_update, \
metadata={op_name="jit(train_step)/_where/select_n"}
  %new_w = f32[64]{0} get-tuple-element(%update), index=0
  %new_mu = f32[64]{0} get-tuple-element(%update), index=1
  %packed = (f32[64]{0}, f32[64]{0}) tuple(%new_mu, %new_w)
  %w_out = f32[64]{0} get-tuple-element(%packed), index=1
  %mu_out = f32[64]{0} get-tuple-element(%packed), index=0
  ROOT %state = (f32[64]{0}, f32[64]{0}) tuple(%w_out, %mu_out)
}
"""


def test_a_fusion_writing_the_donated_state_is_labelled_by_that_state_not_its_last_op():
  """XLA names a multi-output fusion after its root: a whole optimizer update whose last op is a guard's hold
  read as `_where/select_n`. A fusion whose results the step writes in place of its donated inputs is labelled
  by those inputs' state parts (followed through a tuple taken apart again, as ViT-B/16's program writes its
  state); its bytes are unchanged (3 reads of 64 f32 and a pred, 2 writes)."""
  [kernel] = hlo_cost.Program(GUARDED_UPDATE).kernels
  assert kernel.label == "update: state.opt_state, state.params"
  assert kernel.bytes == 5 * 64 * 4 + 1
  undonated = hlo_cost.Program(GUARDED_UPDATE.replace("input_output_alias=", "unaliased="))
  assert undonated.kernels[0].label == "_where/select_n"
