"""Rules over parameter paths: the one mechanism behind weight decay, lr multipliers, freezing and init_from skips.

A param's path is its '/'-joined dict keys (`path_str`: 'backbone/blocks/attn/qkv/kernel'). A rule is a
(regex, value) pair, and `ParamRules` holds an ordered list of them:

  matching     a rule matches a path when `re.search` finds its regex anywhere in the path (anchor with '^' or
               '$' to pin it to the start or the end)
  first wins   the value of a path is the value of the first rule that matches it, a default when none does

Who uses it, over which config field:
  config.optim.no_decay     regexes: matching kernels get no weight decay (optim.decay_mask_fn)
  config.optim.lr_mults     (regex, multiplier) pairs: the first match scales the param's lr (optim.lr_multipliers)
  config.optim.freeze       regexes: matching params get no update (optim.freeze_labels_fn)
  config.init_from_skip     one regex: matching model params stay freshly initialised (init_from.load)
  config.sharding.overrides (regex, layout) pairs: the first match lays the param out (parallel/sharding.py)

A rule a config gives that matches no param is a typo or a wrong prefix: `require_matches` raises a ConfigError
naming it, and lr_mults, freeze, init_from_skip and the sharding overrides ask for that check. no_decay does not:
its default serves every model family ('cpb_mlp' is SwinV2's; a ViT has none), so a rule of it may legitimately
match nothing in a given model.

A leaf (jax, flax and errors only): training's optim, init_from and checkpoint and parallel's sharding apply the
rules, and convert names params by the same paths (`path_str`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Generic, Iterable, Sequence, TypeVar, overload

from flax.core import meta
import jax

from visionfm_jax.errors import ConfigError

V = TypeVar("V")


def path_str(path) -> str:
  """'/'-joined dict keys of a tree path ('blocks/attn/qkv/kernel'); box/attribute keys are dropped."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def named_leaves(tree) -> list[tuple[str, Any]]:
  """[(path_str, leaf)] of a param tree; a Flax Partitioned box (logical axes) counts as one leaf, given unboxed."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, meta.Partitioned))[0]
  return [(path_str(p), x.value if isinstance(x, meta.Partitioned) else x) for p, x in leaves]


def compile_regex(pattern: str, field: str) -> re.Pattern:
  """re.compile(pattern), or a ConfigError naming `field` (e.g. 'config.optim.freeze') and the pattern."""
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ConfigError(f"{field}: {pattern!r} is not a regex ({e})") from e


class ParamRules(Generic[V]):
  """Ordered (regex, value) rules over param paths: re.search matching, the first matching rule wins.

  `field` names the config field the rules come from in every error (a bad regex, a malformed rule, a rule
  that matches no param); `value_name` says what the value is in the malformed-rule errors, and `convert`
  (e.g. float) turns each rule's value into the one `value` returns."""

  def __init__(
    self,
    rules: Iterable[tuple[str, Any]],
    *,
    field: str,
    value_name: str = "value",
    convert: Callable[[Any], V] | None = None,
  ):
    self.field = field
    self._rules: list[tuple[re.Pattern, V]] = []
    for rule in rules:
      if not isinstance(rule, (tuple, list)) or len(rule) != 2:
        raise ConfigError(f"{field}: {rule!r} is not a (regex, {value_name}) pair")
      try:
        value = rule[1] if convert is None else convert(rule[1])
      except (TypeError, ValueError) as e:
        raise ConfigError(f"{field}: {rule!r} has no valid {value_name} ({e})") from e
      self._rules.append((compile_regex(rule[0], field), value))

  @classmethod
  def of_patterns(cls, patterns: Iterable[str], *, field: str) -> ParamRules[bool]:
    """Rules that only say whether a path matches (value True): no_decay, freeze, init_from_skip."""
    if isinstance(patterns, str):
      patterns = (patterns,) if patterns else ()
    return cls([(p, True) for p in patterns], field=field)

  def __bool__(self) -> bool:
    return bool(self._rules)

  @property
  def patterns(self) -> tuple[str, ...]:
    return tuple(p.pattern for p, _ in self._rules)

  @overload
  def value(self, name: str) -> V | None: ...

  @overload
  def value(self, name: str, default: V) -> V: ...

  def value(self, name: str, default: V | None = None) -> V | None:
    """The value of the first rule whose regex re.search-es `name`; `default` when none does."""
    return next((v for p, v in self._rules if p.search(name)), default)

  def matches(self, name: str) -> bool:
    """Whether any rule matches `name`."""
    return any(p.search(name) for p, _ in self._rules)

  def require_matches(self, names: Sequence[str]) -> None:
    """ConfigError naming the first rule that matches none of `names` (a typo, or a wrong prefix)."""
    for p, _ in self._rules:
      if not any(p.search(n) for n in names):
        raise ConfigError(
          f"{self.field}: {p.pattern!r} matches no param (param paths look like {', '.join(names[:3])}, ...)"
        )
