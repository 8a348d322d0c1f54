"""soft_cross_entropy and multilabel_softmax_cross_entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxsoftmax.losses import multilabel_softmax_cross_entropy, nll, soft_cross_entropy
from tests.losses import accuracy as accuracy_losses

SOFT_CASES = [
  c
  for c in accuracy_losses.CASES
  if c.name in ("soft_cross_entropy", "multilabel_softmax_cross_entropy")
]


@pytest.mark.parametrize("regime", sorted(accuracy_losses.REGIMES))
@pytest.mark.parametrize("case", SOFT_CASES, ids=lambda c: c.name)
def test_float32_value_within_ulps_times_condition_number(case, regime, assert_accurate):
  assert_accurate(case, regime, 8, ks=(2, 16))


def test_matches_optax_and_onehot_targets_match_nll():
  # Reference: optax.softmax_cross_entropy at moderate logits.
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(0, 2, (32, 10)), jnp.float32)
  q = jax.nn.softmax(jnp.asarray(rng.normal(0, 1, (32, 10)), jnp.float32))
  np.testing.assert_allclose(soft_cross_entropy(z, q), optax.softmax_cross_entropy(z, q), rtol=2e-6)
  y = jnp.asarray(rng.integers(0, 10, 32))
  z = z.at[:, 0].add(40.0)  # p_0 -> 1: nll is tiny there, and must still agree
  onehot = jax.nn.one_hot(y, 10, dtype=jnp.float32)
  np.testing.assert_allclose(soft_cross_entropy(z, onehot), nll(z, y), rtol=4e-6)


def test_gradients_in_both_arguments_float64():
  # Closed forms: d/dz = sum(q) softmax(z) - q and d/dq = -log softmax(z).
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(0, 4, (5, 7)))
    q = jnp.asarray(rng.random((5, 7))).at[:, 2].set(0.0)  # a zero target too
    gz, gq = jax.grad(lambda z, q: soft_cross_entropy(z, q).sum(), argnums=(0, 1))(z, q)
    np.testing.assert_allclose(
      gz, q.sum(-1, keepdims=True) * jax.nn.softmax(z) - q, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(gq, -jax.nn.log_softmax(z), rtol=1e-13)
    check_grads(
      jax.jit(soft_cross_entropy),
      (z + jnp.array([20.0, 0, 0, 0, 0, 0, 0]), q),
      order=2,
      modes=["rev"],
    )


@pytest.mark.parametrize("num_classes", [8, 40])
def test_multilabel_gradient_is_softmax_minus_y_over_size_float64(num_classes):
  # 40 classes take XLA:CPU's chain of sweeps (from 32), 8 the two sweeps.
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(0, 3, (6, num_classes)))
    y = jnp.asarray(rng.random((6, num_classes)) < 0.4).at[:, 3].set(True)
    grad = jax.grad(lambda z: multilabel_softmax_cross_entropy(z, y).sum())(z)
    np.testing.assert_allclose(
      grad, jax.nn.softmax(z) - y / y.sum(-1, keepdims=True), rtol=1e-12, atol=1e-14
    )
    check_grads(
      jax.jit(lambda z: multilabel_softmax_cross_entropy(z, y)), (z,), order=2, modes=["rev"]
    )


def test_excluded_classes_cost_nothing_unless_targeted():
  z = jnp.array([1.0, 2.0, 5.0, 0.5])
  keep = jnp.array([True, True, False, True])
  q = jnp.array([0.5, 0.5, 0.0, 0.0])
  loss, grad = jax.value_and_grad(lambda z: soft_cross_entropy(z, q, where=keep))(z)
  # Reference: optax on the three admissible classes alone.
  np.testing.assert_allclose(loss, optax.softmax_cross_entropy(z[keep], q[keep]), rtol=1e-6)
  assert grad[2] == 0.0 and np.all(np.isfinite(grad))
  targeted = jnp.array([0.5, 0.0, 0.5, 0.0])
  loss, grad = jax.value_and_grad(lambda z: soft_cross_entropy(z, targeted, where=keep))(z)
  assert loss == np.inf
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("num_classes", [4, 64])
def test_multilabel_empty_row_is_an_error_eagerly_and_nan_under_jit(num_classes):
  # 64 classes take XLA:CPU's chain of sweeps, whose 1 / |Y| is 0 / 0 there.
  z = jnp.zeros((3, num_classes))
  y = np.zeros((3, num_classes), bool)
  y[0, 0] = y[2, 0] = y[2, 1] = True
  with pytest.raises(ValueError, match=r"label_mask\[1\] has no label"):
    multilabel_softmax_cross_entropy(z, y)
  grad = jax.jit(jax.grad(lambda z: multilabel_softmax_cross_entropy(z, y).sum()))(z)
  out = jax.jit(multilabel_softmax_cross_entropy)(z, y)
  assert np.isnan(out[1]) and np.all(np.isfinite(out[np.array([0, 2])]))
  assert np.isnan(grad[1]).all() and np.isfinite(grad[np.array([0, 2])]).all()
  # Closed form: with equal logits every -log p_k is log K, whatever Y is.
  np.testing.assert_allclose(out[np.array([0, 2])], [np.log(num_classes)] * 2, rtol=1e-6)


# Rows at the edges of the CPU's sweeps (tests/losses/test_partition.py's, for targets):
# ties at the top, a lead beyond 44 nats, +inf, -inf, all -inf, and a NaN; each padded
# to 32 classes with its last value (fewer classes take the two sweeps).
_EDGE_ROWS = [
  [1.0, 1.0, 1.0, -2.0],  # three ties at the top
  [0.0, 0.0, 0.0, 0.0],  # every class tied (zero-initialised head)
  [30.0, 0.0, -1.0, 2.0],  # p_top -> 1: the loss is tiny when the target is the top
  [100.0, 0.0, 0.0, 0.0],  # others 100 nats behind: the sum of the others underflows
  [2.0, -jnp.inf, 0.0, 1.0],  # a class of probability 0
  [jnp.inf, 0.0, 1.0, 2.0],
  [-jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf],
  [jnp.nan, 0.0, 1.0, 2.0],
]


def _loss(targets):
  """The loss that takes these targets: multilabel_softmax_cross_entropy a label mask,
  soft_cross_entropy the rest."""
  return multilabel_softmax_cross_entropy if targets.dtype == bool else soft_cross_entropy


def _edge_batches(targets):
  """``(row, logits, targets)``: each edge row (padded to 32 classes) in a batch of 7
  ordinary rows, with targets on the top class, spread, on class 1, or a label mask."""
  rng = np.random.default_rng(5)
  ordinary = rng.normal(0, 3, (7, 32))
  for row in _EDGE_ROWS:
    z = jnp.asarray(np.vstack([ordinary, np.pad(row, (0, 28), mode="edge")]), jnp.float32)
    q = {
      "on the top": jax.nn.one_hot(jnp.argmax(jnp.nan_to_num(z), -1), 32),
      "spread": jax.nn.softmax(jnp.asarray(rng.normal(0, 1, (8, 32)), jnp.float32)),
      "on the -inf class": jnp.zeros((8, 32)).at[:, 1].set(1.0),
      # multilabel_softmax_cross_entropy's (Y / |Y|): classes 0, 2 and 9
      "a label mask": jnp.zeros((8, 32), bool).at[:, jnp.array([0, 2, 9])].set(True),
    }[targets]
    yield row, z, q


@pytest.mark.parametrize(
  "targets, chained",
  [("on the top", 4), ("spread", 5), ("on the -inf class", 5), ("a label mask", 4)],
)
def test_the_cpus_value_equals_the_two_sweeps_in_every_edge_row(targets, chained):
  # XLA:CPU's value of soft_cross_entropy: a chain of sweeps with no argmax and no
  # masked copy (_soft._cpu_sums). Each edge row is put in a batch of ordinary rows; the
  # value equals the two jax.nn.logsumexp sweeps' (_soft._forward's, value_only), with
  # the same inf and NaN, within 4e-6. The chain runs for the ties, the leads of 30 and
  # 100 and, unless a zero target meets it (0 * inf), the -inf class; the batches with
  # +inf, all -inf or NaN fall back to the two sweeps. A label mask (since it too takes
  # the chain, read as 1-byte copies) leaves the -inf class out: 0 * inf, a fallback.
  from jaxsoftmax.losses import _soft

  count = 0
  for row, z, q in _edge_batches(targets):
    expected = np.asarray(jax.jit(lambda z, q: _soft._forward(z, q, value_only=True)[0])(z, q))
    got = np.asarray(jax.jit(_loss(q))(z, q))
    np.testing.assert_allclose(got, expected, rtol=4e-6, err_msg=str(row))
    count += bool(jax.jit(_soft._cpu_loss)(z, q)[1])
  assert count == chained


def test_the_cpus_value_is_exact_where_the_top_is_near_certain():
  # -log p_top = log1p(sum of the others' exponentials), the top left out of the sum by
  # its index: the float64 reference (np.logaddexp) to 8 ulps (the 63 rounded
  # exponentials' sum; 3.8e-7 before, by two sweeps), for losses from 1e-30 to 0.35 (a
  # sum with the top's 1 in it rounds them to 0 below 6e-8).
  gaps = np.linspace(5.0, 69.0, 17)
  z = np.zeros((17, 64))
  z[:, 9] = gaps  # the top at class 9, every other class at 0
  q = np.zeros((17, 64))
  q[:, 9] = 1.0
  got = np.asarray(jax.jit(soft_cross_entropy)(jnp.asarray(z, jnp.float32), jnp.asarray(q)))
  expected = np.logaddexp(0.0, np.log(63.0) - gaps)
  np.testing.assert_allclose(got, expected, rtol=8 * 1.2e-7)
  assert got.min() < 1e-26


def test_the_cpus_value_keeps_a_nan_logit_in_a_wide_row():
  z = jnp.asarray(np.random.default_rng(0).normal(0, 3, (64, 4096)), jnp.float32)
  z = z.at[3, 100].set(jnp.nan)
  q = jax.nn.softmax(z * 0.5)
  q = jnp.where(jnp.isnan(q), 0.1, q)
  loss = np.asarray(jax.jit(soft_cross_entropy)(z, q))
  assert np.isnan(loss[3]) and np.isfinite(np.delete(loss, 3)).all()


def test_the_cpus_value_writes_no_array_of_the_logits_size():
  # Before: the logits with the top class set to -inf, and the gaps to the top, each
  # written whole (2.0x the logits: 8192 MiB at [4096, 262144], where optax's
  # softmax_cross_entropy holds none). The fallback by blocks of 1/512 of the rows
  # writes three rows of each block: 0.6% here (and three rows of one example where
  # there are fewer than 512).
  z = jnp.zeros((512, 8192), jnp.float32)
  temp = jax.jit(soft_cross_entropy).lower(z, z).compile().memory_analysis().temp_size_in_bytes
  assert temp <= 0.01 * z.nbytes, temp / z.nbytes


def test_the_cpus_value_under_vmap_with_one_instance_out_of_range():
  # Under vmap the instances are one call (a custom batching rule), so the choice of
  # sweeps is one lax.cond for all of them: the numbers of the whole batch called at
  # once (vmap of the cond itself would run both branches on every call). An instance
  # holding a +inf logit sends the batch to the two sweeps.
  from jaxsoftmax.losses import _soft

  z = jnp.asarray(np.random.default_rng(2).normal(0, 3, (2, 5, 32)), jnp.float32)
  z = z.at[1, 2, 4].set(jnp.inf)
  q = jax.nn.softmax(jnp.asarray(np.random.default_rng(3).normal(0, 1, (2, 5, 32)), jnp.float32))
  batched = jax.jit(jax.vmap(soft_cross_entropy))(z, q)
  np.testing.assert_array_equal(batched, jax.jit(soft_cross_entropy)(z, q))
  assert not jax.jit(_soft._cpu_loss)(z, q)[1] and jax.jit(_soft._cpu_loss)(z[0], q[0])[1]
  two_sweeps = jax.jit(lambda z, q: _soft._forward(z, q, value_only=True)[0])
  np.testing.assert_array_equal(batched, two_sweeps(z, q))


def _two_sweeps_gradients(z, q):
  """The gradients of the summed loss by the forward rule of the two sweeps (the rule on
  every platform but XLA:CPU): _soft._forward's residuals through the backward rule."""
  from jaxsoftmax.losses import _soft

  _, residuals = _soft._forward(z, q)
  return _soft._soft_cross_entropy_bwd(residuals, jnp.ones(z.shape[:-1], jnp.float32))


@pytest.mark.parametrize(
  "targets, chained",
  [("on the top", 4), ("spread", 4), ("on the -inf class", 4), ("a label mask", 4)],
)
def test_the_cpus_forward_rule_gives_the_two_sweeps_gradients_in_every_edge_row(targets, chained):
  # XLA:CPU's forward rule (training) takes the top class, the others' sum and the
  # targets' sums from reductions with no argmax and no masked copy (_soft._cpu_forward).
  # In each edge row's batch the gradients in the logits and in the targets equal the
  # two sweeps' within 4e-6 of the largest entry, with the same NaN. The chain runs
  # where the value's does and the loss is finite: for the ties and the leads of 30 and
  # 100; the -inf class falls back with any target on it (an impossible example, loss
  # +inf, zero gradient) or none (0 * inf).
  from jaxsoftmax.losses import _soft

  count = 0
  mask = targets == "a label mask"  # multilabel_softmax_cross_entropy: no targets' gradient
  argnums = (0,) if mask else (0, 1)
  grad = jax.jit(jax.grad(lambda z, q: _loss(q)(z, q).sum(), argnums=argnums))
  for row, z, q in _edge_batches(targets):
    expected = jax.jit(_two_sweeps_gradients)(z, q)[: len(argnums)]
    for got, expected in zip(grad(z, q), expected):
      got, expected = np.asarray(got), np.asarray(expected)
      np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=str(row))
      scale = np.abs(expected[np.isfinite(expected)]).max()
      np.testing.assert_allclose(got, expected, rtol=4e-6, atol=4e-6 * scale, err_msg=str(row))
    loss, exact = jax.jit(_soft._cpu_loss)(z, q)
    count += bool(exact & jnp.isfinite(loss).all())
  assert count == chained


def test_the_cpus_training_writes_no_array_of_the_logits_size():
  # jit(value_and_grad) of the mean. Before: 2.0x the logits (the forward rule's argmax
  # and masked copies; 8192 MiB at [4096, 262144] float32, where optax's
  # softmax_cross_entropy holds 4096, its log-softmax); the gradient is the output.
  z = jnp.zeros((512, 8192), jnp.float32)
  step = jax.jit(jax.value_and_grad(lambda z, q: soft_cross_entropy(z, q).mean()))
  temp = step.lower(z, z).compile().memory_analysis().temp_size_in_bytes
  assert temp <= 0.01 * z.nbytes, temp / z.nbytes


def test_the_cpus_multilabel_loss_writes_only_two_bytes_per_label():
  # multilabel_softmax_cross_entropy takes the chain too: its mask read as two 1-byte
  # copies, one per reduction (0.5x the float32 logits' bytes). Before, its value wrote
  # the masked logits and the mask as int32 (2.0x), and training 4.0x (optax: 1.0x and
  # 3.0x, its log-softmax and the targets as floats).
  z, m = jnp.zeros((512, 8192), jnp.float32), jnp.zeros((512, 8192), bool)
  value = jax.jit(multilabel_softmax_cross_entropy)
  training = jax.jit(jax.value_and_grad(lambda z, m: multilabel_softmax_cross_entropy(z, m).mean()))
  for step in (value, training):
    temp = step.lower(z, m).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 0.51 * z.nbytes, temp / z.nbytes


def test_the_cpus_forward_rule_under_vmap_and_its_second_derivatives():
  # Under vmap the instances are one call (the fallback of one sends all of them to the
  # two sweeps): the gradients of the whole batch called at once. Second derivatives
  # (grad of grad differentiates the forward rule) are the two sweeps': the Hessian
  # equals the closed form Q (diag(p) - p p^T), p = softmax(z) in float64.
  z = jnp.asarray(np.random.default_rng(2).normal(0, 3, (2, 5, 32)), jnp.float32)
  q = jax.nn.softmax(jnp.asarray(np.random.default_rng(3).normal(0, 1, (2, 5, 32)), jnp.float32))
  grad = jax.grad(lambda z, q: soft_cross_entropy(z, q).sum())
  for inf_at in (None, (1, 2, 4)):
    zi = z if inf_at is None else z.at[inf_at].set(jnp.inf)
    np.testing.assert_array_equal(jax.jit(jax.vmap(grad))(zi, q), jax.jit(grad)(zi, q))
  z64, q64 = np.asarray(z[0, 0], np.float64), np.asarray(q[0, 0], np.float64)
  p = np.exp(z64 - z64.max()) / np.exp(z64 - z64.max()).sum()
  expected = q64.sum() * (np.diag(p) - np.outer(p, p))
  one = lambda z: soft_cross_entropy(z, q[0, 0])
  for second in (jax.hessian(one), jax.jacrev(jax.grad(one))):
    np.testing.assert_allclose(jax.jit(second)(z[0, 0]), expected, rtol=2e-5, atol=1e-9)
