"""Losses for one label per example: positive (``nll``) and negative feedback."""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks
from jaxsoftmax.losses._partition import _partition_nll


def _label_loss(logits, labels, where, complement):
  logits = _checks.as_logits(logits)
  labels = _checks.as_labels(labels, logits)
  logits = _checks.apply_where(logits, where)
  return _partition_nll(logits, labels, complement)


def nll(
    logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
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
    logits: ``[..., K]`` floating logits, classes on the last axis. bfloat16 and
      float16 compute in float32.
    labels: ``[...]`` integer labels in ``[0, K)``, any integer dtype. Eagerly, a
      label out of range raises ``ValueError``; under ``jit`` that example's loss
      and gradient are NaN.
    where: optional boolean mask broadcastable to ``[..., K]``; excluded classes
      have probability 0 and get a zero gradient.

  Returns:
    ``[...]`` per-example losses, no reduction; float32 for low-precision logits.
    The loss is +inf only where ``p_y`` is exactly 0 (the label's logit is -inf
    or excluded by ``where``); the gradient of such an example is zero. An example
    with no admissible class gives NaN with a zero gradient.

  Only reverse-mode differentiation is defined (``jax.custom_vjp``): ``jax.jvp``
  and ``jax.jacfwd`` raise a ``TypeError``; use ``jax.grad`` or ``jax.jacrev``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import nll
    >>> print(nll(jnp.array([[2.0, 0.0, -1.0], [30.0, 0.0, 0.0]]), jnp.array([0, 0])))
    [1.6985e-01 1.8715e-13]

  Reference: the multinomial logistic (softmax) log-likelihood, e.g. Bishop,
  *Pattern Recognition and Machine Learning* (2006), eq. 4.108.
  """
  return _label_loss(logits, labels, where, complement=False)


def complement_nll(
    logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
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
    logits: ``[..., K]`` floating logits, classes on the last axis. bfloat16 and
      float16 compute in float32.
    labels: ``[...]`` integer labels known to be wrong, in ``[0, K)``. Eagerly, a
      label out of range raises ``ValueError``; under ``jit`` that example's loss
      and gradient are NaN.
    where: optional boolean mask broadcastable to ``[..., K]``; excluded classes
      have probability 0 and get a zero gradient.

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
  return _label_loss(logits, labels, where, complement=True)


def negated_nll(
    logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
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
    logits: ``[..., K]`` floating logits, classes on the last axis.
    labels: ``[...]`` integer labels in ``[0, K)``; out-of-range labels as in
      :func:`nll`.
    where: optional boolean mask broadcastable to ``[..., K]``.

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
  return -_label_loss(logits, labels, where, complement=False)
