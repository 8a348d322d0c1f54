"""Losses inside real training loops: padding, masks, ignore_index, NaN and wide labels.

Expected values: optax's cross-entropy (which gives padded rows loss 0 and gradient 0),
closed forms and the unpadded batch's own loss and gradient.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsoftmax import losses
from jaxsoftmax.models import MLP

LABEL_LOSSES = [losses.nll, losses.complement_nll, losses.negated_nll]
_ids = lambda f: f.__name__


def _padded_nll_mean(z, y):
  mask = y >= 0
  return jnp.sum(jnp.where(mask, losses.nll(z, y), 0.0)) / mask.sum()


def test_issue_reproduction_padding_label_under_jit_gives_zero_gradient():
  z = jnp.array([[2.0, 1, 0], [0.5, 0.1, 0.2]])
  y = jnp.array([0, -100])
  loss, grad = jax.jit(jax.value_and_grad(_padded_nll_mean))(z, y)
  np.testing.assert_allclose(loss, 0.4076059, rtol=1e-6)  # -log softmax([2, 1, 0])[0]
  np.testing.assert_array_equal(grad[1], 0.0)
  # optax's gradient for the same masked mean: the reference.
  ref = jax.grad(
    lambda z: (
      jnp.sum(
        jnp.where(
          y >= 0, optax.softmax_cross_entropy_with_integer_labels(z, jnp.maximum(y, 0)), 0.0
        )
      )
      / 1
    )
  )(z)
  np.testing.assert_allclose(grad, ref, rtol=1e-6)


def _garbage_rows(loss_case, rng, shape=(4, 5)):
  """A batch whose rows 1 and 3 are padding: NaN/inf logits and an invalid second argument."""
  name, fn, make_aux = loss_case
  z = np.asarray(rng.normal(0, 2, shape), np.float32)
  aux = np.asarray(make_aux(rng, shape))
  z[1] = np.nan
  z[3, :2] = np.inf
  if aux.dtype.kind in "iu":
    aux[1], aux[3] = -100, 99
  mask = np.array([True, False, True, False])
  return jnp.asarray(z), jnp.asarray(aux), jnp.asarray(mask)


@pytest.mark.parametrize("how", ["where", "multiply"])
def test_zero_cotangent_gives_zero_gradient_whatever_the_row_holds(loss_case, how):
  name, fn, _ = loss_case
  z, aux, mask = _garbage_rows(loss_case, np.random.default_rng(0))
  col = mask if fn is not losses.sigmoid_binary_cross_entropy else mask[:, None]

  def masked(z, aux):
    loss = fn(z, aux)
    if how == "where":
      return jnp.sum(jnp.where(col, loss, 0.0))
    return jnp.sum(jnp.where(col, loss, 0.0) * col)  # loss * mask where the loss is finite

  # Padding labels are out of range: eagerly an error, so the labels are traced here.
  grad = jax.jit(jax.grad(masked))(z, aux)
  np.testing.assert_array_equal(grad[~mask], 0.0)
  assert np.all(np.isfinite(grad[mask]))
  # The kept rows get exactly their own gradient.
  own = jax.grad(lambda z: fn(z, aux[mask]).sum())(z[mask])
  np.testing.assert_allclose(grad[mask], own, rtol=1e-6)
  per_example = jax.jit(jax.vmap(jax.grad(lambda z, a, m: jnp.where(m, fn(z, a).sum(), 0.0))))(
    z, aux, mask
  )
  np.testing.assert_array_equal(per_example[~mask], 0.0)
  # Second derivatives of a masked row are zero too where its logits are finite (a NaN
  # logit's own derivative is NaN, and 0 * NaN cannot be avoided inside the rule).
  finite = jnp.where(jnp.isfinite(z), z, 1.0)
  hess_rows = jax.jit(jax.grad(lambda z, aux: jnp.sum(jax.grad(masked)(z, aux) ** 2)))(finite, aux)
  np.testing.assert_array_equal(hess_rows[~mask], 0.0)
  assert np.all(np.isfinite(hess_rows))


def test_padded_batch_through_an_optax_step_equals_the_unpadded_step():
  model = MLP((6,), 4, hidden=(8,), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)
  y = jnp.array([0, 3, -100, 1, -100, 2])
  keep = np.asarray(y) >= 0
  optimizer = optax.adam(1e-2)

  @chex.assert_max_traces(n=1)
  def step(params, opt_state, x, y):
    def loss(params):
      return _padded_nll_mean(nnx.merge(graphdef, params)(x), y)

    grads = jax.grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(step)
  # Padding rows hold finite garbage (a NaN input would poison x^T @ dlogits in any loss).
  padded = x.at[~keep].set(1e3)
  p1, _ = step(params, optimizer.init(params), padded, y)
  p2, _ = step(params, optimizer.init(params), padded, y)  # no retrace: same shapes
  chex.assert_tree_all_finite(p1)
  chex.assert_trees_all_equal(p1, p2)

  def unpadded(params):
    return losses.nll(nnx.merge(graphdef, params)(x[keep]), y[keep]).mean()

  grads = jax.grad(unpadded)(params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  chex.assert_trees_all_close(p1, optax.apply_updates(params, updates), rtol=1e-5, atol=1e-7)


def test_a_row_that_where_excludes_entirely_has_loss_zero_and_zero_gradient_as_in_optax(loss_case):
  name, fn, make_aux = loss_case
  if name == "sigmoid_binary_cross_entropy":
    pytest.skip(
      "elementwise, with no optax counterpart of where: an excluded entry is a "
      "class of probability 0 (test_checks)"
    )
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(0, 2, (3, 5)), jnp.float32)
  aux = jnp.asarray(make_aux(rng, (3, 5)))
  where = jnp.array([[True], [False], [True]])
  loss, grad = jax.value_and_grad(lambda z: fn(z, aux, where=where).sum())(z)
  per_example = fn(z, aux, where=where)
  np.testing.assert_array_equal(per_example[1], 0.0)
  np.testing.assert_array_equal(grad[1], 0.0)
  np.testing.assert_allclose(per_example[np.array([0, 2])], fn(z[::2], aux[::2]), rtol=1e-6)
  if name == "nll":  # optax's value for the same mask
    np.testing.assert_allclose(
      per_example,
      optax.softmax_cross_entropy_with_integer_labels(
        z, aux, where=jnp.broadcast_to(where, z.shape)
      ),
      rtol=1e-6,
    )


@pytest.mark.parametrize("fn", LABEL_LOSSES, ids=_ids)
def test_ignore_index_gives_loss_zero_and_zero_gradient_eagerly_and_under_jit(fn):
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(0, 2, (5, 4)), jnp.float32)
  y = jnp.array([1, -100, 3, -100, 0])
  keep = np.asarray(y) != -100
  for transform in (lambda f: f, jax.jit):
    value = transform(lambda z, y: fn(z, y, ignore_index=-100))(z, y)
    grad = transform(jax.grad(lambda z, y: fn(z, y, ignore_index=-100).sum()))(z, y)
    np.testing.assert_array_equal(value[~keep], 0.0)
    np.testing.assert_array_equal(grad[~keep], 0.0)
    np.testing.assert_allclose(value[keep], fn(z[keep], y[keep]), rtol=1e-6)
  # Another out-of-range label is still an error eagerly and NaN under jit.
  with pytest.raises(ValueError, match=r"labels\[1\] = -1 is outside \[0, 4\)"):
    fn(z[:2], jnp.array([0, -1]), ignore_index=-100)
  out = jax.jit(lambda z, y: fn(z, y, ignore_index=-100))(z[:3], jnp.array([0, 7, -100]))
  assert np.isfinite(out[0]) and np.isnan(out[1]) and out[2] == 0.0
  # A padding value no label of the dtype can hold ignores nothing.
  np.testing.assert_array_equal(
    fn(z[:2], jnp.array([0, 1], jnp.uint8), ignore_index=-100), fn(z[:2], jnp.array([0, 1]))
  )
  with pytest.raises(TypeError, match="ignore_index must be an int"):
    fn(z, y, ignore_index=-100.0)


def test_hierarchical_losses_take_ignore_index_and_a_zero_cotangent():
  from jaxsoftmax.tree import balanced_tree

  tree = balanced_tree(9)
  rng = np.random.default_rng(4)
  u = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 3, 3)), jnp.float32)
  y = jnp.array([0, -100, 8, -100])
  keep = np.asarray(y) >= 0
  for fn in (losses.hierarchical_nll, losses.hierarchical_complement_nll):
    f = jax.jit(lambda u, w, y: fn(u, w, y, tree, ignore_index=-100))
    value = f(u, w, y)
    gu, gw = jax.grad(lambda u, w: f(u, w, y).sum(), argnums=(0, 1))(u, w)
    np.testing.assert_array_equal(value[~keep], 0.0)
    np.testing.assert_array_equal(gu[~keep], 0.0)
    np.testing.assert_array_equal(gw[~keep], 0.0)
    np.testing.assert_allclose(value[keep], fn(u[keep], w[keep], y[keep], tree), rtol=1e-6)
    # Padding labels masked the usual way under jit: zero gradient too.
    gu = jax.jit(jax.grad(lambda u, y: jnp.where(y >= 0, fn(u, w, y, tree), 0.0).sum()))(u, y)
    np.testing.assert_array_equal(gu[~keep], 0.0)


# --- NaN in, NaN out ------------------------------------------------------------


def test_a_nan_logit_anywhere_in_a_row_gives_nan_loss_and_gradient(loss_case):
  name, fn, make_aux = loss_case
  rng = np.random.default_rng(5)
  z = np.asarray(rng.normal(0, 1, (3, 5)), np.float32)
  aux = jnp.asarray(make_aux(rng, (3, 5)))
  if aux.dtype.kind in "iu":
    aux = jnp.array([0, 0, 0])
  z[1, 2] = np.nan  # not the label's logit, and in the complement of every set's first class
  z = jnp.asarray(z)
  loss = fn(z, aux)
  grad = jax.grad(lambda z: fn(z, aux).sum())(z)
  if name == "sigmoid_binary_cross_entropy":  # elementwise: only that entry
    assert np.isnan(loss[1, 2]) and np.isnan(grad[1, 2])
    return
  assert np.isnan(loss[1]) and np.all(np.isfinite(loss[np.array([0, 2])]))
  assert np.any(np.isnan(grad[1])) and np.all(np.isfinite(grad[np.array([0, 2])]))
  # A NaN on a class that where excludes is not admissible: no effect.
  keep = (jnp.arange(5) != 2)[None]  # a mask over classes keeps the class axis (optax's rule)
  np.testing.assert_allclose(fn(z, aux, where=keep)[1], fn(z.at[1, 2].set(0.0), aux, where=keep)[1])


@pytest.mark.parametrize("fn", LABEL_LOSSES, ids=_ids)
def test_issue_reproductions_nan_outside_the_label_is_not_swallowed(fn):
  # Before: nll and negated_nll returned 0, complement_nll +inf with a zero gradient.
  z = jnp.array([[0.0, jnp.nan, 1.0]])
  assert np.isnan(fn(z, jnp.array([0]))[0])
  assert np.all(np.isnan(jax.grad(lambda z: fn(z, jnp.array([0])).sum())(z)))


def test_hierarchical_nan_in_another_cluster_poisons_the_example():
  from jaxsoftmax.tree import balanced_tree

  tree = balanced_tree(9)
  u = jnp.zeros((2, 3))
  w = jnp.zeros((2, 3, 3)).at[0, 2, 1].set(jnp.nan)  # label 0 lives in cluster 0
  for fn in (losses.hierarchical_nll, losses.hierarchical_complement_nll):
    out = fn(u, w, jnp.array([0, 0]), tree)
    assert np.isnan(out[0]) and np.isfinite(out[1])
    gu = jax.grad(lambda u: fn(u, w, jnp.array([0, 0]), tree).sum())(u)
    assert np.all(np.isnan(gu[0])) and np.all(np.isfinite(gu[1]))
    assert np.isnan(fn(u.at[1, 2].set(jnp.nan), w, jnp.array([0, 0]), tree)[1])


# --- labels that wrap -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
@pytest.mark.parametrize("fn", LABEL_LOSSES, ids=_ids)
def test_wide_numpy_labels_are_checked_before_any_cast(fn, dtype):
  # With x64 off, JAX would hold 2**32 + 1 as 1: the loss of label 1, silently.
  with pytest.raises(ValueError, match=r"labels\[0\] = 4294967297 is outside \[0, 3\)"):
    fn(jnp.zeros((2, 3)), np.array([2**32 + 1, 1], dtype))
  with pytest.raises(ValueError, match=r"= 2147483648 is outside"):
    fn(jnp.zeros((1, 3)), np.array([2**31], dtype))
  np.testing.assert_array_equal(
    fn(jnp.arange(6.0).reshape(2, 3), np.array([2, 1], dtype)),
    fn(jnp.arange(6.0).reshape(2, 3), jnp.array([2, 1])),
  )


# --- axis ---------------------------------------------------------------------------


def test_axis_selects_the_class_axis(loss_case):
  name, fn, make_aux = loss_case
  if name == "sigmoid_binary_cross_entropy":
    pytest.skip("elementwise: no class axis to reduce over")
  rng = np.random.default_rng(6)
  z = jnp.asarray(rng.normal(0, 2, (4, 5)), jnp.float32)
  aux = jnp.asarray(make_aux(rng, (4, 5)))
  aux_t = aux if aux.ndim == 1 else aux.T
  np.testing.assert_allclose(fn(z.T, aux_t, axis=0), fn(z, aux), rtol=1e-6)
  where = jnp.asarray(rng.random((4, 5)) < 0.8).at[:, 0].set(True)
  if aux.dtype.kind in "iu":
    aux, aux_t = jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32)
  np.testing.assert_allclose(
    fn(z.T, aux_t, axis=0, where=where.T), fn(z, aux, where=where), rtol=1e-6
  )
  g0 = jax.grad(lambda z: fn(z, aux_t, axis=0).sum())(z.T)
  np.testing.assert_allclose(g0.T, jax.grad(lambda z: fn(z, aux).sum())(z), rtol=1e-6)
  z3 = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)  # classes in the middle
  aux3 = jnp.asarray(make_aux(rng, (2, 3, 5)))
  aux_mid = aux3 if aux3.ndim == 2 else jnp.moveaxis(aux3, -1, 1)
  np.testing.assert_allclose(fn(z3, aux_mid, axis=1), fn(jnp.moveaxis(z3, 1, -1), aux3), rtol=1e-6)
  with pytest.raises(ValueError, match=r"axis 2 is out of range for logits of shape \(4, 5\)"):
    fn(z, aux, axis=2)
