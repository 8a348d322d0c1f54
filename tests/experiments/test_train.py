"""The vmapped trainer: regime losses, sampling, divergence recorded and contained."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config as config_lib
from experiments import data, protocols
from experiments.protocols import EMPTY, NEGATIVE, POSITIVE
from experiments.train import REGIME_IDS, Trainer, example_losses, hierarchical_example_losses
from jaxsoftmax import losses
from jaxsoftmax.tree import balanced_tree


def small_config(**overrides):
  c = config_lib.defaults()
  c.dataset, c.hidden, c.batch_size, c.learning_rate = "synthetic", (16,), 32, 1e-2
  for key, value in overrides.items():
    c[key] = value
  config_lib.validate(c)
  return c


@pytest.fixture(scope="module")
def synthetic():
  return data.load("synthetic")


def stacked(trainer, runs):
  keys = jax.random.split(jax.random.key(0), runs)
  return trainer.init(keys, jax.random.split(jax.random.key(1), runs))


@pytest.mark.parametrize("regime, negative_loss", [
    ("positive_only", lambda z, l: jnp.zeros(z.shape[0])),
    ("negated_gradient", losses.negated_nll),
    ("complement_likelihood", losses.complement_nll),
])
def test_example_losses_per_regime(regime, negative_loss):
  z = jax.random.normal(jax.random.key(0), (6, 4)) * 5
  label = jnp.array([0, 1, 2, 3, 0, 1])
  kind = jnp.array([POSITIVE, NEGATIVE, EMPTY, POSITIVE, NEGATIVE, EMPTY])
  got = example_losses(z, protocols.Examples(label, kind), jnp.int32(REGIME_IDS[regime]))
  # Expected: the library's losses, picked by kind by hand.
  want = np.where(kind == POSITIVE, losses.nll(z, label),
                  np.where(kind == NEGATIVE, negative_loss(z, label), 0.0))
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("regime", sorted(REGIME_IDS))
def test_hierarchical_example_losses_equal_the_flat_ones_on_the_implied_logits(regime):
  tree = balanced_tree(5)
  u = jax.random.normal(jax.random.key(0), (6, tree.num_clusters)) * 3
  w = jax.random.normal(jax.random.key(1), (6, tree.num_clusters, tree.max_size)) * 3
  label = jnp.array([0, 1, 2, 3, 4, 1])
  kind = jnp.array([POSITIVE, NEGATIVE, EMPTY, POSITIVE, NEGATIVE, NEGATIVE])
  ex, r = protocols.Examples(label, kind), jnp.int32(REGIME_IDS[regime])
  # The flat logits the tree implies: log p(class), whose softmax is p itself.
  flat = losses.hierarchical_log_softmax(u, w, tree)
  np.testing.assert_allclose(hierarchical_example_losses(u, w, ex, r, tree),
                             example_losses(flat, ex, r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["softmax", "hierarchical"])
def test_vmapped_step_equals_one_run_at_a_time(synthetic, head):
  trainer = Trainer(small_config(head=head), synthetic, 100)
  y = jnp.asarray(synthetic.y_train)
  ex = protocols.complementary(jax.random.key(2), y, jnp.arange(len(y)) < 100, 5)
  examples = jax.tree.map(lambda a: jnp.stack([a, a, a]), ex)
  regimes = jnp.array([0, 1, 2])
  state = stacked(trainer, 3)
  batched, stats = trainer.batch_step(state, examples, regimes, trainer.x_train)
  for run in range(3):
    one = jax.tree.map(lambda a: a[run], state)
    single, single_stats = jax.jit(trainer.step)(one, ex, regimes[run], trainer.x_train)
    np.testing.assert_allclose(stats.loss[run], single_stats.loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(batched.params)):
      np.testing.assert_allclose(a, b[run], rtol=1e-5, atol=1e-6)


def test_logit_bound_freezes_the_run_at_its_first_step(synthetic):
  trainer = Trainer(small_config(logit_bound=1e-3), synthetic, 10)
  ex = protocols.supervised(jnp.asarray(synthetic.y_train)[None])
  state = stacked(trainer, 1)
  after, stats = trainer.train(state, ex, jnp.array([0]), 5)
  assert not bool(after.alive[0]) and int(after.diverged_at[0]) == 1
  assert np.asarray(stats.alive)[:, 0].tolist() == [True, False, False, False, False]
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(a, b)  # frozen at the parameters it had


def test_non_finite_loss_diverges_one_run_and_spares_the_others(synthetic):
  x = synthetic.x_train.copy()
  x[0] = np.nan
  poisoned = dataclasses.replace(synthetic, x_train=x)
  trainer = Trainer(small_config(), poisoned, 20)
  y = jnp.asarray(synthetic.y_train)
  only_first = jnp.zeros(len(y), bool).at[0].set(True)
  bad = protocols.labeled_only(y, only_first)          # every batch is the NaN input
  good = protocols.labeled_only(y, ~only_first)        # never sees it
  examples = jax.tree.map(lambda a, b: jnp.stack([a, b]), bad, good)
  state = stacked(trainer, 2)
  after, stats = trainer.train(state, examples, jnp.array([0, 0]), 20)
  assert after.diverged_at.tolist() == [1, -1]
  assert after.alive.tolist() == [False, True]
  assert np.all(np.isfinite(stats.loss[:, 1]))
  for leaf in jax.tree.leaves(after.params):
    assert np.all(np.isfinite(leaf))


def test_positive_only_never_samples_a_negative_example(synthetic):
  x = synthetic.x_train.copy()
  x[1:] = np.nan  # any negative example (inputs 1..n-1) would poison the loss
  trainer = Trainer(small_config(), dataclasses.replace(synthetic, x_train=x), 20)
  y = jnp.asarray(synthetic.y_train)
  ex = protocols.complementary(jax.random.key(0), y, jnp.arange(len(y)) == 0, 5)
  state = stacked(trainer, 1)
  after, _ = trainer.train(state, jax.tree.map(lambda a: a[None], ex),
                           jnp.array([REGIME_IDS["positive_only"]]), 20)
  assert bool(after.alive[0])
  after, _ = trainer.train(state, jax.tree.map(lambda a: a[None], ex),
                           jnp.array([REGIME_IDS["complement_likelihood"]]), 20)
  assert not bool(after.alive[0])  # the same table with negatives used does reach them


def test_test_metrics_match_a_direct_computation(synthetic):
  trainer = Trainer(small_config(), synthetic, 10)
  state = stacked(trainer, 2)
  metrics = trainer.test_metrics(state)
  params = jax.tree.map(lambda a: a[1], state.params)
  logits = trainer.logits(params, trainer.x_test)
  np.testing.assert_allclose(metrics["test_accuracy"][1],
                             np.mean(np.argmax(logits, -1) == synthetic.y_test), rtol=1e-6)
  np.testing.assert_allclose(metrics["test_nll"][1], np.mean(losses.nll(logits, synthetic.y_test)),
                             rtol=1e-5)
