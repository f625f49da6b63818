"""GPU tests (`pytest -m gpu`; skipped where JAX has no GPU, as in CI): cuDNN flash attention against the softmax
path in every place the models use it, SwinV2's Pallas window kernel (Triton) against it too, one bf16 train
step of each seed model, fp16 loss scaling meeting a real overflow, and a short run that checkpoints and resumes.
launch/gpu_check.sh runs them.

Attention is compared through errors against an fp32 reference: in bf16/fp16 the cuDNN path may differ from our
softmax path by rounding, but its error must stay of the order of the softmax path's own."""

import faulthandler
import importlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax.bench import step as step_lib
from visionfm_jax.models import kernels, swinv2, text, vit
from visionfm_jax.training import train

from conftest import override, read_the_loss_after_every_step, tiny_vit_config

pytestmark = pytest.mark.gpu
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _max_error(got, want):
  """Largest |got - want| over all leaves, relative to the largest |want| of that leaf."""
  errors = jax.tree.map(
    lambda g, w: float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / (jnp.max(jnp.abs(w)) + 1e-6)), got, want
  )
  return max(jax.tree.leaves(errors))


def _assert_as_close_as_softmax(value_and_grads, args, dtype, name, implementation="cudnn"):
  """`value_and_grads(attention, dtype, *args)` with `implementation` (cuDNN; SwinV2's Pallas window kernel)
  against an fp32 softmax reference: its error is at most twice the softmax path's own error in `dtype` (plus a
  little), values and gradients alike."""
  reference = value_and_grads("softmax", jnp.float32, *args)
  ours = value_and_grads("softmax", dtype, *args)
  fused = value_and_grads(implementation, dtype, *args)
  for part, index in (("value", 0), ("gradients", 1)):
    bound = 2 * _max_error(ours[index], reference[index]) + 1e-2
    error = _max_error(fused[index], reference[index])
    assert error <= bound, (
      f"{name} {part}: {implementation} error {error:.4f} > {bound:.4f} (softmax path in {dtype.__name__})"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
  "tokens,causal,masked",
  [(257, False, False), (128, True, False), (77, True, True)],
  ids=["vit_h14_tokens", "causal", "causal_and_padding_mask"],
)
def test_cudnn_attention_matches_the_softmax_path(dtype, tokens, causal, masked):
  q, k, v = (_normal(i, (2, tokens, 4, 64)) for i in range(3))
  mask = (
    jnp.arange(tokens)[None, None, None, :] < jnp.array([tokens, tokens // 2])[:, None, None, None] if masked else None
  )
  cotangent = _normal(3, q.shape)

  def value_and_grads(implementation, compute, q, k, v):
    def f(q, k, v):
      out = kernels.attention(
        q.astype(compute), k.astype(compute), v.astype(compute), mask=mask, causal=causal, implementation=implementation
      )
      return out.astype(jnp.float32)

    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(cotangent)

  _assert_as_close_as_softmax(jax.jit(value_and_grads, static_argnums=(0, 1)), (q, k, v), DTYPES[dtype], "attention")


def _model_value_and_grads(make_model, inputs):
  params = jax.jit(make_model("softmax", jnp.float32).init)(jax.random.key(0), inputs)
  params = jax.tree.map(lambda a: a + 0.01, params)  # off the zero-initialised head, so every gradient flows

  def run(attention, dtype, params):
    model = make_model(attention, dtype)

    def loss(p):
      out = model.apply(p, inputs)
      out = out["logits"] if "logits" in out else out["embedding"]
      return jnp.sum(jnp.sin(out.astype(jnp.float32))), out.astype(jnp.float32)

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  return run, params


@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_with_cudnn_attention_matches_softmax(dtype):
  images = _normal(0, (4, 64, 64, 3))
  make = lambda attention, dt: vit.ViT(
    width=256,
    depth=2,
    mlp_dim=512,
    num_heads=4,
    patch_size=8,
    image_size=64,
    num_classes=10,
    dtype=dt,
    attention=attention,
  )
  run, params = _model_value_and_grads(make, images)
  _assert_as_close_as_softmax(jax.jit(run, static_argnums=(0, 1)), (params,), DTYPES[dtype], "ViT")


@pytest.mark.parametrize("dtype", DTYPES)
def test_naflex_vit_with_cudnn_attention_matches_softmax(dtype):
  # SigLIP 2's tower on NaFlex inputs: each image's patches, the rest of the 64 rows masked in cuDNN's mask form
  inputs = {"patches": _normal(4, (4, 64, 8 * 8 * 3)), "grid": jnp.array([[3, 9], [8, 8], [11, 2], [1, 5]])}
  make = lambda attention, dt: vit.ViT(
    width=256,
    depth=2,
    mlp_dim=512,
    num_heads=4,
    patch_size=8,
    image_size=64,
    num_classes=10,
    dtype=dt,
    attention=attention,
    class_token=False,
    pool="map",
  )
  run, params = _model_value_and_grads(make, inputs)
  _assert_as_close_as_softmax(jax.jit(run, static_argnums=(0, 1)), (params,), DTYPES[dtype], "NaFlex ViT")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implementation", ["cudnn", kernels.WINDOW_KERNEL])
def test_swinv2_window_attention_with_position_bias_and_shift_mask_on_cudnn(dtype, implementation):
  """An 8x8 map with 4x4 windows: the second block of stage 1 is shifted, so the shift mask and the continuous
  position bias both go through cuDNN's bias input (or SwinV2's Pallas window kernel, run as Triton kernels)."""
  images = _normal(1, (2, 32, 32, 3))
  make = lambda attention, dt: swinv2.SwinV2(
    64,
    (2, 2),
    (2, 4),
    window_size=4,
    patch_size=4,
    image_size=32,
    num_classes=10,
    scan=False,
    dtype=dt,
    attention=attention,
  )
  run, params = _model_value_and_grads(make, images)
  _assert_as_close_as_softmax(jax.jit(run, static_argnums=(0, 1)), (params,), DTYPES[dtype], "SwinV2", implementation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [7, 40])
def test_swinv2_window_kernel_at_the_seeds_windows_matches_the_softmax_path(dtype, window):
  """SwinV2's Pallas window kernel (three Triton kernels) at the seeds' windows, 7 (224 px) and 40 (640 px),
  shifted: its output and the gradients of q, k, v and the position-bias table as close to fp32 as the softmax path
  in `dtype`. The logit scale's gradient, sum(dS * logits), cancels along each row: FlashAttention's dS, which takes
  rowsum(dO * O) from the output rounded to `dtype` (as cuDNN's does), leaves it within 10% of its largest head's
  (bf16, window 7 on the CPU's interpreter: 6%; the softmax path: 1.5%)."""
  heads, dim, windows = 4, 32, 4
  n = window * window
  q, k, v = (_normal(i, (2, windows, n, heads, dim)) for i in range(3))
  logit_scale, table = _normal(3, (heads,), 0.3) + 2.5, 16 * jax.nn.sigmoid(_normal(4, (heads, (2 * window - 1) ** 2)))
  regions = swinv2.shift_regions(windows * window, window, window, window // 2)
  cotangent = _normal(5, q.shape)

  def value_and_grads(implementation, compute, q, k, v, logit_scale, table):
    def f(q, k, v, logit_scale, table):
      q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
      q, k, v = (x.astype(compute) for x in (q, k, v))
      scale = jnp.exp(jnp.minimum(logit_scale, swinv2.MAX_LOGIT_SCALE))
      if implementation == kernels.WINDOW_KERNEL:
        out = kernels.window_attention(q, k, v, scale, table, regions, mask_value=swinv2.MASK_VALUE)
      else:
        mask = jnp.where(regions[:, :, None] == regions[:, None, :], 0.0, swinv2.MASK_VALUE)
        out = swinv2.window_attention(q, k, v, scale, swinv2.bias_of_offsets(table, window), mask)
      return out.astype(jnp.float32)

    out, vjp = jax.vjp(f, q, k, v, logit_scale, table)
    grads = vjp(cotangent)
    return out, grads[:3] + grads[4:], grads[3]

  run = jax.jit(value_and_grads, static_argnums=(0, 1))
  args = (q, k, v, logit_scale, table)
  _assert_as_close_as_softmax(run, args, DTYPES[dtype], f"window {window}", kernels.WINDOW_KERNEL)
  scale_error = _max_error(run(kernels.WINDOW_KERNEL, DTYPES[dtype], *args)[2], run("softmax", jnp.float32, *args)[2])
  assert scale_error < 0.1, f"window {window}: the logit scale's gradient is {scale_error:.3f} off"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", ["eos", "cls"])
def test_causal_text_tower_on_cudnn(dtype, pool):
  """The CLIP text tower (causal, EOS pooling) and the CoCa-style one (causal plus the padding mask of its CLS)."""
  tokens = jnp.asarray(np.random.default_rng(2).integers(4, 100, (4, 32)), jnp.int32)
  tokens = tokens.at[:, 20:].set(0).at[:, 19].set(3)  # EOS at 19, padding after
  make = lambda attention, dt: text.TextTransformer(
    width=128,
    depth=2,
    num_heads=2,
    mlp_dim=256,
    embed_dim=32,
    vocab_size=100,
    max_len=32,
    dtype=dt,
    attention=attention,
    pool=pool,
  )
  run, params = _model_value_and_grads(make, tokens)
  _assert_as_close_as_softmax(jax.jit(run, static_argnums=(0, 1)), (params,), DTYPES[dtype], f"text ({pool})")


def _demo(name: str, **fields):
  config = importlib.import_module(f"configs.{name}").get_config("demo")
  return override(config, **{"global_batch_size": 16, "grad_accum_steps": 1, **fields})


ATTENTION_FIELDS = {
  "vit_huge": ("model.attention",),
  "swinv2_g_clip": ("model.image.attention", "model.text.attention"),
  "aurora_xl": ("model.encoder.attention", "model.text.attention"),
}


def _step(bench):
  bench.state, metrics = bench.compiled(bench.state, bench.batch)
  return jax.device_get(metrics)


def _params(bench):
  return jax.tree.leaves(jax.device_get(bench.state.params))


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("name", list(ATTENTION_FIELDS))
def test_one_bf16_train_step_of_each_seed_model(name, micro_batches):
  """training/step.py's step (bench/step.py: same jit, shardings, donation) of each demo model in bf16 with cuDNN
  attention: finite loss and gradient norm, and the params move (at the second step: warmup starts at lr 0).
  With 2 micro-batches, as the SwinV2-G-CLIP and Aurora-XL defaults run: CLIP's and Aurora's two-pass split of
  the whole-batch loss (a feature pass, then each micro-batch's backward), ViT's plain accumulation."""
  config = _demo(
    name,
    **{"precision.compute_dtype": "bfloat16", "grad_accum_steps": micro_batches},
    **{f: "cudnn" for f in ATTENTION_FIELDS[name]},
  )
  bench = step_lib.JaxStep(config, jax.devices()[:1])
  _step(bench)
  before = _params(bench)
  metrics = _step(bench)
  assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/grad_norm"]), metrics
  assert any(not np.array_equal(a, b) for a, b in zip(_params(bench), before))


@pytest.mark.parametrize("recipe", ["fp8", "fp8_bf16_wgrad"])
def test_fp8_steps_run_cublaslt_fp8_gemms_near_the_bf16_step(recipe):
  """precision.gemm on a GPU with FP8 tensor cores: the compiled step calls cuBLASLt's FP8 GEMMs (the forward and
  input-gradient products; with 'fp8' the weight gradient too), and two steps from the same state give losses and
  gradient norms within an e4m3 roundoff (2^-4) of the bf16 step's."""
  base = {"precision.compute_dtype": "bfloat16", "model.attention": "cudnn"}
  runs = {}
  for gemm in ("compute_dtype", recipe):
    bench = step_lib.JaxStep(_demo("vit_huge", **base, **{"precision.gemm": gemm}), jax.devices()[:1])
    runs[gemm] = [_step(bench), _step(bench)]
    text = bench.compiled.as_text()
    assert ("__cublas$lt$matmul$f8" in text) == (gemm != "compute_dtype"), gemm
  for name in ("train/loss", "train/grad_norm"):
    for got, want in zip(runs[recipe], runs["compute_dtype"]):
      assert abs(got[name] - want[name]) <= 2.0**-4 * abs(want[name]), (name, got[name], want[name])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_pallas_layer_norm_candidate_on_the_gpu_matches_the_plain_layer_norm(dtype):
  """The Triton kernels of kernels.trying('pallas_layer_norm') against XLA's LayerNorm on ViT-H's width, values
  and gradients, each relative to an fp32 reference on the same inputs: the kernel's error at most twice XLA's
  plus bf16's step (it keeps the backward's statistics in bf16).

  XLA's LayerNorm rounds its output to the compute dtype explicitly (`reduce_precision`): on a GPU XLA drops a
  bf16 -> fp32 convert pair inside a fusion (excess precision), so its error would be the fp32 reference's, 0,
  while the kernel's bf16 output is real. The input is rounded before the programs, for the same reason."""
  d = DTYPES.get(dtype, jnp.float32)
  x = (_normal(0, (4, 257, 1280), 2.0) + 1.0).astype(d)
  scale, bias = _normal(1, (1280,), 0.3) + 1.0, _normal(2, (1280,), 0.3)

  def rounded_layer_norm(x, s, b):
    y = kernels.plain_layer_norm(x, s, b, 1e-6)
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(y, exponent_bits=info.nexp, mantissa_bits=info.nmant).astype(x.dtype)

  def value_and_grads(layer_norm, x):
    f = lambda x, s, b: jnp.sum(jnp.sin(layer_norm(x, s, b).astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, scale, bias)

  reference = value_and_grads(rounded_layer_norm, x.astype(jnp.float32))
  xla = value_and_grads(rounded_layer_norm, x)
  with kernels.trying([kernels.PALLAS_LAYER_NORM]):
    tried = value_and_grads(lambda x, s, b: kernels.layer_norm(x, s, b, 1e-6, x.dtype), x)
  assert _max_error(tried, reference) <= 2 * _max_error(xla, reference) + (2**-8 if dtype == "bfloat16" else 1e-5)


def test_fp16_loss_scaling_meets_a_real_overflow():
  """Two steps at the default scale move the zero-initialised head (else no gradient reaches the fp16 body); at
  a scale of 2^40 the fp16 activations' gradients overflow: the step is skipped (params unchanged) and the scale
  halves, until it is back where fp16 holds and training goes on."""
  config = _demo("vit_huge", **{"precision.compute_dtype": "float16"})
  bench = step_lib.JaxStep(config, jax.devices()[:1])
  _step(bench), _step(bench)
  scale = bench.state.loss_scale.scale
  bench.state = bench.state.replace(
    loss_scale=bench.state.loss_scale.replace(scale=jax.device_put(np.float32(2.0**40), scale.sharding))
  )
  before = _params(bench)
  metrics = _step(bench)
  assert metrics["train/skipped_steps"] == 1 and metrics["train/loss_scale"] == 2.0**40, metrics
  assert float(bench.state.loss_scale.scale) == 2.0**39
  for got, want in zip(_params(bench), before):
    np.testing.assert_array_equal(got, want)
  for _ in range(30):  # halving from 2^39: within 30 steps the scale is one that fp16 holds
    skipped = int(metrics["train/skipped_steps"])
    metrics = _step(bench)
    if int(metrics["train/skipped_steps"]) == skipped:
      break
  assert int(metrics["train/skipped_steps"]) == skipped and np.isfinite(metrics["train/loss"]), metrics
  assert 2.0**5 <= float(metrics["train/loss_scale"]) <= 2.0**38, metrics
  assert any(not np.array_equal(a, b) for a, b in zip(_params(bench), before))


def test_two_steps_checkpoint_and_resume_on_gpu(tmp_path):
  """Two bf16 steps with a checkpoint after each, then a 4-step run that resumes from step 2: it ends where an
  uninterrupted 4-step run ends (warmup covers steps 1-2, so both schedules agree there)."""

  def config(total_steps):
    c = tiny_vit_config(total_steps=total_steps, log_every=1, eval_every=100, checkpoint_every=1, strategy="ddp")
    c.resume.allow_changes = "total_steps"  # the second run extends the first
    c.data.num_workers = 0
    c.data.eval_examples = 16
    c.precision.compute_dtype = "bfloat16"
    return c

  first = train.run(config(2), str(tmp_path / "run"))
  assert first["step"] == 2 and sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == "2"
  resumed = train.run(config(4), str(tmp_path / "run"))
  straight = train.run(config(4), str(tmp_path / "straight"))
  assert resumed["step"] == straight["step"] == 4
  np.testing.assert_allclose(resumed["train/loss"], straight["train/loss"], rtol=1e-3)


def test_the_transfer_guard_catches_a_device_read_between_logging_steps(tmp_path, monkeypatch):
  """On a GPU the loop's guard is real (on CPU, test_train_loop emulates it): a step that reads its loss every
  time fails at the first step that does not log."""
  config = tiny_vit_config(total_steps=4, log_every=2, eval_every=100, checkpoint_every=100, strategy="ddp")
  config.data.num_workers = 0
  config.data.eval_examples = 16
  read_the_loss_after_every_step(monkeypatch)
  with pytest.raises(Exception, match="(?i)disallowed device-to-host transfer"):
    train.run(config, str(tmp_path))


def test_rerun_after_the_newest_checkpoint_is_deleted_on_gpu(tmp_path):
  """A 4-step bf16 run checkpointing every step; with its step-4 checkpoint deleted, the rerun resumes from step 3
  and ends where the run did. Past 300 s every thread's stack is dumped and the process exits: being the file's
  last test, that costs no other test its run."""

  def config():
    c = tiny_vit_config(total_steps=4, log_every=1, eval_every=100, checkpoint_every=1, strategy="ddp")
    c.data.num_workers = 0
    c.data.eval_examples = 16
    c.precision.compute_dtype = "bfloat16"
    return c

  faulthandler.dump_traceback_later(300, exit=True)
  try:
    first = train.run(config(), str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    rerun = train.run(config(), str(tmp_path))
  finally:
    faulthandler.cancel_dump_traceback_later()
  assert first["step"] == rerun["step"] == 4
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4
  np.testing.assert_allclose(rerun["train/loss"], first["train/loss"], rtol=1e-3)
