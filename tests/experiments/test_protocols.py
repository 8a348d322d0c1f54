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


def test_judge_gathers_an_inputs_wrong_predictions_into_one_set():
  y = jnp.array([0, 1, 2, 3])
  ex = protocols.with_sets(
    protocols.labeled_only(y, jnp.array([True, False, False, False]), rounds=3), 2
  )
  ex = protocols.judge(ex, jnp.array([3, 1, 0, 0]), y, 0)  # 2 and 3 wrong (both said 0)
  ex = protocols.judge(ex, jnp.array([9, 9, 1, 0]), y, 1)  # 2 wrong again (1), 3 again 0
  # Input 2's set is {1, 0} in its round-1 slot; 3's is {0}, said twice, held once.
  np.testing.assert_array_equal(
    ex.kind[:8], [POSITIVE, POSITIVE, EMPTY, EMPTY, EMPTY, EMPTY, NEGATIVE, NEGATIVE]
  )
  np.testing.assert_array_equal(ex.label[6:8], [1, 0])
  np.testing.assert_array_equal(ex.wrong[6:8], [[0, -1], [-1, -1]])
  np.testing.assert_array_equal(ex.wrong[2:4], [[-1, -1], [-1, -1]])
  ex = protocols.judge(ex, jnp.array([9, 9, 2, 1]), y, 2)  # 2 now right; 3 wrong (1)
  np.testing.assert_array_equal(ex.kind[8:], [EMPTY, EMPTY, POSITIVE, NEGATIVE])
  assert int(ex.kind[6]) == NEGATIVE and int(ex.kind[7]) == EMPTY  # 2 keeps its set
  np.testing.assert_array_equal(ex.label[10:], [2, 1])
  np.testing.assert_array_equal(ex.wrong[11], [0, -1])
  assert [int(c) for c in ex.counts()] == [3, 2]
  # The same on a batch of tables, vmapped over seeds.
  batch = jax.tree.map(
    lambda a: jnp.stack([a, a]),
    protocols.with_sets(
      protocols.labeled_only(y, jnp.array([True, False, False, False]), rounds=3), 2
    ),
  )
  batch = protocols.judge(batch, jnp.array([[3, 1, 0, 0]] * 2), y, 0)
  batch = protocols.judge(batch, jnp.array([[9, 9, 1, 0]] * 2), y, 1)
  np.testing.assert_array_equal(batch.wrong[1, 6:8], [[0, -1], [-1, -1]])


def test_judge_works_on_a_batch_of_tables():
  y = jnp.array([0, 1])
  ex = protocols.labeled_only(jnp.broadcast_to(y, (3, 2)), jnp.zeros((3, 2), bool))
  ex = protocols.judge(ex, jnp.array([[0, 1], [1, 1], [1, 0]]), y, 0)
  np.testing.assert_array_equal(ex.counts()[0], [2, 1, 0])


def test_sets_of_wrong_labels_are_distinct_and_never_the_true_label():
  y = jnp.asarray(np.random.default_rng(0).integers(0, 10, 2000))
  sets = np.asarray(protocols.wrong_label_sets(jax.random.key(0), y, 10, 4))
  assert sets.shape == (2000, 4)
  assert np.all(sets != np.asarray(y)[:, None])
  assert all(len(set(row)) == 4 for row in sets)
  # Uniform: for inputs of class c each of the 9 wrong labels is in the set with
  # probability 4/9 (4 of 9 drawn without replacement), the true one never.
  yn = np.asarray(y)
  for c in range(10):
    freq = np.bincount(sets[yn == c].ravel(), minlength=10) / (yn == c).sum()
    np.testing.assert_allclose(np.delete(freq, c), 4 / 9, atol=0.12)
    assert freq[c] == 0
  # One label per input: exactly wrong_labels's draw.
  np.testing.assert_array_equal(
    protocols.wrong_label_sets(jax.random.key(3), y, 10, 1)[:, 0],
    protocols.wrong_labels(jax.random.key(3), y, 10),
  )
  with pytest.raises(ValueError, match=r"count must be in \[1, 9\]"):
    protocols.wrong_label_sets(jax.random.key(0), y, 10, 10)


def test_biased_sets_draw_the_shifted_label_more_often():
  y = jnp.zeros(4000, jnp.int32)
  sets = np.asarray(protocols.wrong_label_sets(jax.random.key(1), y, 5, 2, bias=0.8))
  # Expected: label 1 = (0 + 1) mod 5 is in almost every pair (its weight 0.85 of 1).
  assert (sets == 1).any(axis=1).mean() > 0.9
  assert np.all(sets != 0)


def test_complementary_with_several_negatives_holds_one_set_per_input():
  y = jnp.array([0, 1, 2, 3, 4])
  labeled = jnp.array([True, False, False, False, False])
  ex = protocols.complementary(jax.random.key(0), y, labeled, 5, num_negatives=3, rounds=2)
  assert ex.wrong.shape == (10, 2)
  np.testing.assert_array_equal(ex.kind[:5], [POSITIVE, NEGATIVE, NEGATIVE, NEGATIVE, NEGATIVE])
  np.testing.assert_array_equal(ex.wrong[0], [-1, -1])  # the labeled input has no set
  np.testing.assert_array_equal(ex.wrong[5:], -1)  # later rounds are empty
  for i in range(1, 5):
    labels = {int(ex.label[i]), *map(int, ex.wrong[i])}
    assert len(labels) == 3 and i not in labels
  assert [int(c) for c in ex.counts()] == [1, 4]  # one negative example per input, not three
  one = protocols.complementary(jax.random.key(0), y, labeled, 5)
  assert one.wrong is None
