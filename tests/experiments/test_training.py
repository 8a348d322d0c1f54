"""Training functions: regime losses through the heads, sampling, divergence recorded and
contained, and one program for every regime group."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsoftmax import losses
from jaxsoftmax.tree import balanced_tree
from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import data, heads, protocols, training
from jaxsoftmax_experiments.protocols import EMPTY, NEGATIVE, POSITIVE
from jaxsoftmax_experiments.regimes import REGIMES


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


def setup_for(config, dataset, regimes, seeds=1, steps=100):
  config = config.copy_and_resolve_references()
  config.num_seeds = seeds
  return training.make_setup(
    config, dataset, regimes=tuple(regimes), total_steps=steps, devices=jax.devices()[:1]
  )


def fresh(setup, seed=0):
  g, s = len(setup.regimes), setup.seeds
  keys = jax.random.split(jax.random.key(seed), g * s).reshape(g, s)
  return training.functions(setup).init(
    keys, jax.random.split(jax.random.key(seed + 1), g * s).reshape(g, s)
  )


class _Logits:
  """A stand-in model whose output is fixed logits, for the per-example losses."""

  def __init__(self, out):
    self.out = out

  def __call__(self, x):
    return self.out


@pytest.mark.parametrize(
  "regime, negative_loss",
  [
    ("positive_only", lambda z, l: jnp.zeros(z.shape[0])),
    ("negated_gradient", losses.negated_nll),
    ("complement_likelihood", losses.complement_nll),
  ],
)
def test_example_losses_per_regime(regime, negative_loss):
  z = jax.random.normal(jax.random.key(0), (6, 4)) * 5
  label = jnp.array([0, 1, 2, 3, 0, 1])
  kind = jnp.array([POSITIVE, NEGATIVE, EMPTY, POSITIVE, NEGATIVE, EMPTY])
  head, batch, rule = heads.SoftmaxHead(4), protocols.Examples(label, kind), REGIMES[regime]
  out = head.training_output(_Logits(z), None, label)
  got = np.where(
    kind == POSITIVE,
    rule.positive(head, out, batch),
    np.where(kind == NEGATIVE, rule.negative(head, out, batch) if rule.negative else 0.0, 0.0),
  )
  # Expected: the library's losses, picked by kind by hand.
  want = np.where(
    kind == POSITIVE, losses.nll(z, label), np.where(kind == NEGATIVE, negative_loss(z, label), 0.0)
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_set_of_wrong_labels_uses_the_complement_set_loss():
  z = jax.random.normal(jax.random.key(1), (3, 5)) * 3
  label = jnp.array([0, 1, 2])
  wrong = jnp.array([[3, -1], [-1, -1], [4, 0]])
  batch = protocols.Examples(label, jnp.full(3, NEGATIVE), wrong)
  got = REGIMES["complement_likelihood"].negative(heads.SoftmaxHead(5), z, batch)
  members = np.zeros((3, 5), bool)
  for i, ls in enumerate([[0, 3], [1], [2, 4, 0]]):
    members[i, ls] = True
  # Expected: complement_set_nll of each slot's label and its further wrong labels.
  np.testing.assert_allclose(got, losses.complement_set_nll(z, jnp.asarray(members)), rtol=1e-6)


@pytest.mark.parametrize("regime", sorted(config_lib.REGIMES))
def test_hierarchical_example_losses_equal_the_flat_ones_on_the_implied_logits(regime):
  tree = balanced_tree(5)
  u = jax.random.normal(jax.random.key(0), (6, tree.num_clusters)) * 3
  w = jax.random.normal(jax.random.key(1), (6, tree.num_clusters, tree.max_size)) * 3
  label = jnp.array([0, 1, 2, 3, 4, 1])
  batch = protocols.Examples(
    label, jnp.array([POSITIVE, NEGATIVE, EMPTY, POSITIVE, NEGATIVE, NEGATIVE])
  )
  rule, tree_head, flat_head = REGIMES[regime], heads.HierarchicalHead(tree), heads.SoftmaxHead(5)
  # The flat logits the tree implies: log p(class), whose softmax is p itself.
  flat = losses.hierarchical_log_softmax(u, w, tree)
  cluster = jnp.asarray(tree.cluster_of)[label]
  rows = jnp.take_along_axis(w, cluster[:, None, None], axis=1)[:, 0]
  for part in ("positive", "negative"):
    fn = getattr(rule, part)
    if fn is None:
      continue
    np.testing.assert_allclose(
      fn(tree_head, (u, rows, cluster), batch), fn(flat_head, flat, batch), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("head", ["softmax", "hierarchical"])
def test_grouped_step_equals_one_run_at_a_time(synthetic, head):
  setup = setup_for(small_config(head=head), synthetic, config_lib.REGIMES)
  y = jnp.asarray(synthetic.y_train)
  ex = protocols.complementary(jax.random.key(2), y, jnp.arange(len(y)) < 100, 5)
  state = fresh(setup)
  x = jnp.asarray(synthetic.x_train)
  grouped, stats = training.functions(setup).train(
    state, (jax.tree.map(lambda a: a[None], ex),) * 3, x, length=1
  )
  for g, regime in enumerate(setup.regimes):
    one = jax.tree.map(lambda a: a[0], state[g])
    single, single_stats = jax.jit(training.step, static_argnums=(0, 1))(setup, regime, one, ex, x)
    np.testing.assert_allclose(stats[g].loss[0, 0], single_stats.loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(grouped[g].params)):
      np.testing.assert_allclose(a, b[0], rtol=1e-5, atol=1e-6)


def _count(jaxpr, primitive):
  """How many times ``primitive`` runs in ``jaxpr``, each call of a sub-jaxpr counted (a
  jitted loss called twice is printed once but computed twice)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == primitive
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count(sub.jaxpr, primitive)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count(sub, primitive)
  return n


def test_each_group_computes_only_its_own_regime_loss(synthetic):
  # Each partition loss's backward rule takes one sigmoid (`logistic`) of its log-odds:
  # a step that computed every regime's loss and selected one would hold three.
  y = jnp.asarray(synthetic.y_train)
  ex = protocols.complementary(jax.random.key(2), y, jnp.arange(len(y)) < 100, 5)
  x = jnp.asarray(synthetic.x_train)
  count = {}
  for regime in config_lib.REGIMES:
    setup = setup_for(small_config(), synthetic, (regime,))
    one = jax.tree.map(lambda a: a[0], fresh(setup)[0])
    jaxpr = jax.make_jaxpr(lambda s: training.step(setup, regime, s, ex, x))(one)
    count[regime] = _count(jaxpr.jaxpr, "logistic")
  assert count["positive_only"] == 1  # nll alone
  assert count["negated_gradient"] == 2  # nll and its negation
  assert count["complement_likelihood"] == 2  # nll and complement_nll


def test_the_training_step_is_traced_once(synthetic):
  setup = setup_for(small_config(), synthetic, ("complement_likelihood",))
  y = jnp.asarray(synthetic.y_train)
  ex = protocols.complementary(jax.random.key(2), y, jnp.arange(len(y)) < 100, 5)
  x = jnp.asarray(synthetic.x_train)
  step = jax.jit(chex.assert_max_traces(training.step, n=1), static_argnums=(0, 1))
  one = jax.tree.map(lambda a: a[0], fresh(setup)[0])
  for _ in range(3):
    one, _ = step(setup, "complement_likelihood", one, ex, x)  # a retrace would raise
  chex.clear_trace_counter()


def test_logit_bound_freezes_the_run_at_its_first_step(synthetic):
  setup = setup_for(small_config(logit_bound=1e-3), synthetic, ("positive_only",), steps=10)
  ex = protocols.supervised(jnp.asarray(synthetic.y_train)[None])
  state = fresh(setup)
  after, stats = training.functions(setup).train(
    state, (ex,), jnp.asarray(synthetic.x_train), length=5
  )
  assert not bool(after[0].alive[0]) and int(after[0].diverged_at[0]) == 1
  assert np.asarray(stats[0].alive)[:, 0].tolist() == [True, False, False, False, False]
  for a, b in zip(jax.tree.leaves(state[0].params), jax.tree.leaves(after[0].params)):
    np.testing.assert_array_equal(a, b)  # frozen at the parameters it had


def test_non_finite_loss_diverges_one_run_and_spares_the_others(synthetic):
  x = synthetic.x_train.copy()
  x[0] = np.nan
  poisoned = dataclasses.replace(synthetic, x_train=x)
  setup = setup_for(small_config(), poisoned, ("positive_only",), seeds=2, steps=20)
  y = jnp.asarray(synthetic.y_train)
  only_first = jnp.zeros(len(y), bool).at[0].set(True)
  bad = protocols.labeled_only(y, only_first)  # every batch is the NaN input
  good = protocols.labeled_only(y, ~only_first)  # never sees it
  examples = jax.tree.map(lambda a, b: jnp.stack([a, b]), bad, good)
  after, stats = training.functions(setup).train(
    fresh(setup), (examples,), jnp.asarray(x), length=20
  )
  assert after[0].diverged_at.tolist() == [1, -1]
  assert after[0].alive.tolist() == [False, True]
  assert np.all(np.isfinite(stats[0].loss[:, 1]))
  for leaf in jax.tree.leaves(after[0].params):
    assert np.all(np.isfinite(leaf))


def test_positive_only_never_samples_a_negative_example(synthetic):
  x = synthetic.x_train.copy()
  x[1:] = np.nan  # any negative example (inputs 1..n-1) would poison the loss
  y = jnp.asarray(synthetic.y_train)
  ex = jax.tree.map(
    lambda a: a[None], protocols.complementary(jax.random.key(0), y, jnp.arange(len(y)) == 0, 5)
  )
  setup = setup_for(small_config(), synthetic, ("positive_only", "complement_likelihood"), steps=20)
  after, _ = training.functions(setup).train(fresh(setup), (ex, ex), jnp.asarray(x), length=20)
  assert bool(after[0].alive[0])
  assert not bool(after[1].alive[0])  # the same table with negatives used does reach them


def test_test_metrics_match_a_direct_computation(synthetic):
  setup = setup_for(small_config(), synthetic, ("positive_only",), seeds=2, steps=10)
  state = fresh(setup)
  metrics = training.functions(setup).evaluate(
    state, jnp.asarray(synthetic.x_test), jnp.asarray(synthetic.y_test)
  )[0]
  from flax import nnx

  params = jax.tree.map(lambda a: a[1], state[0].params)
  logits = nnx.merge(setup.graphdef, params)(synthetic.x_test)
  np.testing.assert_allclose(
    metrics["test_accuracy"][1], np.mean(np.argmax(logits, -1) == synthetic.y_test), rtol=1e-6
  )
  np.testing.assert_allclose(
    metrics["test_nll"][1], np.mean(losses.nll(logits, synthetic.y_test)), rtol=1e-5
  )
