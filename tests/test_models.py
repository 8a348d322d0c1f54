"""Flax NNX models: shapes, bad arguments, and training with the losses and Optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsoftmax import losses
from jaxsoftmax.models import CNN, MLP, HierarchicalSoftmax, conv_as_matmul
from jaxsoftmax.tree import ClassTree, balanced_tree


@pytest.mark.parametrize(
  "make",
  [
    lambda: MLP((40,), 10, hidden=(16, 8), rngs=nnx.Rngs(0)),
    lambda: CNN((40,), 10, channels=(4, 4), rngs=nnx.Rngs(0)),
    lambda: CNN((8, 8), 10, channels=(4, 4), rngs=nnx.Rngs(0)),
  ],
)
def test_logits_shape_for_any_batch_shape(make):
  model = make()
  x = jnp.zeros((2, 3, *model.input_shape))
  assert model(x).shape == (2, 3, 10)


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"CNN takes 1-D or 2-D inputs, got input shape \(2, 3, 4\)"):
    CNN((2, 3, 4), 10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must be positive"):
    MLP((4,), 0, rngs=nnx.Rngs(0))


class _Synthetic:
  """Gaussian class clusters: 5 classes in 10 dimensions, 500 train and 250 test points,
  standardised on the training split (the library's tests carry their own data)."""

  def __init__(self, num_classes=5, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.5, (num_classes, dim))

    def draw(n):
      y = rng.integers(0, num_classes, n)
      return centres[y] + rng.normal(0.0, 1.0, (n, dim)), y

    x_train, y_train = draw(500)
    x_test, y_test = draw(250)
    mean, std = x_train.mean(0), x_train.std(0)
    self.x_train = ((x_train - mean) / std).astype(np.float32)
    self.x_test = ((x_test - mean) / std).astype(np.float32)
    self.y_train, self.y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    self.num_classes, self.input_shape = num_classes, (dim,)


def _train_on_synthetic(model, loss_fn, predict):
  """150 full-batch Adam steps; returns (first loss, last loss, test accuracy)."""
  ds = _Synthetic()
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m, x, y))(model)
    optimizer.update(model, grads)
    return loss

  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  first = float(step(model, optimizer, x, y))
  for _ in range(150):
    last = float(step(model, optimizer, x, y))
  accuracy = float(jnp.mean(predict(model, jnp.asarray(ds.x_test)) == ds.y_test))
  return first, last, accuracy


@pytest.mark.parametrize("model_cls", [MLP, CNN])
def test_trains_on_synthetic_with_nll_and_adam(model_cls):
  ds = _Synthetic()
  first, last, accuracy = _train_on_synthetic(
    model_cls(ds.input_shape, ds.num_classes, rngs=nnx.Rngs(0)),
    lambda m, x, y: losses.nll(m(x), y).mean(),
    lambda m, x: jnp.argmax(m(x), -1),
  )
  # Chance is 1/5; the clusters are well separated, so a trained model does far better.
  assert last < 0.5 * first
  assert accuracy > 0.8


@pytest.mark.parametrize(
  "shape, window, strides",
  [
    ((4, 40, 1), (5,), 2),
    ((4, 40, 3), (3,), 1),
    ((2, 8, 8, 1), (3, 3), 2),
    ((2, 7, 9, 2), (3, 3), 1),
  ],
)
def test_conv_as_matmul_equals_nnx_conv(shape, window, strides):
  conv = nnx.Conv(shape[-1], 6, window, strides=strides, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), shape)
  # Reference: nnx.Conv itself (lax.conv_general_dilated).
  np.testing.assert_allclose(conv_as_matmul(conv, x), conv(x), rtol=1e-5, atol=1e-5)


def test_hierarchical_head_rows_are_the_full_tables_rows():
  tree = ClassTree.from_clusters([2, 0, 1, 0, 2, 2, 1])
  head = HierarchicalSoftmax(6, tree, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 4, 6))
  y = jnp.arange(12).reshape(3, 4) % 7
  cluster_logits, within = head(x)
  assert cluster_logits.shape == (3, 4, 3) and within.shape == (3, 4, 3, 3)
  u, rows = head.target_logits(x, y)
  np.testing.assert_allclose(u, cluster_logits, rtol=1e-6)
  expected = jnp.take_along_axis(within, jnp.asarray(tree.cluster_of)[y][..., None, None], -2)[
    ..., 0, :
  ]
  np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)
  logp = head.log_probs(x)
  np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1.0, rtol=1e-5)


def test_hierarchical_head_bad_arguments():
  with pytest.raises(ValueError, match="the class tree has 9 classes, but the model has 10"):
    MLP((4,), 10, tree=balanced_tree(9), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="tree must be a jaxsoftmax.tree.ClassTree, got list"):
    HierarchicalSoftmax(4, [0, 1], rngs=nnx.Rngs(0))


@pytest.mark.parametrize("model_cls", [MLP, CNN])
def test_trains_on_synthetic_with_a_hierarchical_head(model_cls):
  ds = _Synthetic()
  tree = balanced_tree(ds.num_classes)
  first, last, accuracy = _train_on_synthetic(
    model_cls(ds.input_shape, ds.num_classes, tree=tree, rngs=nnx.Rngs(0)),
    lambda m, x, y: losses.hierarchical_nll(
      *m.head.target_logits(m.features(x), y), y, tree
    ).mean(),
    lambda m, x: jnp.argmax(m.head.log_probs(m.features(x)), -1),
  )
  # As for the softmax head above: chance is 1/5 and the clusters are well separated.
  assert last < 0.5 * first
  assert accuracy > 0.8
