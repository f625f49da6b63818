"""Frozen-backbone probes: the weighted k-NN vote and the L-BFGS linear probe on known cases, the evaluators of
a classification run on the shapes source, and tools.probe on a workdir."""

import functools
import json

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import scipy.optimize

from visionfm_jax import parallel, param_rules, tasks
from visionfm_jax.errors import DataError
from visionfm_jax.evaluate import probe
from visionfm_jax.tasks.base import EvalContext
from visionfm_jax.tools import probe as probe_tool
from visionfm_jax.training import checkpoint

from conftest import tiny_vit_config


def _clusters(n, dim=16, classes=4, spread=0.3, seed=0):
  """Gaussian clusters around random centres (separable when spread is small)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, dim))
  labels = rng.integers(0, classes, n)
  return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels.astype(np.int32)


def test_knn_separable_features_score_one_and_random_labels_score_chance():
  x, y = _clusters(600)
  assert probe.knn_top1(x[:400], y[:400], x[400:], y[400:]) == 1.0
  rng = np.random.default_rng(2)
  scores = [probe.knn_top1(x[:400], rng.permutation(y[:400]), x[400:], y[400:]) for _ in range(5)]
  assert abs(np.mean(scores) - 0.25) < 0.06, scores  # 4 classes; 1000 votes in all: +- 0.014
  # A train set of more than one padded bucket, a test set of more than one chunk.
  x, y = _clusters(probe.ROW_BUCKET + probe.CHUNK + 10, seed=3)
  assert (
    probe.knn_top1(
      x[: probe.ROW_BUCKET + 5], y[: probe.ROW_BUCKET + 5], x[probe.ROW_BUCKET + 5 :], y[probe.ROW_BUCKET + 5 :]
    )
    == 1.0
  )


def test_knn_vote_is_weighted_by_exp_similarity_over_temperature():
  # One close neighbour of class 1 against two farther ones of class 0 (cosine 1.0 vs 0.8).
  train_x = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]], np.float32)
  train_y = np.array([1, 0, 0, 2], np.int32)
  query, label1, label0 = np.array([[2.0, 0.0]], np.float32), np.array([1]), np.array([0])
  # exp(1 / T) vs 2 exp(0.8 / T): class 1 wins for T < 0.2 / ln 2 = 0.289, class 0 above.
  assert probe.knn_top1(train_x, train_y, query, label1, k=3, temperature=0.07) == 1.0
  assert probe.knn_top1(train_x, train_y, query, label0, k=3, temperature=1.0) == 1.0
  assert probe.knn_top1(train_x, train_y, query, label0, k=3, temperature=0.3) == 1.0
  assert probe.knn_top1(train_x, train_y, query, label1, k=3, temperature=0.28) == 1.0


def test_linear_probe_separates_what_is_linearly_separable_and_is_deterministic():
  # 8 separable clusters in badly scaled features, 32 wide (the pico ViT's width: one compiled solver for both).
  x, y = _clusters(1000, dim=32, classes=8, spread=0.5)
  x *= np.geomspace(0.01, 100.0, 32).astype(np.float32)
  top1, objective = probe.linear_probe_top1(x[:700], y[:700], x[700:], y[700:])
  assert top1 >= 0.99 and objective < 0.1, (top1, objective)
  assert probe.linear_probe_top1(x[:700], y[:700], x[700:], y[700:]) == (top1, objective)
  shuffled, _ = probe.linear_probe_top1(x[:700], np.random.default_rng(1).permutation(y[:700]), x[700:], y[700:])
  assert shuffled < 0.2  # chance 1/8 +- 0.02


def _knn_reference(train_x, train_y, test_x, test_y, k: int, temperature: float) -> float:
  """Top-1 of the weighted k-NN vote from its definition, in float64: cosine similarity; each of the k most
  similar train rows votes for its class with weight exp(similarity / T)."""
  unit = lambda x: np.asarray(x, np.float64) / np.linalg.norm(np.asarray(x, np.float64), axis=1, keepdims=True)
  sims = np.einsum("qd,nd->qn", unit(test_x), unit(train_x))
  nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  rows = np.arange(len(test_x))[:, None]
  votes = np.zeros((len(test_x), int(max(train_y.max(), test_y.max())) + 1))
  np.add.at(votes, (np.broadcast_to(rows, nearest.shape), train_y[nearest]), np.exp(sims[rows, nearest] / temperature))
  return float(np.mean(np.argmax(votes, axis=1) == test_y))


def _linear_reference(train_x, train_y, test_x, test_y, l2: float) -> tuple[float, float]:
  """(test top-1, train objective) of the softmax regression on standardised features (the train split's mean
  and std), mean cross-entropy + l2 / 2 * |W|^2, minimised to convergence by scipy's L-BFGS-B in float64. The
  products are einsums: a multi-threaded BLAS call per tiny product costs milliseconds on a loaded machine."""
  mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
  x, t = (np.asarray(train_x, np.float64) - mean) / std, (np.asarray(test_x, np.float64) - mean) / std
  classes = int(max(train_y.max(), test_y.max())) + 1
  onehot = np.eye(classes)[train_y]

  def objective(flat):
    w, b = flat[:-classes].reshape(x.shape[1], classes), flat[-classes:]
    logits = np.einsum("nd,dk->nk", x, w) + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    value = -np.mean(np.log(p[np.arange(len(x)), train_y])) + 0.5 * l2 * np.sum(w * w)
    dlogits = (p - onehot) / len(x)
    return value, np.concatenate([(np.einsum("nd,nk->dk", x, dlogits) + l2 * w).ravel(), dlogits.sum(axis=0)])

  fit = scipy.optimize.minimize(
    objective,
    np.zeros((x.shape[1] + 1) * classes),
    jac=True,
    method="L-BFGS-B",
    options={"maxiter": 10_000, "gtol": 1e-9, "ftol": 1e-13},
  )
  w, b = fit.x[:-classes].reshape(x.shape[1], classes), fit.x[-classes:]
  return float(np.mean(np.argmax(np.einsum("nd,dk->nk", t, w) + b, axis=1) == test_y)), float(fit.fun)


def _probe_config(**fields):
  return tiny_vit_config(
    **{
      "data.num_workers": 0,
      "probe.knn": True,
      "probe.linear": True,
      "probe.train_examples": 768,
      "probe.eval_examples": 512,
      **fields,
    }
  )


@functools.lru_cache(maxsize=1)
def _random_vit_params():
  """A random pico ViT's params (normal / sqrt(fan in) weights, unit norm scales, zero biases): drawn from the
  init's shapes (no compile)."""
  task = tasks.build(_probe_config())
  abstract = nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0))["params"])
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = param_rules.path_str(path)
    if name.endswith("scale"):
      return np.ones(leaf.shape, np.float32)
    if name.endswith("bias"):
      return np.zeros(leaf.shape, np.float32)
    scanned = name.startswith("blocks/")
    fan_in = int(np.prod(leaf.shape[1 if scanned else 0 : -1])) or 1
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _record_extracted(monkeypatch) -> list:
  """The (features, labels) of each split `probe.extract` returns from now on, in order."""
  extracted, extract = [], probe.extract
  monkeypatch.setattr(probe, "extract", lambda *a: extracted.append(extract(*a)) or extracted[-1])
  return extracted


def _assert_probes_as_references(
  extracted, knn_top1, linear_top1, linear_objective, *, l2, objective_slack, top1_slack
):
  """The probes' results (k 20, T 0.07) against numpy's k-NN vote, exactly, and scipy's converged linear fit,
  within the slack of the probe's fixed L-BFGS steps."""
  [(train_x, train_y), (test_x, test_y)] = extracted
  reference = _knn_reference(train_x, train_y, test_x, test_y, k=20, temperature=0.07)
  assert knn_top1 == reference, (knn_top1, reference)
  top1, objective = _linear_reference(train_x, train_y, test_x, test_y, l2=l2)
  assert objective - 1e-6 <= linear_objective < objective + objective_slack, (linear_objective, objective)
  assert abs(linear_top1 - top1) <= top1_slack, (linear_top1, top1)


def test_classification_evaluators_probe_a_frozen_vit_on_shapes(monkeypatch):
  """A random pico ViT: its pooled features carry some of the shape class (chance 1/8)."""
  config = _probe_config()
  task = tasks.build(config)
  mesh = parallel.make_mesh(config.mesh)
  params = jax.device_put(_random_vit_params(), NamedSharding(mesh, P()))  # as in training: on the mesh
  extracted = _record_extracted(monkeypatch)
  evaluators = task.evaluators(EvalContext(mesh, 128, 0, 1))
  assert sorted(evaluators) == ["knn", "linear_probe", "val"]
  knn, linear = evaluators["knn"](params), evaluators["linear_probe"](params)
  assert len(extracted) == 2  # the train and eval splits once, for both probes
  # 512 eval examples: chance 0.125 +- 0.015; measured 0.191 (k-NN) and 0.203 (linear).
  assert knn["top1"] > 0.16 and linear["top1"] > 0.16, (knn, linear)
  assert np.isfinite(linear["train_objective"]) and linear["train_objective"] < np.log(8)
  assert extracted[0][0].shape == (768, 32) and extracted[1][0].shape == (512, 32)
  # 100 L-BFGS steps stop short of the minimum: measured 0.008 above it, top-1 3 of 512 examples off the optimum's.
  _assert_probes_as_references(
    extracted, knn["top1"], linear["top1"], linear["train_objective"], l2=1e-4, objective_slack=0.02, top1_slack=0.02
  )


def test_probe_tool_on_a_workdir(tmp_path, capsys, monkeypatch):
  config = _probe_config(**{"probe.train_examples": 96, "probe.eval_examples": 40})
  extracted = _record_extracted(monkeypatch)
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(3, {"params": _random_vit_params(), "step": np.int32(3)})
  ckpt.close()
  status = probe_tool.main(["probe", f"--workdir={tmp_path}", "--batch_size=30", "--config.probe.linear_l2=1e-3"])
  out = capsys.readouterr()
  assert status == 0, out.err
  lines = out.out.strip().splitlines()
  result = json.loads(lines[-1])
  assert lines[0] == f"knn/top1={result['knn/top1']:.4f}"
  assert (result["train_examples"], result["eval_examples"], result["feature_dim"], result["step"]) == (96, 40, 32, 3)
  # The run's probes (k 20, T 0.07, l2 from the command line) of the checkpoint's features, recomputed here.
  assert extracted[0][0].shape == (96, 32) and extracted[1][0].shape == (40, 32)
  # The probe's 100 L-BFGS steps from zeros stop short of the minimum (measured 0.0009 above it, the same top-1).
  _assert_probes_as_references(
    extracted,
    result["knn/top1"],
    result["linear_probe/top1"],
    result["linear_probe/train_objective"],
    l2=1e-3,
    objective_slack=0.01,
    top1_slack=1 / 40,
  )

  assert probe_tool.main(["probe", f"--checkpoint={tmp_path}", "--config.probe.nope=1"]) == 2
  assert "nope" in capsys.readouterr().err
  assert probe_tool.main(["probe", f"--checkpoint={tmp_path}", "--config.probe.knn_k=0"]) == 2
  assert "error: config.probe.knn_k=0: must be an integer >= 1" in capsys.readouterr().err  # its row's domain
  assert probe_tool.main(["probe", f"--checkpoint={tmp_path / 'missing'}"]) == 2
  assert "no such directory" in capsys.readouterr().err


def test_a_bad_probe_source_is_an_error_naming_config_probe_source():
  """The probe's data come from config.probe.source when it is set: an error names that field, not the
  config.data.eval_source the probe's split config carries it in."""
  config = _probe_config(**{"probe.source": "shapez"})
  mesh = parallel.make_mesh(config.mesh)
  with pytest.raises(DataError, match=r"^config.probe.source='shapez': expected 'shapes'"):
    probe.FeatureProbe(lambda p, x: x, config.probe, config.data, EvalContext(mesh, 128, 0, 1))


def test_evaluate_tool_runs_a_classifier_workdirs_evaluators(tmp_path, capsys):
  from visionfm_jax.tools import evaluate  # pylint: disable=g-import-not-at-top

  config = _probe_config(**{"probe.knn": False, "probe.linear": False, "data.eval_examples": 24})
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(3, {"params": _random_vit_params(), "step": np.int32(3)})
  ckpt.close()
  assert evaluate.main(["evaluate", f"--checkpoint={tmp_path}", "--batch_size=8"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # the val evaluator as the training loop builds it, on the same params
  task = tasks.build(config, parallel.make_mesh(config.mesh))
  ctx = EvalContext(task.mesh, 8, 0, 1)
  params = jax.device_put(_random_vit_params(), NamedSharding(task.mesh, P()))
  want = {f"eval/val/{k}": float(v) for k, v in task.evaluators(ctx)["val"](params).items()}
  assert result == {**want, "step": 3}
