"""Library edge cases found by adversarial inputs: each was a silent wrong answer (a
finite gradient that hides a bad token, a transition matrix that is not one, a NaN where
the limit is finite, a NaN for every token) and is now the documented behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsoftmax import losses

V, D = 37, 8


def _fused_problem(n=4):
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), jnp.float32)
  return h, w


@pytest.mark.parametrize("name", ["fused_nll", "fused_complement_nll"])
def test_an_out_of_range_id_under_jit_gives_a_nan_gradient_as_the_flat_loss_does(name):
  h, w = _fused_problem()
  labels = jnp.array([3, V + 5, 1, 0], jnp.int32)  # token 1's id is out of range
  fused = getattr(losses, name)
  flat = getattr(losses, name.removeprefix("fused_"))
  # The labels are traced (arguments of the jitted call): eagerly they raise instead.
  value = jax.jit(lambda h, w, y: fused(h, w, y, vocab_chunk=16))(h, w, labels)
  grad_h, grad_w = jax.jit(jax.grad(lambda h, w, y: fused(h, w, y, vocab_chunk=16).sum(), (0, 1)))(
    h, w, labels
  )
  flat_grad = jax.jit(jax.grad(lambda z, y: flat(z, y).sum()))(h @ w, labels)
  assert np.isnan(value[1]) and np.isfinite(np.asarray(value)[[0, 2, 3]]).all()
  # The flat loss: a NaN logit-gradient row for the bad token (and so NaN through h @ w).
  assert np.isnan(flat_grad[1]).all() and np.isfinite(np.asarray(flat_grad)[[0, 2, 3]]).all()
  assert np.isnan(grad_h[1]).all() and np.isfinite(np.asarray(grad_h)[[0, 2, 3]]).all()
  assert np.isnan(grad_w).any()


def test_an_out_of_range_negative_id_under_jit_gives_a_nan_gradient_row():
  h, w = _fused_problem()
  ids = jnp.array([[3, -1], [V, 2], [1, 4], [0, -1]], jnp.int32)
  grad_h = jax.jit(jax.grad(lambda h, m: losses.fused_complement_set_nll(h, w, m).sum()))(h, ids)
  assert np.isnan(grad_h[1]).all() and np.isfinite(np.asarray(grad_h)[[0, 2, 3]]).all()


def test_soft_cap_infinite_is_refused_not_nan_for_every_token():
  h, w = _fused_problem()
  with pytest.raises(ValueError, match="soft_cap must be a finite number > 0"):
    losses.fused_nll(h, w, jnp.zeros(4, jnp.int32), soft_cap=float("inf"))


UNIFORM = (1.0 - np.eye(3, dtype=np.float32)) / 2


@pytest.mark.parametrize(
  "transition, message",
  [
    (UNIFORM * 2, r"transition row 0 sums to 2"),
    (
      UNIFORM + np.array([[0, -0.6, 0.6], [0, 0, 0], [0, 0, 0]], np.float32),
      r"transition\[0, 1\] = -0.1",
    ),
    (np.where(np.eye(3, k=1) > 0, np.nan, UNIFORM), r"transition\[0, 1\] = nan"),
  ],
)
def test_a_transition_matrix_that_is_not_one_is_refused_naming_the_entry(transition, message):
  # Before: rows summing to 2 and a negative entry returned values that are not the
  # formula's, and a NaN in the shown label's column a finite loss.
  z, y = jnp.zeros((2, 3)), jnp.array([1, 2])
  with pytest.raises(ValueError, match=message):
    losses.forward_nll(z, y, transition)


def test_under_jit_a_bad_transition_matrix_gives_nan_for_the_examples_it_affects():
  z, y = jnp.array([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]), jnp.array([1, 2])
  nan_in_column_1 = jnp.asarray(UNIFORM).at[0, 1].set(jnp.nan)
  f = jax.jit(losses.forward_nll)  # T traced: checked inside the program
  got = f(z, y, nan_in_column_1)
  grad = jax.jit(jax.grad(lambda z, t: losses.forward_nll(z, y, t).sum()))(z, nan_in_column_1)
  assert np.isnan(got[0]) and np.isfinite(got[1])  # only label 1's column is bad
  assert np.isnan(grad[0]).all() and np.isfinite(grad[1]).all()
  assert np.isnan(f(z, y, jnp.asarray(UNIFORM * 2))).all()  # rows off 1: every example


def test_a_label_no_class_shows_has_infinite_loss_and_zero_gradient():
  # Column 2 all zero: no class is ever shown label 2, so p(shown 2) = 0 and the loss is
  # -log 0 = +inf (before: NaN with a zero gradient), as nll's for a label of probability 0.
  t = np.array([[0, 1, 0], [1, 0, 0], [0.5, 0.5, 0]], np.float32)
  z, y = jnp.array([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]), jnp.array([1, 2])
  got = losses.forward_nll(z, y, t)
  grad = jax.grad(lambda z: losses.forward_nll(z, y, t).sum())(z)
  # Row 0: p(shown 1) = p_0 + 0.5 p_2 (T's column 1), from the softmax in float64.
  p = np.exp([0.5, 0.0, -1.0]) / np.exp([0.5, 0.0, -1.0]).sum()
  assert got[0] == pytest.approx(-np.log(p[0] + 0.5 * p[2]), rel=1e-6)
  assert got[1] == np.inf and np.all(grad[1] == 0) and np.isfinite(grad[0]).all()


@pytest.mark.parametrize("name", ["mcl_mae", "mcl_exp", "complement_set_nll"])
def test_a_positive_infinite_logit_outside_the_set_gives_the_limit_gradient(name):
  # z_2 = +inf outside S = {0, 1}: P(S) = 0, so MCL-MAE = 0, MCL-EXP = exp(-1) and
  # -log(1 - P(S)) = 0, finite; the gradient's limit as z_2 -> inf is 0 (each term has a
  # factor p_k (1[k in S] - P(S)) -> 0). Before: NaN at the +inf logit.
  z = jnp.array([[0.0, 1.0, jnp.inf, -1.0]])
  s = jnp.array([[True, True, False, False]])
  f = getattr(losses, name)
  value = f(z, s)
  grad = jax.grad(lambda z: f(z, s).sum())(z)
  assert np.isfinite(value).all()
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  # The same as a large finite logit, where the gradient is exactly representable as 0.
  np.testing.assert_allclose(value, f(z.at[0, 2].set(1e4), s), rtol=1e-6)


def test_a_positive_infinite_logit_gives_the_limit_of_softmax_minus_onehot():
  z = jnp.array([[0.0, 1.0, jnp.inf, -1.0]])
  grad = jax.grad(lambda z: losses.nll(z, jnp.array([0])).sum())(z)
  # d nll / dz = softmax(z) - onehot(0) -> (0, 0, 1, 0) - (1, 0, 0, 0).
  np.testing.assert_array_equal(np.asarray(grad), [[-1.0, 0.0, 1.0, 0.0]])
