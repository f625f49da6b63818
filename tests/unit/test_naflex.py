"""NaFlex inputs (data/transforms/naflex.py) and the ViT's per-image position embeddings (models/vit.py), against
transformers' SigLIP 2 processor and torch's antialiased bilinear interpolate: the grid rule, the patches, their
mask and grid, and the resized position embeddings; the mixed-aspect demo data through the training loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.siglip2.image_processing_pil_siglip2 import (
  Siglip2ImageProcessorPil,
  get_image_size_for_max_num_patches,
)

from visionfm_jax import config_lib, data
from visionfm_jax.data.embedded import shapes
from visionfm_jax.data.text import tokenizer as tokenizer_lib
from visionfm_jax.data.transforms import naflex
from visionfm_jax.models import vit

SIZES = [(37, 90), (64, 64), (90, 25), (20, 30), (5, 500), (333, 7)]


def test_grid_is_siglip2s_rule():
  rng = np.random.default_rng(0)
  cases = [
    (int(h), int(w), int(p), int(n))
    for (h, w), p, n in zip(
      rng.integers(1, 1500, (300, 2)), rng.choice([2, 4, 14, 16], 300), rng.choice([4, 16, 64, 256, 576], 300)
    )
  ]
  for h, w, p, n in cases + [(h, w, 4, 64) for h, w in SIZES]:
    height, width = get_image_size_for_max_num_patches(h, w, p, n)
    rows, columns = naflex.grid_for_budget(h, w, p, n)
    assert (rows, columns) == (height // p, width // p), (h, w, p, n)
    assert rows * columns <= n


def test_patches_mask_and_grid_are_the_processors():
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
  hf = Siglip2ImageProcessorPil(patch_size=4, max_num_patches=64)(
    images=images, return_tensors="np", input_data_format="channels_last"
  )
  packed = np.stack([naflex.pack(image, 4, 64) for image in images])
  assert packed.shape == (len(SIZES), 65, 48) and packed.dtype == np.uint8
  ours = naflex.normalized(packed, 127.5, 127.5)  # the processor's mean and std 0.5, on the 0..255 scale
  np.testing.assert_array_equal(ours["grid"], hf["spatial_shapes"])
  np.testing.assert_array_equal(naflex.valid(ours["grid"], 64), hf["pixel_attention_mask"].astype(bool))
  np.testing.assert_allclose(ours["patches"], hf["pixel_values"], atol=1e-6)
  # a packed image unpacks to the resized image, as the panels show it
  rows, columns = hf["spatial_shapes"][0]
  assert naflex.unpacked_image(packed[0], 4).shape == (rows * 4, columns * 4, 3)
  np.testing.assert_array_equal(
    naflex.patchify(naflex.unpacked_image(packed[0], 4), 4), packed[0, 1 : 1 + rows * columns]
  )


@pytest.mark.parametrize("square", [4, 7])
def test_position_embeddings_are_torchs_antialiased_bilinear_resize(square):
  rng = np.random.default_rng(2)
  table = rng.standard_normal((square, square, 5)).astype(np.float32)
  grids = np.array([[2, 9], [square, square], [11, 3], [1, 1], [5, 5]], np.int32)  # shrunk, kept, stretched
  tokens = 64
  position_weights = jax.jit(vit.naflex_position_weights, static_argnums=(1, 2))  # one program, not one per op
  weights = np.asarray(position_weights(jnp.asarray(grids), tokens, square))
  resized = weights @ table.reshape(square * square, -1)
  for (rows, columns), got in zip(grids, resized):
    want = (
      F.interpolate(
        torch.from_numpy(table).permute(2, 0, 1)[None],
        size=(int(rows), int(columns)),
        mode="bilinear",
        align_corners=False,
        antialias=True,
      )[0]
      .permute(1, 2, 0)
      .numpy()
    )
    np.testing.assert_allclose(got[: rows * columns], want.reshape(rows * columns, -1), atol=1e-5)
  # an evaluation batch's padding row (all zeros: grid (0, 0)) stays finite
  assert np.all(np.isfinite(position_weights(jnp.zeros((1, 2), jnp.int32), tokens, square)))


def test_mixed_aspect_demo_batches_keep_each_images_aspect():
  config = config_lib.base_config("clip", task="contrastive")
  config.data.source, config.data.image_size, config.data.num_workers = "shapes:mixed_aspect", 32, 0
  config.data.naflex.max_tokens, config.data.naflex.patch_size = 64, 4
  config.data.augment.random_resized_crop = False
  tokenizer = tokenizer_lib.load(tokenizer_lib.shapes_tokenizer_path(), max_len=16)
  loader = data.make_pair_train_loader(config.data, tokenizer, batch_size=16, seed=0, process_index=0, process_count=1)
  batch = next(iter(loader))
  assert batch["image"].shape == (16, 65, 48)
  assert config.data.augment.flip and "flip" not in batch  # flipped on the host, before the patches
  grids = naflex.grids(batch["image"])
  assert len({tuple(g) for g in grids}) >= 3 and np.all(np.prod(grids, axis=1) <= 64)
  for rows, columns in grids:  # each the aspect of a drawn image, within the rounding up to whole patches
    assert any(abs(columns / rows - aspect) <= aspect * (1 / rows + 1 / columns) for aspect in shapes.ASPECTS)
