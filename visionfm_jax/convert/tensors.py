"""What every Hugging Face weight converter does with tensors, whatever the architecture: `Reader` / `Writer`
hand tensors out and collect them by HF name (Linear weights transposed to our (in, out) kernels and back),
`check_tensors` compares a file's tensors with the names and shapes its config implies, `numpy_params` and
`check_model` compare params with the tree our model's `init` makes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.errors import CheckpointError
from visionfm_jax.parallel.sharding import unbox
from visionfm_jax.param_rules import path_str


def show(names: list[str], limit: int = 10) -> str:
  return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "") or "none"


def check_tensors(
  path: str,
  tensors: dict[str, np.ndarray],
  expected: dict[str, tuple[int, ...]],
  ignorable: set[str],
  family: str = "ViT",
) -> None:
  """Raises a CheckpointError listing missing, unexpected and mis-shaped tensors, or the weights that are not
  floating point (an integer tensor would be converted to float32 without a word)."""
  not_float = sorted(
    f"{k} ({tensors[k].dtype})" for k in expected if k in tensors and not np.issubdtype(tensors[k].dtype, np.floating)
  )
  if not_float:
    raise CheckpointError(
      f"{path}: weights of the {family} must be floating point (float16, bfloat16, float32 or "
      f"float64): {show(not_float)}"
    )
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected) - ignorable)
  mismatched = sorted(
    f"{k} {tuple(tensors[k].shape)} (expected {shape})"
    for k, shape in expected.items()
    if k in tensors and tuple(tensors[k].shape) != shape
  )
  if missing or unexpected or mismatched:
    raise CheckpointError(
      f"{path}: weights do not match the {family} its config.json describes: missing {show(missing)}; "
      f"unexpected {show(unexpected)}; shape mismatch {show(mismatched)}"
    )


def converted(
  path: str, tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], convert, family: str
) -> dict[str, Any]:
  """The unrolled params `convert(tensors)` -> (params, names taken) makes of a file's tensors, after
  `check_tensors` against `expected`; CheckpointError naming the tensors it left over."""
  check_tensors(path, tensors, expected, set(), family=family)
  params, taken = convert(tensors)
  leftover = sorted(set(tensors) - taken)
  if leftover:
    raise CheckpointError(f"{path}: tensors not converted: {show(leftover)}")
  return params


class Reader:
  """Hands out tensors as float32 by name and remembers which were taken."""

  def __init__(self, tensors: dict[str, np.ndarray], prefix: str, taken: set[str]):
    self._tensors, self._prefix, self.taken = tensors, prefix, taken

  def __call__(self, name: str) -> np.ndarray:
    key = self._prefix + name
    self.taken.add(key)
    return np.asarray(self._tensors[key], np.float32)

  def dense(self, name: str) -> dict[str, np.ndarray]:
    return {"kernel": self(f"{name}.weight").T, "bias": self(f"{name}.bias")}

  def norm(self, name: str) -> dict[str, Any]:
    return {"ln": {"scale": self(f"{name}.weight"), "bias": self(f"{name}.bias")}}


class Writer:
  """Collects float32 tensors by HF name (under a prefix): the inverse of `Reader`."""

  def __init__(self, tensors: dict[str, np.ndarray], prefix: str):
    self._tensors, self._prefix = tensors, prefix

  def __call__(self, name: str, value) -> None:
    self._tensors[self._prefix + name] = np.asarray(value, np.float32)

  def dense(self, name: str, params: dict[str, Any]) -> None:
    self(f"{name}.weight", params["kernel"].T)
    if "bias" in params:
      self(f"{name}.bias", params["bias"])

  def norm(self, name: str, params: dict[str, Any]) -> None:
    self(f"{name}.weight", params["ln"]["scale"])
    self(f"{name}.bias", params["ln"]["bias"])


def tree_shapes(tree) -> dict[str, tuple[int, ...]]:
  return {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def param_mismatch(model: Any, params: dict[str, Any]) -> list[str]:
  """Where `params` differs from the tree `model.init` makes (names and shapes); empty when it fits."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  want = tree_shapes(unbox(jax.eval_shape(model.init, jax.random.key(0), images))["params"])
  got = tree_shapes(params)
  return sorted(f"{k}: {got.get(k)} vs model {want.get(k)}" for k in set(want) | set(got) if want.get(k) != got.get(k))


def check_model(path: str, model: Any, params: dict[str, Any]) -> None:
  """The converted tree must be exactly the one `model.init` makes (names and shapes)."""
  diff = param_mismatch(model, params)
  if diff:
    raise CheckpointError(f"{path}: converted params do not fit our {type(model).__name__}: {show(diff)}")


def numpy_params(model: Any, params: dict[str, Any]) -> dict[str, Any]:
  """`params` of `model` (boxed or not, on devices or not) as float32 numpy; CheckpointError unless they fit."""
  params = unbox(params)
  diff = param_mismatch(model, params)
  if diff:
    raise CheckpointError(f"params do not fit the {type(model).__name__} to export: {show(diff)}")
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
