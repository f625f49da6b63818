"""FP8 GEMMs (models/fp8.py): the products within bounds derived from e4m3's and e5m2's precision, the weight
gradient unquantized, power-of-two per-tensor scales, only the blocks' GEMMs quantized, GPUs without FP8 refused."""

import functools
import re
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from visionfm_jax import tasks
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import fp8, layers, vit
from visionfm_jax.parallel import sharding

from conftest import tiny_vit_config

# Unit roundoff (half the spacing of the significands) and the smallest subnormal's half: a value v quantized with
# scale s is off by at most U * |v| + s * TINY / 2, the second term for values that land among the subnormals.
E4M3_U, E4M3_TINY = 2.0**-4, 2.0**-9
E5M2_U, E5M2_TINY = 2.0**-3, 2.0**-16


def _operands(seed=0, m=48, k=160, n=96):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)) * np.exp(rng.uniform(-3, 3, (m, 1)))  # rows of very different magnitudes
  w = rng.standard_normal((k, n)) * 0.05
  return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


def _error_bound(a, a_scale, a_format, b, b_scale, b_format):
  """|q(a) @ q(b) - a @ b| <= sum_k (e_a |b| + |a| e_b + e_a e_b), e the per-element quantization error bound."""

  def err(v, s, fmt):
    u, tiny = fmt
    return u * jnp.abs(v) + s * tiny / 2

  ea, eb = err(a, a_scale, a_format), err(b, b_scale, b_format)
  return ea @ jnp.abs(b) + jnp.abs(a) @ eb + ea @ eb


@pytest.mark.parametrize("bf16_wgrad", [False, True])
def test_the_forward_product_is_within_the_e4m3_bound(bf16_wgrad):
  """x scaled whole in 'fp8', each of its rows by its own max in 'fp8_bf16_wgrad'; w whole in both."""
  x, w = _operands()
  y = fp8.matmul(x, w, bf16_wgrad)
  bound = _error_bound(
    x, fp8.scale(x, fp8.E4M3, by_row=bf16_wgrad), (E4M3_U, E4M3_TINY), w, fp8.scale(w, fp8.E4M3), (E4M3_U, E4M3_TINY)
  )
  error = jnp.abs(y - x @ w)
  assert bool(jnp.all(error <= bound * (1 + 1e-5) + 1e-6))
  assert float(jnp.max(error)) > 0  # it does quantize


@functools.partial(jax.jit, static_argnums=3)
def _input_and_weight_grads(x, w, g, bf16_wgrad):
  """(dx, dw) of fp8.matmul for the output gradient g: one program (each operation of an eager backward would
  compile one of its own)."""
  return jax.vjp(lambda x, w: fp8.matmul(x, w, bf16_wgrad), x, w)[1](g)


@pytest.mark.parametrize("bf16_wgrad", [False, True])
def test_the_gradients_are_within_their_formats_bounds_and_the_bf16_weight_gradient_is_unquantized(bf16_wgrad):
  """dx = q5(g) @ q4(w)^T in 'fp8', q4(g by rows) @ q4(w)^T in 'fp8_bf16_wgrad'; dw = q4(x)^T @ q5(g) in 'fp8',
  x^T @ g itself in 'fp8_bf16_wgrad'."""
  x, w = _operands(1)
  g = jnp.asarray(np.random.default_rng(2).standard_normal((x.shape[0], w.shape[1])), jnp.float32)
  dx, dw = _input_and_weight_grads(x, w, g, bf16_wgrad)
  e4m3, e5m2 = (E4M3_U, E4M3_TINY), (E5M2_U, E5M2_TINY)
  g_scale = fp8.scale(g, fp8.E4M3, by_row=True) if bf16_wgrad else fp8.scale(g, fp8.E5M2)
  bound = _error_bound(g, g_scale, e4m3 if bf16_wgrad else e5m2, w.T, fp8.scale(w, fp8.E4M3), e4m3)
  assert bool(jnp.all(jnp.abs(dx - g @ w.T) <= bound * (1 + 1e-5) + 1e-6))
  if bf16_wgrad:
    np.testing.assert_allclose(dw, x.T @ g, rtol=1e-6, atol=1e-5)
  else:
    bound = _error_bound(x.T, fp8.scale(x, fp8.E4M3), e4m3, g, g_scale, e5m2)
    error = jnp.abs(dw - x.T @ g)
    assert bool(jnp.all(error <= bound * (1 + 1e-5) + 1e-6)) and float(jnp.max(error)) > 0


def test_scales_are_powers_of_two_that_fit_the_range():
  x = jnp.asarray([[3.0, -1000.0], [0.5, 2.0]])
  s = float(fp8.scale(x, fp8.E4M3))
  assert s == 4.0  # 1000 / 448 = 2.23 -> 2^2
  q, _ = fp8.quantize(x, fp8.E4M3)
  assert q.dtype == jnp.float8_e4m3fn and float(jnp.max(jnp.abs(q.astype(jnp.float32)))) <= 448
  assert float(fp8.scale(jnp.zeros((3, 3)), fp8.E4M3)) == 1.0
  np.testing.assert_array_equal(fp8.matmul(jnp.zeros((2, 16)), jnp.ones((16, 4))), jnp.zeros((2, 4)))


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("bf16_wgrad", [False, True])
def test_an_overflowing_gradient_stays_non_finite_through_the_fp8_gemms(bad, bf16_wgrad):
  """An fp16 overflow (an inf in the output gradient) must not be clipped to e5m2's largest value: the step's
  overflow check (training/precision.py) and the health guard read it from the gradients."""
  x, w = _operands(4)
  g = jnp.zeros((x.shape[0], w.shape[1])).at[3, 5].set(bad)
  dx, dw = _input_and_weight_grads(x, w, g, bf16_wgrad)
  assert not bool(jnp.all(jnp.isfinite(dx))) and not bool(jnp.all(jnp.isfinite(dw)))
  assert bool(jnp.all(jnp.isfinite(fp8.matmul(x, w, bf16_wgrad))))


def test_only_the_blocks_gemms_run_in_fp8_and_only_under_the_switch():
  """Every Dense of a ViT's blocks (qkv, out, fc1, fc2) multiplies in FP8 under fp8.gemms('fp8'); the patch
  embedding and the head do not, and nothing does outside the switch (evaluation)."""
  model = vit.ViT(**vit.parse_variant("pico/4"), num_classes=3)
  images = jnp.ones((2, 16, 16, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  quantized = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Dense) and context.method_name == "__call__":
      quantized.append((context.module.path, context.module.fp8 and fp8.active() == "fp8"))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record), fp8.gemms("fp8"):
    jax.eval_shape(model.apply, variables, images)
  in_fp8 = {"/".join(path) for path, on in quantized if on}
  assert in_fp8 == {f"blocks/{name}" for name in ("attn/qkv", "attn/out", "mlp/fc1", "mlp/fc2")}
  assert {"/".join(path) for path, on in quantized if not on} == {"head"}
  quantized.clear()
  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, variables, images)
  assert quantized and not any(on for _, on in quantized)


@pytest.mark.parametrize("recipe", fp8.CURRENT)
def test_separate_projections_in_fp8_are_the_fused_fp8_product_sliced(recipe):
  """Under an FP8 recipe q, k and v are one FP8 product of the whole (C, 3, heads, head_dim) kernel under one scale,
  sliced (values and gradients): three products sharing x are merged by XLA's GPU compiler into one dot of their
  dequantized weights, which it then runs in the compute dtype."""
  x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 5, 16)), jnp.float32)
  fused, apart = (
    layers.dense(
      (3, 2, 8),
      (layers.EMBED, None, layers.HEADS, layers.KV),
      jnp.float32,
      fp8=True,
      separate=separate,
      bias_init=nn.initializers.normal(0.5),
    )
    for separate in (False, True)
  )
  params = nn.unbox(fused.init(jax.random.key(0), x))
  params["params"]["kernel"] *= jnp.asarray([1.0, 1e-5, 3.0])[:, None, None]  # alone, k would scale apart
  split = lambda y: tuple(y[:, :, i] for i in range(3))
  sliced = lambda p: split(fused.apply(p, x))
  loss = lambda f: lambda p: sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(f(p)))
  with fp8.gemms(recipe):
    chex.assert_trees_all_equal(apart.apply(params, x), sliced(params))
    chex.assert_trees_all_equal(jax.grad(loss(lambda p: apart.apply(p, x)))(params), jax.grad(loss(sliced))(params))
    in_fp8 = apart.apply(params, x)
  assert not np.allclose(in_fp8[0], apart.apply(params, x)[0], rtol=0, atol=1e-6)  # it does quantize


def test_the_switch_takes_only_known_formats():
  with pytest.raises(ValueError, match="precision.gemm='int4'"):
    fp8.gemms("int4")


@pytest.mark.parametrize("recipe", fp8.RECIPES)
@pytest.mark.parametrize("capability, refused", [("8.0", True), ("8.6", True), ("8.9", False), ("9.0", False)])
def test_a_gpu_without_fp8_tensor_cores_is_refused_in_one_line(capability, refused, recipe):
  device = types.SimpleNamespace(platform="gpu", compute_capability=capability, device_kind="NVIDIA X")
  if refused:
    with pytest.raises(
      ConfigError, match=rf"precision.gemm={recipe}: NVIDIA X \(compute capability {capability}\)"
    ) as e:
      fp8.check_device(recipe, device)
    assert "\n" not in str(e.value)
  else:
    fp8.check_device(recipe, device)
  fp8.check_device("compute_dtype", device)
  fp8.check_device("fp8", types.SimpleNamespace(platform="cpu"))


def test_bf16_operands_give_bf16_products_of_the_same_quantized_values():
  x, w = _operands(3)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  y = fp8.matmul(xb, wb)
  chex.assert_type(y, jnp.bfloat16)
  np.testing.assert_allclose(
    np.asarray(y, np.float32),
    np.asarray(fp8.matmul(xb.astype(jnp.float32), wb.astype(jnp.float32))),
    rtol=2**-7,
    atol=1e-2,
  )


def test_a_task_that_trains_in_fp8_checks_its_mesh_device_and_evaluation_does_not_ask(monkeypatch):
  """The train loop, `bench` and the planners call task.check_training_devices() once the mesh is known: on an A100
  an FP8 config is one error line naming the GPU; a task built without FP8 there, or for evaluation, builds."""
  a100 = types.SimpleNamespace(platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100-SXM4-80GB")
  monkeypatch.setattr(tasks.Task, "device", lambda self: a100)
  task = tasks.build(tiny_vit_config(**{"precision.gemm": "fp8"}))
  with pytest.raises(
    ConfigError, match=r"^config.precision.gemm=fp8: NVIDIA A100-SXM4-80GB \(compute capability 8.0\)"
  ):
    task.check_training_devices()
  tasks.build(tiny_vit_config()).check_training_devices()


def _sharded_grads(mesh, recipe):
  """The gradients of sum((x @ w)^2) through `recipe`'s FP8 GEMMs, x split over the batch's devices and w over
  fsdp, and how many scalars the compiled program all-reduces (the maxima of tensors split over devices)."""
  x, w = (a.astype(jnp.bfloat16) for a in _operands(4, m=64, k=128, n=96))
  loss = _square_loss(recipe)
  x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None)))
  w = jax.device_put(w, NamedSharding(mesh, P("fsdp", None)))
  with sharding.activation_sharding(mesh):
    step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
  types = re.findall(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", step.as_text())
  return step(x, w), sum(len(re.findall(r"\w+\[\]", t)) for t in types)  # the scalars: maxima


def _square_loss(recipe):
  matmul = fp8.matmul_of(recipe)
  return lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32) ** 2)


@pytest.mark.parametrize("recipe", fp8.CURRENT)
def test_each_devices_rows_are_scaled_by_their_own_max_and_the_weight_whole(recipe):
  """Over a batch split 8 ways, each device scales its rows of x and of the gradient by their own max ('fp8'; each
  row by its own in 'fp8_bf16_wgrad'), without an all-reduce: the gradients are the sums of each device's rows'
  gradients computed alone, the only max reduced across devices the weight's (sharded over fsdp). A mesh with a
  tensor axis scales the batch whole in 'fp8'."""
  devices = np.array(jax.devices()[:8])
  (dx, dw), maxima = _sharded_grads(Mesh(devices.reshape(1, 8, 1), ("data", "fsdp", "tensor")), recipe)
  x, w = (a.astype(jnp.bfloat16) for a in _operands(4, m=64, k=128, n=96))
  alone = [jax.grad(_square_loss(recipe), argnums=(0, 1))(rows, w) for rows in jnp.split(x, 8)]
  np.testing.assert_array_equal(
    np.asarray(dx, np.float32), np.concatenate([np.asarray(g, np.float32) for g, _ in alone])
  )
  shares = np.stack([np.asarray(g, np.float32) for _, g in alone])
  # each share and the sum rounded to bf16 (8 significant bits) once
  bound = 2.0**-8 * (np.abs(shares).sum(0) + np.abs(shares.sum(0)))
  assert np.all(np.abs(np.asarray(dw, np.float32) - shares.sum(0)) <= bound)
  assert maxima == 1
  _, maxima = _sharded_grads(Mesh(devices.reshape(1, 4, 2), ("data", "fsdp", "tensor")), recipe)
  assert maxima == (1 if recipe == "fp8_bf16_wgrad" else 3)
