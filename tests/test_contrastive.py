"""The contrastive (CLIP) task: training through the loop with zero-shot and retrieval evaluation, resolution
transfer, fp16 overflow handling, the temperature clamp, Mixup, and the evaluators' arithmetic."""

import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import tiny_clip_config as _tiny
from test_train_step import _setup
import test_real_data
from visionfm_jax import parallel, tasks
from visionfm_jax.errors import ConfigError
from visionfm_jax.training import checkpoint, optim, train
from visionfm_jax.evaluate import retrieval, zeroshot
from visionfm_jax.models import clip
from visionfm_jax.tasks import contrastive


def _random_pairs(config, n, seed=0):
  rng = np.random.default_rng(seed)
  size, length = config.data.image_size, config.model.text.max_len
  batches = []
  for _ in range(n):
    text = rng.integers(4, 200, (config.global_batch_size, length), dtype=np.int32)
    text[:, 0], text[:, 10], text[:, 11:] = 2, 3, 0
    batches.append({"image": rng.integers(0, 256, (config.global_batch_size, size, size, 3), dtype=np.uint8),
                    "text": text})
  return batches


def test_clip_trains_evaluates_and_transfers_resolution(tmp_path):
  """From img2dataset tars converted by tools.prepare_data; zero-shot on the labelled shapes set."""
  config = _tiny(strategy="zero3", **{"data.num_workers": 0, "eval.zeroshot_source": "shapes",
                                      "eval.zeroshot_examples": -1, "data.shapes_eval_size": 40})
  config.data.source = test_real_data.convert_shapes_tars(tmp_path, train=64, validation=48)
  first = train.run(config, str(tmp_path / "low"))
  assert first["step"] == 4 and np.isfinite(first["train/loss"]) and first["data/skipped"] == 0
  for key in ("eval/zeroshot/top1", "eval/zeroshot/top5", "eval/retrieval/i2t_r1", "eval/retrieval/i2t_r5",
              "eval/retrieval/i2t_r10", "eval/retrieval/t2i_r1", "eval/retrieval/t2i_r10"):
    assert 0.0 <= first[key] <= 1.0, key
  assert first["eval/retrieval/count"] == 48
  assert first["eval/zeroshot/count"] == 40  # its own count (-1: every example), not data.eval_examples
  assert 0.0 < first["train/logit_scale"] <= 100.0

  high = _tiny("ft640", init_from=str(tmp_path / "low"), total_steps=1, **{"optim.warmup_steps": 1})
  second = train.run(high, str(tmp_path / "high"))
  assert second["step"] == 1 and np.isfinite(second["eval/zeroshot/top1"])
  # The image tower normalises its position bias by the windows of the run it starts from, read from its config.
  written = json.loads((tmp_path / "high" / "config.json").read_text())
  assert written["model"]["image"]["pretrained_window_sizes"] == [4, 4]
  # At lr 0 (the first warmup step) the new run's params are the old run's, all of them.
  target = nn.unbox(jax.jit(lambda: tasks.build(high).init_variables(jax.random.key(0))["params"])())
  chex.assert_trees_all_equal(checkpoint.load_params(str(tmp_path / "low"), target),
                              checkpoint.load_params(str(tmp_path / "high"), target))


def test_fp16_overflow_skips_exactly_that_step_and_continues():
  config = _tiny(**{"precision.compute_dtype": "float16", "precision.loss_scale_init": 2.0**12, "strategy": "zero3"})
  batches = _random_pairs(config, 4)
  for i, b in enumerate(batches):  # the third batch overflows
    b["poison"] = np.full((config.global_batch_size,), i == 2, np.bool_)

  class OverflowingTask(tasks.ContrastiveTask):
    """Gradients become inf on a poisoned batch, as an fp16 overflow makes them."""

    def loss(self, params, batch, rng):
      loss, aux = super().loss(params, batch, rng)
      return loss * jnp.where(jnp.any(batch["poison"]), jnp.inf, 1.0), aux

  mesh = parallel.make_mesh(config.mesh)
  state, step, _ = _setup(config, OverflowingTask(config, mesh))
  history = []
  for b in batches:
    before = jax.device_get(state.params)
    state, m = step(state, b)
    history.append((m, before, jax.device_get(state.params)))
  skipped = [int(m["train/skipped_steps"]) for m, _, _ in history]
  assert skipped == [0, 0, 1, 1]
  scales = [float(m["train/loss_scale"]) for m, _, _ in history]
  assert scales == [2.0**12, 2.0**12, 2.0**12, 2.0**11]
  chex.assert_trees_all_equal(history[2][1], history[2][2])  # the overflowing step changed nothing
  assert not np.allclose(history[3][1]["image_proj"]["kernel"], history[3][2]["image_proj"]["kernel"])
  assert all(np.isfinite(m["train/loss"]) for i, (m, _, _) in enumerate(history) if i != 2)
  # train/lr is the rate applied: the skipped step did not advance the schedule, so steps 3 and 4 share it.
  schedule = optim.schedule(config.optim, config.total_steps)
  lrs = [float(m["train/lr"]) for m, _, _ in history]
  np.testing.assert_allclose(lrs, [float(schedule(i)) for i in (0, 1, 2, 2)], rtol=1e-6)


def test_temperature_is_clamped_after_every_update():
  config = _tiny(**{"optim.lr": 10.0, "optim.clip_norm": 0.0, "strategy": "ddp"})
  state, step, _ = _setup(config)
  assert float(state.params["logit_scale"]) == pytest.approx(math.log(1 / 0.07), abs=1e-6)
  state = state.replace(params={**state.params, "logit_scale": jnp.float32(4.6)})
  for b in _random_pairs(config, 2):
    state, _ = step(state, b)
    assert 0.0 <= float(state.params["logit_scale"]) <= math.log(100.0) + 1e-6
  clamped = clip.clamp_logit_scale({"logit_scale": jnp.float32(9.0), "other": 1})
  assert float(clamped["logit_scale"]) == pytest.approx(math.log(100.0)) and clamped["other"] == 1


@pytest.mark.parametrize("mixup_alpha", [0.0, 0.4])
def test_sharded_task_loss_equals_the_single_device_loss(mixup_alpha):
  config = _tiny(**{"data.augment.mixup_alpha": mixup_alpha})
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  plain, sharded = tasks.build(config), tasks.build(config, mesh)
  params = nn.unbox(plain.init_variables(jax.random.key(0))["params"])
  batch = _random_pairs(config, 1)[0]
  want, _ = jax.jit(plain.loss)(params, batch, jax.random.key(3))
  got, _ = jax.jit(sharded.loss)(params, batch, jax.random.key(3))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_retrieval_ranks_and_ties():
  # Pair 0 is found first, pair 1 second (text 0 scores higher for image 1), pair 2 tied with text 0.
  scores = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.3, 0.0, 0.3]])
  np.testing.assert_array_equal(retrieval.ranks(scores), [0, 1, 1])
  np.testing.assert_array_equal(retrieval.ranks(np.zeros((4, 4))), [0, 1, 2, 3])  # constant: chance
  emb = np.eye(5)
  r = retrieval.recall_at_k(emb, emb)
  assert r["i2t_r1"] == r["t2i_r1"] == 1.0
  r = retrieval.recall_at_k(emb, np.roll(emb, 1, axis=0), ks=(1, 5))
  assert r["i2t_r1"] == 0.0 and r["i2t_r5"] == 1.0


def test_zeroshot_split_applies_to_the_eval_source_too():
  """config.eval.zeroshot_split used to be read only with a zeroshot_source, and silently ignored without one."""
  config = _tiny(**{"eval.zeroshot_source": "", "eval.zeroshot_split": "train", "eval.zeroshot_examples": 8})
  data_cfg = contrastive.zeroshot_data_config(config.data, config.eval)
  assert (data_cfg.eval_source, data_cfg.eval_split, data_cfg.eval_examples) == ("", "train", 8)
  config.eval.zeroshot_split = ""  # the eval split
  assert contrastive.zeroshot_data_config(config.data, config.eval).eval_split == config.data.eval_split
  config.eval.zeroshot_source, config.eval.zeroshot_split = "shapes", "test"
  data_cfg = contrastive.zeroshot_data_config(config.data, config.eval)
  assert (data_cfg.eval_source, data_cfg.eval_split) == ("shapes", "test")


def test_zeroshot_prompt_ensembling():
  names, templates = zeroshot.class_names_and_templates("imagenet")
  # OpenAI's list repeats two names (two 'missile' and two 'sunglasses' classes); test_openai_zeroshot_set
  # compares it with open_clip's copy entry for entry.
  assert len(names) == 1000 and len(set(names)) == 998 and names[0] == "tench"
  assert len(templates) == 80 == len(set(templates)) and all(t.count("{}") == 1 for t in templates)
  simple_names, simple = zeroshot.class_names_and_templates("imagenet_simple")
  assert simple_names == names and len(simple) == 8 and set(simple) < set(templates)
  with pytest.raises(ConfigError, match="zeroshot_classes='imagenet21k'"):
    zeroshot.class_names_and_templates("imagenet21k")
  assert zeroshot.prompts(["cat", "dog"], ["a {}", "the {}"]) == ["a cat", "the cat", "a dog", "the dog"]

  def embed(_, tokens):  # two prompts per class whose mean points along the class axis
    return jnp.asarray(tokens, jnp.float32)
  tokens = np.array([[1, 1, 0], [1, -1, 0], [0, 1, 1], [0, 1, -1]], np.float32)
  classes = zeroshot.class_embeddings(embed, None, tokens, 2)
  np.testing.assert_allclose(classes, [[1, 0, 0], [0, 1, 0]], atol=1e-6)


def test_short_shapes_captions_name_size_colour_and_shape_only():
  config = _tiny()
  source = tasks.contrastive.data.build_source("shapes", "train", config.data)
  full = tasks.contrastive.data.shapes.ShapesSource("train", 5, 16)
  for i in range(5):
    short, long = source[i]["caption"], full[i]["caption"]
    assert long.startswith(short + " ") and "background" in long and "background" not in short
    assert len(short.split()) == 4


@pytest.mark.parametrize("mixup_alpha", [0.0, 0.4])
def test_four_accumulation_steps_equal_one_batch_of_four_times_the_size(mixup_alpha):
  """Two-pass accumulation: CLIP's negatives and Mixup partners span the whole batch of 32, not each micro-batch
  of 8 (the partner of a micro-batch's first row sits in another micro-batch): the loss and the gradients of
  4 micro-batches are those of the whole batch."""
  config = _tiny(global_batch_size=32, **{"data.augment.mixup_alpha": mixup_alpha})
  mesh = parallel.make_mesh(config.mesh)
  task = tasks.build(config, mesh)
  params = nn.unbox(task.init_variables(jax.random.key(0))["params"])
  batch = _random_pairs(config, 1)[0]
  rng = jax.random.key(7)
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  with mesh, parallel.activation_sharding(mesh):
    want_loss, want = jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch, rng)[0]))(params)
    got, got_loss, _ = jax.jit(lambda p: train.two_pass_grads(task, p, batch, 4, rng, 1.0, replicated))(params)
    naive = jax.jit(lambda p: sum(task.loss(p, jax.tree.map(lambda x, j=j: x[j::4], batch), rng)[0]
                                  for j in range(4)) / 4)(params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  assert abs(float(naive) - float(want_loss)) > 0.1  # the equalities above mean something
