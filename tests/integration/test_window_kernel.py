"""models/kernels.py window_attention, SwinV2's window attention as Pallas kernels: its values and gradients (q, k,
v, the logit scale, the position-bias table; a tiny SwinV2's params) against the softmax path, run by Pallas's
interpreter here, at the seeds' windows (7 at 224 px, 40 at 640 px) and SwinV2's 8, 12, 16 and 24, shifted and
not; the GPU program it lowers to (three Triton kernels, no per-window score gradient); the config's choice."""

import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionfm_jax import config_lib, models
from visionfm_jax.errors import ConfigError
from visionfm_jax.models import kernels, swinv2

from conftest import ROOT, cpu_env, params_drawn_by_shape

MAX_LOGIT_SCALE = float(np.log(100.0))


def _inputs(
  window: int,
  shifted: bool,
  batch: int = 1,
  windows: int = 2,
  heads: int = 2,
  dim: int = 16,
  dtype=jnp.float32,
  seed: int = 0,
):
  """(q, k, v (batch, windows, N, heads, dim), logit scale (heads,), per-offset table (heads, (2W-1)^2)) as SwinV2
  makes them (cosine-normalised q and k, a table in (0, 16)), and the region ids of a shifted map of `windows`
  windows stacked vertically (None unshifted)."""
  rng = np.random.default_rng(seed)
  shape = (batch, windows, window * window, heads, dim)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (jnp.asarray(unit(rng.normal(size=shape)), dtype) for _ in range(2))
  v = jnp.asarray(rng.normal(size=shape), dtype)
  logit_scale = jnp.asarray(rng.uniform(np.log(5.0), MAX_LOGIT_SCALE - 0.5, heads), jnp.float32)
  table = jnp.asarray(16.0 * rng.uniform(size=(heads, (2 * window - 1) ** 2)), jnp.float32)
  regions = swinv2.shift_regions(windows * window, window, window, window // 2) if shifted else None
  return (q, k, v, logit_scale, table), regions


def _attention(window: int, regions, kernel: bool, **kwargs):
  """SwinV2's attention of (q, k, v, logit scale, table) as WindowAttention computes it: the kernel (which gathers
  the bias from the table itself) or the softmax path (swinv2.window_attention) of the gathered bias."""

  def attend(q, k, v, logit_scale, table):
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    if kernel:
      return kernels.window_attention(q, k, v, scale, table, regions, mask_value=swinv2.MASK_VALUE, **kwargs)
    bias = swinv2.bias_of_offsets(table, window)
    mask = None if regions is None else jnp.where(regions[:, :, None] == regions[:, None, :], 0.0, swinv2.MASK_VALUE)
    return swinv2.window_attention(q, k, v, scale, bias, mask)

  return attend


def _value_and_grads(f, args):
  """f(*args) and the gradients of sum(sin(f)) with respect to every argument, in one jitted program."""
  loss = lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))
  return jax.jit(lambda *a: (f(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a)))(*args)


def _assert_close(got, want, tol):
  """Every leaf within `tol` of the largest entry of its expected value (gradients span orders of magnitude)."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=0, atol=tol * max(1.0, np.abs(w).max()))


def _check_against_softmax_path(window, shifted, tol=2e-5, **kwargs):
  block = kwargs.pop("block", kernels.WINDOW_BLOCK)
  args, regions = _inputs(window, shifted, **kwargs)
  got = _value_and_grads(_attention(window, regions, True, block=block), args)
  want = _value_and_grads(_attention(window, regions, False), args)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(want[1]))  # every gradient is compared
  _assert_close(got, want, tol)


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
@pytest.mark.parametrize("window", [7, 8, 12, 16, 24])
def test_the_window_kernel_computes_the_softmax_paths_values_and_gradients(window, shifted):
  """Output and the gradients with respect to q, k, v, the logit scale and the position-bias table, at every
  window SwinV2 uses but the 640 px one (below), a query tile of 64 tokens: one tile (7, 8) or several with a
  ragged last one (12, 16, 24)."""
  _check_against_softmax_path(window, shifted)


@pytest.mark.slow
def test_the_window_kernel_at_640_px_window_40():
  """The 640 px seeds' window of 40 (1,600 tokens, 25 x 25 tiles), shifted."""
  _check_against_softmax_path(40, True, heads=1)


def test_the_window_kernel_with_small_tiles_padded_head_dims_and_grouped_windows(monkeypatch):
  """Tiles of 16 over 49 tokens (the last holds one real token), a head dim of 8 that Triton's tiles pad to 16
  (SwinV2-pico's), and the bias gradient's sum split so that its groups hold 2, 2, 1 and 1 of 6 windows."""
  _check_against_softmax_path(7, True, block=16, dim=8)
  monkeypatch.setattr(kernels, "WINDOW_PROGRAMS", 8)  # 2 heads x 1 tile: 4 groups over 3 x 2 windows
  _check_against_softmax_path(8, True, batch=3)


def test_the_window_kernel_in_bfloat16_is_the_softmax_path_to_its_rounding():
  _check_against_softmax_path(8, True, tol=3e-2, dtype=jnp.bfloat16)


@pytest.mark.slow
def test_a_swinv2_with_the_window_kernel_computes_what_the_softmax_path_does():
  """A tiny SwinV2 (a scanned pair of blocks, plain and shifted, on 4 windows): its output and every param's
  gradient (the CPB MLP's, the logit scales', the qkv projections') with attention='pallas' against 'softmax'."""
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  kwargs = dict(embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, image_size=32, num_classes=5)
  softmax = swinv2.SwinV2(**kwargs, attention="softmax")
  params = {"params": params_drawn_by_shape(lambda: softmax.init(jax.random.key(0), images)["params"])}

  def loss_and_grads(model):
    def loss(p):
      out = model.apply(p, images)
      return jnp.sum(jnp.sin(out["logits"])) + jnp.sum(jnp.sin(out["tokens"]))

    return jax.jit(jax.value_and_grad(loss))(params)

  pallas = swinv2.SwinV2(**kwargs, attention=kernels.WINDOW_KERNEL)
  assert "pallas_call" in str(jax.make_jaxpr(pallas.apply)(params, images))
  chex.assert_trees_all_close(loss_and_grads(pallas), loss_and_grads(softmax), atol=2e-5, rtol=1e-4)


def _largest_array(fn, *args) -> int:
  """(the most elements of any array in `fn`'s program lowered for a GPU (StableHLO's tensor types), its text)."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  dims = re.findall(r"tensor<((?:\d+x)+)[a-z]", text)
  return max(int(np.prod([int(d) for d in shape.rstrip("x").split("x")])) for shape in dims), text


def test_a_gpu_program_has_three_triton_kernels_and_no_per_window_score_gradient():
  """Lowered for a GPU (on this CPU host), the value and gradients of the 640 px window attention (windows of 40,
  shifted) are three Triton kernels (forward; dK and dV; dQ and the bias gradient), and no array is as large as
  the score gradient (B x nW x heads x N^2) that the softmax path (and cuDNN's bias gradient) writes."""
  batch, windows, heads, window = 8, 4, 2, 40
  n = window * window
  (q, k, v, logit_scale, table), regions = _inputs(
    window, True, batch=batch, windows=windows, heads=heads, dim=32, dtype=jnp.bfloat16
  )
  args = (jax.ShapeDtypeStruct(q.shape, q.dtype),) * 3 + (logit_scale, table)

  def grads(kernel):
    return jax.grad(
      lambda *a: jnp.sum(_attention(window, regions, kernel)(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)
    )

  largest, text = _largest_array(grads(True), *args)
  assert text.count("__gpu$xla.gpu.triton") == 3
  scores = batch * windows * heads * n * n
  assert largest < scores / 2
  assert _largest_array(grads(False), *args)[0] >= scores  # the check sees the softmax path's


def test_the_window_kernel_is_a_swinv2_choice_refused_elsewhere_and_off_a_gpu():
  """attention='pallas' is in a SwinV2's domain (and a CLIP's SwinV2 tower's), not a ViT's or a text tower's; a run
  on CPU devices refuses it with one line naming the field, a GPU's takes it."""
  swin = config_lib.model_config("swinv2")
  swin.attention = kernels.WINDOW_KERNEL
  models.build(swin, jnp.float32, "gpu")
  models.check_platform(swin, "gpu")
  with pytest.raises(
    ConfigError,
    match=r"^config.model.attention='pallas': SwinV2's Pallas window kernel runs on a "
    r"GPU, and these devices are cpu; set config.model.attention=auto$",
  ):
    models.check_platform(swin, "cpu")
  clip = config_lib.model_config("clip", image_tower="swinv2")
  clip.image.attention = kernels.WINDOW_KERNEL
  with pytest.raises(ConfigError, match="config.model.image.attention='pallas'"):
    models.check_platform(clip, "cpu")
  vit = config_lib.model_config("vit")
  vit.attention = kernels.WINDOW_KERNEL
  with pytest.raises(ConfigError, match="attention='pallas'.*auto.*softmax.*cudnn.*jax"):
    models.build(vit, jnp.float32, "gpu")
  with pytest.raises(ValueError, match="attention='pallas'"):
    kernels.attention(*(jnp.ones((1, 4, 2, 8)),) * 3, implementation=kernels.WINDOW_KERNEL)


def test_a_cpu_run_of_the_window_kernel_ends_with_one_error_line(tmp_path):
  """`python -m visionfm_jax.main` of the SwinV2 demo with attention=pallas on CPU devices: exit status 2, one
  `error:` line naming the field and the way out, before any data is read or state built."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "visionfm_jax.main",
      "--config=configs/swinv2_cls.py:demo",
      f"--workdir={tmp_path / 'run'}",
      "--config.model.attention=pallas",
    ],
    cwd=ROOT,
    env=cpu_env(1),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
    "error: config.model.attention='pallas': SwinV2's Pallas window kernel runs on a GPU, and these "
    "devices are cpu; set config.model.attention=auto"
  ]
  assert "Traceback" not in proc.stderr
