"""sigmoid_binary_cross_entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.test_util import check_grads

from jaxsoftmax.losses import sigmoid_binary_cross_entropy
from tests.losses import accuracy as accuracy_losses


def test_float32_value_within_ulps_times_condition_number():
  # Expected values: mpmath at 40 digits, logits over [-90, 90].
  rows = accuracy_losses.measure_sigmoid(60)
  assert len(rows) >= 150
  assert rows[:, 0].max() <= 4.0


def test_matches_optax_elementwise():
  # Reference: optax.sigmoid_binary_cross_entropy at moderate logits.
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(0, 3, (16, 5)), jnp.float32)
  t = jnp.asarray(rng.random((16, 5)), jnp.float32)
  out = sigmoid_binary_cross_entropy(z, t)
  assert out.shape == (16, 5)
  np.testing.assert_allclose(out, optax.sigmoid_binary_cross_entropy(z, t), rtol=1e-5, atol=1e-7)


def test_gradients_exact_in_both_tails_and_in_targets():
  # Closed forms: d/dz = sigmoid(z) - t; d/dt = -z.
  z = jnp.array([-60.0, -20.0, 20.0, 60.0, 0.5], jnp.float32)
  t = jnp.array([0.0, 1.0, 0.0, 1.0, 0.3], jnp.float32)
  gz, gt = jax.grad(lambda z, t: sigmoid_binary_cross_entropy(z, t).sum(), argnums=(0, 1))(z, t)
  expected = np.array([np.exp(-60.0), -1.0, 1.0, -np.exp(-60.0), 1 / (1 + np.exp(-0.5)) - 0.3])
  np.testing.assert_allclose(gz, expected, rtol=1e-6)
  np.testing.assert_array_equal(gt, -z)
  with jax.enable_x64(True):
    check_grads(
      jax.jit(sigmoid_binary_cross_entropy),
      (z.astype(jnp.float64), t.astype(jnp.float64)),
      order=2,
      modes=["rev"],
    )


def test_boolean_targets_and_where():
  z = jnp.array([[2.0, -1.0, 3.0]])
  t = jnp.array([[True, False, False]])
  keep = jnp.array([[True, True, False]])  # elementwise: the logits' dimensions
  loss, grad = jax.value_and_grad(lambda z: sigmoid_binary_cross_entropy(z, t, where=keep).sum())(z)
  # Reference: optax on the kept entries; the excluded one (target 0) costs 0.
  np.testing.assert_allclose(
    loss, optax.sigmoid_binary_cross_entropy(z[:, :2], t[:, :2].astype(float)).sum(), rtol=1e-6
  )
  assert grad[0, 2] == 0.0
