"""Losses for a set of labels per example: candidate sets and sets of wrong labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks
from jaxsoftmax.losses._partition import _partition_nll


def set_inputs(logits, members, where, axis, keep_dtype=False):
  """Checked inputs of a set loss: ``(logits, members, kept)`` with the class axis last
  (16-bit logits left as they are with ``keep_dtype``, for the partition kernel)."""
  logits = _checks.as_logits(logits, keep_dtype=keep_dtype)
  axis = _checks.class_axis(axis, logits)
  members, bad = _checks.as_members(members, logits, axis)
  where = _checks.as_where(where, logits, axis)
  logits, kept = _checks.apply_where(_checks.move_to_last(logits, axis), where)
  if bad is not None:  # an id out of range (under a transformation): NaN for that example
    logits = jnp.where(bad[..., None], jnp.nan, logits).astype(logits.dtype)
  return logits, members, kept


def _set_loss(logits, members, where, axis, complement):
  logits, members, kept = set_inputs(logits, members, where, axis, keep_dtype=True)
  return _checks.finish(_partition_nll(logits, members, complement), kept)


def set_nll(
  logits: ArrayLike,
  members: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
) -> jax.Array:
  r"""Negative log-probability of a set of labels, ``-log sum_{k in S} p_k``.

  .. math::
    \ell = \operatorname{logsumexp}_k z_k - \operatorname{logsumexp}_{k \in S} z_k
         = \operatorname{softplus}\big(\operatorname{logsumexp}_{k \notin S} z_k
           - \operatorname{logsumexp}_{k \in S} z_k\big)

  For candidate (partial) labels: the true label is somewhere in S. The gradient
  is ``softmax(z) - softmax(z restricted to S)``. Each logsumexp takes its own
  maximum, so a set far below the top logit gives a large finite loss, not inf.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis`` (the last by
      default).
    members: the set S: a boolean mask of the logits' shape, or integer class ids
      ``[..., M]`` (-1 pads), as the fused and tree set losses take them.
    where: optional boolean mask, read as in optax: with as many dimensions as the
      logits it masks entries (``[1, K]`` masks classes in every example); with fewer
      it masks examples (``[...]``, expanded at the class axis). Excluded classes have
      probability 0 and get a zero gradient; an example that ``where`` excludes
      entirely has loss 0 and a zero gradient, as in optax.
    axis: the class axis of ``logits`` and ``members`` (default -1), or a tuple
      of axes flattened into one, as in optax.

  Returns:
    ``[...]`` per-example losses. +inf only where S has probability exactly 0 (S
    empty, or all its classes excluded or at -inf), with a zero gradient there.

  Only reverse-mode differentiation is defined (``jax.custom_vjp``).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import set_nll
    >>> logits = jnp.array([2.0, 0.0, -1.0])
    >>> print(f"{set_nll(logits, jnp.array([False, True, True])):.4f}")
    1.8566

  Reference: the partial-label (candidate set) likelihood, Jin and Ghahramani,
  "Learning with Multiple Labels", NeurIPS 2002; Feng et al., "Provably Consistent
  Partial-Label Learning", NeurIPS 2020.
  """
  return _set_loss(logits, members, where, axis, complement=False)


def complement_set_nll(
  logits: ArrayLike,
  members: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
) -> jax.Array:
  r"""Complement likelihood of several known-wrong labels, ``-log sum_{k not in S} p_k``.

  .. math::
    \ell = -\log\big(1 - \textstyle\sum_{k \in S} p_k\big)
         = \operatorname{softplus}\big(\operatorname{logsumexp}_{k \in S} z_k
           - \operatorname{logsumexp}_{k \notin S} z_k\big)

  With a single member this equals :func:`complement_nll`. Bounded below by 0, and
  finite for every finite logit vector while some class lies outside S.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis`` (the last by
      default).
    members: the wrong labels S: a boolean mask of the logits' shape, or integer
      class ids ``[..., M]`` (-1 pads), as the fused and tree set losses take them.
    where: optional boolean mask, read as in optax: with as many dimensions as the
      logits it masks entries (``[1, K]`` masks classes in every example); with fewer
      it masks examples (``[...]``, expanded at the class axis). Excluded classes have
      probability 0 and get a zero gradient; an example that ``where`` excludes
      entirely has loss 0 and a zero gradient, as in optax.
    axis: the class axis of ``logits`` and ``members`` (default -1), or a tuple
      of axes flattened into one, as in optax.

  Returns:
    ``[...]`` per-example losses. +inf only where every admissible class is in S,
    with a zero gradient there.

  Only reverse-mode differentiation is defined (``jax.custom_vjp``).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import complement_set_nll
    >>> logits = jnp.array([2.0, 0.0, -1.0])
    >>> print(f"{complement_set_nll(logits, jnp.array([True, True, False])):.4f}")
    3.1698

  Reference: MCL-LOG, Feng et al., "Learning with Multiple Complementary Labels",
  ICML 2020.
  """
  return _set_loss(logits, members, where, axis, complement=True)
