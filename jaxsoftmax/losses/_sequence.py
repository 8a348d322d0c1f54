"""Sequence-level losses: the likelihood of a whole answer, and of any answer but it.

For an answer ``a = (a_1, ..., a_T)`` scored by next-token logits, ``L = -log P(a) =
sum_t -log p(a_t)`` is the sum of the token losses (each exact, from the label kernel).
A judged-wrong answer calls for the complement likelihood

    -log(1 - P(a)) = -log(-expm1(-L)),

written as ``-log(-expm1(-L))`` while ``L <= log 2`` (P >= 1/2: the model is sure of the
wrong answer, and ``1 - P`` is formed without cancellation by ``expm1``) and as
``-log1p(-exp(-L))`` beyond (P small: the loss is tiny and keeps its relative
precision). Its derivative in ``L`` is ``-1/expm1(L)``, finite and non-zero for every
``L > 0``: about ``-1/L`` when the wrong answer is nearly certain and ``-exp(-L)`` when it
is unlikely. The textbook ``-log(1 - exp(-L))`` is +inf once ``P`` rounds to 1 (``L <
6e-8`` in float32), and ``1 - prod_t p_t`` is 0 there.

The set version scores several distinct wrong answers of one prompt at once:
``-log(1 - sum_j P(a_j))``, with ``sum_j P(a_j) = exp(-L_S)`` and ``L_S = -logsumexp_j(-L_j)``
formed as ``min_j L_j - log1p(sum of the others' exp(min - L_j))``, exact when one answer
holds nearly all the mass; an answer repeated among the slots counts once.

Each kernel is a ``jax.custom_vjp`` composed with the exact token kernels, so the
gradient is ``-1/expm1(L)`` times the token losses' gradients, and its own derivative
(``exp(L) / expm1(L)^2``, formed as ``1 / (expm1(L) (-expm1(-L)))``) is exact too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks
from jaxsoftmax.losses._fused import fused_nll
from jaxsoftmax.losses._label import nll

_LOG2 = float(np.log(2.0))


@jax.custom_jvp
def _slope(nll_sum: jax.Array) -> jax.Array:
  """``d/dL -log(1 - exp(-L)) = -1/expm1(L)``; 0 at ``L = 0`` (the loss is +inf there, and
  the gradient is zero by the losses' convention) and at ``L = inf``; NaN for NaN."""
  safe = jnp.where(nll_sum > 0, nll_sum, 1.0)
  slope = jnp.where(nll_sum > 0, -1.0 / jnp.expm1(safe), 0.0)
  return jnp.where(jnp.isnan(nll_sum), jnp.nan, slope)  # NaN in, NaN gradient out


@_slope.defjvp
def _slope_jvp(primals, tangents):
  (nll_sum,), (d,) = primals, tangents
  slope = _slope(nll_sum)
  # d/dL (-1/expm1(L)) = exp(L)/expm1(L)^2 = -slope / (-expm1(-L)): no inf / inf at large L.
  safe = jnp.where(nll_sum > 0, nll_sum, 1.0)
  curvature = jnp.where(nll_sum > 0, -slope / -jnp.expm1(-safe), 0.0)
  return slope, curvature * d


def _complement_value(nll_sum: jax.Array) -> jax.Array:
  """``-log(1 - exp(-L))`` per entry, exact at every magnitude of ``L >= 0``."""
  small = nll_sum <= _LOG2
  near = -jnp.log(-jnp.expm1(-jnp.where(small, nll_sum, _LOG2)))  # P >= 1/2
  far = -jnp.log1p(-jnp.exp(-jnp.where(small, _LOG2, nll_sum)))  # P < 1/2
  return jnp.where(small, near, far)


@jax.custom_vjp
def _complement_of_nll(nll_sum: jax.Array) -> jax.Array:
  """:func:`_complement_value` with the gradient ``-1/expm1(L)``, exact at every ``L``."""
  return _complement_value(nll_sum)


def _complement_of_nll_fwd(nll_sum):
  # The plain function, not the custom_vjp one: a forward rule that calls its own
  # custom_vjp function cannot be differentiated forwards (jax.hessian of the loss).
  return _complement_value(nll_sum), nll_sum


def _complement_of_nll_bwd(nll_sum, g):
  return (_checks.zero_where_no_cotangent(g, _slope(nll_sum)),)


_complement_of_nll.defvjp(_complement_of_nll_fwd, _complement_of_nll_bwd)


def _token_mask(tokens, where, ignore_index):
  """The tokens that count (``where`` and not ``ignore_index``), or None for all."""
  mask = None
  if where is not None:
    mask = jnp.broadcast_to(
      _checks.boolean_mask_for(where, tokens.shape, f"the tokens' shape {tokens.shape}"),
      tokens.shape,
    )
  if ignore_index is not None:
    kept = jnp.asarray(tokens) != ignore_index
    mask = kept if mask is None else mask & kept
  return mask


def _as_tokens(tokens: ArrayLike) -> jax.Array | np.ndarray:
  """Token ids as they are checked: a JAX array (or tracer) kept, anything else as NumPy, so
  that an id JAX would wrap when it casts is seen first."""
  return tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)


def _check_sequence(logits, what="logits") -> jax.Array:
  logits = _checks.as_logits(logits, name=what, keep_dtype=True)
  if logits.ndim < 2:
    raise ValueError(
      f"{what} has shape {logits.shape}: a sequence loss needs [..., T, V] (a time axis "
      "and a class axis)."
    )
  return logits


def _token_losses(logits, tokens, mask):
  """:func:`nll` of every token; an excluded one's id is replaced by 0 first (padding may
  hold any value), and its loss by 0 after (so it gets a zero gradient)."""
  if mask is not None:
    tokens = jnp.where(mask, tokens, 0)
  return _sum_over_time(nll(logits, tokens), mask)


def _sum_over_time(token_losses, mask):
  if mask is not None:
    token_losses = jnp.where(mask, token_losses, 0.0)
  return jnp.sum(token_losses, axis=-1)


def sequence_nll(
  logits: ArrayLike,
  tokens: ArrayLike,
  *,
  where: ArrayLike | None = None,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Negative log-likelihood of a whole sequence, ``-log P(a) = -sum_t log p(a_t)``.

  Args:
    logits: ``[..., T, V]`` floating next-token logits (16-bit compute in float32).
    tokens: ``[..., T]`` integer token ids in ``[0, V)``.
    where: optional boolean mask broadcastable to ``[..., T]``: the answer's tokens (a
      prompt's or padding's are excluded: their loss is 0, their gradient zero).
    ignore_index: a token value that marks padding (e.g. -100), excluded likewise.

  Returns:
    ``[...]`` per-sequence losses ``L >= 0``; the sum of :func:`nll` over the kept tokens.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import sequence_nll
    >>> z = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))  # P(a = (0, 0)) = 0.45
    >>> print(sequence_nll(z, jnp.array([[0, 0]])))
    [0.7985]
  """
  logits = _check_sequence(logits)
  tokens = _as_tokens(tokens)
  mask = _token_mask(tokens, where, ignore_index)
  return _token_losses(logits, tokens, mask)


def sequence_complement_nll(
  logits: ArrayLike,
  tokens: ArrayLike,
  *,
  where: ArrayLike | None = None,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Complement likelihood of a judged-wrong sequence, ``-log(1 - P(a))``.

  .. math::
    \ell = -\log\big(1 - e^{-L}\big) = -\log\big(-\operatorname{expm1}(-L)\big),
    \qquad L = -\sum_t \log p(a_t),
    \qquad \frac{\partial \ell}{\partial L} = \frac{-1}{\operatorname{expm1}(L)}

  The sequence-level analogue of :func:`complement_nll`: bounded below by 0, its
  gradient switches itself off once the answer is unlikely and stays large while the
  model is sure of it. Finite with a non-zero gradient for every ``L > 0`` whose
  ``exp(-L)`` float32 represents (``1e-8 <= L <= 87``); +inf with a zero gradient only
  where ``P(a)`` is exactly 1.

  Args:
    logits: ``[..., T, V]`` floating next-token logits (16-bit compute in float32).
    tokens: ``[..., T]`` integer token ids of the wrong answer, in ``[0, V)``.
    where: optional boolean mask broadcastable to ``[..., T]``: the answer's tokens.
    ignore_index: a token value that marks padding, excluded likewise.

  Returns:
    ``[...]`` per-sequence losses. Only reverse-mode differentiation is defined.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import sequence_complement_nll
    >>> z = jnp.array([[[30.0, 0.0], [30.0, 0.0]]])  # P(a = (0, 0)) = 1 - 1.9e-13
    >>> print(sequence_complement_nll(z, jnp.array([[0, 0]])))
    [29.3069]

  Reference: the sequence-level unlikelihood of a negative sample, e.g. the complement
  likelihood of Welleck et al., "Neural Text Generation with Unlikelihood Training",
  ICLR 2020, taken over the whole answer.
  """
  return _complement_of_nll(sequence_nll(logits, tokens, where=where, ignore_index=ignore_index))


def _set_nll_sum(per_answer: jax.Array, kept: jax.Array) -> jax.Array:
  """``-log sum_j exp(-L_j)`` over the kept answers, +inf for none: the smallest ``L``
  minus ``log1p`` of the others' ratios to it (no cancellation when one dominates)."""
  big = jnp.where(kept, per_answer, jnp.inf)
  top = jnp.argmin(big, axis=-1)[..., None] == jnp.arange(big.shape[-1])
  lead = jnp.sum(jnp.where(top, big, 0.0), axis=-1, keepdims=True)  # the smallest L
  finite = jnp.isfinite(lead)
  safe_lead = jnp.where(finite, lead, 0.0)
  ratios = jnp.exp(safe_lead - jnp.where(top | ~kept, safe_lead, big))  # exp(L_top - L_j)
  rest = jnp.sum(jnp.where(top | ~kept, 0.0, ratios), axis=-1)
  return jnp.where(finite[..., 0], safe_lead[..., 0] - jnp.log1p(rest), jnp.inf)


def _distinct(tokens, mask):
  """``[..., J]``: the answers that count: not empty, and not a repeat of an earlier slot
  (the same tokens at the same kept positions)."""
  mask = jnp.ones(tokens.shape, bool) if mask is None else mask
  same_tokens = jnp.all(
    (tokens[..., :, None, :] == tokens[..., None, :, :]) | ~mask[..., :, None, :], axis=-1
  ) & jnp.all(mask[..., :, None, :] == mask[..., None, :, :], axis=-1)
  j = tokens.shape[-2]
  earlier = jnp.tril(jnp.ones((j, j), bool), -1)
  repeated = jnp.any(same_tokens & earlier, axis=-1)
  return jnp.any(mask, axis=-1) & ~repeated


def sequence_complement_set_nll(
  logits: ArrayLike,
  tokens: ArrayLike,
  *,
  where: ArrayLike | None = None,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Complement likelihood of several wrong answers of one prompt, ``-log(1 - sum_j P(a_j))``.

  With ``L_S = -log sum_j P(a_j)`` over the distinct answers, the loss is
  ``-log(-expm1(-L_S))``, exact as :func:`sequence_complement_nll`. An answer repeated in
  another slot counts once; a slot whose tokens are all excluded (padding) is no answer,
  and an example with none has loss 0.

  Args:
    logits: ``[..., J, T, V]`` floating next-token logits, one row per answer slot.
    tokens: ``[..., J, T]`` integer token ids of the wrong answers.
    where: optional boolean mask broadcastable to ``[..., J, T]``: each answer's tokens.
    ignore_index: a token value that marks padding, excluded likewise.

  Returns:
    ``[...]`` per-prompt losses; +inf with a zero gradient only where the answers'
    probabilities sum to exactly 1.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import sequence_complement_set_nll
    >>> z = jnp.log(jnp.full((1, 2, 1, 4), 0.25))   # two one-token answers, 1/4 each
    >>> print(sequence_complement_set_nll(z, jnp.array([[[0], [3]]])))  # -log(1/2)
    [0.6931]
  """
  z = _check_sequence(logits)
  if z.ndim < 3:
    raise ValueError(
      f"logits has shape {z.shape}: the set loss needs [..., J, T, V] (an answer axis, "
      "a time axis and a class axis)."
    )
  tokens = _as_tokens(tokens)
  mask = _token_mask(tokens, where, ignore_index)
  return _complement_of_answers(_token_losses(z, tokens, mask), tokens, mask)


def _complement_of_answers(per_answer, tokens, mask):
  """``-log(1 - sum_j P(a_j))`` over the distinct answers, 0 where there is none."""
  kept = _distinct(jnp.asarray(tokens), mask)
  loss = _complement_of_nll(_set_nll_sum(per_answer, kept))
  return jnp.where(jnp.any(kept, axis=-1), loss, 0.0)


def fused_sequence_nll(
  h: ArrayLike,
  w: ArrayLike,
  tokens: ArrayLike,
  *,
  where: ArrayLike | None = None,
  ignore_index: int | None = None,
  **fused,
) -> jax.Array:
  """:func:`sequence_nll` of ``h @ w + bias`` without forming the logits: ``h [..., T, D]``,
  ``w [D, V]``; the other keywords (``bias``, ``soft_cap``, ``z_loss``, ``vocab_chunk``,
  ``token_chunk``, ``vocab_axis_name``) as for :func:`fused_nll`."""
  per_token = fused_nll(h, w, tokens, where=where, ignore_index=ignore_index, **fused)
  return jnp.sum(per_token, axis=-1)


def fused_sequence_complement_nll(
  h: ArrayLike,
  w: ArrayLike,
  tokens: ArrayLike,
  *,
  where: ArrayLike | None = None,
  ignore_index: int | None = None,
  **fused,
) -> jax.Array:
  """:func:`sequence_complement_nll` of ``h @ w + bias`` without forming the logits
  (``h [..., T, D]``, ``w [D, V]``; keywords as for :func:`fused_nll`)."""
  nll_sum = fused_sequence_nll(h, w, tokens, where=where, ignore_index=ignore_index, **fused)
  return _complement_of_nll(nll_sum)


def fused_sequence_complement_set_nll(
  h: ArrayLike,
  w: ArrayLike,
  tokens: ArrayLike,
  *,
  where: ArrayLike | None = None,
  ignore_index: int | None = None,
  **fused,
) -> jax.Array:
  """:func:`sequence_complement_set_nll` of ``h @ w + bias`` without forming the logits:
  ``h [..., J, T, D]``, ``tokens [..., J, T]`` (keywords as for :func:`fused_nll`)."""
  tokens_np = _as_tokens(tokens)
  if tokens_np.ndim < 2:
    raise ValueError(f"tokens has shape {tokens_np.shape}: the set loss needs [..., J, T].")
  mask = _token_mask(tokens_np, where, ignore_index)
  per_answer = fused_sequence_nll(h, w, tokens, where=mask, ignore_index=ignore_index, **fused)
  return _complement_of_answers(per_answer, tokens_np, mask)
