"""The partition kernel, and every loss's residuals: the size of the inputs plus O(batch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
# gathers nor sweeps the logits twice); a label mask's loss keeps 1 / |Y| as well, so that
# the backward pass does not count the mask again (XLA:CPU wrote the mask out as int32 to
# count it: a temporary of the logits' size).
EXTRA_VALUES = {
  "scl_exp": 8,
  "mcl_mae": 8,
  "mcl_exp": 8,
  "soft_cross_entropy": 5,
  "multilabel_softmax_cross_entropy": 6,
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
  # forward rule keeps the exponentials for the backward pass. Same numbers, bit for bit
  # (on XLA:CPU these rows, 4 of them beyond the label's one sweep, take the two sweeps a
  # row at a time; the one sweep's own agreement is tested below).
  name, fn, make_aux = loss_case
  rng = np.random.default_rng(1)
  z = rng.normal(0, 3, (12, 16)).astype(np.float32)
  z[:4, 3] += np.array([30.0, 1e3, -1e3, 1e4], np.float32)  # both tails
  z[4, 5] = -np.inf
  z, aux = jnp.asarray(z), jnp.asarray(make_aux(rng, (12, 16)))
  for f in (lambda z: fn(z, aux), jax.jit(lambda z: fn(z, aux))):
    primal = f(z)
    forward_rule, _ = jax.vjp(f, z)
    if name != "soft_cross_entropy":
      np.testing.assert_array_equal(primal, forward_rule)
      continue
    # soft_cross_entropy's value on XLA:CPU is one chain of sweeps with the top left out
    # by its index (tests/losses/test_soft.py), which takes this batch: within 4 ulps of
    # the forward rule (2.6e-7 at most here). Its two sweeps, the value everywhere else,
    # equal the forward rule bit for bit.
    from jaxsoftmax.losses import _soft

    np.testing.assert_allclose(primal, forward_rule, rtol=4 * 1.2e-7)
    two_sweeps = lambda z: _soft._two_sweeps_value(z, aux)
    for g in (two_sweeps, jax.jit(two_sweeps)):
      np.testing.assert_array_equal(g(z), forward_rule)


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


def test_the_cpus_one_sweep_for_labels_equals_the_two_sweeps_and_falls_back_at_the_edges():
  # XLA:CPU's value for labels: one sweep shifted by the label's logit, the label left
  # out by arithmetic (_label_sums). Each special row is put in a batch of ordinary
  # rows: where the whole batch is in the one sweep's exact range it runs (the flag
  # says so, and the special rows that must not take it do not); either way b - a
  # equals the two jax.nn.logsumexp sweeps' (same inf and NaN, 2e-6 apart at most).
  from jaxsoftmax.losses._partition import _label_gap_cpu, _label_sums, _split_logsumexp_value

  ordinary = np.random.default_rng(0).normal(0, 3, (7, 3))
  one_sweep = {0: 0, 1: 0, -1: 0}
  for row in _SPECIAL_ROWS:
    z = jnp.asarray(np.vstack([ordinary, [row]]), jnp.float32)
    for label in one_sweep:
      y = jnp.full((8,), label, jnp.int32)
      a, b = _split_logsumexp_value(z, y)
      _same(b - a, jax.jit(_label_gap_cpu)(z, y), rtol=2e-6)
      one_sweep[label] += bool(jax.jit(_label_sums)(z, y)[3])
  # Label 0: rows 0-2 and 4 (within 44 nats) and the all -inf row; label 1 also row 9
  # (a label of 0 beside -inf and 0). An invalid label is NaN either way. The rows with
  # a lead of 100 or more, an infinite label or another +inf, or a NaN fall back.
  assert one_sweep == {0: 5, 1: 6, -1: len(_SPECIAL_ROWS)}, one_sweep


def test_the_cpus_one_sweep_keeps_a_nan_logit_in_a_wide_row():
  # At [64, 4096] the sweep runs in a YNNPACK fusion, whose min(NaN, x) returns x: the
  # NaN logit still gives NaN, through the fallback (its total is out of range).
  from jaxsoftmax.losses import complement_nll, nll

  z = jnp.asarray(np.random.default_rng(0).normal(0, 3, (64, 4096)), jnp.float32)
  z = z.at[3, 100].set(jnp.nan)
  y = jnp.zeros((64,), jnp.int32)
  for fn in (nll, complement_nll):
    loss = np.asarray(jax.jit(fn)(z, y))
    assert np.isnan(loss[3]) and np.isfinite(np.delete(loss, 3)).all()


def test_the_cpus_label_value_writes_no_array_of_the_logits_size():
  # The value of nll on XLA:CPU: one sweep, and a fallback that runs the two sweeps on
  # 1/256 of the rows at a time. Before it, the masked logits were written whole: a
  # temporary of 1.0x the logits (128 MiB at [1024, 32768]; 8 MiB here).
  from jaxsoftmax.losses import complement_nll, nll

  z, y = jnp.zeros((256, 8192), jnp.float32), jnp.zeros((256,), jnp.int32)
  for fn in (nll, complement_nll):
    temp = jax.jit(fn).lower(z, y).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 0.01 * z.nbytes, temp / z.nbytes


def test_the_cpus_one_sweep_under_vmap_with_one_instance_out_of_range():
  # Under vmap the instances are one call (a custom batching rule), so the choice
  # between the one sweep and the two is one lax.cond for all of them: the same numbers
  # as the whole batch called at once (vmap of the cond itself would run both branches,
  # and give instance 0 the one sweep's numbers: 3.2x the time at [4, 2048, 1000]).
  from jaxsoftmax.losses import complement_nll

  z = jnp.asarray(np.random.default_rng(2).normal(0, 3, (2, 5, 16)), jnp.float32)
  z = z.at[1, 2, 4].set(1e4)
  y = jnp.full((2, 5), 4, jnp.int32)
  batched = jax.jit(jax.vmap(complement_nll))(z, y)
  np.testing.assert_array_equal(batched, jax.jit(complement_nll)(z, y))
  row = np.asarray(z[1, 2], np.float64)  # float64 reference: log1p(exp(a - b)), ~a - b
  expected = np.logaddexp(0.0, row[4] - np.logaddexp.reduce(np.delete(row, 4)))
  np.testing.assert_allclose(batched[1, 2], expected, rtol=1e-7)


@pytest.mark.parametrize("name", ["nll", "complement_nll"])
def test_the_cpus_one_sweep_is_accurate_over_its_range(name, monkeypatch, assert_accurate):
  # The accuracy table's regimes reach gaps of 80 and -1e4, so their batches take the
  # two sweeps: here the label is 5 to 40 nats ahead of, or behind, the best other
  # class, where every batch takes the one sweep (checked), against mpmath at the
  # suite's bound (measured 0.80 at most).
  from jaxsoftmax.losses._partition import _label_sums
  from tests.losses import accuracy

  case = next(c for c in accuracy.CASES if c.name == name)
  for regime, (low, high) in {"ahead": (5.0, 40.0), "behind": (-40.0, -5.0)}.items():
    gaps = lambda rng, n, lo=low, hi=high: rng.uniform(lo, hi, n)
    monkeypatch.setitem(accuracy.REGIMES, regime, gaps)
    for k in (2, 16, 64):
      z, y = accuracy.draw(np.random.default_rng(k), case, regime, 40, k)
      assert jax.jit(_label_sums)(jnp.asarray(z), jnp.asarray(y, jnp.int32))[3]
    assert_accurate(case, regime, 40)


def test_the_cpus_fallback_by_blocks_of_rows_equals_the_two_sweeps_on_the_whole_batch():
  # One row out of the one sweep's range sends the batch to the two sweeps, run a block
  # of rows at a time (2 rows per block at 515 rows, and a last block of 1). A block's
  # reductions may round differently from the whole batch's: b - a within an ulp of b
  # (2.1e-6 of b - a at most here, 43 of 515 rows not bit-equal).
  from jaxsoftmax.losses._partition import _label_gap_cpu, _label_sums, _split_logsumexp_value

  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(0, 3, (515, 40)), jnp.float32).at[7, 0].set(1e3)
  y = jnp.asarray(rng.integers(0, 40, 515), jnp.int32).at[7].set(0)
  assert not jax.jit(_label_sums)(z, y)[3]
  a, b = jax.jit(_split_logsumexp_value)(z, y)
  _same(b - a, jax.jit(_label_gap_cpu)(z, y), rtol=4e-6)
  gap = jax.jit(_label_gap_cpu)(z, y)
  assert (np.abs(np.asarray(gap - (b - a))) <= 2 * 1.2e-7 * np.abs(np.asarray(b))).all()


def test_the_cpus_set_value_equals_the_two_sweeps_and_falls_back_at_the_edges():
  # XLA:CPU's value for a boolean set (from 64 classes): the sums inside and outside S
  # from two reductions shifted by the row's maximum, the other side left out by
  # arithmetic on an integer copy of the mask (_set_sums). Each special row is put in a
  # batch of ordinary rows, with S holding class 0, classes 1 and 2, nothing or
  # everything: b - a equals the two jax.nn.logsumexp sweeps' (same inf and NaN, 2e-6
  # apart at most), and the sums run where the whole batch is in their exact range.
  from jaxsoftmax.losses._partition import _set_gap_cpu, _set_sums, _split_logsumexp_value

  ordinary = np.random.default_rng(0).normal(0, 3, (7, 3))
  masks = {"{0}": [True, False, False], "{1, 2}": [False, True, True]}
  masks.update({"empty": [False] * 3, "all": [True] * 3})
  summed = dict.fromkeys(masks, 0)
  for row in _SPECIAL_ROWS:
    z = jnp.asarray(np.vstack([ordinary, [row]]), jnp.float32)
    for name, mask in masks.items():
      m = jnp.asarray(np.tile(mask, (8, 1)))
      a, b = _split_logsumexp_value(z, m)
      _same(b - a, jax.jit(_set_gap_cpu)(z, m), rtol=2e-6)
      summed[name] += bool(jax.jit(_set_sums)(z, m)[2])
  # Both sides within 44 nats for rows 0-2 and 4 ({0}; row 2 puts S 30 nats behind) and
  # rows 0, 1 and 4 ({1, 2}: row 2 leaves S all 30 nats behind the top, but the sum
  # outside holds the top and S's is e^-30 of it: within range). An empty side (all
  # -inf, or S empty or everything) always falls back, as do the infinite and NaN rows.
  assert summed == {"{0}": 4, "{1, 2}": 4, "empty": 0, "all": 0}, summed


def test_the_cpus_set_value_writes_no_masked_copy_of_the_logits():
  # Before: the two sweeps' jnp.where wrote the logits masked, once per side (2.0x the
  # logits: 16 MiB here). Now the two 1-byte copies of the mask (0.5x the float32
  # logits' bytes), one per reduction, and per-example vectors.
  from jaxsoftmax.losses import complement_set_nll, set_nll

  z = jnp.zeros((512, 8192), jnp.float32)
  m = jnp.zeros((512, 8192), bool)
  for fn in (set_nll, complement_set_nll):
    temp = jax.jit(fn).lower(z, m).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 0.51 * z.nbytes, temp / z.nbytes


def test_the_cpus_set_value_under_vmap_with_one_instance_out_of_range():
  # As for labels: one call for all instances, so one instance's fallback is the whole
  # call's (at 64 classes, the fewest the sums take).
  from jaxsoftmax.losses import set_nll
  from jaxsoftmax.losses._partition import _set_sums

  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(0, 3, (2, 5, 64)), jnp.float32).at[1, 2, 4].set(1e4)
  m = jnp.asarray(rng.random((2, 5, 64)) < 0.3).at[..., 0].set(True)
  assert not jax.jit(_set_sums)(z, m)[2] and jax.jit(_set_sums)(z[0], m[0])[2]
  batched = jax.jit(jax.vmap(set_nll))(z, m)
  np.testing.assert_array_equal(batched, jax.jit(set_nll)(z, m))
