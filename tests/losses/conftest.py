"""Every public loss with a generator of valid second arguments, for parametrized tests."""

import numpy as np
import pytest

from jaxsoftmax import losses
from tests.losses import accuracy as accuracy_losses


def _assert_accurate(case, regime, cases_per_k, ks=(2, 16, 64), bound=4.0):
  """Float32 error <= ``bound`` ulps per unit of (1 + condition number).

  Expected values: mpmath at 40 digits (tests/losses/reference.py).
  """
  rows = np.concatenate([accuracy_losses.measure(case, regime, cases_per_k, k, seed=k) for k in ks])
  assert len(rows) >= 0.7 * cases_per_k * len(ks)  # few losses fall below float32's tiny
  assert rows[:, 0].max() <= bound, rows[rows[:, 0].argmax()]


@pytest.fixture
def assert_accurate():
  """The accuracy check against mpmath, for the per-loss test modules."""
  return _assert_accurate


def _labels(rng, shape):
  return rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)


def _mask(rng, shape):
  mask = rng.random(shape) < 0.4
  mask[..., 0] = True  # never empty
  mask[..., -1] = False  # never full
  return mask


def _soft(rng, shape):
  q = rng.random(shape).astype(np.float32)
  return q / q.sum(axis=-1, keepdims=True)


def _binary(rng, shape):
  return (rng.random(shape) < 0.5).astype(np.float32)


def _forward_uniform(z, y, **kwargs):
  """forward_nll with the uniform transition matrix of z's classes."""
  axis = kwargs.get("axis", -1)
  k = z.shape[axis] if -z.ndim <= axis < z.ndim else z.shape[-1]  # a bad axis: the loss says so
  return losses.forward_nll(z, y, (1.0 - np.eye(k, dtype=np.float32)) / (k - 1), **kwargs)


# The losses of one integer label per example, and of a boolean set.
LABEL_LOSSES = (
  "nll",
  "complement_nll",
  "negated_nll",
  "scl_exp",
  "pairwise_comparison",
  "forward_nll",
)
SET_LOSSES = (
  "set_nll",
  "complement_set_nll",
  "multilabel_softmax_cross_entropy",
  "mcl_mae",
  "mcl_exp",
)

LOSSES = {
  "nll": (losses.nll, _labels),
  "complement_nll": (losses.complement_nll, _labels),
  "negated_nll": (losses.negated_nll, _labels),
  "set_nll": (losses.set_nll, _mask),
  "complement_set_nll": (losses.complement_set_nll, _mask),
  "soft_cross_entropy": (losses.soft_cross_entropy, _soft),
  "multilabel_softmax_cross_entropy": (losses.multilabel_softmax_cross_entropy, _mask),
  "sigmoid_binary_cross_entropy": (losses.sigmoid_binary_cross_entropy, _binary),
  "scl_exp": (losses.scl_exp, _labels),
  "pairwise_comparison": (losses.pairwise_comparison, _labels),
  "forward_nll": (_forward_uniform, _labels),
  "mcl_mae": (losses.mcl_mae, _mask),
  "mcl_exp": (losses.mcl_exp, _mask),
}


@pytest.fixture(params=sorted(LOSSES))
def loss_case(request):
  """(name, loss function, aux generator) for every public loss."""
  fn, make_aux = LOSSES[request.param]
  return request.param, fn, make_aux
