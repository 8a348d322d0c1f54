r"""Losses through a two-level class tree: ``p(y = l) = p(c) * p(l | c)``, ``c = cluster(l)``.

A hierarchical head gives cluster logits ``u`` (``[..., C]``) and within-cluster
logits ``w`` laid out by :class:`~jaxsoftmax.tree.ClassTree` as ``[..., C, M]``. With

    A = -log p(c)     = softplus(logsumexp_{c' != c} u - u_c)
    B = -log p(l | c) = softplus(logsumexp_{j != l in c} w - w_l)

(the flat kernel's exact forms), the NLL is ``L = A + B``, a sum of two non-negative
terms, so it keeps the terms' relative precision. The complement likelihood
``-log(1 - p_l)`` uses

    1 - p_l = (1 - p(c)) + p(c) * (1 - p(l | c)),

a sum of positive terms whose logarithms ``log(1 - p(c)) = -softplus(u_c - ...)``,
``log p(c) = -A`` and ``log(1 - p(l | c))`` are all exact: this is exact as
``p_l -> 1``. As ``p_l -> 0`` it is ``-log1p(-exp(-L))`` instead, exact up to
``L``'s rounding. Gradients are formed from the same logs, so neither loss's
gradient vanishes or overflows in a tail.

Only the label's cluster row of ``w`` enters a loss: pass ``w`` as the full table
``[..., C, M]`` or as that row alone, ``[..., M]`` (what
:meth:`jaxsoftmax.models.HierarchicalSoftmax.target_logits` computes, at O(sqrt K)
cost per example for a balanced tree instead of O(K)).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks
from jaxsoftmax.losses._partition import (
  _partition_nll,
  _split_logsumexp,
  _split_logsumexp_value,
)
from jaxsoftmax.losses._sequence import _complement_of_nll
from jaxsoftmax.tree import ClassTree

_LOG2 = math.log(2.0)


def _target_row(cluster_logits, within_logits, labels, tree, ignore_index=None):
  """Checked inputs: cluster logits, the label's cluster row (padding at -inf), ids, and
  the examples ``ignore_index`` marks (None without it)."""
  if not isinstance(tree, ClassTree):
    raise TypeError(f"tree must be a jaxsoftmax.tree.ClassTree, got {type(tree).__name__}.")
  cluster_logits = _checks.as_logits(cluster_logits, name="cluster_logits")
  within_logits = _checks.as_logits(within_logits, name="within_logits")
  if cluster_logits.shape[-1] != tree.num_clusters:
    raise ValueError(
      f"cluster_logits has {cluster_logits.shape[-1]} entries on its last axis, "
      f"but the tree has {tree.num_clusters} clusters."
    )
  labels, ignored = _checks.as_labels(
    labels, cluster_logits, num_classes=tree.num_classes, ignore_index=ignore_index
  )
  batch, width = cluster_logits.shape[:-1], tree.max_size
  valid = labels >= 0
  cluster = jnp.where(valid, jnp.asarray(tree.cluster_of)[jnp.maximum(labels, 0)], -1)
  slot = jnp.where(valid, jnp.asarray(tree.slot_of)[jnp.maximum(labels, 0)], -1)
  if within_logits.shape == (*batch, tree.num_clusters, width):
    row = jnp.take_along_axis(within_logits, jnp.maximum(cluster, 0)[..., None, None], axis=-2)[
      ..., 0, :
    ]
    # A NaN anywhere in the table poisons the example (loss and gradient), as a NaN
    # among flat logits does, although only the label's row enters the loss.
    poisoned = jnp.any(jnp.isnan(within_logits), axis=(-2, -1))
    cluster_logits = cluster_logits + jnp.where(poisoned, jnp.nan, 0.0)[..., None].astype(
      cluster_logits.dtype
    )
  elif within_logits.shape == (*batch, width):
    row = within_logits
  else:
    raise ValueError(
      f"within_logits has shape {within_logits.shape}; with cluster_logits {cluster_logits.shape} "
      f"it must be the full table {(*batch, tree.num_clusters, width)} or the label's cluster "
      f"row {(*batch, width)}."
    )
  sizes = jnp.asarray(tree.sizes)[jnp.maximum(cluster, 0)]
  row = jnp.where(jnp.arange(width) < sizes[..., None], row, -jnp.inf)
  dtype = jnp.result_type(cluster_logits, row)
  return cluster_logits.astype(dtype), row.astype(dtype), cluster, slot, ignored


def _log_not(a, b):
  """log(1 - P) for P = sigmoid(a - b) (a label's log-odds against the rest): exact."""
  return -jax.nn.softplus(a - b)


def _loss(a1, b1, a2, b2, complement):
  """The loss from the two levels' label and rest logsumexps; also L and the two logs."""
  nll = jax.nn.softplus(b1 - a1) + jax.nn.softplus(b2 - a2)  # L = A + B
  log_u, log_v = _log_not(a1, b1), _log_not(a2, b2)  # log(1 - p(c)), log(1 - p(l|c))
  if complement:
    log_rest = jnp.logaddexp(log_u, log_v - jax.nn.softplus(b1 - a1))  # log(1 - p_l)
    small = -jnp.log1p(-jnp.exp(-nll))  # exact once p_l <= 1/2
    loss = jnp.where(nll > _LOG2, small, -log_rest)
  else:
    loss = nll
  return loss, nll, log_u, log_v


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _hierarchical(cluster_logits, row, cluster, slot, complement):
  """The value alone, from ``jax.nn.logsumexp``; the forward rule keeps the exponentials."""
  a1, b1 = _split_logsumexp_value(cluster_logits, cluster)
  a2, b2 = _split_logsumexp_value(row, slot)
  return _loss(a1, b1, a2, b2, complement)[0]


def _hierarchical_fwd(cluster_logits, row, cluster, slot, complement):
  a1, b1, e1, _, s1 = _split_logsumexp(cluster_logits, cluster)
  a2, b2, e2, _, s2 = _split_logsumexp(row, slot)
  loss, nll, log_u, log_v = _loss(a1, b1, a2, b2, complement)
  return loss, (cluster_logits, row, e1, s1, e2, s2, cluster, slot, nll, loss, log_u, log_v)


def _direction(e, total, members):
  """d(-log p(member))/dz divided by (1 - p(member)): +restricted softmax, -1 at the member."""
  is_member = members[..., None] == jnp.arange(e.shape[-1])
  return jnp.where(is_member, -1.0, e / jnp.where(total > 0, total, 1.0)[..., None])


def _hierarchical_bwd(complement, residuals, g):
  return (*_gradient(complement, residuals[0], residuals[1], residuals[2:], g), None, None)


def _exact_value(cluster_logits, row, cluster, slot, complement):
  """The loss as the partition kernel's ``-log p(c) - log p(l | c)`` (``-log(1 - exp(-L))``
  of it for the complement): the same value, written with the kernels whose own
  derivatives are exact, for the gradient's derivative rule."""
  nll = _partition_nll(cluster_logits, cluster, False) + _partition_nll(row, slot, False)
  return _complement_of_nll(nll) if complement else nll


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _gradient(complement, cluster_logits, row, residuals, g):
  """The gradient from the forward rule's exponentials; its own derivatives are those of
  :func:`_exact_value`'s gradient."""
  e1, s1, e2, s2, cluster, slot, nll, loss, log_u, log_v = residuals
  if complement:
    # d(-log(1 - p_l)) = -(p_l / (1 - p_l)) dL, and dA = (1 - p(c)) * direction:
    # weights p_l (1 - p(c)) / (1 - p_l) and p_l (1 - p(l|c)) / (1 - p_l), both in
    # [0, 1], from logs so that none of the factors can underflow on its own.
    base = loss - nll
    w1, w2 = -jnp.exp(base + log_u), -jnp.exp(base + log_v)
    dead = ~jnp.isfinite(loss) | (nll == jnp.inf)  # p_l is exactly 1 or 0
  else:
    w1, w2 = jnp.exp(log_u), jnp.exp(log_v)
    dead = nll == jnp.inf  # p_l is exactly 0
  w1, w2 = (jnp.where(dead & ~jnp.isnan(nll), 0.0, w) for w in (w1, w2))
  g = g[..., None]
  return (
    _checks.zero_where_no_cotangent(g, w1[..., None] * _direction(e1, s1, cluster)),
    _checks.zero_where_no_cotangent(g, w2[..., None] * _direction(e2, s2, slot)),
  )


@_gradient.defjvp
def _gradient_jvp(complement, primals, tangents):
  cluster_logits, row, residuals, g = primals
  d_cluster, d_row, _, dg = tangents
  cluster, slot = residuals[4], residuals[5]

  def exact(cluster_logits, row, g):
    value = lambda c, r: _exact_value(c, r, cluster, slot, complement)
    _, vjp = jax.vjp(value, cluster_logits, row)
    return tuple(_checks.zero_where_no_cotangent(g[..., None], d) for d in vjp(g))

  out = _gradient(complement, cluster_logits, row, residuals, g)
  _, tangent = jax.jvp(exact, (cluster_logits, row, g), (d_cluster, d_row, dg))
  return out, tuple(t.astype(o.dtype) for t, o in zip(tangent, out))


_hierarchical.defvjp(_hierarchical_fwd, _hierarchical_bwd)
_hierarchical = _checks.compiled(_hierarchical, (4,))


def hierarchical_nll(
  cluster_logits: ArrayLike,
  within_logits: ArrayLike,
  labels: ArrayLike,
  tree: ClassTree,
  *,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Negative log-likelihood of the label through the tree, ``-log p(c) - log p(l | c)``.

  Args:
    cluster_logits: ``[..., C]`` floating logits of the clusters.
    within_logits: the full within-cluster table ``[..., C, M]``, or only the label's
      cluster row ``[..., M]``; slots past a cluster's size are ignored.
    labels: ``[...]`` integer classes in ``[0, K)``. Eagerly, a label out of range
      raises ``ValueError``; under ``jit`` that example's loss is NaN.
    tree: the :class:`~jaxsoftmax.tree.ClassTree` (static).
    ignore_index: a label value that marks padding (e.g. -100): those examples have
      loss 0 and a zero gradient, eagerly and under ``jit``.

  Returns:
    ``[...]`` per-example losses, no reduction. Equal to ``nll`` of the flat
    distribution the tree implies (:func:`hierarchical_log_softmax`), to float32
    precision in both tails; +inf with a zero gradient where ``p_l`` is exactly 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import hierarchical_nll
    >>> from jaxsoftmax.tree import ClassTree
    >>> tree = ClassTree.from_clusters([0, 0, 1])
    >>> u = jnp.array([[0.0, 0.0]])          # p(cluster) = 1/2 each
    >>> w = jnp.array([[[0.0, 0.0], [5.0, 0.0]]])
    >>> print(hierarchical_nll(u, w, jnp.array([2]), tree))  # -log(1/2 * 1)
    [0.6931]

  Reference: F. Morin and Y. Bengio, "Hierarchical probabilistic neural network
  language model", AISTATS 2005; J. Goodman, "Classes for fast maximum entropy
  training", ICASSP 2001 (the two-level class factorisation).
  """
  u, row, cluster, slot, ignored = _target_row(
    cluster_logits, within_logits, labels, tree, ignore_index
  )
  return _checks.finish(_hierarchical(u, row, cluster, slot, False), None, ignored)


def hierarchical_complement_nll(
  cluster_logits: ArrayLike,
  within_logits: ArrayLike,
  labels: ArrayLike,
  tree: ClassTree,
  *,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Complement likelihood of a negative example through the tree, ``-log(1 - p(y = l))``.

  .. math::
    1 - p_l = \big(1 - p(c)\big) + p(c)\,\big(1 - p(l \mid c)\big)

  Every term comes from an exact log, so the loss keeps its precision as
  ``p_l -> 1`` (where ``-log(1 - exp(-hierarchical_nll))`` returns inf) and as
  ``p_l -> 0`` (where it is about ``p_l``). Its gradient is ``p_l / (1 - p_l)`` times
  the gradient of ``-hierarchical_nll``, formed without dividing two underflowed
  numbers, so it stays of order 1 while the model is confidently wrong.

  Args:
    cluster_logits: ``[..., C]`` floating logits of the clusters.
    within_logits: ``[..., C, M]`` or the label's cluster row ``[..., M]``.
    labels: ``[...]`` integer classes in ``[0, K)`` (the classes the examples are not).
    tree: the :class:`~jaxsoftmax.tree.ClassTree` (static).
    ignore_index: a label value that marks padding (e.g. -100): those examples have
      loss 0 and a zero gradient, eagerly and under ``jit``.

  Returns:
    ``[...]`` per-example losses, no reduction, >= 0; +inf with a zero gradient only
    where ``p_l`` is exactly 1 (one cluster holding one class).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import hierarchical_complement_nll
    >>> from jaxsoftmax.tree import ClassTree
    >>> tree = ClassTree.from_clusters([0, 0, 1])
    >>> u = jnp.array([[40.0, 0.0]])         # p(class 0) = 1 - 4.2e-18 - 2e-9
    >>> w = jnp.array([[[0.0, -20.0], [0.0, 0.0]]])
    >>> print(hierarchical_complement_nll(u, w, jnp.array([0]), tree))
    [20.]

  Reference: the complementary-label likelihood of T. Ishida et al.,
  "Complementary-label learning for arbitrary losses and models", ICML 2019,
  through the class factorisation of :func:`hierarchical_nll`.
  """
  u, row, cluster, slot, ignored = _target_row(
    cluster_logits, within_logits, labels, tree, ignore_index
  )
  return _checks.finish(_hierarchical(u, row, cluster, slot, True), None, ignored)


def hierarchical_log_softmax(
  cluster_logits: ArrayLike, within_logits: ArrayLike, tree: ClassTree
) -> jax.Array:
  """The log-probability of every class, ``log p(c(k)) + log p(k | c(k))``, ``[..., K]``.

  This is the flat distribution the tree implies: its ``-log`` at a label equals
  :func:`hierarchical_nll`. It costs O(K) per example; use it to predict and
  evaluate, and the losses to train.

  Args:
    cluster_logits: ``[..., C]`` floating logits of the clusters.
    within_logits: ``[..., C, M]`` floating within-cluster logits.
    tree: the :class:`~jaxsoftmax.tree.ClassTree` (static).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.tree import ClassTree
    >>> tree = ClassTree.from_clusters([0, 0, 1])
    >>> logp = hierarchical_log_softmax(jnp.zeros(2), jnp.zeros((2, 2)), tree)
    >>> print(jnp.exp(logp))
    [0.25 0.25 0.5 ]
  """
  cluster_logits = _checks.as_logits(cluster_logits, name="cluster_logits")
  within_logits = _checks.as_logits(within_logits, name="within_logits")
  table = (tree.num_clusters, tree.max_size)
  if cluster_logits.shape[-1] != tree.num_clusters or within_logits.shape[-2:] != table:
    raise ValueError(
      f"cluster_logits {cluster_logits.shape} and within_logits {within_logits.shape} do "
      f"not fit the tree: they need last axes ({tree.num_clusters},) and {table}."
    )
  return _log_softmax(cluster_logits, within_logits, tree)


@functools.partial(jax.jit, static_argnums=2)
def _log_softmax(cluster_logits, within_logits, tree):
  """:func:`hierarchical_log_softmax` past its checks, as one program."""
  valid = jnp.asarray(tree.members >= 0)
  log_cluster = jax.nn.log_softmax(cluster_logits, axis=-1)
  log_within = jax.nn.log_softmax(jnp.where(valid, within_logits, -jnp.inf), axis=-1, where=valid)
  cluster_of, slot_of = jnp.asarray(tree.cluster_of), jnp.asarray(tree.slot_of)
  return log_cluster[..., cluster_of] + log_within[..., cluster_of, slot_of]
