"""Losses for one label per example: positive (``nll``) and negative feedback."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks
from jaxsoftmax.losses._partition import _partition_nll
from jaxsoftmax.losses._soft import _soft_cross_entropy


def label_inputs(
  logits, labels, where, axis, ignore_index, keep_dtype=False
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
  """Checked inputs of a label loss: ``(logits, labels, where, kept, ignored)`` with the
  class axis last, excluded classes at -inf and padding labels replaced by 0 (16-bit
  logits left as they are with ``keep_dtype``, for the partition kernel)."""
  logits = _checks.as_logits(logits, keep_dtype=keep_dtype)
  axis = _checks.class_axis(axis, logits)
  where = _checks.as_where(where, logits, axis)
  shape = logits.shape
  logits = _checks.move_to_last(logits, axis)
  labels, ignored = _checks.as_labels(labels, logits, ignore_index=ignore_index, logits_shape=shape)
  logits, kept = _checks.apply_where(logits, where)
  return logits, labels, where, kept, ignored


def _label_loss(logits, labels, where, axis, ignore_index, complement, label_smoothing=0.0):
  logits, labels, where, kept, ignored = label_inputs(
    logits, labels, where, axis, ignore_index, keep_dtype=not label_smoothing
  )
  if label_smoothing:
    loss = _smoothed_nll(logits, labels, where, label_smoothing)
  else:
    loss = _partition_nll(logits, labels, complement)
  return _checks.finish(loss, kept, ignored)


def _smoothed_nll(logits, labels, where, eps):
  """Cross-entropy against ``(1 - eps) onehot(y) + eps / K'`` (K' admissible classes).

  The soft kernel forms every ``-log p_k`` without cancellation, so the loss keeps its
  relative precision when it is tiny. An invalid label (-1) gets NaN targets: NaN loss
  and gradient for that example, as without smoothing.
  """
  num_classes = logits.shape[-1]
  admissible = jnp.ones((num_classes,), bool) if where is None else where
  count = jnp.sum(admissible, axis=-1, keepdims=True)
  uniform = jnp.where(admissible, eps / jnp.maximum(count, 1), 0.0)
  onehot = labels[..., None] == jnp.arange(num_classes)
  targets = jnp.where(onehot, 1.0 - eps, 0.0) + uniform
  targets = jnp.where((labels >= 0)[..., None], targets, jnp.nan).astype(logits.dtype)
  return _soft_cross_entropy(logits, targets)


def _check_smoothing(label_smoothing):
  if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
    raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}.")
  return float(label_smoothing)


def nll(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
  ignore_index: int | None = None,
  label_smoothing: float = 0.0,
) -> jax.Array:
  r"""Softmax negative log-likelihood of the label, ``-log p(y = label | x)``.

  .. math::
    \ell = \operatorname{logsumexp}_k z_k - z_y
         = \operatorname{softplus}\big(\operatorname{logsumexp}_{k \ne y} z_k - z_y\big)

  The right-hand form keeps full relative precision when the loss is tiny
  (``p_y -> 1``), where the literal difference rounds to 0. The gradient with
  respect to the logits is ``softmax(z) - onehot(y)``, with ``1 - p_y`` computed as
  ``sigmoid(logsumexp_{k != y} z_k - z_y)``.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis`` (the last by
      default). bfloat16 and float16 compute in float32.
    labels: ``[...]`` integer labels in ``[0, K)``, any integer dtype. Eagerly, a
      label out of range raises ``ValueError``; under ``jit`` that example's loss
      and gradient are NaN.
    where: optional boolean mask, read as in optax: with as many dimensions as the
      logits it masks entries (``[1, K]`` masks classes in every example); with fewer
      it masks examples (``[...]``, expanded at the class axis). Excluded classes have
      probability 0 and get a zero gradient; an example that ``where`` excludes
      entirely has loss 0 and a zero gradient, as in optax.
    axis: the class axis of ``logits`` (default -1), or a tuple of axes whose
      entries together are the classes (a label is a flat index into them), as in optax.
    ignore_index: a label value that marks padding (e.g. -100, as in PyTorch): those
      examples have loss 0 and a zero gradient, eagerly and under ``jit``.
    label_smoothing: ``eps`` in ``[0, 1)``: the loss becomes
      ``(1 - eps) * nll + eps * mean_k(-log p_k)`` over the admissible classes, with
      gradient ``softmax(z) - ((1 - eps) onehot(y) + eps / K)``, exact in the tiny-loss
      regime like the rest (every ``-log p_k`` is formed without cancellation).

  Returns:
    ``[...]`` per-example losses, no reduction; float32 for low-precision logits.
    The loss is +inf only where ``p_y`` is exactly 0: the label's logit is -inf
    or excluded by ``where`` (the gradient is then zero), or another logit is +inf
    (the gradient is then its limit, ``softmax - onehot``). A NaN among an
    example's admissible logits gives a NaN loss and gradient.

  Only reverse-mode differentiation is defined (``jax.custom_vjp``): ``jax.jvp``
  and ``jax.jacfwd`` raise a ``TypeError``; use ``jax.grad`` or ``jax.jacrev``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import nll
    >>> print(nll(jnp.array([[2.0, 0.0, -1.0], [30.0, 0.0, 0.0]]), jnp.array([0, 0])))
    [1.6985e-01 1.8715e-13]

    A padded batch: the padding label's example costs 0 and gets a zero gradient.

    >>> z, y = jnp.array([[2.0, 1.0, 0.0], [0.5, 0.1, 0.2]]), jnp.array([0, -100])
    >>> print(nll(z, y, ignore_index=-100))
    [0.4076 0.    ]

  Reference: the multinomial logistic (softmax) log-likelihood, e.g. Bishop,
  *Pattern Recognition and Machine Learning* (2006), eq. 4.108.
  """
  label_smoothing = _check_smoothing(label_smoothing)
  return _label_loss(logits, labels, where, axis, ignore_index, False, label_smoothing)


def complement_nll(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Complement likelihood of a negative example, ``-log p(y != label | x)``.

  For the feedback "for x, ``label`` is wrong":

  .. math::
    \ell = -\log(1 - p_l) = \operatorname{logsumexp}_k z_k - \operatorname{logsumexp}_{k \ne l} z_k
         = \operatorname{softplus}\big(z_l - \operatorname{logsumexp}_{k \ne l} z_k\big)

  Bounded below by 0; its gradient ``p_l * (onehot(l) - softmax_{k != l}(z))``
  switches itself off once ``p_l`` is small and stays of order 1 while the model
  is confidently wrong (``p_l -> 1``), where ``log(1 - softmax)`` gives inf and
  clipping gives a zero gradient. Finite for every finite logit vector.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis`` (the last by
      default). bfloat16 and float16 compute in float32.
    labels: ``[...]`` integer labels known to be wrong, in ``[0, K)``. Eagerly, a
      label out of range raises ``ValueError``; under ``jit`` that example's loss
      and gradient are NaN.
    where: optional boolean mask, read as in optax: with as many dimensions as the
      logits it masks entries (``[1, K]`` masks classes in every example); with fewer
      it masks examples (``[...]``, expanded at the class axis). Excluded classes have
      probability 0 and get a zero gradient; an example that ``where`` excludes
      entirely has loss 0 and a zero gradient, as in optax.
    axis: the class axis of ``logits`` (default -1), or a tuple of axes whose
      entries together are the classes (a label is a flat index into them), as in optax.
    ignore_index: a label value that marks padding (e.g. -100, as in PyTorch): those
      examples have loss 0 and a zero gradient, eagerly and under ``jit``.

  Returns:
    ``[...]`` per-example losses, no reduction. +inf only where ``p_l`` is exactly
    1 (every other class excluded or at -inf), with a zero gradient there.

  Only reverse-mode differentiation is defined (``jax.custom_vjp``): ``jax.jvp``
  and ``jax.jacfwd`` raise a ``TypeError``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import complement_nll
    >>> print(complement_nll(jnp.array([[2.0, 0.0, -1.0], [-30.0, 0.0, 0.0]]), jnp.array([0, 0])))
    [1.8566e+00 4.6788e-14]

  Reference: SCL-NL, Chou et al., "Unbiased Risk Estimators Can Mislead: A Case
  Study of Learning with Complementary Labels", ICML 2020; the negative-learning
  loss of Kim et al., "NLNL: Negative Learning for Noisy Labels", ICCV 2019.
  """
  return _label_loss(logits, labels, where, axis, ignore_index, complement=True)


def negated_nll(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  axis: int | tuple[int, ...] = -1,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""The naive "negate the gradient" objective for a negative example: ``+log p(y = label | x)``.

  .. math::
    \ell = \log p_l = z_l - \operatorname{logsumexp}_k z_k = -\,\mathrm{nll}(z, l)

  Minimising it is gradient ascent on the NLL of the wrong label. It is unbounded
  below: the loss tends to -inf as ``p_l -> 0`` and its gradient never switches
  off, so the logit gap grows without limit and training diverges. It is kept so
  that experiments can show this; train on negative examples with
  :func:`complement_nll` instead.

  Args:
    logits: ``[..., K]`` floating logits, classes on ``axis`` (the last by
      default).
    labels: ``[...]`` integer labels in ``[0, K)``; out-of-range labels as in
      :func:`nll`.
    where: optional boolean mask, read as in optax: with as many dimensions as the
      logits it masks entries (``[1, K]`` masks classes in every example); with fewer
      it masks examples (``[...]``, expanded at the class axis). Excluded classes have
      probability 0 and get a zero gradient; an example that ``where`` excludes
      entirely has loss 0 and a zero gradient, as in optax.
    axis: the class axis of ``logits`` (default -1), or a tuple of axes whose
      entries together are the classes (a label is a flat index into them), as in optax.
    ignore_index: a label value that marks padding (e.g. -100, as in PyTorch): those
      examples have loss 0 and a zero gradient, eagerly and under ``jit``.

  Returns:
    ``[...]`` per-example values ``log p_l`` (at most 0; -inf where ``p_l = 0``,
    with a zero gradient there).

  Only reverse-mode differentiation is defined (``jax.custom_vjp``).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import negated_nll
    >>> print(negated_nll(jnp.array([[2.0, 0.0, -1.0], [-30.0, 0.0, 0.0]]), jnp.array([0, 0])))
    [ -0.1698 -30.6931]

  Reference: the unbounded negative term of the unbiased complementary-label risk
  estimator, Ishida et al., "Complementary-Label Learning for Arbitrary Losses and
  Models", ICML 2019; "gradient ascent" unlearning, whose collapse is analysed by
  Zhang et al., "Negative Preference Optimization", 2024.
  """
  return -_label_loss(logits, labels, where, axis, ignore_index, complement=False)
