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
