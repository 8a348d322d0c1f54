"""Doctests print arrays with four significant decimals, as the docstrings show them."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_printoptions(request):
  if isinstance(request.node, pytest.DoctestItem):
    with np.printoptions(precision=4):
      yield
  else:
    yield
