"""Bad input: clear errors eagerly, NaN for that example only under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsoftmax import losses
from tests.losses.conftest import LABEL_LOSSES, SET_LOSSES


def test_label_out_of_range_names_value_and_position():
  z = jnp.zeros((2, 3, 4))
  y = jnp.array([[0, 1, 2], [3, 7, -1]])
  with pytest.raises(ValueError, match=r"labels\[1, 1\] = 7 is outside \[0, 4\) \(2 of 6"):
    losses.nll(z, y)
  with pytest.raises(ValueError, match=r"labels\[0\] = -1 is outside \[0, 4\)"):
    losses.complement_nll(jnp.zeros((2, 4)), np.array([-1, 0]))


@pytest.mark.parametrize(
  "fn", [losses.nll, losses.complement_nll, losses.negated_nll], ids=lambda f: f.__name__
)
def test_under_jit_a_bad_label_gives_nan_for_that_example_only(fn):
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(0, 1, (4, 5)), jnp.float32)
  y = jnp.array([1, -1, 5, 4])
  out = jax.jit(fn)(z, y)
  assert np.isnan(out[1]) and np.isnan(out[2])
  np.testing.assert_array_equal(out[np.array([0, 3])], fn(z[np.array([0, 3])], y[np.array([0, 3])]))
  grad = jax.jit(jax.grad(lambda z, y: fn(z, y).sum()))(z, y)
  assert np.all(np.isnan(grad[1:3])) and np.all(np.isfinite(grad[np.array([0, 3])]))
  # A bad label closed over as a constant is known at trace time: an error, not NaN.
  with pytest.raises(ValueError, match="outside"):
    jax.jit(lambda z: fn(z, y))(z)
  # optax wraps -1 to the last class: a silently wrong, finite loss.
  assert np.isfinite(jax.jit(optax.softmax_cross_entropy_with_integer_labels)(z, y)[1])


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.int32, jnp.uint32])
def test_any_integer_dtype(dtype):
  z = jnp.arange(12.0).reshape(3, 4)
  y = jnp.array([0, 3, 2], dtype)
  np.testing.assert_array_equal(losses.nll(z, y), losses.nll(z, jnp.array([0, 3, 2])))


def test_wide_labels_never_wrap_into_range():
  with jax.enable_x64(True):
    y = jnp.array([2**32 + 1, 1], jnp.int64)  # would be 1 after a cast to int32
    out = jax.jit(losses.nll)(jnp.zeros((2, 3)), y)
    assert np.isnan(out[0]) and np.isfinite(out[1])


def test_uint8_labels_with_more_classes_than_uint8_holds():
  z = jnp.zeros((2, 300))
  np.testing.assert_allclose(
    losses.nll(z, jnp.array([255, 0], jnp.uint8)), np.log(300.0), rtol=1e-6
  )


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=r"labels shape \(3,\) does not match logits shape \(2, 5\)"):
    losses.nll(jnp.zeros((2, 5)), jnp.zeros(3, jnp.int32))
  with pytest.raises(
    ValueError, match=r"members shape \(2, 4\) does not match logits shape \(2, 5\)"
  ):
    losses.set_nll(jnp.zeros((2, 5)), jnp.zeros((2, 4), bool))
  with pytest.raises(
    ValueError, match=r"targets shape \(5,\) does not match logits shape \(2, 5\)"
  ):
    losses.soft_cross_entropy(jnp.zeros((2, 5)), jnp.zeros(5))
  with pytest.raises(
    ValueError, match=r"where shape \(3,\) does not broadcast to logits shape \(2, 5\)"
  ):
    losses.nll(jnp.zeros((2, 5)), jnp.zeros(2, jnp.int32), where=jnp.ones(3, bool))


def test_type_errors():
  with pytest.raises(TypeError, match="logits must be a real floating array, got dtype int32"):
    losses.nll(jnp.zeros((2, 3), jnp.int32), jnp.zeros(2, jnp.int32))
  with pytest.raises(TypeError, match="labels must be integers, got dtype float32"):
    losses.nll(jnp.zeros((2, 3)), jnp.zeros(2))
  # Integer members are class ids (the fused and tree set losses' form); floats are neither.
  with pytest.raises(TypeError, match="members must be a boolean mask over the classes or integer"):
    losses.set_nll(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(TypeError, match="where must be a boolean mask"):
    losses.nll(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), where=jnp.ones(3))


def test_no_class_axis():
  with pytest.raises(ValueError, match="scalar"):
    losses.nll(jnp.float32(1.0), jnp.int32(0))
  with pytest.raises(ValueError, match="class axis is empty"):
    losses.nll(jnp.zeros((2, 0)), jnp.zeros(2, jnp.int32))


def test_masked_and_minus_inf_logits_get_zero_gradient_never_nan(loss_case):
  name, fn, make_aux = loss_case
  rng = np.random.default_rng(1)
  aux = jnp.asarray(make_aux(rng, (3, 6)))
  if name in ("soft_cross_entropy",):
    aux = aux.at[:, 4:].set(0.0)  # no target mass on the excluded classes
  elif name in LABEL_LOSSES:
    aux = aux % 4
  elif name != "sigmoid_binary_cross_entropy":
    aux = aux.at[:, 4:].set(False)
  else:
    aux = aux.at[:, 4:].set(0.0)
  z = jnp.asarray(rng.normal(0, 1, (3, 6)), jnp.float32).at[:, 5].set(-jnp.inf)
  keep = (jnp.arange(6) != 4)[None]  # class 4 excluded by where, class 5 by a -inf logit
  loss, grad = jax.value_and_grad(lambda z: fn(z, aux, where=keep).sum())(z)
  assert np.isfinite(loss)
  assert np.all(np.isfinite(grad)) and np.all(grad[:, 4:] == 0.0)
  grad2 = jax.grad(lambda z: jax.grad(lambda z: fn(z, aux, where=keep).sum())(z).sum())(z)
  assert np.all(np.isfinite(grad2))


def test_probability_zero_events():
  z = jnp.array([0.0, 1.0, 2.0])
  only_0 = jnp.array([True, False, False])
  # nll of an excluded label: +inf, zero gradient.
  loss, grad = jax.value_and_grad(lambda z: losses.nll(z, 1, where=only_0))(z)
  assert loss == np.inf and np.all(grad == 0.0)
  # complement of the only admissible class: p = 1, so -log(1 - p) = +inf, zero gradient.
  loss, grad = jax.value_and_grad(lambda z: losses.complement_nll(z, 0, where=only_0))(z)
  assert loss == np.inf and np.all(grad == 0.0)
  # No admissible class at all: loss 0 and a zero gradient, as optax gives.
  none = jnp.zeros(3, bool)
  loss, grad = jax.value_and_grad(lambda z: losses.nll(z, 0, where=none))(z)
  assert loss == 0.0 and np.all(grad == 0.0)
  assert optax.softmax_cross_entropy_with_integer_labels(z, 0, where=none) == 0.0


def test_a_side_of_only_minus_inf_logits_gets_zero_gradient(loss_case):
  # Raw -inf logits (no where mask) on every class but one: the loss is 0 or +inf
  # and every gradient entry, first and second order, is finite and 0 at -inf.
  name, fn, _ = loss_case
  z = jnp.array([[1.5, -jnp.inf, -jnp.inf]])
  if name in LABEL_LOSSES:
    aux = jnp.array([0])
  elif name in SET_LOSSES:
    aux = jnp.array([[True, False, False]])
  else:  # soft_cross_entropy and sigmoid_binary_cross_entropy
    aux = jnp.array([[1.0, 0.0, 0.0]])
  grad = jax.grad(lambda z: fn(z, aux).sum())(z)
  assert np.all(np.isfinite(grad)) and np.all(grad[:, 1:] == 0.0)
  grad2 = jax.grad(lambda z: jax.grad(lambda z: fn(z, aux).sum())(z).sum())(z)
  assert np.all(np.isfinite(grad2))
