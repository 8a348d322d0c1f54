"""Sigmoid (binary) cross-entropy for non-exclusive classes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks


def _terms(logits, targets):
  # softplus(+-z) is the two-term logsumexp log(exp(0) + exp(+-z)). An infinite
  # side whose weight is exactly 0 is replaced by 0 before the product, so 0 * inf
  # never arises at z = +-inf, and the product stays linear in the targets (the
  # forward pass is differentiated again for second derivatives).
  up = jax.nn.softplus(-logits)
  down = jax.nn.softplus(logits)
  up = jnp.where((targets == 0) & jnp.isinf(up), 0.0, up)
  down = jnp.where((targets == 1) & jnp.isinf(down), 0.0, down)
  return targets * up + (1 - targets) * down


@jax.custom_vjp
def _sigmoid_cross_entropy(logits, targets):
  return _terms(logits, targets)


def _sigmoid_cross_entropy_fwd(logits, targets):
  return _terms(logits, targets), (logits, targets)


def _sigmoid_cross_entropy_bwd(residuals, g):
  logits, targets = residuals
  # sigmoid(z) - t written as (1 - t) sigmoid(z) - t sigmoid(-z): exact in both tails.
  # sigmoid is 0 or 1 at z = +-inf, so no product here is 0 * inf.
  grad = (1 - targets) * _checks.sigmoid(logits) - targets * _checks.sigmoid(-logits)
  impossible = ((targets != 0) & (logits == -jnp.inf)) | ((targets != 1) & (logits == jnp.inf))
  grad = jnp.where(impossible, 0.0, grad)
  # d/dt [t softplus(-z) + (1 - t) softplus(z)] = softplus(-z) - softplus(z) = -z.
  return (_checks.zero_where_no_cotangent(g, grad), _checks.zero_where_no_cotangent(g, -logits))


_sigmoid_cross_entropy.defvjp(_sigmoid_cross_entropy_fwd, _sigmoid_cross_entropy_bwd)
_sigmoid_cross_entropy = _checks.compiled(_sigmoid_cross_entropy, ())


def sigmoid_binary_cross_entropy(
  logits: ArrayLike, targets: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  r"""Elementwise sigmoid cross-entropy, for classes that are not exclusive.

  .. math::
    \ell_k = t_k \operatorname{softplus}(-z_k) + (1 - t_k) \operatorname{softplus}(z_k)
           = -t_k \log \sigma(z_k) - (1 - t_k) \log(1 - \sigma(z_k))

  with gradient ``sigmoid(z) - t`` computed as ``(1 - t) sigmoid(z) - t sigmoid(-z)``,
  so neither a tiny loss nor its gradient is lost to rounding, and the gradient
  stays of order 1 while the loss is large. The gradient with respect to the
  targets is ``-z``.

  Args:
    logits: ``[..., K]`` floating logits.
    targets: ``[..., K]`` targets in ``[0, 1]``: floating, or boolean/integer 0/1.
    where: optional boolean mask, read as optax reads one for the softmax losses:
      with as many dimensions as the logits it masks entries; with fewer it masks
      examples (``[...]``, expanded at the last axis). An excluded entry has
      probability 0 (its logit is taken as -inf): loss 0 for target 0, zero gradient.

  Returns:
    ``[..., K]`` elementwise losses, no reduction (like optax). +inf only where
    the target's event has probability exactly 0, with a zero gradient there.

  Only reverse-mode differentiation is defined (``jax.custom_vjp``).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import sigmoid_binary_cross_entropy
    >>> print(sigmoid_binary_cross_entropy(jnp.array([30.0, -2.0]), jnp.array([1.0, 1.0])))
    [9.3576e-14 2.1269e+00]

  Reference: logistic regression log-likelihood, e.g. Bishop, *Pattern Recognition
  and Machine Learning* (2006), eq. 4.90.
  """
  logits = _checks.as_logits(logits)
  targets = jnp.asarray(targets)
  if targets.dtype == jnp.bool_ or jnp.issubdtype(targets.dtype, jnp.integer):
    targets = targets.astype(logits.dtype)
  targets = _checks.as_targets(targets, logits)
  if where is not None:
    logits = _checks.apply_where(logits, _checks.as_where(where, logits, logits.ndim - 1))[0]
  return _sigmoid_cross_entropy(logits, targets)
