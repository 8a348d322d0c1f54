r"""Losses of the complementary-label literature for a negative example "x is not l".

- :func:`scl_exp`: ``exp(p_l)`` (SCL-EXP, Chou et al. 2020);
- :func:`forward_nll`: ``-log (T^T p)_l`` with a transition matrix ``T`` (Yu et al. 2018);
- :func:`pairwise_comparison`: ``sum_{k != l} sigmoid(z_l - z_k)`` (PC, Ishida et al. 2017);
- :func:`mcl_mae` and :func:`mcl_exp` on a set S of wrong labels: ``P(S)`` and
  ``exp(-(1 - P(S)))`` (Feng et al. 2020; their MCL-LOG is :func:`complement_set_nll`).

Each is a ``custom_vjp`` whose backward rule returns exactly 0 where its cotangent is 0
(a masked example) and NaN where its logits hold a NaN, as the other losses do. The
probability-valued losses take ``p = exp(-nll)`` from the exact label and set kernels,
so ``p`` keeps its relative precision when tiny.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks, _partition
from jaxsoftmax.losses._label import label_inputs
from jaxsoftmax.losses._partition import _partition_nll, _split_logsumexp
from jaxsoftmax.losses._set import set_inputs

# name -> (f(p), f'(p)) for a loss that is a function of a probability p.
_OF_PROBABILITY = {
  "p": (lambda p: p, lambda p: jnp.ones_like(p)),
  "exp": (jnp.exp, jnp.exp),
  "exp_neg": (lambda p: jnp.exp(-p), lambda p: -jnp.exp(-p)),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _of_probability(logits, members, complement, kind):
  """``f(P)`` with ``P = exp(-partition_nll)``: the probability of S (or of its complement)."""
  return _OF_PROBABILITY[kind][0](jnp.exp(-_partition_nll(logits, members, complement)))


def _of_probability_fwd(logits, members, complement, kind):
  neg_log_p, residuals = _partition._forward(logits, members, complement)
  return _OF_PROBABILITY[kind][0](jnp.exp(-neg_log_p)), residuals


def _of_probability_bwd(complement, kind, residuals, g):
  a, b = residuals[3:5]
  # dL/dz = f'(P) dP/dz = -P f'(P) d(-log P)/dz: the partition kernel's rule with the
  # cotangent scaled. A masked example's log-odds may be NaN (an invalid label); they are
  # replaced before any arithmetic, so that grad of grad stays finite for it too.
  p = jnp.exp(-jax.nn.softplus(jnp.where(g != 0, b - a, 0.0)))
  scaled = _checks.zero_where_no_cotangent(g, -p * _OF_PROBABILITY[kind][1](p))
  return _partition._partition_nll_bwd(complement, residuals, scaled)


_of_probability.defvjp(_of_probability_fwd, _of_probability_bwd)
_of_probability = _checks.compiled(_of_probability, (2, 3))


def scl_exp(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""SCL-EXP for a negative example "x is not ``label``": ``exp(p_l)``.

  Bounded in ``[1, e]``; its gradient ``exp(p_l) p_l (onehot(l) - p)`` vanishes both
  when ``p_l -> 0`` and when ``p_l -> 1``, unlike :func:`complement_nll`.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis``.
    labels: ``[...]`` integer labels known to be wrong, in ``[0, K)``.
    where: optional class mask, as for :func:`nll` (a row it excludes entirely gives 0).
    axis: the class axis (default -1), or a tuple of axes flattened into one.
    ignore_index: a padding label value: loss 0 and gradient 0.

  Returns:
    ``[...]`` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import scl_exp
    >>> print(scl_exp(jnp.array([[0.0, 0.0]]), jnp.array([0])))  # exp(1/2)
    [1.6487]

  Reference: Chou et al., "Unbiased Risk Estimators Can Mislead: A Case Study of
  Learning with Complementary Labels", ICML 2020.
  """
  logits, labels, _, kept, ignored = label_inputs(logits, labels, where, axis, ignore_index)
  return _checks.finish(_of_probability(logits, labels, False, "exp"), kept, ignored)


def mcl_mae(
  logits: ArrayLike,
  members: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
) -> jax.Array:
  r"""MCL-MAE for a set S of wrong labels: ``1 - sum_{k not in S} p_k = P(S)``.

  Bounded in ``[0, 1]`` and computed as ``exp(-set_nll)``, so a tiny ``P(S)`` keeps its
  relative precision (the literal ``1 - sum`` rounds it to 0).

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis``.
    members: boolean mask of the wrong labels S, the logits' shape.
    where: optional class mask, as for :func:`set_nll`.
    axis: the class axis (default -1), or a tuple of axes flattened into one.

  Returns:
    ``[...]`` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import mcl_mae
    >>> print(mcl_mae(jnp.zeros((1, 4)), jnp.array([[True, True, False, False]])))
    [0.5]

  Reference: Feng et al., "Learning with Multiple Complementary Labels", ICML 2020.
  """
  logits, members, kept = set_inputs(logits, members, where, axis)
  return _checks.finish(_of_probability(logits, members, False, "p"), kept)


def mcl_exp(
  logits: ArrayLike,
  members: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
) -> jax.Array:
  r"""MCL-EXP for a set S of wrong labels: ``exp(-sum_{k not in S} p_k)``.

  Bounded in ``[1/e, 1]``.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis``.
    members: boolean mask of the wrong labels S, the logits' shape.
    where: optional class mask, as for :func:`set_nll`.
    axis: the class axis (default -1), or a tuple of axes flattened into one.

  Returns:
    ``[...]`` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import mcl_exp
    >>> print(mcl_exp(jnp.zeros((1, 4)), jnp.array([[True, True, False, False]])))  # exp(-1/2)
    [0.6065]

  Reference: Feng et al., "Learning with Multiple Complementary Labels", ICML 2020.
  """
  logits, members, kept = set_inputs(logits, members, where, axis)
  return _checks.finish(_of_probability(logits, members, True, "exp_neg"), kept)


def _forward_parts(logits, weights, valid):
  """``(loss, a, lse, q, r)``: the loss ``-log P(S) - log r`` with S the classes of
  positive weight, ``a = logsumexp_S z``, ``q = softmax`` restricted to S and
  ``r = sum_S w q`` (a weighted average of the weights, so ``-log r`` has no cancellation)."""
  in_s = weights > 0
  # The kernel's own split logsumexp: an empty side is -inf with a finite derivative.
  a_raw, b, _, _, _ = _split_logsumexp(logits, in_s)
  lse = jnp.logaddexp(a_raw, b)
  a = jnp.where(valid, a_raw, jnp.nan)  # an invalid label: NaN
  # q from a finite shift only: an invalid label or an S of probability 0 gets a stand-in
  # (its loss is NaN or +inf below), so no NaN enters a derivative through q.
  ok = jnp.isfinite(a)
  q = jnp.where(in_s, jnp.exp(logits - jnp.where(ok, a, 0.0)[..., None]), 0.0)
  # r = w_min + sum_S (w - w_min) q, using sum_S q = 1 exactly: a uniform column gives
  # r = w_min with no rounding of the sum, and a biased one a sum of positive terms.
  w_min = jnp.min(jnp.where(in_s, weights, jnp.inf), axis=-1)
  r = w_min + jnp.sum(jnp.where(in_s, weights - w_min[..., None], 0.0) * q, axis=-1)
  # No class can show l (its column is all zero): p(shown l) = 0, loss +inf (zero
  # gradient below), as nll's for a label of probability 0.
  # (A NaN logit or an invalid label stays NaN.)
  possible = jnp.any(in_s, axis=-1) | jnp.isnan(a) | jnp.isnan(lse)
  loss = jnp.where(possible, jax.nn.softplus(b - a) - jnp.log(r), jnp.inf)
  return loss, a, lse, q, r


@jax.custom_vjp
def _forward(logits, weights, valid):
  return _forward_parts(logits, weights, valid)[0]


def _forward_fwd(logits, weights, valid):
  loss, a, lse, _, r = _forward_parts(logits, weights, valid)
  return loss, (logits, weights, a, lse, r)


def _forward_bwd(residuals, g):
  logits, weights, a, lse, r = residuals
  # Where S has probability 0 (a = -inf) the gradient is zero; the shifts are replaced
  # first, so that no inf - inf arises (also when this rule is differentiated).
  dead = (a == -jnp.inf) | jnp.isinf(lse)
  # Masked or impossible examples: their shifts are replaced before any arithmetic.
  keep = ~dead & (g != 0)
  a, lse, r = (jnp.where(keep, v, fill) for v, fill in ((a, 0.0), (lse, 0.0), (r, 1.0)))
  q = jnp.where(weights > 0, jnp.exp(logits - a[..., None]), 0.0)
  # d/dz [lse(z) - lse(z + log w)] = softmax(z) - w q / r.
  grad = jnp.exp(logits - lse[..., None]) - weights * q / r[..., None]
  grad = jnp.where(dead[..., None], 0.0, grad)
  return _checks.zero_where_no_cotangent(g[..., None], grad), None, None


_forward.defvjp(_forward_fwd, _forward_bwd)
_forward = _checks.compiled(_forward, ())


def forward_nll(
  logits: ArrayLike,
  labels: ArrayLike,
  transition: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Forward correction for a shown wrong label: ``-log sum_k T[k, l] p_k``.

  ``T[k, l]`` is the probability that an input of class k is shown the wrong label l
  (rows sum to 1, ``T[k, k] = 0``). The loss is the NLL of the shown label under the
  model's class distribution pushed through ``T``, computed exactly as
  ``-log P(S) - log sum_{k in S} T[k, l] q_k`` with S the classes of positive weight,
  ``-log P(S)`` from the set kernel and ``q`` the softmax restricted to S: a sum of two
  non-negative terms (no ``1e-6`` inside a log). Its gradient is
  ``softmax(z) - softmax(z + log T[:, l])``.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis``.
    labels: ``[...]`` integer wrong labels shown, in ``[0, K)``.
    transition: ``[K, K]`` transition matrix ``T``.
    where: optional class mask, as for :func:`nll`.
    axis: the class axis (default -1), or a tuple of axes flattened into one.
    ignore_index: a padding label value: loss 0 and gradient 0.

  Returns:
    ``[...]`` per-example losses; +inf (zero gradient) for a label no class shows (an
    all-zero column of ``T``).

  Raises:
    ValueError: for a concrete ``T`` with an entry that is not finite or is negative, or
      a row whose sum is not 1 within ``TRANSITION_ROW_TOLERANCE`` (1e-4). Under
      ``jit``, such a ``T`` gives NaN loss and gradient instead: for the examples shown a
      label whose column has a bad entry, and for every example when a row is off 1.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import forward_nll
    >>> t = (1.0 - jnp.eye(3)) / 2                      # uniform wrong labels
    >>> print(forward_nll(jnp.zeros((1, 3)), jnp.array([0]), t))  # -log(2/3 * 1/2)
    [1.0986]

  Reference: Yu et al., "Learning with Biased Complementary Labels", ECCV 2018.
  """
  logits, labels, _, kept, ignored = label_inputs(logits, labels, where, axis, ignore_index)
  k = logits.shape[-1]
  transition, valid_columns = _check_transition(transition, k, logits.dtype)
  column = jnp.take(transition.T, jnp.maximum(labels, 0), axis=0)  # [..., K]: T[:, l]
  valid = (labels >= 0) & jnp.take(valid_columns, jnp.maximum(labels, 0))
  column = jnp.where(valid[..., None], column, jnp.nan)  # NaN loss and a NaN gradient row
  return _checks.finish(_forward(logits, column, valid), kept, ignored)


#: How far a row of ``forward_nll``'s transition matrix may sum from 1.
TRANSITION_ROW_TOLERANCE = 1e-4


def _check_transition(transition, k, dtype) -> tuple[jax.Array, jax.Array]:
  """``(T, valid_columns)``: ``T`` as a ``[K, K]`` array of ``dtype`` and, per shown label,
  whether its column can be used (finite, non-negative, and every row of ``T`` summing to 1
  within ``TRANSITION_ROW_TOLERANCE``). A concrete ``T`` that fails raises
  ``ValueError`` naming the entry or row; a traced one gives ``False`` there (NaN loss and
  gradient for the examples shown that label; every example, for a row off 1)."""
  if np.shape(transition) != (k, k):
    raise ValueError(
      f"transition has shape {np.shape(transition)}; it must be ({k}, {k}) for {k} classes."
    )
  if _checks.is_concrete(transition):
    values = np.asarray(transition, np.float64)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
      at = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
        f"transition{_checks.index_str(at)} = {values[at]}: a transition "
        "matrix's entries are finite probabilities >= 0."
      )
    rows = values.sum(axis=1)
    off = np.abs(rows - 1.0) > TRANSITION_ROW_TOLERANCE
    if off.any():
      row = int(np.argmax(off))
      raise ValueError(
        f"transition row {row} sums to {rows[row]:.6g}; each row of T is the "
        f"distribution of the label shown for that class and sums to 1 "
        f"(within {TRANSITION_ROW_TOLERANCE})."
      )
  transition = jnp.asarray(transition, dtype)
  columns = jnp.all(jnp.isfinite(transition) & (transition >= 0), axis=0)
  # (A row holding NaN passes this test: its bad entry marks its column.)
  rows = ~jnp.any(jnp.abs(jnp.sum(transition, axis=1) - 1.0) > TRANSITION_ROW_TOLERANCE)
  return transition, columns & rows


@jax.custom_vjp
def _pairwise(logits, labels):
  z_l = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)
  z_l = jnp.where((labels >= 0)[..., None], z_l, jnp.nan)
  others = (jnp.arange(logits.shape[-1]) != labels[..., None]) & ~jnp.isneginf(logits)
  return jnp.sum(jnp.where(others, jax.nn.sigmoid(z_l - logits), 0.0), axis=-1)


def _pairwise_fwd(logits, labels):
  return _pairwise(logits, labels), (logits, labels)


def _pairwise_bwd(residuals, g):
  logits, labels = residuals
  z_l = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)
  z_l = jnp.where((labels >= 0)[..., None], z_l, jnp.nan)
  others = (jnp.arange(logits.shape[-1]) != labels[..., None]) & ~jnp.isneginf(logits)
  # An example with a zero cotangent contributes nothing; its t may be NaN (an invalid
  # label), so it is replaced first: then grad of grad stays finite for it too.
  t = jnp.where((g != 0)[..., None], z_l - logits, 0.0)
  slope = jnp.where(others, jax.nn.sigmoid(t) * jax.nn.sigmoid(-t), 0.0)  # sigma'(t), exact
  is_label = jnp.arange(logits.shape[-1]) == labels[..., None]
  grad = jnp.where(is_label, jnp.sum(slope, axis=-1, keepdims=True), -slope)
  return _checks.zero_where_no_cotangent(g[..., None], grad), None


_pairwise.defvjp(_pairwise_fwd, _pairwise_bwd)
_pairwise = _checks.compiled(_pairwise, ())


def pairwise_comparison(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Pairwise comparison (PC) loss of a wrong label: ``sum_{k != l} sigmoid(z_l - z_k)``.

  Each term pushes the wrong label's logit below another class's, with the sigmoid
  loss; bounded in ``[0, K - 1]``. Classes that ``where`` excludes (or at -inf) are
  left out of the sum.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis``.
    labels: ``[...]`` integer labels known to be wrong, in ``[0, K)``.
    where: optional class mask, as for :func:`nll`.
    axis: the class axis (default -1), or a tuple of axes flattened into one.
    ignore_index: a padding label value: loss 0 and gradient 0.

  Returns:
    ``[...]`` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import pairwise_comparison
    >>> print(pairwise_comparison(jnp.zeros((1, 3)), jnp.array([0])))  # 2 x sigmoid(0)
    [1.]

  Reference: Ishida et al., "Learning from Complementary Labels", NeurIPS 2017 (the
  pairwise-comparison formulation with the sigmoid loss).
  """
  logits, labels, _, kept, ignored = label_inputs(logits, labels, where, axis, ignore_index)
  return _checks.finish(_pairwise(logits, labels), kept, ignored)
