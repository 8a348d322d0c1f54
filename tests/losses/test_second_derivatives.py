"""Second derivatives of the label and set losses against mpmath (the issue's cases).

Expected values: ``tests/losses/reference.py``'s ``set_nll_hessian`` at 40 digits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsoftmax import losses
from tests.losses import reference


def _reference(z, in_set):
  return np.array([[float(x) for x in row] for row in reference.set_nll_hessian(z, in_set)])


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_an_improbable_labels_hessian_row_is_not_zero(mode):
  # logits [20, 0, 0], label 1: the label's Hessian row is about 2e-9, was exactly 0.
  z = jnp.array([20.0, 0.0, 0.0])
  f = lambda z: losses.nll(z, 1)
  h = np.asarray((jax.jacrev(jax.grad(f)) if mode == "rev" else jax.hessian(f))(z))
  expected = _reference(np.asarray(z, np.float64), np.arange(3) == 1)
  np.testing.assert_allclose(h, expected, rtol=1e-6)
  assert abs(h[1, 1] - 2.0611536e-9) < 1e-15


@pytest.mark.parametrize(
  "fn, complement", [(losses.nll, False), (losses.complement_nll, True)], ids=["nll", "complement"]
)
def test_hessian_of_a_3x5_batch_matches_mpmath(fn, complement):
  # The shape and labels: the worst entry was 2.3e-3 off in relative terms.
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 5)).astype(np.float32)
  y = np.array([1, 0, 4])
  h = np.asarray(jax.jacrev(jax.grad(lambda z: fn(z, y).sum()))(jnp.asarray(z)))
  for i in range(3):
    in_set = np.arange(5) == y[i]
    expected = _reference(z[i].astype(np.float64), ~in_set if complement else in_set)
    np.testing.assert_allclose(h[i, :, i, :], expected, rtol=2e-6)


@pytest.mark.parametrize("gap", [0.0, 5.0, 10.0, 20.0, 30.0, 1e4])
@pytest.mark.parametrize("label", [0, 1])
def test_hessian_vector_products_from_probable_to_improbable_labels(gap, label):
  # jax.jvp of the gradient (a Hessian-vector product) and jax.vjp of it, against mpmath,
  # for nll, complement_nll and a two-member set, from gap 0 to 1e4.
  z = jnp.array([gap, 0.0, -1.0, 0.5], jnp.float32)
  v = jnp.array([0.3, -1.0, 2.0, 0.7], jnp.float32)
  members = jnp.array([label == 0, label == 1, False, True])
  for fn, aux, in_set in [
    (losses.nll, label, np.arange(4) == label),
    (losses.complement_nll, label, np.arange(4) != label),
    (losses.set_nll, members, np.asarray(members)),
    (losses.complement_set_nll, members, ~np.asarray(members)),
  ]:
    grad = jax.grad(lambda z: fn(z, aux))
    expected = _reference(np.asarray(z, np.float64), in_set) @ np.asarray(v, np.float64)
    scale = np.abs(_reference(np.asarray(z, np.float64), in_set)).max(axis=1) * np.abs(v).max()
    for hv in (jax.jvp(grad, (z,), (v,))[1], jax.vjp(grad, z)[1](v)[0]):
      np.testing.assert_array_less(np.abs(np.asarray(hv) - expected), 1e-5 * scale + 1e-37)


@pytest.mark.parametrize("z", [30.0, 20.0, -30.0])
def test_sigmoid_cross_entropys_second_derivative_in_the_tails(z):
  # d^2/dz^2 of the sigmoid cross-entropy is sigmoid(z) sigmoid(-z) (closed form, float64);
  # at z = 30 it was exactly 0 (jax.nn.sigmoid's derivative s (1 - s) with s rounded to 1).
  f = lambda z: losses.sigmoid_binary_cross_entropy(z[None], jnp.array([1.0]))[0]
  expected = 1.0 / (1.0 + np.exp(-z)) / (1.0 + np.exp(z))
  np.testing.assert_allclose(jax.grad(jax.grad(f))(jnp.float32(z)), expected, rtol=1e-6)
