"""The contrastive (CLIP) task: training through the loop with zero-shot and retrieval evaluation, resolution
transfer, fp16 overflow handling, the temperature clamp, Mixup, and the evaluators' arithmetic."""

import functools
import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image
import pytest

from visionfm_jax import data, parallel, tasks
from visionfm_jax.data.embedded import shapes
from visionfm_jax.errors import ConfigError
from visionfm_jax.evaluate import panels, retrieval, zeroshot
from visionfm_jax.models import clip
from visionfm_jax.tasks import contrastive, image_text
from visionfm_jax.trained import workdir as workdir_lib
from visionfm_jax.training import grads as grads_lib
from visionfm_jax.training import optim, stored, train

from conftest import random_params
from conftest import tiny_clip_config as _tiny
import test_real_data
from test_train_step import _setup


def _random_pairs(config, n, seed=0):
  rng = np.random.default_rng(seed)
  size, length = config.data.image_size, config.model.text.max_len
  batches = []
  for _ in range(n):
    text = rng.integers(4, 200, (config.global_batch_size, length), dtype=np.int32)
    text[:, 0], text[:, 10], text[:, 11:] = 2, 3, 0
    batches.append(
      {"image": rng.integers(0, 256, (config.global_batch_size, size, size, 3), dtype=np.uint8), "text": text}
    )
  return batches


def _recall_at_k(image_emb, text_emb, k):
  """R@k both ways of N pairs, by a stable sort of each query's scores (ties: the lower index first)."""
  scores = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T

  def recall(s):
    order = np.argsort(-s, axis=1, kind="stable")
    return np.mean(np.argmax(order == np.arange(len(s))[:, None], axis=1) < k)

  return recall(scores), recall(scores.T)


def _top_k(image_emb, class_emb, labels, k):
  scores = np.asarray(image_emb, np.float64) @ np.asarray(class_emb, np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")
  return np.mean(np.argmax(order == labels[:, None], axis=1) < k)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _eval_metrics_by_numpy(config, params):
  """The zero-shot and held-out retrieval metrics of `params` recomputed here: the same eval batches, one
  forward of each tower over all of them, and the ranking in numpy (stable sorts in float64)."""
  task = tasks.build(config)
  pairs = list(
    data.make_pair_eval_iterator(config.data, task.tokenizer, batch_size=16, process_index=0, process_count=1)
  )
  zs_data = contrastive.zeroshot_data_config(config.data, config.eval)
  labelled = list(data.make_eval_iterator(zs_data, batch_size=16, process_index=0, process_count=1))
  kept = lambda batches, key: np.concatenate([b[key][b["mask"].astype(bool)] for b in batches])
  names, templates = zeroshot.class_names_and_templates(config.eval.zeroshot_classes)
  prompts = task.tokenizer.encode_batch(zeroshot.prompts(names, templates))
  pair_images, pair_texts = kept(pairs, "image"), kept(pairs, "text")
  images = np.concatenate([pair_images, kept(labelled, "image")])
  embed = jax.jit(lambda p, i, t: (task.embed_images(p, i), task.embed_texts(p, t)))
  image_emb, text_emb = (np.asarray(x) for x in embed(params, images, np.concatenate([pair_texts, prompts])))
  n = len(pair_images)
  class_emb = _unit(_unit(text_emb[n:]).reshape(len(names), len(templates), -1).mean(axis=1))
  out = {"eval/retrieval/count": n, "eval/zeroshot/count": len(images) - n}
  for k in (1, 5, 10):
    out[f"eval/retrieval/i2t_r{k}"], out[f"eval/retrieval/t2i_r{k}"] = _recall_at_k(image_emb[:n], text_emb[:n], k)
  for k in (1, 5):
    out[f"eval/zeroshot/top{k}"] = _top_k(image_emb[n:], class_emb, kept(labelled, "label"), k)
  return out


@pytest.mark.slow
def test_clip_trains_transfers_resolution_and_evaluates_as_numpy_does(tmp_path):
  """From img2dataset tars converted by datatools.prepare_data: 4 steps at 16 px (ZeRO-3), then the ft640 variant at
  32 px from them (init_from) evaluates zero-shot on the labelled shapes set and retrieval on the held-out
  pairs; every metric equals its numpy recomputation from the model's embeddings."""
  source = test_real_data.convert_shapes_tars(tmp_path, train=64, validation=48)
  config = _tiny(
    strategy="zero3",
    **{"data.num_workers": 0, "data.source": source, "eval.zeroshot_classes": "", "eval.retrieval": False},
  )
  first = train.run(config, str(tmp_path / "low"))
  assert first["step"] == 4 and np.isfinite(first["train/loss"]) and first["data/skipped"] == 0
  assert not any(key.startswith("eval/") for key in first)  # no evaluator configured

  high = _tiny(
    "ft640",
    init_from=str(tmp_path / "low"),
    total_steps=1,
    strategy="zero3",
    **{
      "optim.warmup_steps": 1,
      "data.num_workers": 0,
      "data.source": source,
      "eval.zeroshot_source": "shapes",
      "eval.zeroshot_examples": -1,
      "data.shapes_eval_size": 40,
    },
  )
  second = train.run(high, str(tmp_path / "high"))
  assert second["step"] == 1
  # Its panel: a row of the held-out images with their captions and zero-shot classes, then one row per caption of
  # the images it retrieves.
  panel = np.asarray(Image.open(tmp_path / "high" / "panels" / "step_1.png"))
  assert panel.shape[0] >= (1 + image_text.PANEL_CAPTIONS) * panels.TILE
  assert panel.shape[1] >= image_text.PANEL_IMAGES * panels.TILE
  # The image tower normalises its position bias by the windows of the run it starts from, as its config states.
  written = json.loads((tmp_path / "high" / "config.json").read_text())
  assert written["model"]["image"]["pretrained_window_sizes"] == [4]
  # At lr 0 (the first warmup step) the new run's params are the old run's, all of them.
  abstract = jax.eval_shape(lambda: nn.unbox(tasks.build(high).init_variables(jax.random.key(0))["params"]))
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device), abstract)
  params = stored.load_params(str(tmp_path / "low"), target)
  chex.assert_trees_all_equal(params, stored.load_params(str(tmp_path / "high"), target))
  # Its evaluation (after that step: of those params) at 32 px; the counts are the sets' own (zero-shot: -1,
  # every example of its 40, not data.eval_examples).
  # rebuilt as the tools rebuild a workdir's model: from its config.json
  trained = workdir_lib.load_config(str(tmp_path / "high"), (high.task,), "a CLIP model")
  assert tuple(trained.model.image.pretrained_window_sizes) == (4,)
  want = _eval_metrics_by_numpy(trained, params)
  assert (want["eval/retrieval/count"], want["eval/zeroshot/count"]) == (48, 40)
  assert {k: second[k] for k in want} == pytest.approx(want, abs=1e-9)
  # train/logit_scale is the temperature applied: exp of the params' (the step-1 forward ran on the old run's).
  ls = float(params["logit_scale"])
  assert second["train/logit_scale"] == pytest.approx(math.exp(ls), rel=1e-6)
  # The old run's, logged at its step 4, is one Adam update (at most ~lr) from its final value.
  assert abs(math.log(first["train/logit_scale"]) - ls) <= 3 * config.optim.lr


@pytest.mark.slow
def test_fp16_overflow_skips_exactly_that_step_and_the_temperature_is_clamped_after_every_update():
  """An overflowing step changes nothing (params, schedule), the loss scale halves after it; the temperature
  (train/logit_scale = exp of the param) is clamped into [0, log 100] after every applied update: set out of
  range before steps 2 and 4, it leaves them exactly on the bound (clamping before the update would leave it
  an update (~lr) away)."""
  # At a scale of 2**12 the temperature's bound (logits up to 100) overflowed a step; at 2**8 none does.
  config = _tiny(**{"precision.compute_dtype": "float16", "precision.loss_scale_init": 2.0**8, "strategy": "zero3"})
  batches = _random_pairs(config, 4)
  for i, b in enumerate(batches):  # the third batch overflows
    b["poison"] = np.full((config.global_batch_size,), i == 2, np.bool_)

  class OverflowingTask(tasks.ContrastiveTask):
    """Gradients become inf on a poisoned batch, as an fp16 overflow makes them."""

    def loss(self, params, batch, rng):
      loss, aux = super().loss(params, batch, rng)
      return loss * jnp.where(jnp.any(batch["poison"]), jnp.inf, 1.0), aux

  mesh = parallel.make_mesh(config.mesh)
  task = OverflowingTask(config, mesh)
  # The temperature's init alone; the state's params drawn at random around it (no init compile).
  init = nn.unbox(task.model.init(jax.random.key(0), method=lambda m: m.logit_scale)["params"])
  assert float(init["logit_scale"]) == pytest.approx(math.log(1 / 0.07), abs=1e-6)
  params = _random_params(json.dumps(config.model.to_dict(), sort_keys=True))
  # as host arrays: the state's init lays them out (from one device, each leaf would be resharded on its own)
  state, step, _ = _setup(config, task, params=jax.device_get(params))
  assert float(state.params["logit_scale"]) == float(init["logit_scale"])
  out_of_range = {1: math.log(100.0) + 0.05, 3: -0.05}  # step index -> the temperature param set before it
  history = []
  for i, b in enumerate(batches):
    if i in out_of_range:  # laid out as the param it replaces: another sharding would compile the step again
      old = state.params["logit_scale"]
      state = state.replace(
        params={**state.params, "logit_scale": jax.device_put(jnp.float32(out_of_range[i]), old.sharding)}
      )
    before = jax.device_get(state.params)
    state, m = step(state, b)
    history.append((m, before, jax.device_get(state.params)))
  skipped = [int(m["train/skipped_steps"]) for m, _, _ in history]
  assert skipped == [0, 0, 1, 1]
  scales = [float(m["train/loss_scale"]) for m, _, _ in history]
  assert scales == [2.0**8, 2.0**8, 2.0**8, 2.0**7]
  chex.assert_trees_all_equal(history[2][1], history[2][2])  # the overflowing step changed nothing
  assert not np.allclose(history[3][1]["image_proj"]["kernel"], history[3][2]["image_proj"]["kernel"])
  assert all(np.isfinite(m["train/loss"]) for i, (m, _, _) in enumerate(history) if i != 2)
  # train/lr is the rate applied: the skipped step did not advance the schedule, so steps 3 and 4 share it.
  schedule = optim.schedule(config.optim, config.total_steps)
  lrs = [float(m["train/lr"]) for m, _, _ in history]
  np.testing.assert_allclose(lrs, [float(schedule(i)) for i in (0, 1, 2, 2)], rtol=1e-6)
  assert lrs[1] > 0 and lrs[3] > 0  # the out-of-range steps do update
  for m, before, _ in history:
    assert float(m["train/logit_scale"]) == pytest.approx(math.exp(float(before["logit_scale"])), rel=1e-6)
  temperatures = [float(after["logit_scale"]) for _, _, after in history]
  assert temperatures[1] == np.float32(math.log(100.0)) and temperatures[3] == 0.0
  clamped = clip.clamp_logit_scale({"logit_scale": jnp.float32(9.0), "other": 1})
  assert float(clamped["logit_scale"]) == pytest.approx(math.log(100.0)) and clamped["other"] == 1


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
  # in chunks of 3 rows, the last padded: every call has one shape, and the padding is dropped
  shapes_seen = []
  chunked = zeroshot.class_embeddings(
    lambda p, t: (shapes_seen.append(t.shape), embed(p, t))[1], None, tokens, 2, chunk=3
  )
  assert shapes_seen == [(3, 3), (3, 3)]
  np.testing.assert_allclose(chunked, classes, atol=1e-6)


def test_class_embeddings_embed_each_set_once_per_weights_and_read_subsets_from_it():
  """A run's zero-shot evaluators and panel share one ClassEmbeddings: the same set (ImageNet's 1000 classes for the
  zero-shot set, ImageNet-V2, -Sketch and the panel) goes through the text tower once per evaluation, a subset of
  a held set under the same templates (ImageNet-R's and -A's 200) is read from it, and new weights embed anew."""
  words = {"cat": [1.0, 0.0, 0.0], "dog": [0.0, 1.0, 0.0], "owl": [0.0, 0.0, 1.0]}
  encoded, embedded = [], []

  def encode(prompts):  # "a cat" -> the cat's axis; "the cat" -> the cat's axis tilted to the next one
    encoded.append(list(prompts))
    rows = [np.roll(words[p.split()[-1]], 1) * (p.startswith("the ")) * 0.5 + words[p.split()[-1]] for p in prompts]
    return np.asarray(rows, np.float32)

  def embed(params, tokens):
    embedded.append(len(tokens))
    return jnp.asarray(tokens) * params["scale"]

  shared = zeroshot.ClassEmbeddings(embed, encode)
  templates = ["a {}", "the {}"]
  params = {"scale": jnp.float32(2.0)}
  full = shared(params, ["cat", "dog", "owl"], templates)
  want = zeroshot.class_embeddings(embed, params, encode(zeroshot.prompts(["cat", "dog", "owl"], templates)), 3)
  encoded.clear(), embedded.clear()
  np.testing.assert_allclose(full, want, atol=1e-6)
  assert shared(params, ["cat", "dog", "owl"], templates) is full  # the same set: held
  np.testing.assert_array_equal(shared(params, ["owl", "cat"], templates), np.asarray(full)[[2, 0]])  # a subset
  assert encoded == embedded == []
  shared(params, ["cat"], ["a {}"])  # other templates: embedded
  assert encoded == [["a cat"]] and embedded == [1]
  new_params = {"scale": jnp.float32(3.0)}
  np.testing.assert_allclose(
    shared(new_params, ["owl", "cat"], templates), np.asarray(full)[[2, 0]], atol=1e-6
  )  # unit embeddings: the scale cancels, but the set is embedded again
  assert embedded == [1, 4]


def test_short_shapes_captions_name_size_colour_and_shape_only():
  config = _tiny()
  source = tasks.contrastive.data.build_source("shapes", "train", config.data)
  full = shapes.ShapesSource("train", 5, 16)
  for i in range(5):
    short, long = source[i]["caption"], full[i]["caption"]
    assert long.startswith(short + " ") and "background" in long and "background" not in short
    assert len(short.split()) == 4


@functools.lru_cache(maxsize=1)
def _random_params(model_json):
  """The tiny CLIP's params drawn at random by shape (conftest.random_params: no init compile; unlike the init's
  identity-like blocks, every param changes the loss), the temperature at the init's 1/0.07. The tests below
  differ only in what does not shape them."""
  config = _tiny()
  assert json.dumps(config.model.to_dict(), sort_keys=True) == model_json
  return {**random_params(tasks.build(config)), "logit_scale": jnp.float32(math.log(1 / 0.07))}


@pytest.mark.slow
@pytest.mark.parametrize("mixup_alpha,per_device", [(0.0, False), (0.4, True)])
def test_sharded_loss_and_four_accumulation_steps_equal_the_single_device_loss_of_the_whole_batch(
  mixup_alpha, per_device
):
  """On a (data 2, fsdp 4) mesh the sharded loss (B_local x B_global logits) equals the single-device loss; with
  two-pass accumulation CLIP's negatives and Mixup partners span the whole batch of 32, not each micro-batch of
  8 (the partner of a micro-batch's first row sits in another micro-batch): the loss and the gradients of 4
  micro-batches are those of the whole batch, unlike the mean of the micro-batches' own losses; also with each
  device accumulating its own gradients, summed once (`per_device`). The model runs 7 forwards for the 4
  micro-batches, not 8: pass 2's forward of the last one also completes the batch for the contrastive term (per
  device, each micro-batch runs twice)."""
  config = _tiny(global_batch_size=32, **{"data.augment.mixup_alpha": mixup_alpha, "mesh.data": 2, "mesh.fsdp": 4})
  mesh = parallel.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  plain, task = tasks.build(config), tasks.build(config, mesh)
  params = _random_params(json.dumps(config.model.to_dict(), sort_keys=True))
  batch = _random_pairs(config, 1)[0]
  rng = jax.random.key(7)
  single_device_loss = jax.jit(lambda p, b: plain.loss(p, b, rng)[0])
  micro_batches = [jax.tree.map(lambda x, j=j: x[j::4], batch) for j in range(4)]
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  forwards = []  # CLIP's forward is its batch_features, in both passes
  features = task.batch_features

  def counted_features(*args):
    jax.debug.callback(lambda: forwards.append(1))
    return features(*args)

  with parallel.activation_sharding(mesh):
    want_loss, want = jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch, rng)[0]))(params)
    task.batch_features = counted_features
    got, got_loss, _ = jax.jit(
      lambda p: grads_lib.two_pass_grads(task, p, batch, 4, rng, 1.0, replicated, mesh if per_device else None)
    )(params)
  jax.effects_barrier()
  assert len(forwards) == (2 * 4 * mesh.size if per_device else 4 + 3)
  np.testing.assert_allclose(want_loss, single_device_loss(params, batch), rtol=1e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  naive = sum(float(single_device_loss(params, micro)) for micro in micro_batches) / 4
  assert abs(naive - float(want_loss)) > 0.1  # the equalities above mean something


@pytest.mark.parametrize("variant", [(), ("vit", "flip")])
def test_the_towers_features_and_gradients_are_those_of_one_forward_of_both(variant):
  """`batch_features` embeds the images, then the texts, so that in the backward the text tower comes first
  (`image_text.backward_after`): as the model's one call of both towers, FLIP's token drop (a dropout draw) included,
  the same features bit for bit and the same gradients to rounding (the barrier changes what XLA fuses). Jitted:
  op by op, each primitive compiled on its own, the two variants took 34 CPU s, jitted 17."""
  config = _tiny(*variant, **({"model.image.variant": "pico/8"} if "vit" in variant else {}))
  task = tasks.build(config)
  params = random_params(task)
  batch = jax.tree.map(jnp.asarray, task.synthetic_batch(config.global_batch_size, np.random.default_rng(0)))
  rng = jax.random.key(1)
  batch, context = task.whole_batch(batch, rng)

  def both_at_once(p):
    out = task.model.apply(
      {"params": p}, task.mixed_images(batch, context), batch["text"], train=True, rngs={"dropout": rng}
    )
    return out["image_emb"], out["text_emb"]

  ordered = lambda p: task.batch_features(p, batch, rng, context)
  loss = lambda f: lambda p: sum(jnp.sum(jnp.sin(3 * x) * (i + 1)) for i, x in enumerate(f(p)))
  chex.assert_trees_all_equal(jax.jit(ordered)(params), jax.jit(both_at_once)(params))
  grads = lambda f: jax.jit(jax.grad(loss(f)))(params)
  chex.assert_trees_all_close(grads(ordered), grads(both_at_once), rtol=1e-5, atol=1e-5)
  barriers = lambda f: str(jax.make_jaxpr(jax.grad(loss(f)))(params)).count("optimization_barrier")
  assert barriers(ordered) == barriers(both_at_once) + 1  # the text tower's cotangents and the image embedding's


def test_backward_after_releases_the_second_cotangent_with_the_first_in_one_barrier():
  """Values and gradients pass through unchanged; the backward holds both cotangents in one optimization barrier, so
  whatever consumes the second's runs after the first's is complete."""
  first, then = {"w": jnp.arange(3.0)}, jnp.ones((2,))
  f = lambda a, b: jnp.sum(jnp.sin(a["w"])) * jnp.sum(jnp.cos(b))
  tied = lambda a, b: f(*image_text.backward_after(a, b))
  chex.assert_trees_all_equal(jax.grad(tied, argnums=(0, 1))(first, then), jax.grad(f, argnums=(0, 1))(first, then))
  barriers = [
    e
    for e in jax.make_jaxpr(jax.grad(tied, argnums=(0, 1)))(first, then).eqns
    if e.primitive.name == "optimization_barrier"
  ]
  assert len(barriers) == 1 and [v.aval.shape for v in barriers[0].invars] == [(3,), (2,)]
