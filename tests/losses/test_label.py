"""nll, complement_nll and negated_nll: values, gradients and behaviour in training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxsoftmax.losses import complement_nll, negated_nll, nll
from tests.losses import accuracy as accuracy_losses
from tests.losses import reference

EPS32 = np.finfo(np.float32).eps
LABEL_CASES = [c for c in accuracy_losses.CASES if c.aux == "label"]


@pytest.mark.parametrize("regime", sorted(accuracy_losses.REGIMES))
@pytest.mark.parametrize("case", LABEL_CASES, ids=lambda c: c.name)
def test_float32_value_within_ulps_times_condition_number(case, regime, assert_accurate):
  assert_accurate(case, regime, 10)


@pytest.mark.parametrize(
  "gap, expected",
  [
    # mpmath, 30 digits: log1p(2 exp(-gap)) at the float32-rounded gap.
    (17.8, 3.720390623e-8),
    (20.0, 4.122307236e-9),
    (50.0, 3.857499696e-22),
  ],
)
def test_nll_tiny_loss_where_literal_difference_is_zero(gap, expected):
  z = jnp.array([gap, 0.0, 0.0], jnp.float32)
  literal = jax.nn.logsumexp(z) - z[0]
  ours = nll(z, 0)
  assert literal == 0.0
  # The condition number here is about the gap: allow 4 ulps per unit of it.
  np.testing.assert_allclose(ours, expected, rtol=4 * np.finfo(np.float32).eps * (1 + gap))
  # The project's reference agrees with the closed form above.
  np.testing.assert_allclose(
    float(reference.nll(np.asarray(z, np.float64), 0)[0]), expected, rtol=1e-9
  )


def _softmax_minus_onehot(z, y):
  # Closed form: d/dz (logsumexp(z) - z_y) = softmax(z) - onehot(y).
  return jax.nn.softmax(z) - jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)


def _softmax_minus_restricted(z, l):
  # Closed form: p - softmax over k != l (zero at l), i.e. p_l (onehot(l) - q).
  others = jnp.arange(z.shape[-1]) != l[:, None]
  return jax.nn.softmax(z) - jax.nn.softmax(jnp.where(others, z, -jnp.inf))


@pytest.mark.parametrize(
  "fn, closed_form, rtol, seed",
  [
    (nll, _softmax_minus_onehot, 1e-13, 0),
    (complement_nll, _softmax_minus_restricted, 1e-12, 1),
  ],
  ids=["nll", "complement_nll"],
)
def test_gradient_matches_closed_form_in_float64(fn, closed_form, rtol, seed):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(0, 4, (6, 9)))
    y = jnp.asarray(rng.integers(0, 9, 6))
    grad = jax.grad(lambda z: fn(z, y).sum())(z)
    np.testing.assert_allclose(grad, closed_form(z, y), rtol=rtol, atol=1e-15)


@pytest.mark.parametrize("fn", [nll, complement_nll, negated_nll], ids=lambda f: f.__name__)
@pytest.mark.parametrize("gap", [0.0, 8.0, -8.0, 30.0])
def test_gradients_match_finite_differences_float64(fn, gap):
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(0, 1, (3, 5))).at[:, 2].add(gap)
    y = jnp.array([2, 2, 4])
    check_grads(jax.jit(lambda z: fn(z, y)), (z,), order=2, modes=["rev"])


@pytest.mark.parametrize("fn", [nll, complement_nll, negated_nll], ids=lambda f: f.__name__)
@pytest.mark.parametrize("gap", [20.0, 100.0, 1e3, 1e4, -20.0, -1e3, -1e4])
def test_finite_and_gradient_alive_up_to_gap_1e4_float32(fn, gap):
  z = jnp.array([[gap, 0.0, -1.0, 2.0]], jnp.float32)
  loss, grad = jax.value_and_grad(lambda z: fn(z, jnp.array([0])).sum())(z)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  if abs(float(loss)) > 10.0:  # large loss: the gradient must not vanish
    assert float(jnp.abs(grad).max()) > 0.5
  # The logit gap moves by the gradient's sign in the direction that lowers the loss.
  np.testing.assert_allclose(float(jnp.sum(grad)), 0.0, atol=1e-6)


def test_matches_optax_where_optax_is_accurate():
  # Reference: optax.softmax_cross_entropy_with_integer_labels (moderate logits).
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(0, 2, (64, 10)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 64))
  np.testing.assert_allclose(
    nll(z, y), optax.softmax_cross_entropy_with_integer_labels(z, y), rtol=2e-6
  )
  np.testing.assert_allclose(negated_nll(z, y), -nll(z, y), rtol=0)
  # p + (1 - p) = 1: complement and nll are two views of one probability.
  np.testing.assert_allclose(jnp.exp(-nll(z, y)) + jnp.exp(-complement_nll(z, y)), 1.0, rtol=1e-6)


def test_negated_gradient_diverges_complement_switches_off():
  """Gradient descent on one negative example: the DESIGN's two methods side by side."""
  z0 = jnp.array([2.0, 1.0, 0.0], jnp.float32)
  lr = 1.0

  def run(fn, steps=300):
    step = jax.jit(lambda z: z - lr * jax.grad(lambda z: fn(z, 0))(z))
    z = z0
    for _ in range(steps):
      z = step(z)
    return z, fn(z, 0), jax.grad(lambda z: fn(z, 0))(z)

  z_neg, loss_neg, grad_neg = run(negated_nll)
  z_comp, loss_comp, grad_comp = run(complement_nll)
  # negated: log p_0 keeps falling, the gap keeps growing, the gradient stays ~1.
  assert float(loss_neg) < -50.0
  assert float(z_neg[1] - z_neg[0]) > 50.0
  assert float(jnp.abs(grad_neg).max()) > 0.5
  # complement: the loss reaches ~0 and the gradient has switched itself off.
  assert 0.0 <= float(loss_comp) < 1e-2
  assert float(jnp.abs(grad_comp).max()) < 1e-2


def test_forward_mode_raises_a_clear_error():
  z = jnp.zeros((2, 3))
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda z: nll(z, jnp.array([0, 1])), (z,), (z,))


# --- label smoothing ------------------------------------------------------------------


def _smoothed_reference(z, y, eps, admissible):
  """mpmath (tests/losses/reference.py): soft cross-entropy against (1 - eps) onehot + eps / K'."""
  q = np.where(admissible, eps / admissible.sum(), 0.0) + (1 - eps) * (np.arange(len(z)) == y)
  z = np.where(admissible, z, -np.inf)
  return reference.soft_cross_entropy(z, q)


@pytest.mark.parametrize("gap, eps", [(0.0, 0.1), (8.0, 0.2), (30.0, 1e-12), (-20.0, 0.05)])
def test_label_smoothing_matches_mpmath_value_and_closed_form_gradient(gap, eps):
  rng = np.random.default_rng(4)
  z = rng.normal(0, 1, (3, 6)).astype(np.float32)
  z[:, 1] += gap
  y = np.array([1, 1, 3])
  keep = np.arange(6) != 5
  for where in (None, keep):
    admissible = np.ones(6, bool) if where is None else keep
    loss, grad = jax.vmap(
      jax.value_and_grad(lambda z, y: nll(z, y, where=where, label_smoothing=eps))
    )(jnp.asarray(z), jnp.asarray(y))
    for i in range(3):
      ref_loss, ref_grad = _smoothed_reference(z[i].astype(np.float64), y[i], eps, admissible)
      cond = 1 + abs(gap)
      np.testing.assert_allclose(float(loss[i]), float(ref_loss), rtol=4 * EPS32 * cond)
      # Closed form: softmax(z) - ((1 - eps) onehot(y) + eps / K'), zero on excluded classes.
      np.testing.assert_allclose(
        np.asarray(grad[i], np.float64), np.array(ref_grad, float), rtol=1e-5, atol=1e-7
      )
  # eps = 0 is exactly the plain nll.
  np.testing.assert_array_equal(
    nll(jnp.asarray(z), jnp.asarray(y), label_smoothing=0.0), nll(jnp.asarray(z), jnp.asarray(y))
  )


def test_label_smoothing_matches_optax_smooth_labels_and_finite_differences():
  rng = np.random.default_rng(5)
  z = jnp.asarray(rng.normal(0, 2, (8, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, 8))
  targets = optax.smooth_labels(jax.nn.one_hot(y, 5), 0.1)  # optax: (1 - eps) onehot + eps / K
  np.testing.assert_allclose(
    nll(z, y, label_smoothing=0.1), optax.softmax_cross_entropy(z, targets), rtol=2e-6
  )
  with jax.enable_x64(True):
    z64 = jnp.asarray(rng.normal(0, 1, (3, 5)))
    check_grads(
      jax.jit(lambda z: nll(z, jnp.array([0, 2, 4]), label_smoothing=0.3)),
      (z64,),
      order=2,
      modes=["rev"],
    )


def test_label_smoothing_keeps_padding_and_bad_labels_apart():
  z = jnp.zeros((3, 4))
  y = jnp.array([1, -100, 9])
  out = jax.jit(lambda z, y: nll(z, y, ignore_index=-100, label_smoothing=0.1))(z, y)
  np.testing.assert_allclose(out[0], np.log(4.0), rtol=1e-6)  # uniform p: every -log p_k = log 4
  assert out[1] == 0.0 and np.isnan(out[2])
  for bad in (1.0, -0.1, "0.1"):
    with pytest.raises(ValueError, match=r"label_smoothing must be a float in \[0, 1\)"):
      nll(z, jnp.array([0, 1, 2]), label_smoothing=bad)
