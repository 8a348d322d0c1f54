"""The naive forms fail where ours do not: inf, NaN or a zero gradient past a gap of ~17."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsoftmax import naive
from jaxsoftmax.losses import complement_nll, nll
from tests.losses import reference


def _value_and_grad(fn, gap):
  z = jnp.array([gap, 0.0, 0.0, 0.0], jnp.float32)  # confidently wrong about class 0
  return jax.value_and_grad(lambda z: fn(z, 0))(z)


@pytest.mark.parametrize("gap", [20.0, 50.0, 1e3, 1e4])
def test_side_by_side_when_confidently_wrong(gap):
  # Reference: mpmath, -log(1 - p_0) = log1p(exp(gap) / 3).
  expected = float(reference.complement_nll(np.array([gap, 0.0, 0.0, 0.0]), 0)[0])

  loss, grad = _value_and_grad(naive.log1m_softmax, gap)
  assert np.isinf(loss) and not np.all(np.isfinite(grad))

  loss, grad = _value_and_grad(naive.clipped_log1m_softmax, gap)
  # The clip bound 1 - eps rounds to 1 - 2^-23 in float32: a constant -log(2^-23).
  np.testing.assert_allclose(loss, -np.log(1.0 - np.float32(1.0 - naive.KERAS_EPSILON)), rtol=1e-6)
  assert np.all(grad == 0.0)  # clipped: the example teaches nothing

  loss, grad = _value_and_grad(complement_nll, gap)
  np.testing.assert_allclose(loss, expected, rtol=4 * np.finfo(np.float32).eps * (1 + gap))
  # d/dz_0 = p_0 -> 1 and d/dz_k = -1/3 for the others: the push is of order 1.
  np.testing.assert_allclose(grad, [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)


def test_naive_forms_break_between_gap_17_and_20():
  # At gap 15, p_0 is still below 1 - 2^-24 and the literal form is merely inaccurate.
  for gap in (15.0,):
    assert np.isfinite(_value_and_grad(naive.log1m_softmax, gap)[0])
    assert np.any(_value_and_grad(naive.clipped_log1m_softmax, gap)[1] != 0)
  for gap in (17.0, 20.0):
    assert np.isinf(_value_and_grad(naive.log1m_softmax, gap)[0])
    assert np.all(_value_and_grad(naive.clipped_log1m_softmax, gap)[1] == 0)


@pytest.mark.parametrize("gap", [-20.0, -50.0])
def test_difference_of_logsumexps_is_zero_where_the_loss_is_tiny(gap):
  # Reference: mpmath; the true loss is about exp(gap) / 3, far above float32's tiny.
  expected = float(reference.complement_nll(np.array([gap, 0.0, 0.0, 0.0]), 0)[0])
  assert _value_and_grad(naive.difference_of_logsumexps, gap)[0] == 0.0
  np.testing.assert_allclose(_value_and_grad(complement_nll, gap)[0], expected, rtol=1e-5)


def test_literal_nll_difference_is_zero_where_ours_is_not():
  z = jnp.array([25.0, 0.0], jnp.float32)
  assert jax.nn.logsumexp(z) - z[0] == 0.0
  assert nll(z, 0) > 0.0
