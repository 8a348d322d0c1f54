"""The naive forms of the complement likelihood, kept to show how they fail.

Do not train with these. Each is what a literal transcription of
``-log(1 - p_l)`` gives; :func:`jaxsoftmax.losses.complement_nll` is the exact form.
In float32, once the model is confidently wrong (a logit gap past about 17 to 20,
where ``p_l`` rounds to 1):

- :func:`log1m_softmax` returns inf, and its gradient is NaN;
- :func:`clipped_log1m_softmax` (probabilities clipped to ``[eps, 1 - eps]``, the
  Keras recipe) returns a constant ``-log(eps)`` with an exactly zero gradient, so
  the model never learns from the example;
- :func:`difference_of_logsumexps` (``logsumexp(z) - logsumexp_{k != l} z``) keeps
  the large-loss regime but returns exactly 0 where the true loss is tiny.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

KERAS_EPSILON = 1e-7


def _prob(logits, labels):
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.take_along_axis(probs, jnp.asarray(labels)[..., None], axis=-1)[..., 0]


def log1m_softmax(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """``-log(1 - softmax(z)_l)``, written literally."""
  return -jnp.log(1.0 - _prob(logits, labels))


def clipped_log1m_softmax(
  logits: ArrayLike, labels: ArrayLike, *, eps: float = KERAS_EPSILON
) -> jax.Array:
  """``-log(1 - clip(softmax(z)_l, eps, 1 - eps))``, the Keras-style clipped form."""
  return -jnp.log(1.0 - jnp.clip(_prob(logits, labels), eps, 1.0 - eps))


def difference_of_logsumexps(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """``logsumexp(z) - logsumexp_{k != l}(z)``, the literal difference."""
  logits = jnp.asarray(logits)
  others = jnp.arange(logits.shape[-1]) != jnp.asarray(labels)[..., None]
  return jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1, where=others)
