"""Protocols: labeled sets, wrong-label draws and the judge's verdicts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsoftmax_experiments import protocols
from jaxsoftmax_experiments.protocols import EMPTY, NEGATIVE, POSITIVE


def test_labeled_mask_draws_distinct_inputs():
  mask = protocols.labeled_mask(jax.random.key(0), 50, 17)
  assert mask.shape == (50,) and int(mask.sum()) == 17
  other = protocols.labeled_mask(jax.random.key(1), 50, 17)
  assert not np.array_equal(mask, other)


def test_supervised_and_labeled_only_tables():
  y = jnp.array([2, 0, 1])
  ex = protocols.supervised(y, rounds=2)
  np.testing.assert_array_equal(ex.kind, [POSITIVE] * 3 + [EMPTY] * 3)
  np.testing.assert_array_equal(ex.label[:3], y)
  ex = protocols.labeled_only(y, jnp.array([True, False, True]))
  np.testing.assert_array_equal(ex.kind, [POSITIVE, EMPTY, POSITIVE])
  assert [int(c) for c in ex.counts()] == [2, 0]


@pytest.mark.parametrize("bias", [0.0, 0.3, 1.0])
def test_transition_matrix_rows_are_distributions_over_wrong_labels(bias):
  t = protocols.transition_matrix(5, bias)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(jnp.diag(t), 0.0)
  # Closed form: (y + 1) mod K gets bias + (1 - bias) / (K - 1).
  np.testing.assert_allclose(t[4, 0], bias + (1 - bias) / 4, rtol=1e-6)


@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_wrong_labels_follow_the_transition_matrix(bias):
  k, n = 4, 40_000
  y = jnp.arange(n) % k
  wrong = protocols.wrong_labels(jax.random.key(3), y, k, bias)
  assert not np.any(wrong == y)
  offsets = np.bincount((np.asarray(wrong) - np.asarray(y)) % k, minlength=k) / n
  expected = np.asarray(protocols.transition_matrix(k, bias)[0])  # offset d has T[0, d]
  # Binomial standard error at n = 40000 is at most 0.0025; allow 4 of them.
  np.testing.assert_allclose(offsets, expected, atol=0.01)


def test_complementary_keeps_labeled_true_labels():
  y = jnp.array([0, 1, 2, 0, 1, 2])
  labeled = jnp.array([True, False, False, True, False, False])
  ex = protocols.complementary(jax.random.key(0), y, labeled, 3)
  np.testing.assert_array_equal(ex.kind, np.where(labeled, POSITIVE, NEGATIVE))
  np.testing.assert_array_equal(ex.label[labeled], y[labeled])
  assert not np.any(ex.label[~labeled] == y[~labeled])


def test_judge_marks_predictions_and_skips_resolved_inputs():
  y = jnp.array([0, 1, 2, 3])
  labeled = jnp.array([True, False, False, False])
  ex = protocols.labeled_only(y, labeled, rounds=2)
  # Round 0: input 0 is labeled; 1 is predicted right, 2 and 3 wrong.
  ex = protocols.judge(ex, jnp.array([3, 1, 0, 0]), y, 0)
  np.testing.assert_array_equal(ex.kind[:4], [POSITIVE, POSITIVE, NEGATIVE, NEGATIVE])
  np.testing.assert_array_equal(ex.label[:4], [0, 1, 0, 0])
  # Round 1: only 2 and 3 are shown again; 2 is now right, 3 wrong again.
  ex = protocols.judge(ex, jnp.array([9, 9, 2, 1]), y, 1)
  np.testing.assert_array_equal(ex.kind[4:], [EMPTY, EMPTY, POSITIVE, NEGATIVE])
  np.testing.assert_array_equal(ex.label[6:], [2, 1])
  assert [int(c) for c in ex.counts()] == [3, 3]


def test_judge_works_on_a_batch_of_tables():
  y = jnp.array([0, 1])
  ex = protocols.labeled_only(jnp.broadcast_to(y, (3, 2)), jnp.zeros((3, 2), bool))
  ex = protocols.judge(ex, jnp.array([[0, 1], [1, 1], [1, 0]]), y, 0)
  np.testing.assert_array_equal(ex.counts()[0], [2, 1, 0])
