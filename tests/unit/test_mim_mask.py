"""SimMIM masks from the data pipeline: transforms.mim_mask / AddMimMask and the pair loaders' `mim` option."""

import math
import pickle

import ml_collections
import numpy as np
import pytest

from visionfm_jax.data.loader import pipeline
from visionfm_jax.data.text import tokenizer
from visionfm_jax.data.transforms import host as transforms

import test_data  # tests/ is on sys.path under pytest
from test_pairs_data import MAX_LEN, PairRange, data_config

MIM = ml_collections.ConfigDict({"mask_patch_size": 4, "mask_ratio": 0.6})  # 32 px images: an 8 x 8 grid
GRID, ONES = 8, 39  # ceil(64 * 0.6)


@pytest.fixture(scope="module")
def tok():
  return tokenizer.Tokenizer(tokenizer.shapes_tokenizer_path(), MAX_LEN)


@pytest.mark.parametrize("grid,ratio", [(14, 0.6), (8, 0.6), (7, 0.5), (6, 0.75), (3, 0.1)])
def test_mask_count_is_exact(grid, ratio):
  rng = np.random.default_rng(0)
  masks = [transforms.mim_mask(grid, ratio, rng) for _ in range(20)]
  for mask in masks:
    assert mask.shape == (grid, grid) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert mask.sum() == math.ceil(grid * grid * ratio)
  if grid == 14:
    assert masks[0].sum() == 118  # REFERENCE: 448 px, 32 px mask patches
  if grid >= 6:  # many possible masks: all differ, and every position is masked in some of them
    assert len({m.tobytes() for m in masks}) == len(masks)
    assert np.stack(masks).sum(0).min() > 0


def test_add_mim_mask_op():
  op = pickle.loads(pickle.dumps(transforms.AddMimMask(448, 32, 0.6)))  # as grain workers get it
  element = {"image": np.zeros((2, 2, 3), np.uint8), "text": np.arange(3)}
  out = op.random_map(element, np.random.default_rng(1))
  assert set(out) == {"image", "text", "mim_mask"} and "mim_mask" not in element
  assert out["mim_mask"].shape == (14, 14) and out["mim_mask"].sum() == 118
  np.testing.assert_array_equal(out["mim_mask"], op.random_map(element, np.random.default_rng(1))["mim_mask"])
  assert op.spec(448) == {"mim_mask": ((14, 14), np.uint8)}
  with pytest.raises(ValueError, match="image_size=448, not 224"):
    op.spec(224)


@pytest.mark.parametrize(
  "size,patch,ratio,match",
  [
    (32, 5, 0.6, "mask_patch_size=5"),
    (32, 0, 0.6, "mask_patch_size=0"),
    (32, 64, 0.6, "mask_patch_size=64"),
    (32, 4, 0.0, "ratio=0.0"),
    (32, 4, 1.0, "ratio=1.0"),
    (32, 4, -0.2, "ratio=-0.2"),
  ],
)
def test_bad_mask_settings(size, patch, ratio, match):
  with pytest.raises(ValueError, match=match):
    transforms.AddMimMask(size, patch, ratio)


def test_bad_mask_settings_in_the_loaders(tok):
  bad = ml_collections.ConfigDict({"mask_patch_size": 6, "mask_ratio": 0.6})
  with pytest.raises(ValueError, match="mask_patch_size=6.*image_size=32"):
    pipeline.make_pair_train_loader(data_config(), tok, batch_size=4, seed=0, process_index=0, process_count=1, mim=bad)
  bad = ml_collections.ConfigDict({"mask_patch_size": 4, "mask_ratio": 1.5})
  with pytest.raises(ValueError, match="ratio=1.5"):
    pipeline.make_pair_eval_iterator(data_config(), tok, batch_size=4, process_index=0, process_count=1, mim=bad)


def _train_batches(tok, seed, n=2, **kwargs):
  it = iter(
    pipeline.make_pair_train_loader(
      data_config(), tok, batch_size=8, seed=seed, process_index=0, process_count=1, mim=MIM, **kwargs
    )
  )
  return [next(it) for _ in range(n)]


def test_train_batches_carry_masks(tok):
  batches = _train_batches(tok, seed=3)
  for batch in batches:
    assert set(batch) == {"image", "text", "has_text", "label", "mim_mask"}
    assert batch["mim_mask"].shape == (8, GRID, GRID) and batch["mim_mask"].dtype == np.uint8
    assert (batch["mim_mask"].sum((1, 2)) == ONES).all()
  masks = np.concatenate([b["mim_mask"] for b in batches])
  assert len({m.tobytes() for m in masks}) == len(masks)  # every example its own mask
  # The same seed gives the same batches, masks included; another seed other masks.
  for want, got in zip(batches, _train_batches(tok, seed=3)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert not np.array_equal(_train_batches(tok, seed=4, n=1)[0]["mim_mask"], batches[0]["mim_mask"])
  # Without `mim` the batches are as before.
  plain = next(
    iter(pipeline.make_pair_train_loader(data_config(), tok, batch_size=8, seed=3, process_index=0, process_count=1))
  )
  assert set(plain) == {"image", "text", "has_text", "label"}
  np.testing.assert_array_equal(plain["image"], batches[0]["image"])


def test_train_masks_resume_bitwise(tmp_path, tok):
  def fresh():
    return iter(
      pipeline.make_pair_train_loader(
        data_config(), tok, batch_size=8, seed=5, process_index=0, process_count=1, mim=MIM
      )
    )

  test_data.assert_resumes(fresh, tmp_path, ("state", "replay"), skip=2)


def _eval_masks(tok, batch_size, process_count=1, source=None):
  """{record label: mask} over every process's share, and the batches."""
  masks, batches = {}, []
  for index in range(process_count):
    for b in pipeline.make_pair_eval_iterator(
      data_config(image_size=32),
      tok,
      batch_size=batch_size,
      process_index=index,
      process_count=process_count,
      source=source,
      mim=MIM,
    ):
      batches.append(b)
      for label, mask in zip(b["label"][b["mask"]], b["mim_mask"][b["mask"]]):
        masks[int(label)] = mask
  return masks, batches


def test_eval_masks_depend_on_the_record_only(tok):
  source = PairRange(30)
  masks, batches = _eval_masks(tok, 8, source=source)
  assert sorted(masks) == list(range(30)) and len({m.tobytes() for m in masks.values()}) == 30
  for b in batches:
    assert set(b) == {"image", "text", "has_text", "label", "mim_mask", "mask"}
    assert b["mim_mask"].shape == (8, GRID, GRID) and b["mim_mask"].dtype == np.uint8
    assert (b["mim_mask"][b["mask"]].sum((1, 2)) == ONES).all()
    assert (b["mim_mask"][~b["mask"]] == 0).all()  # padding rows: empty masks
  assert (~batches[-1]["mask"]).sum() == 2
  for other in (
    _eval_masks(tok, 8, source=source)[0],
    _eval_masks(tok, 5, source=source)[0],
    _eval_masks(tok, 4, process_count=3, source=source)[0],
  ):
    assert sorted(other) == list(range(30))
    for label, mask in masks.items():
      np.testing.assert_array_equal(other[label], mask)


def test_eval_masks_on_shapes(tok):
  first = list(
    pipeline.make_pair_eval_iterator(data_config(), tok, batch_size=16, process_index=0, process_count=1, mim=MIM)
  )
  second = list(
    pipeline.make_pair_eval_iterator(data_config(), tok, batch_size=16, process_index=0, process_count=1, mim=MIM)
  )
  assert len(first) == 3 and first[-1]["mask"].sum() == 8  # 40 records
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert (a["mim_mask"][a["mask"]].sum((1, 2)) == ONES).all() and (a["mim_mask"][~a["mask"]] == 0).all()
