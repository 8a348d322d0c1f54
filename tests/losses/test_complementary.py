"""The complementary-label losses: each against its paper's formula in float64, gradients
by finite differences, and the behaviour that sets them apart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxsoftmax import losses


def _softmax64(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _draw(seed=0, shape=(6, 5)):
  rng = np.random.default_rng(seed)
  return rng.normal(0, 2, shape), rng.integers(0, shape[-1], shape[0])


def test_scl_exp_is_exp_of_the_wrong_labels_probability():
  with jax.enable_x64(True):
    z, y = _draw()
    # Chou et al. 2020, SCL-EXP: exp(p_l), evaluated directly in float64.
    expected = np.exp(_softmax64(z)[np.arange(6), y])
    np.testing.assert_allclose(losses.scl_exp(jnp.asarray(z), jnp.asarray(y)), expected, rtol=1e-13)
    check_grads(
      jax.jit(lambda z: losses.scl_exp(z, jnp.asarray(y))),
      (jnp.asarray(z),),
      order=2,
      modes=["rev"],
    )


def test_pairwise_comparison_matches_the_sigmoid_pc_formula():
  with jax.enable_x64(True):
    z, y = _draw(1)
    # Ishida et al. 2017, PC with the sigmoid loss: sum over k != l of sigmoid(-(z_k - z_l)),
    # written as libcll does: sum over every k of sigmoid(z_l - z_k), minus the k = l term 1/2.
    expected = (1 / (1 + np.exp(-(z[np.arange(6), y][:, None] - z)))).sum(axis=1) - 0.5
    np.testing.assert_allclose(
      losses.pairwise_comparison(jnp.asarray(z), jnp.asarray(y)), expected, rtol=1e-13
    )
    check_grads(
      jax.jit(lambda z: losses.pairwise_comparison(z, jnp.asarray(y))),
      (jnp.asarray(z),),
      order=2,
      modes=["rev"],
    )


def _transition(k, bias):
  """Yu et al. 2018's biased complementary labels: T[y, (y + 1) mod K] gets bias extra."""
  uniform = (1.0 - np.eye(k)) / (k - 1)
  return bias * np.roll(np.eye(k), 1, axis=1) + (1.0 - bias) * uniform


@pytest.mark.parametrize("bias", [0.0, 0.5, 0.9, 1.0])
def test_forward_nll_matches_minus_log_of_t_transpose_p(bias):
  with jax.enable_x64(True):
    z, y = _draw(2)
    t = _transition(5, bias)
    # -log (T^T p)_l, the forward-corrected likelihood of the shown label, in float64.
    expected = -np.log((_softmax64(z) @ t)[np.arange(6), y])
    got = losses.forward_nll(jnp.asarray(z), jnp.asarray(y), jnp.asarray(t))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    check_grads(
      jax.jit(lambda z: losses.forward_nll(z, jnp.asarray(y), jnp.asarray(t))),
      (jnp.asarray(z),),
      order=2,
      modes=["rev"],
    )


def test_forward_nll_with_the_uniform_matrix_is_the_complement_likelihood_plus_a_constant():
  z, y = _draw(3)
  z, y = jnp.asarray(z, jnp.float32), jnp.asarray(y)
  t = jnp.asarray(_transition(5, 0.0), jnp.float32)
  np.testing.assert_allclose(
    losses.forward_nll(z, y, t), losses.complement_nll(z, y) + np.log(4.0), rtol=1e-6
  )
  with pytest.raises(ValueError, match=r"transition has shape \(4, 4\); it must be \(5, 5\)"):
    losses.forward_nll(z, y, t[:4, :4])


@pytest.mark.parametrize(
  "fn, formula",
  [
    # Feng et al. 2020 on a set S of wrong labels, with P = sum_{k not in S} p_k:
    (losses.mcl_mae, lambda p_out: 1.0 - p_out),  # MCL-MAE
    (losses.mcl_exp, lambda p_out: np.exp(-p_out)),  # MCL-EXP
    (losses.complement_set_nll, lambda p_out: -np.log(p_out)),  # MCL-LOG
  ],
  ids=["mcl_mae", "mcl_exp", "mcl_log"],
)
def test_mcl_losses_match_feng_et_al(fn, formula):
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    z = rng.normal(0, 2, (6, 5))
    members = rng.random((6, 5)) < 0.4
    members[:, 0], members[:, -1] = True, False
    p_out = (_softmax64(z) * ~members).sum(axis=1)
    np.testing.assert_allclose(fn(jnp.asarray(z), jnp.asarray(members)), formula(p_out), rtol=1e-12)
    check_grads(
      jax.jit(lambda z: fn(z, jnp.asarray(members))), (jnp.asarray(z),), order=2, modes=["rev"]
    )


def test_bounded_losses_switch_off_at_both_ends_unlike_the_complement_likelihood():
  # Confidently wrong (the wrong label at +30): complement_nll keeps a gradient of order 1,
  # scl_exp's and pc's vanish (exp(p) p (1 - p) and sigmoid'(30) -> 0).
  z = jnp.array([[30.0, 0.0, 0.0]])
  y = jnp.array([0])
  grad = lambda fn: jax.grad(lambda z: fn(z, y).sum())(z)
  assert float(jnp.abs(grad(losses.complement_nll)).max()) > 0.5
  assert float(jnp.abs(grad(losses.scl_exp)).max()) < 1e-10
  assert float(jnp.abs(grad(losses.pairwise_comparison)).max()) < 1e-10
  # Every bounded loss stays finite where log(1 - softmax) is inf.
  for fn in (losses.scl_exp, losses.pairwise_comparison):
    assert np.isfinite(float(fn(jnp.array([[1e4, 0.0, 0.0]]), y)[0]))
  assert np.isfinite(
    float(losses.mcl_mae(jnp.array([[1e4, 0.0, 0.0]]), jnp.array([[True, False, False]]))[0])
  )
