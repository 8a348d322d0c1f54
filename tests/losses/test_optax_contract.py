"""optax's contract for ``where`` and ``axis``, to the letter.

Cases ported from optax 0.2.8's ``optax/losses/_classification_test.py``
(``SoftmaxCrossEntropyTest``, ``SoftmaxCrossEntropyWithIntegerLabelsTest``), with the
jaxsoftmax equivalent in place of optax's function and optax's expected values and
tolerances; each also compares with optax's own function on the same input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsoftmax import losses

# optax's fixtures (SoftmaxCrossEntropyWithIntegerLabelsTest.setUp).
YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], dtype=np.float32)
TS = np.array([1, 0], dtype=np.int32)
SOFT_TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
MASK = np.array([True, False])  # per example
PER_LOGIT_MASK = np.array([[1, 0, 0], [0, 0, 0]]).astype(bool)


def test_the_issues_per_example_mask_reads_as_optax_does():
  # batch == K == 3: the mask was read as a mask over classes and gave
  # [0.1269 0.8544 inf]; optax (and now jaxsoftmax) reads it as "these examples". optax
  # 0.2.8 prints [0.2761 0. 1.0986] (its docstring's 0.2761 for the first row).
  z = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1], [0.0, 0.0, 0.0]])
  y = jnp.array([0, 1, 2])
  m = jnp.array([True, False, True])
  expected = optax.softmax_cross_entropy_with_integer_labels(z, y, where=m)
  np.testing.assert_allclose(expected, [0.2761, 0.0, 1.0986], atol=1e-4)
  np.testing.assert_allclose(losses.nll(z, y, where=m), expected, rtol=1e-6)
  # The same rule for every flat loss: the masked example costs 0, the others as unmasked.
  for fn in (losses.complement_nll, losses.negated_nll):
    out = fn(z, y, where=m)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[::2], fn(z[::2], y[::2]), rtol=1e-6)
  members = jnp.eye(3, dtype=bool)[y]
  for fn in (losses.set_nll, losses.complement_set_nll):
    out = fn(z, members, where=m)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[::2], fn(z[::2], members[::2]), rtol=1e-6)
  q = jax.nn.softmax(z[::-1])
  np.testing.assert_allclose(
    losses.soft_cross_entropy(z, q, where=m),
    optax.softmax_cross_entropy(z, q, where=m),
    rtol=1e-6,
  )


def test_a_per_class_mask_keeps_the_class_axis():
  z = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1], [0.0, 0.0, 0.0]])
  y = jnp.array([0, 1, 0])
  classes = jnp.array([[True, True, False]])  # [1, K]: class 2 is excluded everywhere
  np.testing.assert_allclose(
    losses.nll(z, y, where=classes),
    optax.softmax_cross_entropy_with_integer_labels(z, y, where=jnp.broadcast_to(classes, z.shape)),
    rtol=1e-6,
  )


def test_a_mask_that_fits_neither_reading_names_both():
  with pytest.raises(ValueError) as error:
    losses.nll(jnp.zeros((2, 5)), jnp.zeros(2, jnp.int32), where=jnp.ones(5, bool))
  message = str(error.value)
  assert "where shape (5,)" in message and "logits shape (2, 5)" in message
  assert "elementwise" in message and "per example" in message and "(2,)" in message
  with pytest.raises(ValueError, match="either of optax's readings"):
    losses.nll(jnp.zeros((2, 5)), jnp.zeros(2, jnp.int32), where=jnp.ones((2, 5, 1), bool))


def test_integer_labels_gradient_is_finite_with_a_per_example_mask():
  # optax: SoftmaxCrossEntropyWithIntegerLabelsTest.test_gradient
  loss = lambda z: jnp.sum(losses.nll(z, TS, where=MASK))
  grad = jax.grad(loss)(YS)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[1], 0.0)
  optax_grad = jax.grad(
    lambda z: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, TS, where=MASK))
  )(YS)
  np.testing.assert_allclose(grad, optax_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [losses.nll, losses.complement_nll, losses.negated_nll])
def test_per_logit_mask(fn):
  # optax: test_per_logit_mask: an example whose logits are all masked costs 0.
  out = fn(YS, TS, where=PER_LOGIT_MASK)
  np.testing.assert_array_equal(jnp.where(jnp.any(PER_LOGIT_MASK, -1), 0.0, out), 0)


def test_soft_targets_per_example_mask_and_gradient():
  # optax: SoftmaxCrossEntropyTest.test_gradient and test_per_logit_mask.
  grad = jax.grad(lambda z: jnp.sum(losses.soft_cross_entropy(z, SOFT_TS, where=MASK)))(YS)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(
    losses.soft_cross_entropy(YS, SOFT_TS, where=MASK),
    optax.softmax_cross_entropy(YS, SOFT_TS, where=MASK),
    atol=1e-4,
  )
  out = losses.soft_cross_entropy(YS, SOFT_TS, where=PER_LOGIT_MASK)
  np.testing.assert_array_equal(jnp.where(jnp.any(PER_LOGIT_MASK, -1), 0.0, out), 0)


@pytest.mark.parametrize("size", [5, 10])
def test_soft_targets_mask_on_one_example(size):
  # optax: SoftmaxCrossEntropyTest.test_mask (1-D logits: the mask is elementwise).
  rng = np.random.default_rng(size)
  preds = rng.normal(size=size).astype(np.float32)
  targets = rng.dirichlet(np.ones(size)).astype(np.float32)
  mask = rng.integers(2, size=size).astype(bool)
  mask[0], mask[1] = True, False
  # The documented difference: target mass on an excluded class (probability 0) costs
  # +inf here, where optax drops it from the sum.
  assert losses.soft_cross_entropy(preds, targets, where=mask) == np.inf
  targets = np.where(mask, targets, 0.0).astype(np.float32)  # optax's case without that mass
  x = losses.soft_cross_entropy(preds[mask], targets[mask])
  y = losses.soft_cross_entropy(preds, targets, where=mask)
  np.testing.assert_allclose(x, y, atol=1e-4)
  np.testing.assert_allclose(y, optax.softmax_cross_entropy(preds, targets, where=mask), atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_axis(axis):
  # optax: SoftmaxCrossEntropyWithIntegerLabelsTest.test_axis and SoftmaxCrossEntropyTest.
  shape = [4, 5, 6]
  rng = np.random.default_rng(axis)
  preds = rng.normal(size=shape).astype(np.float32)
  labels = rng.integers(shape[axis], size=shape[:axis] + shape[axis + 1 :])
  np.testing.assert_allclose(
    losses.nll(preds, labels, axis=axis),
    losses.nll(np.moveaxis(preds, axis, -1), labels),
    atol=1e-4,
  )
  targets = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)
  np.testing.assert_allclose(
    losses.soft_cross_entropy(preds, targets, axis=axis),
    optax.softmax_cross_entropy(preds, targets, axis=axis),
    atol=1e-4,
  )


AXES = [(1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (-2, -1), (0, 1, 3), (-4, -3, -1)]


def _permuted(shape, axis):
  """optax's test_axes: logits [batch..., K] and the permutation that spreads the
  classes over ``axis`` of an array of ``shape``."""
  ndim = len(shape)
  logits_axis = tuple((x + ndim) % ndim for x in axis)
  labels_axis = tuple(x for x in range(ndim) if x not in logits_axis)
  logits_shape = tuple(shape[x] for x in logits_axis)
  labels_shape = tuple(shape[x] for x in labels_axis)
  perm = labels_axis + logits_axis
  perm_inv = tuple(i for i, _ in sorted(enumerate(perm), key=lambda x: x[1]))
  return labels_shape, logits_shape, perm_inv


@pytest.mark.parametrize("axis", AXES)
def test_axes(axis):
  # optax: SoftmaxCrossEntropyWithIntegerLabelsTest.test_axes (its expected value is the
  # loss on the flattened classes; rtol 1e-7 as there).
  shape = (2, 3, 4, 5)
  labels_shape, logits_shape, perm_inv = _permuted(shape, axis)
  num_classes = int(np.prod(logits_shape))
  keys = jax.random.split(jax.random.key(42), 2)
  flat = jax.random.uniform(keys[0], labels_shape + (num_classes,))
  labels = jax.random.randint(keys[1], labels_shape, 0, num_classes - 1)
  logits = flat.reshape(labels_shape + logits_shape).transpose(perm_inv)
  assert logits.shape == shape
  np.testing.assert_allclose(losses.nll(logits, labels, axis=axis), losses.nll(flat, labels))
  np.testing.assert_allclose(
    losses.nll(logits, labels, axis=axis),
    optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis),
    rtol=1e-6,
  )


@pytest.mark.parametrize("axis", [(1, 3), (-1, -2)])
def test_tuple_axes_for_every_flat_loss_and_their_masks(axis):
  shape = (2, 3, 4, 5)
  labels_shape, logits_shape, perm_inv = _permuted(shape, axis)
  k = int(np.prod(logits_shape))
  rng = np.random.default_rng(0)
  flat = jnp.asarray(rng.normal(size=labels_shape + (k,)), jnp.float32)
  spread = lambda x: x.reshape(labels_shape + logits_shape).transpose(perm_inv)
  labels = jnp.asarray(rng.integers(0, k, labels_shape))
  members = jnp.asarray(rng.random(labels_shape + (k,)) < 0.3).at[..., 0].set(True)
  targets = jax.nn.softmax(jnp.asarray(rng.normal(size=labels_shape + (k,)), jnp.float32))
  per_example = jnp.asarray(rng.random(labels_shape) < 0.7)
  per_entry = jnp.asarray(rng.random(labels_shape + (k,)) < 0.8).at[..., 0].set(True)
  for fn, second in [
    (losses.nll, labels),
    (losses.complement_nll, labels),
    (losses.negated_nll, labels),
    (losses.set_nll, members),
    (losses.complement_set_nll, members),
    (losses.soft_cross_entropy, targets),
  ]:
    moved = second if second.ndim == len(labels_shape) else spread(second)
    np.testing.assert_allclose(fn(spread(flat), moved, axis=axis), fn(flat, second), rtol=1e-6)
    np.testing.assert_allclose(
      fn(spread(flat), moved, axis=axis, where=per_example),
      fn(flat, second, where=per_example),
      rtol=1e-6,
    )
    np.testing.assert_allclose(
      fn(spread(flat), moved, axis=axis, where=spread(per_entry)),
      fn(flat, second, where=per_entry),
      rtol=1e-6,
    )
    grad = jax.grad(lambda z: fn(z, moved, axis=axis).sum())(spread(flat))
    np.testing.assert_allclose(grad, spread(jax.grad(lambda z: fn(z, second).sum())(flat)))


def test_bad_axes_are_named():
  z = jnp.zeros((2, 3, 4))
  with pytest.raises(ValueError, match=r"axis 3 is out of range for logits of shape \(2, 3, 4\)"):
    losses.nll(z, jnp.zeros(2, jnp.int32), axis=(1, 3))
  with pytest.raises(ValueError, match="names an axis twice"):
    losses.nll(z, jnp.zeros(2, jnp.int32), axis=(1, -2))
  with pytest.raises(TypeError, match="axis must be an int or a non-empty tuple of ints"):
    losses.nll(z, jnp.zeros(2, jnp.int32), axis=[1, 2])
