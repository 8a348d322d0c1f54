"""The kernel behind every label and set loss: ``-log P(y in S | x)`` with its VJP.

Split the classes into a set S and its complement and let ``a = logsumexp_{k in S} z_k``
and ``b = logsumexp_{k not in S} z_k``, each taken with its own maximum. Then

    -log P(S) = logsumexp(z) - a = log(1 + exp(b - a)) = softplus(b - a).

The right-hand side never subtracts two nearly equal numbers: ``softplus(t)`` is
``exp(t)`` to full relative precision when the loss is tiny (P(S) -> 1) and ``t`` when
it is large (P(S) -> 0). The literal ``logsumexp(z) - a`` returns 0 for a loss of 1e-8
in float32, and ``log(1 - softmax)`` returns inf once P(S) rounds to 1.

The gradient is ``softmax(z) - softmax(z restricted to S)``, computed as

    d/dz_k = P(not S) * exp(z_k - b)      for k not in S    (= p_k)
    d/dz_k = -P(not S) * exp(z_k - a)     for k in S

with ``P(not S) = sigmoid(b - a)``: no ``1 - p`` is ever formed, so the gradient keeps
its precision as P(S) -> 1 and never vanishes while the loss is large.

The value alone (what evaluation computes) is written with ``jax.nn.logsumexp`` on
the logits with S (or its complement) set to -inf. On XLA:CPU (jax 0.10.2) that masked
copy is a logits-sized temporary (128 MiB at [1024, 32768], where optax's
cross-entropy needs none) and the call took 2.4-3.7x optax's time: the CPU's reduction
fusions (YNNPACK) take subtract, multiply, min, exp and the like of their input, but no
select or compare, and any elementwise value that two reductions read is written to
memory. For labels the CPU therefore takes one sweep shifted by the label's own logit,
the label left out by arithmetic on the class index (:func:`_label_sums`): ``b - a`` is
the log of that sum, with no maximum taken and no masked copy
(``experiments/benchmarks/losses.py`` times it: the speed guide). It is exact while the
label is within 44 nats of the rest; a batch with a row beyond that (or with an infinite
or NaN logit) takes the two sweeps a block of rows at a time.

On the TPU the value, and the forward rule's numbers, come from one variadic reduction
(:func:`_online_sides`), which reads the logits once: half of optax's bytes forward,
0.74x under ``value_and_grad``. XLA:CPU runs a variadic reduction as a scalar loop, so
the sets on the CPU, and its forward rule, keep the two sweeps.

Members are either int32 labels (S = {label}; -1 marks an invalid label and gives
NaN) or a boolean mask over classes. ``complement=True`` swaps S and its complement.
The residuals are the logits themselves, the members and a few values per example (each
side's shift and +inf flag, ``a``, ``b`` and the two sums): the backward pass rebuilds the
exponentials from the logits inside its own fusion, so the forward pass writes no array
the size of the logits in any dtype (for 16-bit logits a float32 one would be twice their
bytes: on the TPU compiler 1.00x optax's bytes in bfloat16, against 1.75x with the
exponentials kept; on XLA:CPU float32 ``value_and_grad`` is at optax's time, as it was
with them). A side holding a +inf logit takes the limit of its restricted softmax
(uniform over its +inf logits), so the gradient is the limit rather than inf / inf.

The gradient is itself a function with a custom derivative (:func:`_gradient`): its
Hessian-vector product is formed with no ``1 - p`` and no difference of nearly equal
means, and stays exact when transposed, so ``jax.hessian``, ``jax.jacrev(jax.grad)`` and
Hessian-vector products match mpmath from probable to improbable labels (the second
table of ``tests/losses/accuracy.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsoftmax.losses import _checks


def _in_set(members: jax.Array, num_classes: int) -> jax.Array:
  if jnp.issubdtype(members.dtype, jnp.integer):
    return members[..., None] == jnp.arange(num_classes, dtype=members.dtype)
  return members


def _side_max(masked_logits):
  """``(shift, infinite)`` of one side from one reduction: its maximum (0 for an empty,
  all -inf, side or one holding +inf; NaN kept), and whether it holds a +inf logit."""
  top = jax.lax.stop_gradient(jnp.max(masked_logits, axis=-1))
  return jnp.where(jnp.isinf(top), 0.0, top), top == jnp.inf


def _side_exp(z, shift, infinite):
  """``exp(z - shift)`` with ``shift`` and ``infinite`` already broadcast to ``z``; where
  a side holds +inf, the limit of its restricted softmax's numerators: 1 at its +inf
  logits, 0 at the rest (so that a +inf logit gives the limit of the gradient instead
  of inf / inf)."""
  return jnp.where(infinite, (z == jnp.inf).astype(z.dtype), jnp.exp(z - shift))


def _side_lse(shift, infinite, total):
  return jnp.where(infinite, jnp.inf, shift + _log(total))


def _log(total):
  """log of a sum of exponentials: -inf for an empty sum, NaN for a NaN sum.

  The inner select keeps log's derivative 1/0 out of the discarded branch, so
  differentiating this (for grad of grad) never forms 0 * inf.
  """
  empty = total == 0
  return jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, total)))


def _split_logsumexp_value(logits, members):
  """``(a, b)`` of :func:`_split_logsumexp` by ``jax.nn.logsumexp`` on masked logits.

  The same algorithm and values; used where nothing is differentiated, so no
  exponential needs to be kept. A NaN among a side's logits makes that side NaN.
  """
  in_set = _in_set(members, logits.shape[-1])
  z = _computed(logits)
  b = jax.nn.logsumexp(jnp.where(in_set, -jnp.inf, z), axis=-1)
  if jnp.issubdtype(members.dtype, jnp.integer):
    a = _picked(logits, members)
  else:
    a = jax.nn.logsumexp(jnp.where(in_set, z, -jnp.inf), axis=-1)
  return a, b


def _online_sides(logits, members):
  """``(m_out, s_out, inside)`` from one sweep of the logits: per side of the partition a
  running maximum ``m`` and the sum ``s`` of exponentials rescaled to it, and S's side
  as ``(m_in, s_in)``, or for a label its logit (``inside``).

  One variadic reduction: ``(m, s)`` pairs combine as ``(max(m1, m2), s1 exp(m1 - m) +
  s2 exp(m2 - m))``, a side's term taken as it is where its maximum is the new one (so
  two -inf or two +inf maxima give no NaN). A side holding +inf ends with ``s`` its
  count of +inf logits (the limit's numerators, as :func:`_side_exp`); an empty or all
  -inf side with ``m = -inf`` and ``s`` its count, which :func:`_online_shifts` sets to
  0. For a label, S's side is the label's logit alone: its maximum, a third reduction of
  the same sweep (no gather).
  """
  in_set = _in_set(members, logits.shape[-1])
  z = _computed(logits)
  ninf, zero = jnp.asarray(-jnp.inf, z.dtype), jnp.zeros((), z.dtype)
  one = jnp.ones_like(z)

  def merge(m1, s1, m2, s2):
    m = jnp.maximum(m1, m2)
    term = lambda mi, si: jnp.where(mi == m, si, si * jnp.exp(mi - m))
    return m, term(m1, s1) + term(m2, s2)

  out_z, in_z = jnp.where(in_set, ninf, z), jnp.where(in_set, z, ninf)
  last = (z.ndim - 1,)
  if jnp.issubdtype(members.dtype, jnp.integer):
    combine = lambda x, y: (*merge(x[0], x[1], y[0], y[1]), jnp.maximum(x[2], y[2]))
    m_out, s_out, picked = jax.lax.reduce((out_z, one, in_z), (ninf, zero, ninf), combine, last)
    return m_out, s_out, jnp.where(members >= 0, picked, jnp.nan)  # -1: an invalid label
  combine = lambda x, y: (*merge(x[0], x[1], y[0], y[1]), *merge(x[2], x[3], y[2], y[3]))
  operands, inits = (out_z, one, in_z, one), (ninf, zero, ninf, zero)
  m_out, s_out, m_in, s_in = jax.lax.reduce(operands, inits, combine, last)
  return m_out, s_out, (m_in, s_in)


def _online_logsumexp_pair(logits, members):
  """``(a, b)`` of :func:`_split_logsumexp_value` in one sweep (:func:`_online_shifts`'s
  first two numbers): the logits are read once, where :func:`_split_logsumexp_value`
  reads them twice, as optax's cross-entropy does; the values agree to a few ulps (the
  rescaling rounds once per combination). The TPU's branch (:func:`_gap_per_platform`)."""
  return _online_shifts(logits, members)[:2]


def _online_shifts(logits, members):
  """:func:`_split_logsumexp_shifts` (without the exponentials) from one sweep
  (:func:`_online_sides`): the forward rule's numbers, with each side's shift and +inf
  flag from its running maximum and its sum the rescaled one."""

  def side(top, s):
    shift, infinite = jnp.where(jnp.isinf(top), 0.0, top), top == jnp.inf
    total = jnp.where(top == -jnp.inf, 0.0, s)
    return shift, infinite, total

  m_out, s_out, inside = _online_sides(logits, members)
  top_out, inf_out, sum_out = side(m_out, s_out)
  b = _side_lse(top_out, inf_out, sum_out)
  if jnp.issubdtype(members.dtype, jnp.integer):
    return inside, b, jnp.ones_like(inside), sum_out, (top_out, inf_out)
  top_in, inf_in, sum_in = side(*inside)
  a = _side_lse(top_in, inf_in, sum_in)
  return a, b, sum_in, sum_out, (top_out, inf_out, top_in, inf_in)


# The range of a sum in which one sweep with a term left out by its index is exact: a
# label's total (:func:`_label_sums`), and the others' sum of soft_cross_entropy's chain.
_ONE_SWEEP_RANGE = 2.0**64
# Above this many classes a float32 class index is not exact: two sweeps are kept.
_MAX_INDEXED_CLASSES = 2**24
# Class indices times this differ by at least 2**51 (:func:`_left_out`).
_INDEX_SCALE = 2.0**51
# The two sweeps' fallback reads 1/_ROW_BLOCKS of the examples at a time.
_ROW_BLOCKS = 256


def _left_out(e, scaled_index, scale=_INDEX_SCALE):
  """``e`` with the entry at one class per example set to 0, by arithmetic alone:
  ``min(e_k, d_k^2)`` with ``d_k = k scale - scaled_index``, ``scaled_index`` that
  class's index times ``scale`` (exact in float32 below ``_MAX_INDEXED_CLASSES``
  classes): 0 there, at least ``scale**2`` elsewhere, so every ``e_k`` below it is kept
  (2**102 at the default: every term of a sum within ``_ONE_SWEEP_RANGE``; 1 with
  ``scale=1``, for ``e <= 1``). XLA:CPU's reduction fusions (YNNPACK) take this, where
  a select or compare would write the masked values out. The index comes scaled because
  where it is itself a reduction's result (``soft_cross_entropy``'s chain), a separate
  multiplication of it splits the chain's fusion and writes a logits-sized array."""
  d = jnp.arange(e.shape[-1], dtype=e.dtype) * scale - scaled_index[..., None]
  return jnp.minimum(e, d * d)


def _in_one_sweep_range(total):
  """Whether a sum with a term left out is where one sweep is exact: within
  ``[1 / _ONE_SWEEP_RANGE, _ONE_SWEEP_RANGE]``."""
  return (total >= 1 / _ONE_SWEEP_RANGE) & (total <= _ONE_SWEEP_RANGE)


def _one_call_under_vmap(fn):
  """``fn`` (whose arguments may have any leading axes) with a batching rule that makes
  the instances of a ``vmap`` one call of ``fn`` on the whole batch, the unbatched
  arguments broadcast. For the CPU's one-sweep values: their choice between the sweep
  and its fallback is then one ``lax.cond`` for all instances, where ``vmap`` of the
  cond itself runs both branches on every call. ``fn`` returns an array or a tuple of
  them. Not differentiable (``custom_vmap``): for values that nothing differentiates,
  or under a ``custom_jvp`` that gives their derivatives."""
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = tuple(
      x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
      for x, batched in zip(args, in_batched)
    )
    out = wrapped(*args)
    return out, jax.tree.map(lambda _: True, out)

  return wrapped


def _label_sums(logits, labels):
  """``(a, shift, total, exact)`` for labels from one sweep of the logits shifted by the
  label's own logit: ``a`` the label's logit (NaN for -1), ``total = sum_{k != y}
  exp(z_k - shift)`` with ``shift = a`` (a finite -max where ``a`` is not finite), and
  whether every example came out where that is exact.

  The label's term is left out arithmetically (:func:`_left_out`): XLA:CPU's reduction
  fusions (YNNPACK) take subtract, multiply, min and exp of their input, where a select
  or compare writes the masked logits out (128 MiB at [1024, 32768], 3.7x optax's time).
  No maximum is taken: one sweep against optax's two.

  It is exact where ``2**-64 <= total <= 2**64`` (the label within 44 nats of the rest:
  nothing overflows, and the terms lost to underflow are below 2**-126 each, under half
  an ulp of the total together), for an example whose logits are all -inf (a finite
  shift gives it the total 0, as the two sweeps do) and for an invalid label (NaN
  either way). A NaN logit gives a NaN total or, as these fusions' min returns the other
  operand, at least 2**102: outside the range either way.
  """
  z = _computed(logits)
  a = _picked(logits, labels)
  lowest = jnp.asarray(-jnp.finfo(z.dtype).max, z.dtype)
  shift = jnp.where(jnp.isfinite(a), a, lowest)
  label = jnp.maximum(labels, 0).astype(z.dtype) * _INDEX_SCALE
  total = jnp.sum(_left_out(jnp.exp(z - shift[..., None]), label), axis=-1)
  in_range = _in_one_sweep_range(total)
  exact = (jnp.isfinite(a) & in_range) | ((a == -jnp.inf) & (total == 0)) | (labels < 0)
  return a, shift, total, jnp.all(exact)


def _label_gap_cpu(logits, labels):
  """``b - a`` for labels (:func:`_gap_per_platform`): ``log(total)`` from one sweep
  (:func:`_label_sums`) where that is exact for the whole batch, so the loss is
  ``softplus(log(total))`` with no difference of two logsumexps rounded; otherwise the
  two sweeps, a block of examples at a time (:func:`_by_row_blocks`), so that the masked
  logits they write are a small part of the logits. The second and third sweeps are
  taken only then (one ``lax.cond``, for all instances under ``vmap``). 16-bit logits
  take the same path, so that their value stays the
  float32 value of the rounded logits, bit for bit; XLA:CPU converts them to float32
  whole before any reduction (as it does for optax's), and there the one sweep took
  1.2-1.6x the two sweeps' time at 64 x 262144 and 256 x 131072 (about the same from
  1000 to 32768 classes, 0.65x at 65536 x 1000)."""
  if logits.shape[-1] > _MAX_INDEXED_CLASSES:
    return _gap(*_split_logsumexp_value(logits, labels))
  a, shift, total, exact = _label_sums(logits, labels)
  # An example with a = -inf or NaN keeps the difference's inf or NaN.
  one_sweep = jnp.where(jnp.isfinite(a), _log(total), shift + _log(total) - a)
  two_sweeps = lambda: _gap(*_by_row_blocks(_split_logsumexp_value, logits, labels))
  return jax.lax.cond(exact, lambda: one_sweep, two_sweeps)


_label_gap_cpu = _one_call_under_vmap(_label_gap_cpu)


# Below this many classes the two sweeps are quicker for sets: at [8192, K] with 5% of
# the classes in S, 1.17x optax's time against the sums' 1.54x at K = 16, 1.54x against
# 1.81x at K = 32, 1.34x against 1.26x at K = 64.
_MIN_SET_SUMS_CLASSES = 64


def _set_gap_cpu(logits, members):
  """``b - a`` for a boolean set (:func:`_gap_per_platform`) on XLA:CPU: the sums of the
  exponentials inside and outside S, both shifted by the row's maximum, from two
  reductions that write no masked copy of the logits; ``log(outside / inside)``.

  Each reduction reads the mask as an integer copy of its own (a 1-byte one: a boolean
  is converted outside XLA:CPU's reduction fusions, and a conversion that two of them
  shared would be written out as floats) and leaves the other side out by arithmetic:
  ``exp(d + (m - 1) 2**100)`` and ``exp(d - m 2**101)`` are 0 there, with ``d`` formed
  apart in each (``z - top``, ``(z/2 - top/2) 2``). The side holding the maximum sums
  to at least 1; the result is exact where the maximum is finite and both sums are
  within ``[2**-64, 2**64]`` (the other side within 44 nats: what underflows is below
  half an ulp of its sum). Otherwise (a side empty or far behind, an infinite or NaN
  logit) the two sweeps, a block of examples at a time, in one ``lax.cond`` (for all
  instances under ``vmap``)."""
  inside, outside, exact = _set_sums(logits, members)
  one_sweep = jnp.log(outside / inside)
  two_sweeps = lambda: _gap(*_by_row_blocks(_split_logsumexp_value, logits, members))
  return jax.lax.cond(exact, lambda: one_sweep, two_sweeps)


def _mask_copy(mask, dtype, copy=jnp.uint8):
  """A boolean mask as ``dtype``, through a 1-byte integer copy of its own (``copy``,
  uint8 or int8), for one of XLA:CPU's reduction fusions to read and convert inside: a
  boolean is converted outside them, and a conversion that two of them shared would be
  written out in ``dtype``, logits-sized. Two reductions of one mask take one copy each."""
  return mask.astype(copy).astype(dtype)


def _set_sums(logits, members):
  """``(inside, outside, exact)`` of :func:`_set_gap_cpu`: the two sums per example and
  whether the whole batch is where they are exact."""
  z = _computed(logits)
  top = _computed(jnp.max(logits, axis=-1, keepdims=True))
  inside = jnp.exp((z - top) + (_mask_copy(members, z.dtype) - 1.0) * 2.0**100)
  inside = jnp.sum(inside, axis=-1)
  outside = (z * 0.5 - top * 0.5) * 2.0 - _mask_copy(members, z.dtype, jnp.int8) * 2.0**101
  outside = jnp.sum(jnp.exp(outside), axis=-1)
  exact = jnp.isfinite(top[..., 0]) & _in_one_sweep_range(inside) & _in_one_sweep_range(outside)
  return inside, outside, jnp.all(exact)


_set_gap_cpu = _one_call_under_vmap(_set_gap_cpu)


def _gap(a, b):
  return b - a


def _by_row_blocks(fn, logits, labels, blocks=_ROW_BLOCKS):
  """``fn(logits, labels)`` (a tuple of per-example outputs) over blocks of about
  ``1/blocks`` of the examples, one after another: a ``fori_loop`` slicing the
  logits and the labels (per example, or per class as targets are) (``lax.map`` over
  rows of one example copied all the logits into its loop)."""
  lead, num_classes = logits.shape[:-1], logits.shape[-1]
  rows = logits.reshape(-1, num_classes)
  n = rows.shape[0]
  ids = labels.reshape(n, *labels.shape[len(lead) :])
  block = -(-n // blocks)
  count = n // block
  if count <= 1:
    return fn(logits, labels)

  def body(i, outputs):
    start = i * block
    z = jax.lax.dynamic_slice_in_dim(rows, start, block)
    y = jax.lax.dynamic_slice_in_dim(ids, start, block)
    return tuple(
      jax.lax.dynamic_update_slice_in_dim(out, part, start, 0)
      for out, part in zip(outputs, fn(z, y))
    )

  shapes = jax.eval_shape(fn, rows[:block], ids[:block])
  outputs = tuple(jnp.zeros(n, s.dtype) for s in shapes)
  outputs = jax.lax.fori_loop(0, count, body, outputs)
  if count * block < n:  # the last, shorter block
    tail = fn(rows[count * block :], ids[count * block :])
    outputs = tuple(out.at[count * block :].set(part) for out, part in zip(outputs, tail))
  return tuple(out.reshape(lead) for out in outputs)


def _shifts_per_platform(logits, members):
  """``(a, b, sum_in, sum_out, shifts)`` of :func:`_split_logsumexp_shifts`, in one sweep
  on the TPU (:func:`_online_shifts`), in two elsewhere (see :func:`_gap_per_platform`).

  On the CPU a label's forward rule keeps the two sweeps: XLA:CPU recomputes the shared
  exponential in both of its fusions, and with the label's one sweep
  (:func:`_label_sums`) ``value_and_grad`` took 1.1-1.9x the two sweeps' time at
  [8192, 16] to [1024, 32768]."""

  def two_sweeps(logits, members):
    a, b, _, sum_in, sum_out, shifts = _split_logsumexp_shifts(logits, members)
    return a, b, sum_in, sum_out, shifts

  # Nothing differentiates these numbers: the gradient's own derivative rule reads the
  # logits alone (:func:`_gradient`). Cut here, grad of grad does not differentiate the
  # platform switch (whose derivative passes a symbolic zero to a reshape).
  logits = jax.lax.stop_gradient(logits)
  return jax.lax.platform_dependent(logits, members, tpu=_online_shifts, default=two_sweeps)


def _gap_per_platform(logits, members):
  """``b - a`` of :func:`_split_logsumexp_value`, whose softplus is the loss: in one
  sweep on the TPU (:func:`_online_logsumexp_pair`), for labels on the CPU
  (:func:`_label_gap_cpu`), for boolean sets of 64 classes or more on the CPU from a
  maximum and two sums (:func:`_set_gap_cpu`); elsewhere two ``jax.nn.logsumexp``
  sweeps. XLA:CPU emits the TPU's variadic reduction as a scalar loop, 8.6x the time
  of optax's two vectorised sweeps at [1024, 32768] (139-147 ms against 15-22 ms)."""
  branches = {
    "tpu": lambda z, m: _gap(*_online_logsumexp_pair(z, m)),
    "default": lambda z, m: _gap(*_split_logsumexp_value(z, m)),
  }
  if jnp.issubdtype(members.dtype, jnp.integer):
    branches["cpu"] = _label_gap_cpu
  elif members.dtype == jnp.bool_ and members.shape[-1] >= _MIN_SET_SUMS_CLASSES:
    branches["cpu"] = _set_gap_cpu
  return jax.lax.platform_dependent(logits, members, **branches)


def _computed(logits):
  """The logits in the compute dtype: 16-bit ones converted inside the operations that
  read them (XLA fuses the convert), so no float32 copy is written."""
  return logits.astype(_checks.compute_dtype(logits.dtype))


def _picked(logits, labels):
  """The label's logit, gathered from the logits as they are (a 16-bit gather reads N
  values; gathering from a converted copy would materialise the copy), NaN for -1."""
  safe = jnp.maximum(labels, 0)[..., None]
  picked = _computed(jnp.take_along_axis(logits, safe, axis=-1)[..., 0])
  return jnp.where(labels >= 0, picked, jnp.nan)  # -1 marks an invalid label


def _split_logsumexp(logits, members):
  """logsumexp over S and over its complement, sharing one exponential per logit.

  This is ``jax.nn.logsumexp``'s algorithm (subtract a maximum, exponentiate, sum,
  log) run on both sides of the partition at once, each side shifted by its own
  maximum. It returns the exponentials too, so the backward pass reuses them: one
  ``exp`` per logit for value and gradient together, as in autodiff of optax's
  cross-entropy, where two ``jax.nn.logsumexp`` calls would need two.

  Returns ``(a, b, e, sum_in, sum_out)``: ``a = logsumexp_S z``, ``b =
  logsumexp_{not S} z``, ``e_k = exp(z_k - max of k's side)`` and the sums of ``e``
  over each side. For a label, S = {label} needs no reduction: ``a`` is the label's
  logit, its ``e`` entry is 0 (never read) and ``sum_in`` is 1.
  """
  a, b, e, sum_in, sum_out, _ = _split_logsumexp_shifts(logits, members)
  return a, b, e, sum_in, sum_out


def _split_logsumexp_shifts(logits, members):
  """:func:`_split_logsumexp` and the shifts that rebuild ``e`` (:func:`_exponentials`)."""
  in_set = _in_set(members, logits.shape[-1])
  z = _computed(logits)
  top_out, inf_out = _side_max(jnp.where(in_set, -jnp.inf, z))
  if jnp.issubdtype(members.dtype, jnp.integer):
    shifts = (top_out, inf_out)
    e = _exponentials(logits, members, shifts)
    a = _picked(logits, members)
    sum_in, sum_out = jnp.ones_like(a), jnp.sum(e, axis=-1)
  else:
    top_in, inf_in = _side_max(jnp.where(in_set, z, -jnp.inf))
    shifts = (top_out, inf_out, top_in, inf_in)
    e = _exponentials(logits, members, shifts)
    sum_in = jnp.sum(jnp.where(in_set, e, 0.0), axis=-1)
    sum_out = jnp.sum(jnp.where(in_set, 0.0, e), axis=-1)
    a = _side_lse(top_in, inf_in, sum_in)
  b = _side_lse(top_out, inf_out, sum_out)
  return a, b, e, sum_in, sum_out, shifts


def _exponentials(logits, members, shifts):
  """``e_k = exp(z_k - max of k's side)`` (0 at a label, never read), with a side that
  holds +inf at its limit (:func:`_side_exp`)."""
  in_set = _in_set(members, logits.shape[-1])
  z = _computed(logits)
  if jnp.issubdtype(members.dtype, jnp.integer):
    top_out, inf_out = shifts
    return _side_exp(jnp.where(in_set, -jnp.inf, z), top_out[..., None], inf_out[..., None])
  top_out, inf_out, top_in, inf_in = shifts
  side = lambda inside, outside: jnp.where(in_set, inside[..., None], outside[..., None])
  return _side_exp(z, side(top_in, top_out), side(inf_in, inf_out))


@jax.custom_jvp
def _sides_lse(logits, members, shifts, a, b, sum_in, sum_out):
  """``(a, b)``, the two sides' logsumexps, as computed, with their derivative in the
  logits: each side's restricted softmax (the numbers themselves come from a sweep that
  is not differentiated, :func:`_shifts_per_platform`). Read where the loss's own value
  is differentiated: grad of grad with a cotangent that depends on the logits."""
  return a, b


@_sides_lse.defjvp
def _sides_lse_jvp(primals, tangents):
  logits, members, shifts, a, b, sum_in, sum_out = primals
  in_set, restricted = _sides(False, logits, shifts, members, sum_in, sum_out)
  dz = jnp.asarray(tangents[0], restricted.dtype)
  weighted = restricted * dz
  da = jnp.sum(jnp.where(in_set, weighted, 0.0), axis=-1)
  db = jnp.sum(jnp.where(in_set, 0.0, weighted), axis=-1)
  # A side of -inf (empty) or NaN has no derivative to give: 0, as the gradient's.
  da, db = jnp.where(jnp.isfinite(a), da, 0.0), jnp.where(jnp.isfinite(b), db, 0.0)
  return (a, b), (da.astype(a.dtype), db.astype(b.dtype))


def _forward(logits, members, complement):
  a, b, sum_in, sum_out, shifts = _shifts_per_platform(logits, members)
  a, b = _sides_lse(logits, members, shifts, a, b, sum_in, sum_out)
  if complement:
    a, b, sum_in, sum_out = b, a, sum_out, sum_in
  # The backward pass rebuilds the exponentials from the logits and the per-example
  # shifts, inside its own fusion, instead of keeping an array of them: no array the
  # size of the logits is written by the forward pass (for 16-bit logits a float32 one
  # would be twice their bytes: on the TPU compiler 1.00x optax's bytes in bfloat16,
  # against 1.75x with the exponentials kept), and the gradient is a function of the
  # logits whose own derivative is exact (:func:`_gradient`).
  return jax.nn.softplus(b - a), (logits, shifts, members, a, b, sum_in, sum_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _partition_nll(logits, members, complement):
  """-log P(S) per example; S from ``members``, swapped when ``complement``.

  The value alone (nothing differentiates it) is ``softplus(b - a)`` from two
  ``jax.nn.logsumexp`` calls, or from one sweep on the TPU and, for labels, on the CPU
  (:func:`_gap_per_platform`); the forward rule below computes the same numbers and keeps
  the shifts that rebuild the exponentials. They are the same bits on the TPU and the
  other platforms; on the CPU a label's value is ``softplus(log(total))`` from its one
  sweep (no difference of two rounded logsumexps), or the two sweeps a block of rows at
  a time, which may round an ulp of a logsumexp apart from the forward rule's.
  """
  gap = _gap_per_platform(logits, members)
  return jax.nn.softplus(-gap if complement else gap)


def _partition_nll_fwd(logits, members, complement):
  return _forward(logits, members, complement)


def _partition_nll_bwd(complement, residuals, g):
  logits, shifts, members, a, b, sum_in, sum_out = residuals
  grad = _gradient(complement, logits, shifts, members, a, b, sum_in, sum_out, g)
  return grad.astype(logits.dtype), None


def _sides(complement, logits, shifts, members, sum_in, sum_out):
  """``(in_set, restricted)``: S as a mask over classes, and the softmax restricted to
  each class's own side (``p_k / P(not S)`` outside S, ``p_k / P(S)`` inside).

  Each ``e_k <= 1``, so nothing here can overflow. A side whose logits are all -inf has
  ``e = 0`` and sum 0: dividing by 1 there gives its entries 0 rather than 0/0.
  """
  e = _exponentials(logits, members, shifts)
  is_member = _in_set(members, e.shape[-1])
  in_set = ~is_member if complement else is_member
  safe = lambda total: jnp.where(total > 0, total, 1.0)[..., None]
  if jnp.issubdtype(members.dtype, jnp.integer):
    # A label's side is a singleton: its restricted softmax is exactly 1.
    others = safe(sum_in if complement else sum_out)
    restricted = jnp.where(is_member, 1.0, e / others)
  else:
    restricted = e / jnp.where(in_set, safe(sum_in), safe(sum_out))
  return in_set, restricted


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _gradient(complement, logits, shifts, members, a, b, sum_in, sum_out, g):
  """``g * d(-log P(S))/dz = g P(not S) (restricted outside S, -restricted inside)``.

  ``shifts``, ``a``, ``b`` and the sums are the forward pass's numbers, functions of the
  logits; the derivative rule (:func:`_gradient_jvp`) is the exact Hessian-vector
  product in the logits, so their own tangents are not read.
  """
  in_set, restricted = _sides(complement, logits, shifts, members, sum_in, sum_out)
  # P(not S). An example with a zero cotangent contributes nothing; its b - a may be
  # NaN (an invalid label), so it is replaced before the sigmoid.
  not_s = jax.nn.sigmoid(jnp.where(g != 0, b - a, 0.0))[..., None]
  grad = not_s * jnp.where(in_set, -restricted, restricted)
  return _finish_gradient(grad, a, g)


def _finish_gradient(grad, a, g):
  # a == -inf: S has probability 0 (loss +inf) or no class is admissible (loss NaN).
  # The gradient there is zero by convention, so -inf logits never receive NaN.
  grad = jnp.where((a == -jnp.inf)[..., None], 0.0, grad)
  return _checks.zero_where_no_cotangent(g[..., None], grad)


def _side_top(v, restricted, side):
  """``(is_top, top_v, c)`` for one side: its most probable class t, ``v_t``, and
  ``c = sum_{k != t} r_k (v_k - v_t)``, so that the side's mean ``sum r v`` is
  ``v_t + c`` with no ``1 - r_t`` formed (it is the sum of the other ``r_k``)."""
  top = jnp.argmax(jnp.where(side, restricted, -1.0), axis=-1)[..., None]
  is_top = (jnp.arange(v.shape[-1]) == top) & side
  top_v = jnp.sum(jnp.where(is_top, v, 0.0), axis=-1, keepdims=True)
  others = side & ~is_top
  c = jnp.sum(jnp.where(others, restricted * (v - top_v), 0.0), axis=-1, keepdims=True)
  return is_top, top_v, c


@_gradient.defjvp
def _gradient_jvp(complement, primals, tangents):
  """The exact Hessian-vector product of ``-log P(S)``, times ``g``.

  With ``P = P(S)``, ``Q = P(not S)`` (each a sigmoid of ``a - b``, never ``1 - p``) and
  the restricted softmaxes ``u`` outside S and ``w`` inside:

      (H v)_k = Q u_k (v_k - Q u.v - P w.v)              k not in S
      (H v)_k = -Q w_k (v_k - (1 + P) w.v + P u.v)       k in S

  Each side's mean is its top class's ``v_t`` plus ``c = sum_{k != t} r_k (v_k - v_t)``
  (:func:`_side_top`), so no ``1 - r_t`` is formed; at a side's own top the ``v_t`` terms
  cancel by construction (``1 - Q = P``) and are left out, which keeps the rule exact
  transposed (reverse over reverse) as well as forward. The tangent of ``g`` adds ``dg``
  times the gradient.
  """
  logits, shifts, members, a, b, sum_in, sum_out, g = primals
  dz, dg = tangents[0], tangents[-1]
  # The gradient per unit of cotangent, once: the primal output is g times it (0 where
  # g is 0, whatever it holds there), bit for bit what _gradient computes.
  ones = jnp.ones_like(g)
  per_unit = _gradient(complement, logits, shifts, members, a, b, sum_in, sum_out, ones)
  grad = _checks.zero_where_no_cotangent(g[..., None], per_unit)
  in_set, restricted = _sides(complement, logits, shifts, members, sum_in, sum_out)
  dtype = restricted.dtype
  v = jnp.asarray(dz, dtype)
  out_is_top, out_top, out_c = _side_top(v, restricted, ~in_set)
  in_is_top, in_top, in_c = _side_top(v, restricted, in_set)
  t = jnp.where(g != 0, b - a, 0.0)[..., None]
  q, p = jax.nn.sigmoid(t), jax.nn.sigmoid(-t)
  d = out_top - in_top
  # The brackets v_k - Q u.v - P w.v (outside S) and v_k - (1 + P) w.v + P u.v (inside),
  # each side's mean as top + c; at a side's own top the v_t terms cancel exactly by
  # construction (1 - Q = P), so they are written without them.
  outside = jnp.where(out_is_top, p * d, v - q * out_top - p * in_top) - q * out_c - p * in_c
  inside = jnp.where(in_is_top, p * d, v - (1 + p) * in_top + p * out_top)
  inside = inside - (1 + p) * in_c + p * out_c
  hv = q * restricted * jnp.where(in_set, -inside, outside)
  tangent = _finish_gradient(hv, a, g)  # g * H v
  tangent = tangent + jnp.where(
    (g == 0)[..., None], 0.0, jnp.asarray(dg, dtype)[..., None] * per_unit
  )
  return grad, tangent.astype(dtype)


_partition_nll.defvjp(_partition_nll_fwd, _partition_nll_bwd)
_partition_nll = _checks.compiled(_partition_nll, (2,))
