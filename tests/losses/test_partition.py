"""The partition kernel, and every loss's residuals: the size of the inputs plus O(batch)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxsoftmax.losses._partition import _partition_nll


def _residual_bytes(fn, *args):
  _, vjp_fn = jax.vjp(fn, *args)
  leaves = jax.tree_util.tree_leaves(vjp_fn)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)


# Residuals beyond the inputs, per example: the partition kernel keeps the logits themselves
# (the backward pass rebuilds the exponentials) and per example the shifts of its sides (a
# float32 value and a +inf flag each), a, b and the two sums: at most seven 4-byte values
# for a set (one side fewer for a label); the probability losses keep p too; forward_nll keeps its
# transition column (K floats) and the shift values; the soft-target losses keep the top
# class, the top logit, u and two sums of the targets (so that the backward pass neither
# gathers nor sweeps the logits twice).
EXTRA_VALUES = {
  "scl_exp": 8,
  "mcl_mae": 8,
  "mcl_exp": 8,
  "soft_cross_entropy": 5,
  "multilabel_softmax_cross_entropy": 5,
}


def test_residuals_are_inputs_plus_four_values_per_example(loss_case):
  name, fn, make_aux = loss_case
  rng = np.random.default_rng(0)
  batch, k = 32, 1000
  z = jnp.asarray(rng.normal(size=(batch, k)), jnp.float32)
  aux = jnp.asarray(make_aux(rng, (batch, k)))
  total = _residual_bytes(lambda z: fn(z, aux), z)
  inputs = z.nbytes + aux.nbytes
  if name == "forward_nll":
    inputs += z.nbytes  # the transition column of each example's label, [batch, K]
  # No K-sized array beyond the inputs, a few values per example.
  assert total <= inputs + EXTRA_VALUES.get(name, 7) * 4 * batch, (total, inputs)


def test_kernel_complement_swaps_the_set():
  z = jnp.array([[0.3, -1.0, 2.0, 0.5]])
  members = jnp.array([[True, False, True, False]])
  np.testing.assert_array_equal(
    _partition_nll(z, members, True), _partition_nll(z, ~members, False)
  )
  labels = jnp.array([2])
  np.testing.assert_array_equal(
    _partition_nll(z, labels, False), _partition_nll(z, jnp.arange(4) == labels[:, None], False)
  )


def test_value_by_jax_nn_logsumexp_equals_the_forward_rule(loss_case):
  # The primal (used when nothing differentiates) is written with jax.nn.logsumexp; the
  # forward rule keeps the exponentials for the backward pass. Same numbers, bit for bit.
  name, fn, make_aux = loss_case
  rng = np.random.default_rng(1)
  z = rng.normal(0, 3, (12, 16)).astype(np.float32)
  z[:4, 3] += np.array([30.0, 1e3, -1e3, 1e4], np.float32)  # both tails
  z[4, 5] = -np.inf
  z, aux = jnp.asarray(z), jnp.asarray(make_aux(rng, (12, 16)))
  for f in (lambda z: fn(z, aux), jax.jit(lambda z: fn(z, aux))):
    primal = f(z)
    forward_rule, _ = jax.vjp(f, z)
    np.testing.assert_array_equal(primal, forward_rule)


def test_the_value_calls_jax_nn_logsumexp():
  from jaxsoftmax.losses._partition import _forward

  z, y = jnp.zeros((2, 5)), jnp.array([0, 1])
  primal = str(jax.make_jaxpr(lambda z: _partition_nll.fun(z, y, True))(z))
  forward_rule = str(jax.make_jaxpr(lambda z: _forward(z, y, True))(z))
  # jax.nn.logsumexp ends in log(abs(sum)) with the sum's sign: a `sign` the rule lacks.
  assert " sign " in primal and " sign " not in forward_rule


# Rows with every special value a side can hold: a leading or trailing label, +inf and
# -inf on either side, a side that is all -inf, NaN on either side, ties.
_SPECIAL_ROWS = [
  [2.0, 0.0, -1.0],
  [30.0, 0.0, 0.0],
  [-30.0, 0.0, 0.0],
  [1e4, 0.0, 0.0],
  [0.0, 0.0, 0.0],
  [100.0, -100.0, 5.0],
  [np.inf, 0.0, 0.0],
  [np.inf, np.inf, 0.0],
  [0.0, np.inf, 0.0],
  [-np.inf, 0.0, 0.0],
  [-np.inf, np.inf, -np.inf],
  [0.0, -np.inf, -np.inf],
  [-np.inf, -np.inf, -np.inf],
  [np.nan, 0.0, 0.0],
  [0.0, np.nan, 0.0],
]


def _same(expected, got, rtol):
  expected, got = np.asarray(expected, np.float64), np.asarray(got, np.float64)
  assert got.dtype == expected.dtype
  np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
  finite = np.isfinite(expected)
  np.testing.assert_array_equal(
    got[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)]
  )
  np.testing.assert_allclose(got[finite], expected[finite], rtol=rtol, atol=0)


def test_the_one_sweep_value_of_the_tpu_equals_the_two_jax_nn_logsumexp_sweeps():
  # The TPU's branch (one variadic reduction, online-softmax rescaling), run here on the
  # CPU, against the two jax.nn.logsumexp sweeps every other platform runs: the same
  # special values, and a few ulps apart elsewhere (2.3e-7 measured at [256, 1000]).
  from jaxsoftmax.losses._partition import _online_logsumexp_pair, _split_logsumexp_value

  z = jnp.asarray(_SPECIAL_ROWS, jnp.float32)
  rng = np.random.default_rng(0)
  members = [jnp.full((len(_SPECIAL_ROWS),), y, jnp.int32) for y in (0, 1, -1)]
  members.append(jnp.asarray(rng.random(z.shape) < 0.5))
  for m in members:
    for expected, got in zip(_split_logsumexp_value(z, m), jax.jit(_online_logsumexp_pair)(z, m)):
      _same(expected, got, rtol=1e-6)
  wide = jnp.asarray(rng.normal(0, 5, (256, 1000)), jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    for m in (
      jnp.asarray(rng.integers(0, 1000, 256), jnp.int32),
      jnp.asarray(rng.random(wide.shape) < 0.1),
    ):
      expected = _split_logsumexp_value(wide.astype(dtype), m)
      got = jax.jit(_online_logsumexp_pair)(wide.astype(dtype), m)
      for e, g in zip(expected, got):
        _same(e, g, rtol=1e-6)


def test_the_tpus_one_sweep_forward_rule_gives_the_two_sweep_numbers_and_gradient():
  # The forward rule's numbers on the TPU (shifts, +inf flags, sums and a, b from the
  # one variadic reduction) against the two sweeps', and the gradient the backward pass
  # forms from each, on the special rows and on random logits.
  from jaxsoftmax.losses._partition import _gradient, _online_shifts, _split_logsumexp_shifts

  rng = np.random.default_rng(1)
  special = jnp.asarray(_SPECIAL_ROWS, jnp.float32)
  wide = jnp.asarray(rng.normal(0, 5, (64, 300)), jnp.float32)
  for z in (special, wide):
    n, k = z.shape
    cases = [jnp.asarray(rng.integers(0, k, n), jnp.int32), jnp.full((n,), -1, jnp.int32)]
    cases.append(jnp.asarray(rng.random(z.shape) < 0.3))
    for members in cases:
      a, b, _, sum_in, sum_out, shifts = _split_logsumexp_shifts(z, members)
      expected = (a, b, sum_in, sum_out, *shifts)
      got = jax.jit(_online_shifts)(z, members)
      for e, g in zip(expected, (*got[:4], *got[4])):
        _same(e, g, rtol=4e-6)  # the sums 1.3e-6 apart at most: the rescalings' rounding
      g = jnp.ones((n,), jnp.float32)
      for complement in (False, True):
        two = _gradient(complement, z, shifts, members, a, b, sum_in, sum_out, g)
        one = _gradient(complement, z, got[4], members, *got[:2], *got[2:4], g)
        _same(two, one, rtol=4e-6)
