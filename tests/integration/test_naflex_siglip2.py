"""NaFlex ViT towers (SigLIP 2): transformers' Siglip2VisionModel imported through tools.import_hf matches ours on
images of several aspect ratios (the processor's patches against our data path, the pooled MAP-head features and
the tokens, fp32) and tools.export_hf writes its tensors back unchanged; a NaFlex SigLIP
(configs/swinv2_g_clip.py:demo,naflex shrunk) trains through main on 8 devices on mixed-aspect images, evaluates
zero-shot at native aspect at two token budgets, and exports its tower with the processor of its inputs; NaFlex
where it does not apply (a SwinV2 tower) is one error line."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
import torch
from transformers import AutoImageProcessor, Siglip2VisionConfig, Siglip2VisionModel
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

from visionfm_jax import models
from visionfm_jax.data.transforms import naflex
from visionfm_jax.tools import export_hf, import_hf
from visionfm_jax.training import stored

from test_bad_input import run_main_in_process

PATCH, BUDGET = 4, 24


def _siglip2_dir(path) -> str:
  torch.manual_seed(0)
  config = Siglip2VisionConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH, num_patches=16
  )  # a 4 x 4 grid of position embeddings
  Siglip2VisionModel(config).eval().save_pretrained(path)
  return str(path)


def _params_target(model):
  """The model's params as shapes on one device (jax.eval_shape: no init compiled, nor run op by op)."""
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]))
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device), shapes)


def test_imported_siglip2_matches_transformers_at_several_aspects(tmp_path, capsys):
  src, out = _siglip2_dir(tmp_path / "hf"), str(tmp_path / "imported")
  assert import_hf.main(["import_hf", f"--src={src}", f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert "--config.model.class_token=False" in printed and "--config.model.pool=map" in printed
  with open(os.path.join(out, "model.json")) as f:
    model = models.from_checkpoint_fields(json.load(f))
  params = stored.load_params(out, _params_target(model))

  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 90), (64, 64), (90, 25), (13, 30))]
  processed = Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=BUDGET)(
    images=images, return_tensors="pt", input_data_format="channels_last"
  )
  ours = naflex.normalized(np.stack([naflex.pack(image, PATCH, BUDGET) for image in images]), 127.5, 127.5)
  np.testing.assert_allclose(ours["patches"], processed["pixel_values"].numpy(), atol=1e-6)
  np.testing.assert_array_equal(ours["grid"], processed["spatial_shapes"].numpy())
  assert len({tuple(g) for g in ours["grid"].tolist()}) == 4  # shrunk and stretched position grids alike

  with torch.no_grad():
    want = Siglip2VisionModel.from_pretrained(src).eval()(**processed)
  got = jax.jit(model.apply)({"params": params}, ours)
  np.testing.assert_allclose(got["pooled"], want.pooler_output.numpy(), atol=1e-5)
  valid = processed["pixel_attention_mask"].numpy().astype(bool)
  np.testing.assert_allclose(np.asarray(got["tokens"])[valid], want.last_hidden_state.numpy()[valid], atol=1e-5)

  back = str(tmp_path / "exported")
  assert export_hf.main(["export_hf", f"--checkpoint={out}", f"--out={back}"]) == 0
  original, exported = (
    load_file(os.path.join(src, "model.safetensors")),
    load_file(os.path.join(back, "model.safetensors")),
  )
  assert sorted(original) == sorted(exported)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def _naflex_flags(workdir):
  return [
    "--config=configs/swinv2_g_clip.py:demo,naflex",
    f"--workdir={workdir}",
    "--config.model.image.variant=32x1x64x2/4",
    "--config.model.text.variant=32x1x128x2",
    "--config.model.embed_dim=32",
    "--config.model.image_size=16",
    "--config.data.image_size=16",
    f"--config.data.naflex.max_tokens={BUDGET}",
    "--config.eval.zeroshot_naflex_tokens=(6,)",
    "--config.global_batch_size=16",
    "--config.total_steps=2",
    "--config.optim.warmup_steps=1",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.log_every=1",
    "--config.data.eval_examples=16",
    "--config.eval.retrieval=False",
    "--config.progress_bar=False",
  ]


def test_naflex_siglip_trains_on_mixed_aspects_and_evaluates_at_two_budgets(tmp_path, monkeypatch, capsys):
  status, _, err = run_main_in_process(_naflex_flags(tmp_path / "run"), monkeypatch, capsys)
  assert status == 0, err
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  losses = [row["train/loss"] for row in rows if "train/loss" in row]
  assert len(losses) == 2 and all(np.isfinite(losses))
  final = rows[-1]
  for name in ("zeroshot", "zeroshot_6tok"):  # the training budget, and 6 patches an image
    assert final[f"eval/{name}/count"] == 16 and 0.0 <= final[f"eval/{name}/top1"] <= 1.0
  assert "train/logit_bias" in rows[0]  # SigLIP's loss

  out = str(tmp_path / "exported")
  assert export_hf.main(["export_hf", f"--checkpoint={tmp_path / 'run'}", f"--out={out}"]) == 0
  processor = AutoImageProcessor.from_pretrained(out, backend="pil")
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 50), (44, 17))]
  inputs = processor(images=images, return_tensors="pt", input_data_format="channels_last")
  with torch.no_grad():
    want = Siglip2VisionModel.from_pretrained(out).eval()(**inputs).pooler_output.numpy()
  source = export_hf.load(str(tmp_path / "run"))
  packed = np.stack([naflex.pack(image, PATCH, BUDGET) for image in images])
  mean, std = (np.asarray(x, np.float32) * 255 for x in (source.mean, source.std))
  got = jax.jit(source.model.apply)({"params": source.params}, naflex.normalized(packed, mean, std))["pooled"]
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
  "variant, flags, culprit",
  [
    ("demo,siglip", ["--config.data.naflex.max_tokens=64"], "config.data.naflex.max_tokens=64: a swinv2 tower"),
    ("demo,naflex", ["--config.data.augment.mixup_alpha=0.8"], "config.data.augment.mixup_alpha=0.8"),
    ("demo,siglip", ["--config.eval.zeroshot_naflex_tokens=(16,)"], "config.eval.zeroshot_naflex_tokens=(16,)"),
  ],
)
def test_naflex_where_it_does_not_apply_is_one_error_line(tmp_path, monkeypatch, capsys, variant, flags, culprit):
  status, _, err = run_main_in_process(
    [f"--config=configs/swinv2_g_clip.py:{variant}", f"--workdir={tmp_path}", *flags], monkeypatch, capsys
  )
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert status != 0 and len(errors) == 1 and culprit in errors[0], err
