"""Soft-target and multi-label softmax cross-entropy.

With ``j = argmax z``, every ``-log p_k`` is computed without cancellation:

    -log p_j = softplus(logsumexp_{k != j} z_k - z_j)          (the tiny one, p_j -> 1)
    -log p_k = (z_j - z_k) + (-log p_j)       for k != j        (a sum of two terms >= 0)

so the cross-entropy ``sum_k q_k (-log p_k)`` is a sum of non-negative terms for
non-negative targets. The gradient ``Q softmax(z) - q`` (``Q = sum_k q_k``) takes
its largest entry from ``1 - p_j = sigmoid(logsumexp_{k != j} z_k - z_j)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks
from jaxsoftmax.losses._partition import _computed, _split_logsumexp, _split_logsumexp_value


def _weighted_sum(targets, neg_log_probs):
  # 0 * inf = 0 here: a class of probability 0 costs nothing unless it is targeted.
  # The select comes before the product, so the sum stays linear in the targets.
  safe = jnp.where((targets == 0) & jnp.isinf(neg_log_probs), 0.0, neg_log_probs)
  return jnp.sum(targets * safe, axis=-1)


def _as_weights(targets, dtype):
  """Targets as weights; a boolean label mask Y becomes Y / |Y| (NaN for an empty row).

  Keeping the mask itself as the residual, not Y / |Y|, saves a K-sized float array.
  """
  if targets.dtype != jnp.bool_:
    return targets
  counts = jnp.sum(targets, axis=-1, keepdims=True)
  # Explicit NaN for an empty row: XLA may fold mask / 0 into a select that gives 0.
  weights = jnp.where(counts > 0, targets / jnp.maximum(counts, 1), jnp.nan)
  return weights.astype(dtype)


def _forward(logits, targets, value_only=False):
  """The loss and what the backward pass needs: the logits as they are, the targets, the
  top class and a few numbers per example (no array of ``-log p`` or exponentials).

  The loss is taken apart as ``sum_{k != j} q_k (z_j - z_k) + Q softplus(u)``: the
  same non-negative terms as ``sum_k q_k (-log p_k)``, but the first sum reads the
  logits in the same sweep as the exponentials of ``u``, so the logits are read three
  times (argmax, maximum, exponentials), as by optax's cross-entropy on dense targets.
  ``value_only`` takes the logsumexp from ``jax.nn.logsumexp``; else from the shared
  kernel, whose derivatives stay finite on -inf logits (the backward pass, itself
  differentiated, reads these numbers)."""
  dtype = _checks.compute_dtype(logits.dtype)
  top = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if value_only:
    lse_others = _split_logsumexp_value(logits, top)[1]
  else:
    lse_others = _split_logsumexp(logits, top)[1]
  weights = _as_weights(targets, dtype)
  z = _computed(logits)
  # The top logit from the argmax's own sweep, not gathered (a TPU gather reads a tile of
  # the logits per example: 1% of their bytes).
  z_top = jnp.max(z, axis=-1)
  is_top = top[..., None] == jnp.arange(logits.shape[-1])
  gaps = _weighted_sum(weights, jnp.where(is_top, 0.0, z_top[..., None] - z))
  total = jnp.sum(weights, axis=-1)
  rest = jnp.sum(jnp.where(is_top, 0.0, weights), axis=-1)
  # A targeted class of probability 0 (loss +inf), or no admissible class; counted as a
  # float sum so that it shares the sweep of the sums above (a boolean reduction is a
  # sweep of its own).
  impossible = jnp.sum(jnp.where((weights != 0) & (z == -jnp.inf), 1.0, 0.0), axis=-1) > 0
  u = lse_others - z_top
  loss = gaps + total * jax.nn.softplus(u)
  # Five numbers per example: the top class (its bits flipped, negative, where the
  # gradient is zero), the top logit, u and the two sums.
  flagged_top = jnp.where(impossible, ~top, top)
  return loss, (logits, targets, flagged_top, z_top, u, total, rest)


@jax.custom_vjp
def _soft_cross_entropy(logits, targets):
  """sum_k q_k (-log p_k) per example; ``targets`` weights or a boolean label mask.

  ``logsumexp_{k != j} z_k`` comes from ``jax.nn.logsumexp`` (on 16-bit logits as they
  are, converted inside the reductions, so no float32 copy of them is written).
  """
  return _forward(logits, targets, value_only=True)[0]


def _soft_cross_entropy_fwd(logits, targets):
  return _forward(logits, targets)


def _soft_cross_entropy_bwd(residuals, g):
  logits, mask_or_targets, flagged_top, z_top, u, total, rest = residuals
  dtype = _checks.compute_dtype(logits.dtype)
  targets = _as_weights(mask_or_targets, dtype)
  impossible = flagged_top < 0
  top = jnp.where(impossible, ~flagged_top, flagged_top)
  # -log p rebuilt from the logits and the per-example numbers, inside the fusion that
  # forms the gradient: one read of the logits, one write of the gradient.
  is_top = top[..., None] == jnp.arange(logits.shape[-1])
  gap = jnp.where(is_top, 0.0, z_top[..., None] - _computed(logits))
  neg_log_probs = gap + jax.nn.softplus(u)[..., None]
  probs = jnp.exp(jnp.where(is_top, -jnp.inf, -neg_log_probs))
  total, rest = total[..., None], rest[..., None]
  # At the top class, Q p_j - q_j = (Q - q_j) - Q (1 - p_j) with 1 - p_j = sigmoid(u).
  top_grad = rest - total * _checks.sigmoid(u)[..., None]
  grad = jnp.where(is_top, top_grad, total * probs - targets)
  grad = jnp.where(impossible[..., None], 0.0, grad)
  g = g[..., None]
  grad = _checks.zero_where_no_cotangent(g, grad).astype(logits.dtype)
  if mask_or_targets.dtype == jnp.bool_:
    return grad, None
  return grad, _checks.zero_where_no_cotangent(g, neg_log_probs).astype(mask_or_targets.dtype)


_soft_cross_entropy.defvjp(_soft_cross_entropy_fwd, _soft_cross_entropy_bwd)
_soft_cross_entropy = _checks.compiled(_soft_cross_entropy, ())


def soft_cross_entropy(
  logits: ArrayLike,
  targets: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
) -> jax.Array:
  r"""Cross-entropy against a target distribution, ``-sum_k q_k log p_k``.

  .. math::
    \ell = \sum_k q_k \big(\operatorname{logsumexp}_i z_i - z_k\big),
    \qquad \nabla_z \ell = \Big(\sum_k q_k\Big)\,\mathrm{softmax}(z) - q

  Each ``-log p_k`` is formed without cancellation (see the module notes), so the
  loss keeps full relative precision when it is tiny, e.g. a one-hot target on a
  class with ``p -> 1``. Targets need not sum to 1 (the gradient is then
  ``sum(q) softmax(z) - q``). The gradient with respect to the targets is
  ``-log softmax(z)`` (+inf on excluded classes), so the loss can be
  differentiated in both arguments, e.g. for distillation.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis`` (the last by
      default).
    targets: ``[..., K]`` floating target weights, usually a distribution.
    where: optional boolean mask, read as in optax: with as many dimensions as the
      logits it masks entries (``[1, K]`` masks classes in every example); with fewer
      it masks examples (``[...]``, expanded at the class axis). Excluded classes have
      probability 0 and get a zero gradient; an example that ``where`` excludes
      entirely has loss 0 and a zero gradient, as in optax.
    axis: the class axis (default -1), or a tuple of axes flattened into one, as in
      optax. A zero target on an excluded class costs 0; a non-zero one costs +inf
      (optax drops it from the sum).

  Returns:
    ``[...]`` per-example losses. +inf where a class of probability exactly 0 has a
    non-zero target, with a zero logit gradient there.

  Only reverse-mode differentiation is defined (``jax.custom_vjp``).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import soft_cross_entropy
    >>> logits = jnp.array([2.0, 0.0, -1.0])
    >>> print(f"{soft_cross_entropy(logits, jnp.array([0.8, 0.1, 0.1])):.4f}")
    0.6698

  Reference: cross-entropy with soft targets, e.g. Hinton et al., "Distilling the
  Knowledge in a Neural Network", 2015; Szegedy et al., "Rethinking the Inception
  Architecture" (label smoothing), CVPR 2016.
  """
  logits = _checks.as_logits(logits, keep_dtype=True)
  axis = _checks.class_axis(axis, logits)
  targets = _checks.move_to_last(_checks.as_targets(targets, logits), axis)
  where = _checks.as_where(where, logits, axis)
  logits, kept = _checks.apply_where(_checks.move_to_last(logits, axis), where)
  return _checks.finish(_soft_cross_entropy(logits, targets), kept)


def multilabel_softmax_cross_entropy(
  logits: ArrayLike,
  label_mask: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
) -> jax.Array:
  r"""Softmax cross-entropy against several correct labels, with targets ``Y / |Y|``.

  .. math::
    \ell = -\frac{1}{|Y|} \sum_{k \in Y} \log p_k,
    \qquad \nabla_z \ell = \mathrm{softmax}(z) - \frac{Y}{|Y|}

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis`` (the last by
      default).
    label_mask: ``[..., K]`` boolean mask of the correct labels Y. Every example
      needs at least one: eagerly, an empty row raises ``ValueError``; under
      ``jit`` its loss is NaN.
    where: optional boolean mask, read as in optax: with as many dimensions as the
      logits it masks entries (``[1, K]`` masks classes in every example); with fewer
      it masks examples (``[...]``, expanded at the class axis). Excluded classes have
      probability 0 and get a zero gradient; an example that ``where`` excludes
      entirely has loss 0 and a zero gradient, as in optax.
    axis: the class axis (default -1), or a tuple of axes flattened into one, as in optax.

  Returns:
    ``[...]`` per-example losses; +inf where a label in Y has probability 0.

  Only reverse-mode differentiation is defined (``jax.custom_vjp``).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import multilabel_softmax_cross_entropy
    >>> logits = jnp.array([2.0, 2.0, -1.0])
    >>> print(f"{multilabel_softmax_cross_entropy(logits, jnp.array([True, True, False])):.4f}")
    0.7177

  Reference: Mahajan et al., "Exploring the Limits of Weakly Supervised
  Pretraining", ECCV 2018 (softmax with targets ``Y/|Y|``).
  """
  logits = _checks.as_logits(logits, keep_dtype=True)
  axis = _checks.class_axis(axis, logits)
  label_mask = _checks.as_class_mask(label_mask, logits, name="label_mask")
  if _checks.is_concrete(label_mask):
    empty = ~np.asarray(label_mask).any(axis=axis)
    if empty.any():
      row = tuple(int(i) for i in np.argwhere(empty)[0])
      raise ValueError(
        f"label_mask{_checks.index_str(row)} has no label: every example needs at least one "
        f"({int(empty.sum())} of {empty.size} rows are empty)."
      )
  where = _checks.as_where(where, logits, axis)
  logits, kept = _checks.apply_where(_checks.move_to_last(logits, axis), where)
  label_mask = _checks.move_to_last(label_mask, axis)
  return _checks.finish(_soft_cross_entropy(logits, label_mask), kept)
