"""soft_cross_entropy and multilabel_softmax_cross_entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxsoftmax.losses import multilabel_softmax_cross_entropy, nll, soft_cross_entropy
from tests.losses import accuracy as accuracy_losses

SOFT_CASES = [
  c
  for c in accuracy_losses.CASES
  if c.name in ("soft_cross_entropy", "multilabel_softmax_cross_entropy")
]


@pytest.mark.parametrize("regime", sorted(accuracy_losses.REGIMES))
@pytest.mark.parametrize("case", SOFT_CASES, ids=lambda c: c.name)
def test_float32_value_within_ulps_times_condition_number(case, regime, assert_accurate):
  assert_accurate(case, regime, 8, ks=(2, 16))


def test_matches_optax_and_onehot_targets_match_nll():
  # Reference: optax.softmax_cross_entropy at moderate logits.
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(0, 2, (32, 10)), jnp.float32)
  q = jax.nn.softmax(jnp.asarray(rng.normal(0, 1, (32, 10)), jnp.float32))
  np.testing.assert_allclose(soft_cross_entropy(z, q), optax.softmax_cross_entropy(z, q), rtol=2e-6)
  y = jnp.asarray(rng.integers(0, 10, 32))
  z = z.at[:, 0].add(40.0)  # p_0 -> 1: nll is tiny there, and must still agree
  onehot = jax.nn.one_hot(y, 10, dtype=jnp.float32)
  np.testing.assert_allclose(soft_cross_entropy(z, onehot), nll(z, y), rtol=4e-6)


def test_gradients_in_both_arguments_float64():
  # Closed forms: d/dz = sum(q) softmax(z) - q and d/dq = -log softmax(z).
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(0, 4, (5, 7)))
    q = jnp.asarray(rng.random((5, 7))).at[:, 2].set(0.0)  # a zero target too
    gz, gq = jax.grad(lambda z, q: soft_cross_entropy(z, q).sum(), argnums=(0, 1))(z, q)
    np.testing.assert_allclose(
      gz, q.sum(-1, keepdims=True) * jax.nn.softmax(z) - q, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(gq, -jax.nn.log_softmax(z), rtol=1e-13)
    check_grads(
      jax.jit(soft_cross_entropy),
      (z + jnp.array([20.0, 0, 0, 0, 0, 0, 0]), q),
      order=2,
      modes=["rev"],
    )


def test_multilabel_gradient_is_softmax_minus_y_over_size_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(0, 3, (6, 8)))
    y = jnp.asarray(rng.random((6, 8)) < 0.4).at[:, 3].set(True)
    grad = jax.grad(lambda z: multilabel_softmax_cross_entropy(z, y).sum())(z)
    np.testing.assert_allclose(
      grad, jax.nn.softmax(z) - y / y.sum(-1, keepdims=True), rtol=1e-12, atol=1e-14
    )
    check_grads(
      jax.jit(lambda z: multilabel_softmax_cross_entropy(z, y)), (z,), order=2, modes=["rev"]
    )


def test_excluded_classes_cost_nothing_unless_targeted():
  z = jnp.array([1.0, 2.0, 5.0, 0.5])
  keep = jnp.array([True, True, False, True])
  q = jnp.array([0.5, 0.5, 0.0, 0.0])
  loss, grad = jax.value_and_grad(lambda z: soft_cross_entropy(z, q, where=keep))(z)
  # Reference: optax on the three admissible classes alone.
  np.testing.assert_allclose(loss, optax.softmax_cross_entropy(z[keep], q[keep]), rtol=1e-6)
  assert grad[2] == 0.0 and np.all(np.isfinite(grad))
  targeted = jnp.array([0.5, 0.0, 0.5, 0.0])
  loss, grad = jax.value_and_grad(lambda z: soft_cross_entropy(z, targeted, where=keep))(z)
  assert loss == np.inf
  np.testing.assert_array_equal(grad, 0.0)


def test_multilabel_empty_row_is_an_error_eagerly_and_nan_under_jit():
  z = jnp.zeros((3, 4))
  y = jnp.array([[True, False, False, False], [False] * 4, [True, True, False, False]])
  with pytest.raises(ValueError, match=r"label_mask\[1\] has no label"):
    multilabel_softmax_cross_entropy(z, y)
  out = jax.jit(multilabel_softmax_cross_entropy)(z, y)
  assert np.isnan(out[1]) and np.all(np.isfinite(out[np.array([0, 2])]))
  # Closed form: with equal logits every -log p_k is log 4, whatever Y is.
  np.testing.assert_allclose(out[np.array([0, 2])], [np.log(4.0), np.log(4.0)], rtol=1e-6)
