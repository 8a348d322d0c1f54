"""Soft-target and multi-label softmax cross-entropy.

With ``j = argmax z``, every ``-log p_k`` is computed without cancellation:

    -log p_j = softplus(logsumexp_{k != j} z_k - z_j)          (the tiny one, p_j -> 1)
    -log p_k = (z_j - z_k) + (-log p_j)       for k != j        (a sum of two terms >= 0)

so the cross-entropy ``sum_k q_k (-log p_k)`` is a sum of non-negative terms for
non-negative targets. The gradient ``Q softmax(z) - q`` (``Q = sum_k q_k``) takes
its largest entry from ``1 - p_j = sigmoid(logsumexp_{k != j} z_k - z_j)``.

On XLA:CPU the value (evaluation, :func:`_cpu_value`) and the forward rule's numbers
(training, :func:`_cpu_forward`) come from reductions with no argmax and no masked
copy: XLA:CPU runs an argmax as a scalar loop fusion, not a vectorised reduction, and
its reduction fusions (YNNPACK) take subtract, multiply, min, max, exp and log but no
select or compare, so ``jnp.where(is_top, ...)`` wrote the logits out twice (2.0x their
bytes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks
from jaxsoftmax.losses._partition import (
  _INDEX_SCALE,
  _MAX_INDEXED_CLASSES,
  _by_row_blocks,
  _computed,
  _in_one_sweep_range,
  _left_out,
  _mask_copy,
  _one_call_under_vmap,
  _split_logsumexp,
  _split_logsumexp_value,
)

# Below this many classes the two sweeps are quicker: at [8192, K], 1.32x optax's time
# against the chain's 1.79x at K = 16, when the threshold was chosen; at K = 32 the
# chain is the quicker (`python -m experiments.benchmarks.against_revision --rev 9331e52
# --call value --losses soft_cross_entropy --shapes 8192x32` times it against the two
# sweeps).
_MIN_CHAIN_CLASSES = 32
# The fallback's two sweeps read 1/_ROW_BLOCKS of the examples at a time, and write
# three rows' worth of each block (the block, its logits with the top masked, the gaps).
_ROW_BLOCKS = 512


def _weighted_sum(targets, neg_log_probs):
  # 0 * inf = 0 here: a class of probability 0 costs nothing unless it is targeted.
  # The select comes before the product, so the sum stays linear in the targets.
  safe = jnp.where((targets == 0) & jnp.isinf(neg_log_probs), 0.0, neg_log_probs)
  return jnp.sum(targets * safe, axis=-1)


def _as_weights(targets, dtype):
  """``(weights, extra)``: the targets as weights, and the residuals a label mask adds.
  A boolean label mask Y becomes Y / |Y| (NaN for an empty row), and its ``1 / |Y|``
  per example is kept (``extra``), so that the backward pass forms Y / |Y| without
  counting the mask again (XLA:CPU writes the mask out as int32 to count it). Keeping
  the mask itself as the residual, not Y / |Y|, saves a K-sized float array."""
  if targets.dtype != jnp.bool_:
    return targets, ()
  counts = jnp.sum(targets, axis=-1, keepdims=True)
  # Explicit NaN for an empty row: XLA folds a mask times (or divided by) a per-example
  # number into a select that gives 0 where the mask is 0, whatever the number.
  weights = jnp.where(counts > 0, targets / jnp.maximum(counts, 1), jnp.nan)
  return weights.astype(dtype), (_per_label(counts[..., 0], dtype),)


def _per_label(counts, dtype):
  """``1 / |Y|`` from the counts (NaN for an empty row), as :func:`_as_weights` divides."""
  return jnp.where(counts > 0, 1 / jnp.maximum(counts, 1), jnp.nan).astype(dtype)


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
  z = _computed(logits)
  # The top logit from the argmax's own sweep, not gathered (a TPU gather reads a tile of
  # the logits per example: 1% of their bytes).
  z_top = jnp.max(z, axis=-1)
  is_top = top[..., None] == jnp.arange(logits.shape[-1])
  weights, extra = _as_weights(targets, dtype)
  total = jnp.sum(weights, axis=-1)
  rest = jnp.sum(jnp.where(is_top, 0.0, weights), axis=-1)
  gaps = _weighted_sum(weights, jnp.where(is_top, 0.0, z_top[..., None] - z))
  # A targeted class of probability 0 (loss +inf), or no admissible class; counted as a
  # float sum so that it shares the sweep of the sums above (a boolean reduction is a
  # sweep of its own).
  impossible = jnp.sum(jnp.where((weights != 0) & (z == -jnp.inf), 1.0, 0.0), axis=-1) > 0
  u = lse_others - z_top
  loss = gaps + total * jax.nn.softplus(u)
  # Five numbers per example: the top class (its bits flipped, negative, where the
  # gradient is zero), the top logit, u and the two sums; a sixth for a label mask.
  flagged_top = jnp.where(impossible, ~top, top)
  return loss, (logits, targets, flagged_top, z_top, u, total, rest, *extra)


def _cpu_top(logits):
  """``(top, d, one_top)``: the largest logit (``[..., 1]``), ``d = z + (-top)`` and the
  largest index holding it times ``_INDEX_SCALE`` (``[...]``), from a maximum and a
  reduction that XLA:CPU runs in YNNPACK fusions: ``max_k (k - (K + 1) below_k)``
  scaled, ``below = min(-d * FLT_MAX, 1)`` being 1 where ``d < 0`` and 0 at a tie. ``d``
  is ``z + (-top)`` here and ``top - z`` in the loss, so that no broadcast of ``top`` is
  shared between fusions (a shared one is written out)."""
  z = _computed(logits)
  num_classes = z.shape[-1]
  top = _computed(jnp.max(logits, axis=-1, keepdims=True))  # exact in 16 bits too
  d = z + (-top)
  classes = jnp.arange(num_classes, dtype=z.dtype) * _INDEX_SCALE
  below = jnp.minimum(d * -jnp.finfo(z.dtype).max, 1.0)
  step = (num_classes + 1.0) * _INDEX_SCALE
  return top, d, jnp.max(classes - step * below, axis=-1)


def _cpu_sums(logits):
  """``(top, others)`` per example, ``[..., 1]`` each: the largest logit and the sum of
  ``exp(z_k - top)`` over every class but one top class, left out by its index
  (:func:`_cpu_top`, :func:`_left_out`): a chain of reductions, each reading the ones
  before it, which XLA:CPU runs in one fusion that writes no array of the logits' size.
  Other ties count 1 each, as they should."""
  top, d, one_top = _cpu_top(logits)
  return top, jnp.sum(_left_out(jnp.exp(d), one_top), axis=-1, keepdims=True)


def _takes_chain(logits):
  """Whether XLA:CPU's chain serves these logits: 32 to ``_MAX_INDEXED_CLASSES``
  classes (below 32 the two sweeps are quicker)."""
  return _MIN_CHAIN_CLASSES <= logits.shape[-1] <= _MAX_INDEXED_CLASSES


def _chain_weights(targets, dtype, copy=jnp.uint8):
  """The weights one reduction of the chain reads: float targets as they are; a boolean
  label mask as a 1-byte copy of its own (:func:`_mask_copy`), its ``1 / |Y|`` applied
  to the sums."""
  if targets.dtype != jnp.bool_:
    return targets
  return _mask_copy(targets, dtype, copy)


def _two_sweeps_value(logits, targets):
  return _forward(logits, targets, value_only=True)[0]


def _cpu_value(logits, targets):
  """The loss on XLA:CPU: ``sum_k q_k ((top - z_k) + log1p(others))`` from
  :func:`_cpu_sums`, exact where every example's top is finite and ``others`` is 0 or
  within ``[2**-64, 2**64]`` (nothing lost to underflow counts; a NaN logit gives at
  least 2**102, as the fusions' min returns the other operand) and no loss is NaN (a
  zero target on a -inf class makes ``0 * inf``). Otherwise the two sweeps
  (:func:`_forward`), 1/512 of the examples at a time, in one ``lax.cond`` (for all
  instances under ``vmap``). Fewer than 32 classes keep the two sweeps. A boolean label
  mask is read as 1-byte copies (:func:`_chain_weights`), its ``1 / |Y|`` applied to
  the sums. 16-bit logits are converted to float32 whole, outside the fusions, as three
  of them read them (optax's one fusion converts inside)."""
  if not _takes_chain(logits):
    return _two_sweeps_value(logits, targets)
  loss, exact = _cpu_loss(logits, targets)
  one = lambda z, q: (_two_sweeps_value(z, q),)
  blocks = lambda: _by_row_blocks(one, logits, targets, _ROW_BLOCKS)[0]
  dtype = jax.eval_shape(_two_sweeps_value, logits, targets).dtype
  return jax.lax.cond(exact, lambda: loss.astype(dtype), blocks)


_cpu_value = _one_call_under_vmap(_cpu_value)


def _cpu_loss(logits, targets):
  """The chain's loss per example, and whether it is exact for the whole batch."""
  top, others = _cpu_sums(logits)
  z = _computed(logits)
  loss = jnp.sum(_chain_weights(targets, z.dtype) * ((top - z) + jnp.log1p(others)), axis=-1)
  if targets.dtype == jnp.bool_:  # Y / |Y|: the count from a copy of its own (0/0: NaN)
    loss = loss / jnp.sum(_chain_weights(targets, z.dtype, jnp.int8), axis=-1)
  return loss, jnp.all(_sums_exact(top[..., 0], others[..., 0]) & ~jnp.isnan(loss))


def _sums_exact(top, others):
  return jnp.isfinite(top) & ((others == 0) | _in_one_sweep_range(others))


def _forward_outputs(logits, targets):
  """The forward rule's loss and per-example residuals (the two sweeps)."""
  loss, (_, _, *numbers) = _forward(logits, targets)
  return loss, *numbers


def _cpu_forward(logits, targets):
  """:func:`_forward_outputs` on XLA:CPU with no argmax and no masked copy of the
  logits (those wrote 2.0x their bytes): reductions that each read the logits (and the
  targets) once and write per-example numbers only. The top class is the largest index
  holding the maximum (:func:`_cpu_top`); ``others`` leaves it out as
  ``min(exp(z_k - top), (k - t)^2)`` (:func:`_left_out` unscaled: 0 at ``t``,
  ``exp <= 1 <= (k - t)^2`` elsewhere); ``rest`` weighs each target by
  ``4 min(|k/4 - t/4|, 1/4)`` (0 at ``t``, 1 elsewhere); ``u = log(others)``. For a
  label mask ``rest`` counts the labels off the top, ``|Y|`` is that count and the top
  class's own entry, and ``1 / |Y|`` is the sixth number (:func:`_as_weights`).

  Each reduction forms its broadcasts in an expression of its own (``z - top`` as
  ``(z/2 - top/2) 2`` here, ``z + (-top)`` for the index, ``top - z`` in the loss): one
  that two of XLA:CPU's reduction fusions shared would be written out, logits-sized.

  Exact under :func:`_cpu_value`'s conditions with a finite loss everywhere (so no
  example is impossible); otherwise the two sweeps, 1/512 of the examples at a time, in
  one ``lax.cond`` (for all instances under ``vmap``)."""
  if not _takes_chain(logits):
    return _forward_outputs(logits, targets)
  z = _computed(logits)
  top, _, one_top = _cpu_top(logits)
  index = one_top * (1 / _INDEX_SCALE)
  classes = jnp.arange(z.shape[-1], dtype=z.dtype)
  d = (z * 0.5 + top * -0.5) * 2.0
  others = jnp.sum(_left_out(jnp.exp(d), index, scale=1.0), axis=-1, keepdims=True)
  loss = jnp.sum(_chain_weights(targets, z.dtype) * ((top - z) + jnp.log1p(others)), axis=-1)
  not_top = jnp.minimum(jnp.abs(classes * 0.25 - (index * 0.25)[..., None]), 0.25)
  rest = jnp.sum(_chain_weights(targets, z.dtype, jnp.int8) * not_top, axis=-1) * 4.0
  extra = ()
  if targets.dtype == jnp.bool_:  # Y / |Y|: |Y| is the rest and the top class's entry
    at_top = jnp.take_along_axis(targets, index.astype(jnp.int32)[..., None], axis=-1)
    count = rest + at_top[..., 0].astype(z.dtype)
    per_label = _per_label(count, z.dtype)
    loss = loss / count  # 0 / 0 for an empty row: NaN, as Y / |Y| gives
    total, rest, extra = count * per_label, rest * per_label, (per_label,)
  else:
    total = jnp.sum(targets, axis=-1)
  top, others = top[..., 0], others[..., 0]
  exact = jnp.all(_sums_exact(top, others) & jnp.isfinite(loss))
  chain = (loss, index.astype(jnp.int32), top, jnp.log(others), total, rest, *extra)
  shapes = jax.eval_shape(_forward_outputs, logits, targets)
  chain = tuple(x.astype(s.dtype) for x, s in zip(chain, shapes))
  blocks = lambda: _by_row_blocks(_forward_outputs, logits, targets, _ROW_BLOCKS)
  return jax.lax.cond(exact, lambda: chain, blocks)


# A custom_vmap is not differentiable: the derivatives of these numbers (grad of grad
# differentiates the forward rule) are the two sweeps'.
_cpu_forward = jax.custom_jvp(_one_call_under_vmap(_cpu_forward))
_cpu_forward.defjvp(lambda primals, tangents: jax.jvp(_forward_outputs, primals, tangents))


@jax.custom_vjp
def _soft_cross_entropy(logits, targets):
  """sum_k q_k (-log p_k) per example; ``targets`` weights or a boolean label mask.

  On XLA:CPU from a chain of sweeps (:func:`_cpu_value`); elsewhere
  ``logsumexp_{k != j} z_k`` comes from ``jax.nn.logsumexp`` (on 16-bit logits as they
  are, converted inside the reductions, so no float32 copy of them is written).
  """
  return jax.lax.platform_dependent(logits, targets, cpu=_cpu_value, default=_two_sweeps_value)


def _soft_cross_entropy_fwd(logits, targets):
  outputs = jax.lax.platform_dependent(logits, targets, cpu=_cpu_forward, default=_forward_outputs)
  return outputs[0], (logits, targets, *outputs[1:])


def _soft_cross_entropy_bwd(residuals, g):
  logits, mask_or_targets, flagged_top, z_top, u, total, rest, *extra = residuals
  if mask_or_targets.dtype == jnp.bool_:  # Y / |Y|, as the forward rule formed it
    targets = mask_or_targets.astype(extra[0].dtype) * extra[0][..., None]
  else:
    targets = mask_or_targets
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
