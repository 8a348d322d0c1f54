"""The regime table: each regime's losses are the library's, and each trains (or, for the
unbounded negated gradient, diverges) on the synthetic data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsoftmax import losses
from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import data, heads, loop, protocols, training
from jaxsoftmax_experiments.protocols import NEGATIVE
from jaxsoftmax_experiments.regimes import NAMES, REGIMES

T = np.asarray(protocols.transition_matrix(5, 0.3))


class _Setup:
  def transition(self):
    return jnp.asarray(T)


@pytest.mark.parametrize(
  "regime, expected",
  [
    # The library's loss on the wrong label, one per regime (Chou, Yu, Ishida, Feng et al.).
    ("complement_likelihood", lambda z, l, m: losses.complement_nll(z, l)),
    ("negated_gradient", lambda z, l, m: losses.negated_nll(z, l)),
    ("scl_exp", lambda z, l, m: losses.scl_exp(z, l)),
    ("forward", lambda z, l, m: losses.forward_nll(z, l, T)),
    ("pc", lambda z, l, m: losses.pairwise_comparison(z, l)),
    ("mcl_log", lambda z, l, m: losses.complement_set_nll(z, m)),
    ("mcl_mae", lambda z, l, m: losses.mcl_mae(z, m)),
    ("mcl_exp", lambda z, l, m: losses.mcl_exp(z, m)),
  ],
)
def test_each_regime_applies_its_loss_to_the_negatives(regime, expected):
  z = jax.random.normal(jax.random.key(0), (4, 5)) * 3
  label = jnp.array([0, 1, 2, 3])
  batch = protocols.Examples(label, jnp.full(4, NEGATIVE))
  got = REGIMES[regime].negative(heads.SoftmaxHead(5), z, batch, _Setup())
  members = label[:, None] == jnp.arange(5)
  np.testing.assert_allclose(got, expected(z, label, members), rtol=1e-6)
  np.testing.assert_allclose(
    REGIMES[regime].positive(heads.SoftmaxHead(5), z, batch), losses.nll(z, label), rtol=1e-6
  )


def test_the_setup_gives_the_protocols_transition_matrix():
  c = config_lib.defaults()
  c.dataset, c.protocol, c.bias = "synthetic", "biased", 0.3
  setup = training.make_setup(c, data.load("synthetic"), regimes=("forward",), total_steps=10)
  np.testing.assert_allclose(setup.transition(), T, rtol=1e-6)


@pytest.fixture(scope="module")
def every_regime():
  c = config_lib.defaults()
  c.dataset, c.protocol, c.hidden, c.steps, c.eval_every = "synthetic", "uniform", (16,), 300, 100
  c.num_seeds, c.num_labeled, c.learning_rate, c.regimes = 2, 25, 1e-2, NAMES
  config_lib.validate(c)
  plan = loop.make_plan(c, data.load("synthetic"))
  *_, last = loop.run(plan)
  return loop.results(plan, jax.device_get(loop.light(last, examples=True)))


def test_every_bounded_regime_learns_from_wrong_labels_and_the_negated_gradient_diverges(
  every_regime,
):
  acc = {r: float(np.mean(v["test_accuracy"])) for r, v in every_regime["regimes"].items()}
  # Expected: 25 true labels (5 per class on average) and 475 uniformly drawn wrong labels
  # on 5 well-separated Gaussian clusters; chance is 0.2.
  for regime in NAMES:
    if regime in ("negated_gradient", "positive_only"):
      continue
    assert acc[regime] > 0.6, (regime, acc)
  neg = every_regime["regimes"]["negated_gradient"]
  for diverged, loss in zip(neg["diverged"], neg["train_loss"]):
    assert diverged or loss < 0


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"regimes": ("forward",), "protocol": "feedback"},
      "'forward' needs the protocol's transition",
    ),
    ({"regimes": ("pc",), "head": "hierarchical"}, "'pc' needs the softmax head's logits"),
    (
      {"regimes": ("scl_exp",), "protocol": "uniform", "num_negatives": 2},
      "'scl_exp' takes one wrong label per input",
    ),
  ],
)
def test_a_regime_without_what_it_needs_is_refused(overrides, message):
  c = config_lib.defaults()
  for key, value in overrides.items():
    c[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def _libcll_ure(z, labels, correction):
  """The unbiased risk estimator as the reference toolkit computes it (libcll's URE, after
  Ishida et al. 2019), in float64 numpy: uniform Q, its inverse J - (K - 1) I applied
  elementwise to the per-label sums of -log p, times the prior 1/K over the label count."""
  k = z.shape[1]
  neglog = -(
    z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
  )
  onehot = np.eye(k)[labels]
  neg_vector = onehot.T @ neglog  # [label k, class j]
  q_inv = np.ones((k, k)) - (k - 1) * np.eye(k)
  counts = onehot.sum(0)
  risks = (q_inv * neg_vector).sum(1) / k / np.maximum(counts, 1)
  if correction == "ga":
    return -risks[risks < 0].sum() if (risks < 0).any() else risks.sum()
  return risks[risks > 0].sum()


@pytest.mark.parametrize("regime, correction", [("ure_ga", "ga"), ("ure_nn", "nn")])
def test_the_unbiased_risk_estimators_match_the_reference_toolkits_formula(regime, correction):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    for scale in (0.5, 4.0):  # small logits: every partial risk positive; large: some negative
      z = rng.normal(0, scale, (32, 5))
      labels = rng.integers(0, 5, 32)
      batch = protocols.Examples(jnp.asarray(labels), jnp.full(32, NEGATIVE))
      c = config_lib.defaults()
      c.dataset = "synthetic"
      setup = training.make_setup(c, data.load("synthetic"), regimes=(regime,), total_steps=10)
      rule = REGIMES[regime]
      per_example = rule.negative(heads.SoftmaxHead(5), jnp.asarray(z), batch, setup)
      got = rule.batch_objective(per_example, batch, setup)
      np.testing.assert_allclose(got, _libcll_ure(z, labels, correction), rtol=1e-10)
    # With positives in the batch, they add their mean NLL by their share of it.
    kind = jnp.where(jnp.arange(32) < 8, protocols.POSITIVE, NEGATIVE)
    mixed = protocols.Examples(jnp.asarray(labels), kind)
    per_example = jnp.where(
      kind == NEGATIVE, per_example, losses.nll(jnp.asarray(z), jnp.asarray(labels))
    )
    got = rule.batch_objective(per_example, mixed, setup)
    expected = float(
      losses.nll(jnp.asarray(z[:8]), jnp.asarray(labels[:8])).sum()
    ) / 32 + 24 / 32 * _libcll_ure(z[8:], labels[8:], correction)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_npo_is_bounded_below_by_zero_and_uses_the_reference_log_probability():
  z = jax.random.normal(jax.random.key(1), (4, 5)) * 3
  label = jnp.array([0, 1, 2, 3])
  reference = jnp.array([-0.5, -1.0, -2.0, -8.0])
  batch = protocols.Examples(label, jnp.full(4, NEGATIVE), reference=reference)

  class _Beta:
    npo_beta = 0.1

  got = REGIMES["npo"].negative(heads.SoftmaxHead(5), z, batch, _Beta())
  # Zhang et al. 2024: (2 / beta) log(1 + (p_l / p_ref_l)^beta), in float64 numpy.
  p = np.exp(
    np.asarray(z, np.float64) - np.log(np.exp(np.asarray(z, np.float64)).sum(1, keepdims=True))
  )
  ratio = p[np.arange(4), np.asarray(label)] / np.exp(np.asarray(reference, np.float64))
  np.testing.assert_allclose(got, 20.0 * np.log1p(ratio**0.1), rtol=1e-5)
  assert np.all(np.asarray(got) > 0)


def test_the_reference_table_holds_each_slots_label_log_probability():
  log_probs = jnp.log(jax.nn.softmax(jax.random.normal(jax.random.key(2), (3, 4))))  # n=3, K=4
  ex = protocols.Examples(jnp.array([1, 0, 3, 2, 2, 0]), jnp.full(6, NEGATIVE))  # 2 rounds
  ref = protocols.with_reference(ex, log_probs).reference
  np.testing.assert_allclose(ref, log_probs[jnp.array([0, 1, 2, 0, 1, 2]), ex.label], rtol=1e-6)


def test_npo_trains_against_the_model_of_the_labels_alone(every_regime):
  assert "reference_model_test_accuracy" in every_regime
  assert float(np.mean(every_regime["regimes"]["npo"]["test_accuracy"])) > 0.6
