"""visionfm_jax.parallel hands out its submodules' names on first use (its `__getattr__`): each resolves to the
object its submodule defines, and a name it does not hand out is an AttributeError, as for any module."""

import importlib

import pytest

from visionfm_jax import parallel


@pytest.mark.parametrize("name", parallel.__all__)
def test_each_name_is_its_submodules_object(name):
  module = importlib.import_module(f"visionfm_jax.parallel.{parallel._MODULE_OF[name]}")  # pylint: disable=protected-access
  assert getattr(parallel, name) is getattr(module, name)
  assert name in dir(parallel)


def test_submodules_resolve_and_other_names_do_not():
  assert parallel.sharding is importlib.import_module("visionfm_jax.parallel.sharding")
  with pytest.raises(AttributeError, match="no_such_name"):
    parallel.no_such_name  # pylint: disable=pointless-statement
