"""set_nll and complement_set_nll: values, gradients, and agreement with the label forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxsoftmax import losses
from jaxsoftmax.losses import complement_nll, complement_set_nll, nll, set_nll
from tests.losses import accuracy as accuracy_losses

SET_CASES = [c for c in accuracy_losses.CASES if c.name in ("set_nll", "complement_set_nll")]


@pytest.mark.parametrize("regime", sorted(accuracy_losses.REGIMES))
@pytest.mark.parametrize("case", SET_CASES, ids=lambda c: c.name)
def test_float32_value_within_ulps_times_condition_number(case, regime, assert_accurate):
  assert_accurate(case, regime, 10)


def test_singletons_equal_the_label_losses():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(0, 5, (16, 7)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 7, 16))
  onehot = jnp.arange(7) == y[:, None]
  # The same number, by another algorithm on XLA:CPU (the label's one sweep, shifted by
  # its logit): within 2 ulps.
  np.testing.assert_array_max_ulp(np.asarray(set_nll(z, onehot)), np.asarray(nll(z, y)), maxulp=2)
  # complement_nll's value on XLA:CPU is one sweep shifted by the label's logit, which
  # rounds z_k - z_y where the label trails (1.5e-6 from float64 here, against the two
  # sweeps' 7.2e-7; both inside the accuracy table's bound): each against float64.
  z64 = np.asarray(z, np.float64)
  others = np.where(onehot, -np.inf, z64)
  label = z64[np.arange(16), np.asarray(y)]
  expected = np.logaddexp(0.0, label - np.logaddexp.reduce(others, axis=1))
  np.testing.assert_allclose(complement_set_nll(z, onehot), expected, rtol=2e-6)
  np.testing.assert_allclose(complement_nll(z, y), expected, rtol=2e-6)
  np.testing.assert_allclose(
    jax.grad(lambda z: complement_set_nll(z, onehot).sum())(z),
    jax.grad(lambda z: complement_nll(z, y).sum())(z),
    rtol=1e-6,
    atol=1e-12,
  )


def test_gradient_is_softmax_minus_restricted_softmax_float64():
  # Closed form: d/dz (logsumexp(z) - logsumexp_S(z)) = softmax(z) - softmax(z | S).
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(0, 4, (8, 6)))
    s = jnp.asarray(rng.random((8, 6)) < 0.5).at[:, 0].set(True)
    expected = jax.nn.softmax(z) - jax.nn.softmax(jnp.where(s, z, -jnp.inf))
    np.testing.assert_allclose(
      jax.grad(lambda z: set_nll(z, s).sum())(z), expected, rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("fn", [set_nll, complement_set_nll], ids=lambda f: f.__name__)
@pytest.mark.parametrize("gap", [0.0, 9.0, -9.0])
def test_gradients_match_finite_differences_float64(fn, gap):
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    s = jnp.array([[True, False, True, False, False], [False, True, True, True, False]])
    z = jnp.asarray(rng.normal(0, 1, (2, 5))) + gap * s
    check_grads(jax.jit(lambda z: fn(z, s)), (z,), order=2, modes=["rev"])


def test_a_set_far_below_the_top_gives_a_large_finite_loss():
  # Members 1e4 below the top logit: -log P(S) = 1e4 + log(1 + ...) - log 2, not inf.
  z = jnp.array([1e4, 0.0, 0.0, -5.0], jnp.float32)
  s = jnp.array([False, True, True, False])
  loss, grad = jax.value_and_grad(lambda z: set_nll(z, s))(z)
  np.testing.assert_allclose(loss, 1e4 - np.log(2.0), rtol=1e-7)
  np.testing.assert_allclose(grad, [1.0, -0.5, -0.5, 0.0], atol=1e-6)


def test_empty_set_is_infinite_with_zero_gradient_and_full_set_is_zero():
  z = jnp.array([1.0, 2.0, 3.0])
  none, every = jnp.zeros(3, bool), jnp.ones(3, bool)
  assert set_nll(z, none) == np.inf and complement_set_nll(z, every) == np.inf
  assert set_nll(z, every) == 0.0 and complement_set_nll(z, none) == 0.0
  for fn, s in ((set_nll, none), (complement_set_nll, every), (set_nll, every)):
    np.testing.assert_array_equal(jax.grad(lambda z: fn(z, s))(z), 0.0)


@pytest.mark.parametrize(
  "fn",
  [losses.set_nll, losses.complement_set_nll, losses.mcl_mae, losses.mcl_exp],
  ids=lambda f: f.__name__,
)
def test_class_ids_give_what_the_mask_gives(fn):
  # Before: ids (the fused and tree set losses' form) were refused with a suggestion of
  # members.astype(bool), which is wrong for ids.
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  ids = jnp.array([[0, 3, -1], [5, -1, -1], [1, 1, 2], [4, 0, 5]])
  mask = jnp.zeros((4, 6), bool).at[jnp.arange(4)[:, None], jnp.maximum(ids, 0)].max(ids >= 0)
  np.testing.assert_array_equal(fn(z, ids), fn(z, mask))
  np.testing.assert_array_equal(
    jax.grad(lambda z: fn(z, ids).sum())(z), jax.grad(lambda z: fn(z, mask).sum())(z)
  )
  np.testing.assert_array_equal(fn(z.T, ids, axis=0), fn(z, mask))
  with pytest.raises(ValueError, match=r"members\[1, 0\] = 6 is outside \[0, 6\)"):
    fn(z, ids.at[1, 0].set(6))
  out = jax.jit(fn)(z, ids.at[1, 0].set(6))
  assert np.isnan(out[1]) and np.all(np.isfinite(np.asarray(out)[[0, 2, 3]]))
  with pytest.raises(ValueError, match=r"class ids must have the logits' shape without"):
    fn(z, ids[:3])


def test_the_fused_and_tree_set_losses_name_the_conversion_of_a_mask():
  from jaxsoftmax.tree import Tree

  mask = jnp.array([[True, False, True]])
  with pytest.raises(TypeError, match=r"jnp.where\(mask, jnp.arange\(V\), -1\)"):
    losses.fused_set_nll(jnp.ones((1, 2)), jnp.ones((2, 3)), mask)
  tree = Tree.balanced(3, 2)
  with pytest.raises(TypeError, match=r"jnp.where\(mask, jnp.arange\(K\), -1\)"):
    losses.tree_set_nll(jnp.zeros((1, tree.num_nodes, 2)), mask, tree, layout="table")
