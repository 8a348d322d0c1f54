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
cross-entropy needs none) and the call takes about 2.2x optax's time: the CPU's
reduction fusions (XNNPACK) take a subtract, exp and multiply of their input, but no
select, compare or iota, and any elementwise value that two reductions read is written
to memory. Every exact form needs the label's side apart from the rest (a mask, or a
count of ties with the maximum) in a second reduction; shifting both sides by the
global maximum instead is not exact (complement_nll becomes +inf once the label leads
by 100). ``experiments/benchmarks/losses.py`` reports these forward-only rows.

Members are either int32 labels (S = {label}; -1 marks an invalid label and gives
NaN) or a boolean mask over classes. ``complement=True`` swaps S and its complement.
The residuals are the exponentials (one per logit, in place of the logits), the
members and four values per example.
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


def _masked_max(masked_logits):
  """The shift of one side: its maximum, 0 for an empty (all -inf) side, NaN kept."""
  top = jnp.max(masked_logits, axis=-1)
  return jax.lax.stop_gradient(jnp.where(jnp.isinf(top), 0.0, top))


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
  b = jax.nn.logsumexp(jnp.where(in_set, -jnp.inf, logits), axis=-1)
  if jnp.issubdtype(members.dtype, jnp.integer):
    safe = jnp.maximum(members, 0)[..., None]
    picked = jnp.take_along_axis(logits, safe, axis=-1)[..., 0]
    a = jnp.where(members >= 0, picked, jnp.nan)  # -1 marks an invalid label
  else:
    a = jax.nn.logsumexp(jnp.where(in_set, logits, -jnp.inf), axis=-1)
  return a, b


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
  in_set = _in_set(members, logits.shape[-1])
  if jnp.issubdtype(members.dtype, jnp.integer):
    others = jnp.where(in_set, -jnp.inf, logits)
    top_out = _masked_max(others)
    e = jnp.exp(others - top_out[..., None])
    sum_out = jnp.sum(e, axis=-1)
    safe = jnp.maximum(members, 0)[..., None]
    picked = jnp.take_along_axis(logits, safe, axis=-1)[..., 0]
    a = jnp.where(members >= 0, picked, jnp.nan)  # -1 marks an invalid label
    sum_in = jnp.ones_like(a)
  else:
    top_in = _masked_max(jnp.where(in_set, logits, -jnp.inf))
    top_out = _masked_max(jnp.where(in_set, -jnp.inf, logits))
    e = jnp.exp(logits - jnp.where(in_set, top_in[..., None], top_out[..., None]))
    sum_in = jnp.sum(jnp.where(in_set, e, 0.0), axis=-1)
    sum_out = jnp.sum(jnp.where(in_set, 0.0, e), axis=-1)
    a = top_in + _log(sum_in)
  b = top_out + _log(sum_out)
  return a, b, e, sum_in, sum_out


def _forward(logits, members, complement):
  a, b, e, sum_in, sum_out = _split_logsumexp(logits, members)
  if complement:
    a, b, sum_in, sum_out = b, a, sum_out, sum_in
  return jax.nn.softplus(b - a), (e, members, a, b, sum_in, sum_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _partition_nll(logits, members, complement):
  """-log P(S) per example; S from ``members``, swapped when ``complement``.

  The value alone (nothing differentiates it) is two ``jax.nn.logsumexp`` calls;
  the forward rule below computes the same numbers and keeps the exponentials.
  """
  a, b = _split_logsumexp_value(logits, members)
  if complement:
    a, b = b, a
  return jax.nn.softplus(b - a)


def _partition_nll_fwd(logits, members, complement):
  return _forward(logits, members, complement)


def _partition_nll_bwd(complement, residuals, g):
  e, members, a, b, sum_in, sum_out = residuals
  is_member = _in_set(members, e.shape[-1])
  in_set = ~is_member if complement else is_member
  # P(not S). An example with a zero cotangent contributes nothing; its b - a may be
  # NaN (an invalid label), so it is replaced before the sigmoid: the derivative of
  # this rule (grad of grad) then stays finite for it too.
  not_s = jax.nn.sigmoid(jnp.where(g != 0, b - a, 0.0))[..., None]
  # e / sum is the softmax restricted to k's own side: p_k / P(not S) outside S,
  # p_k / P(S) inside. Each e_k <= 1, so nothing here can overflow. A side whose
  # logits are all -inf has e = 0 and sum 0: dividing by 1 there gives its entries
  # 0 rather than 0/0 (also when this rule is itself differentiated).
  safe = lambda total: jnp.where(total > 0, total, 1.0)[..., None]
  if jnp.issubdtype(members.dtype, jnp.integer):
    # A label's side is a singleton: its restricted softmax is exactly 1 (and stays
    # constant when this rule is itself differentiated).
    others = safe(sum_in if complement else sum_out)
    restricted = jnp.where(is_member, 1.0, e / others)
  else:
    restricted = e / jnp.where(in_set, safe(sum_in), safe(sum_out))
  grad = not_s * jnp.where(in_set, -restricted, restricted)
  # a == -inf: S has probability 0 (loss +inf) or no class is admissible (loss NaN).
  # The gradient there is zero by convention, so -inf logits never receive NaN.
  grad = jnp.where((a == -jnp.inf)[..., None], 0.0, grad)
  return _checks.zero_where_no_cotangent(g[..., None], grad), None


_partition_nll.defvjp(_partition_nll_fwd, _partition_nll_bwd)
