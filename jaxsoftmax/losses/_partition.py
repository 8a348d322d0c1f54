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

Members are either int32 labels (S = {label}; -1 marks an invalid label and gives
NaN) or a boolean mask over classes. ``complement=True`` swaps S and its complement.
The residuals are the logits, the members and the two logsumexps (two values per
example), so the backward pass never stores a K-sized intermediate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _in_set(members: jax.Array, num_classes: int) -> jax.Array:
  if jnp.issubdtype(members.dtype, jnp.integer):
    return members[..., None] == jnp.arange(num_classes, dtype=members.dtype)
  return members


def _log_masses(logits, members, complement):
  """Returns (a, b): logsumexp over S and over its complement, per example."""
  num_classes = logits.shape[-1]
  in_set = _in_set(members, num_classes)
  if jnp.issubdtype(members.dtype, jnp.integer):
    safe = jnp.maximum(members, 0)[..., None]
    picked = jnp.take_along_axis(logits, safe, axis=-1)[..., 0]
    a = jnp.where(members >= 0, picked, jnp.nan)
  else:
    a = jax.nn.logsumexp(logits, axis=-1, where=in_set)
  b = jax.nn.logsumexp(logits, axis=-1, where=~in_set)
  if complement:
    a, b = b, a
  return a, b


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _partition_nll(logits, members, complement):
  """-log P(S) per example; S from ``members``, swapped when ``complement``."""
  a, b = _log_masses(logits, members, complement)
  return jax.nn.softplus(b - a)


def _partition_nll_fwd(logits, members, complement):
  a, b = _log_masses(logits, members, complement)
  return jax.nn.softplus(b - a), (logits, members, a, b)


def _partition_nll_bwd(complement, residuals, g):
  logits, members, a, b = residuals
  in_set = _in_set(members, logits.shape[-1])
  if complement:
    in_set = ~in_set
  not_s = jax.nn.sigmoid(b - a)[..., None]  # P(not S)
  a_ = jnp.where(jnp.isfinite(a), a, 0.0)[..., None]
  b_ = jnp.where(jnp.isfinite(b), b, 0.0)[..., None]
  # Exponents masked before exp, so no discarded branch can overflow: grad of grad
  # stays finite.
  p_out = jnp.exp(jnp.where(in_set, -jnp.inf, logits - b_))
  q_in = jnp.exp(jnp.where(in_set, logits - a_, -jnp.inf))
  grad = not_s * (p_out - q_in)
  # a == -inf: S has probability 0 (loss +inf) or no class is admissible (loss NaN).
  # The gradient there is zero by convention, so -inf logits never receive NaN.
  grad = jnp.where((a == -jnp.inf)[..., None], 0.0, grad)
  return g[..., None] * grad, None


_partition_nll.defvjp(_partition_nll_fwd, _partition_nll_bwd)
