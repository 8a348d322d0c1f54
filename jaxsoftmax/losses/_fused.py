"""Fused linear + softmax-family losses that never hold the ``[tokens, vocabulary]`` logits.

With ``z = h @ w + bias`` (optionally soft-capped, ``c * tanh(z / c)``) and a set S of
columns per token (its label, or a padded list of token ids), the kernel streams over
vocabulary chunks of ``w`` and keeps, per token, the running logsumexp of the columns
outside S (``b``, a running maximum and sum) and the logits of S's members. Then, as in
:mod:`jaxsoftmax.losses._partition`, with ``a = logsumexp_{k in S} z_k``:

    nll, set_nll:                      -log P(S)     = softplus(b - a)
    complement_nll, complement_set_nll: -log(1 - P(S)) = softplus(a - b)

Each side has its own maximum, so the losses are exact in float32 where
``logsumexp(z) - z_l`` or ``log(1 - exp(-nll))`` is not: ``complement_nll`` stays finite
and accurate after ``p_l`` rounds to 1, and a loss of 1e-9 is not rounded to 0.

The backward pass recomputes each chunk's logits and forms its gradient

    dz_k = P(not S) * exp(z_k - b)                 k not in S
    dz_k = -P(not S) * exp(z_k - a)                k in S       (swapped for complements)

plus the z-loss term ``2 * z_loss * lse * p_k``, so the residuals are ``h``, ``w``, the
members and two logsumexps per token: never ``[N, V]``. For bfloat16, float16 and float32
``h`` and ``w`` the chunk's logits are float32 products (``preferred_element_type``), the
logit gradient is formed in float32 and enters the two gradient products in the dtype of
``h`` and ``w`` (as in any mixed-precision matmul), the products accumulate in float32,
the input gradient is accumulated across chunks in float32, and each chunk's weight and
bias gradient is written once: nothing is summed in bfloat16 (float64 inputs compute in
float64).

A vocabulary that is not a multiple of the chunk size ends with one smaller chunk of
the columns left (its own static size): no padding column enters a logsumexp and ``w``
is never copied into a padded buffer.

The tokens go in blocks of at most ``token_chunk``, each streaming over the vocabulary
(in the backward pass, each chunk of columns over the blocks, so that its weight
gradient is summed in float32 and written once). The working memory is then a few
``[token_chunk, vocab_chunk]`` buffers whatever the number of tokens. The blocks are
strided (block ``i`` holds tokens ``i, i + count, ..``), so that under ``jit`` with the
token axis sharded each device works on its own rows; inside ``shard_map``, where the
tokens are the device's own, they are contiguous (:func:`_split_tokens`).

``vocab_axis_name`` runs the same kernel on one shard of the vocabulary inside
``shard_map``: the per-token logsumexps and the members' logits are combined across the
named axis (``pmax`` and ``psum``), and the input gradient is summed across it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks
from jaxsoftmax.losses._partition import _log


def _sweep(body, carry, vocab: int, chunk: int):
  """``body(carry, start, size)`` over the vocabulary: a ``lax.scan`` over the
  ``vocab // chunk`` full chunks, then once over the ``vocab % chunk`` columns left, if
  any (a chunk of their own static size: no padding column, no column seen twice)."""
  chunk = min(chunk, vocab)
  full, rest = divmod(vocab, chunk)
  if full == 1:
    carry = body(carry, 0, chunk)
  else:
    carry, _ = jax.lax.scan(lambda c, i: (body(c, i * chunk, chunk), None), carry, jnp.arange(full))
  if rest:
    carry = body(carry, full * chunk, rest)
  return carry


def _token_blocks(n: int, token_chunk: int):
  """``(count, rest)``: the first ``n - rest`` tokens form ``count`` blocks of at most
  ``token_chunk`` tokens (strided or contiguous, :func:`_split_tokens`), the last
  ``rest`` are streamed in blocks of their own. ``count`` divides ``n`` where a divisor
  is near (``rest = 0``)."""
  if n <= token_chunk:
    return 1, 0
  least = -(-n // token_chunk)
  for count in range(least, 2 * least + 1):
    if n % count == 0:
      return count, 0
  return least, n % least


def _block_axis(contiguous: bool) -> int:
  """The axis of a split array's head that numbers its blocks (:func:`_split_tokens`)."""
  return 0 if contiguous else 1


def _split_tokens(x, token_chunk, contiguous):
  """``x`` ``[N, ...]`` laid out in blocks of at most ``token_chunk`` tokens: ``x`` itself
  if it is one block, else ``(head, tail)``: ``head`` the first ``N - rest`` tokens as
  ``[(N - rest) / count, count, ...]`` bits (:func:`_as_bits`; strided block ``i`` is
  ``head[:, i]``, a free reshape), or as ``[count, (N - rest) / count, ...]`` for
  ``contiguous`` blocks (block ``i`` is ``head[i]``), ``tail`` the last ``rest`` laid out
  the same way (an empty array if none).

  Strided blocks (block ``i``: tokens ``i, i + count, ..``) keep a token axis sharded by
  ``jit`` on its devices (each takes its own rows of every block). Inside ``shard_map``
  (``vocab_axis_name``) the tokens are the device's own, and contiguous blocks are a
  free reshape on the TPU too, where the compiler laid strided ones out block-major: a
  relayout of ``h`` into them and of the input gradient out of them, each an array of
  ``h``'s size per chip."""
  count, rest = _token_blocks(x.shape[0], token_chunk)
  if count == 1:
    return x
  m = x.shape[0] - rest
  bits = _as_bits(x)
  blocks = (count, m // count) if contiguous else (m // count, count)
  head = (bits[:m] if rest else bits).reshape(*blocks, *x.shape[1:])
  if not rest:
    return head, bits[m:]
  return head, _split_tokens(_from_bits(bits[m:], x.dtype), token_chunk, contiguous)


def _join_tokens(x, dtype):
  """The ``[N, ...]`` array of ``dtype`` laid out by :func:`_split_tokens`."""
  if not isinstance(x, tuple):
    return x
  head, tail = x
  flat = _from_bits(head.reshape(-1, *head.shape[2:]), dtype)
  if isinstance(tail, tuple) or tail.shape[0]:
    return jnp.concatenate([flat, _join_tokens(tail, dtype)])
  return flat


def _has_tail(x):
  return isinstance(x[1], tuple) or x[1].shape[0] > 0


def _token_block(head, i, dtype, contiguous):
  """Block ``i`` of a split array's head, from its bits behind an optimization barrier."""
  block = jax.lax.dynamic_index_in_dim(head, i, axis=_block_axis(contiguous), keepdims=False)
  return _from_bits(jax.lax.optimization_barrier(block), dtype)


def _map_tokens(fn, xs, dtypes, contiguous):
  """``fn(*rows)`` (a tree of ``[rows, ...]`` arrays) over all tokens of the arrays ``xs``
  (of ``dtypes``) laid out by :func:`_split_tokens`, a block at a time, joined in token
  order."""
  if not isinstance(xs[0], tuple):
    return fn(*xs)
  out = jax.lax.map(
    lambda i: fn(*(_token_block(x[0], i, t, contiguous) for x, t in zip(xs, dtypes))),
    jnp.arange(xs[0][0].shape[_block_axis(contiguous)]),
  )
  if not contiguous:  # lax.map stacks the blocks on axis 0
    out = jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1), out)
  out = jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), out)
  if _has_tail(xs[0]):
    tail = _map_tokens(fn, [x[1] for x in xs], dtypes, contiguous)
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
  return out


def _scan_tokens(step, dh, carry, xs, dtypes, contiguous):
  """``step(dh_rows, carry, *rows) -> (dh_rows, carry)`` over all tokens of the arrays
  ``xs`` (of ``dtypes``) laid out by :func:`_split_tokens`, a block at a time, with
  ``dh`` an accumulator of per-token rows laid out the same way."""
  if not isinstance(xs[0], tuple):
    return step(dh, carry, *xs)
  dh_head, dh_tail = dh

  axis = _block_axis(contiguous)

  def body(c, i):
    dh_head, carry = c
    rows, carry = step(
      jax.lax.dynamic_index_in_dim(dh_head, i, axis=axis, keepdims=False),
      carry,
      *(_token_block(x[0], i, t, contiguous) for x, t in zip(xs, dtypes)),
    )
    return (jax.lax.dynamic_update_index_in_dim(dh_head, rows, i, axis=axis), carry), None

  (dh_head, carry), _ = jax.lax.scan(body, (dh_head, carry), jnp.arange(dh_head.shape[axis]))
  if _has_tail(xs[0]):
    tail = [x[1] for x in xs]
    dh_tail, carry = _scan_tokens(step, dh_tail, carry, tail, dtypes, contiguous)
  return (dh_head, dh_tail), carry


# The platform whose branch of the kernel is being traced ("cpu", "tpu" or "other"): set
# by _per_platform while it traces each branch (see _as_bits and _block).
_PLATFORM = ["other"]


def _per_platform(fn, *args):
  """``fn(*args)`` traced once per platform under ``lax.platform_dependent``: moving 16-bit
  floats as their bits for XLA:CPU, rounding float32 chunks of ``w`` inside the stream for
  the TPU compiler, as they are for every other platform. Which branch runs is chosen
  when the program is lowered for its platform.

  The bits are XLA:CPU's workaround (see :func:`_as_bits`); the TPU compiler does the
  opposite: it materialises a bitcast of a loop-invariant array, a whole 16-bit copy of
  ``w`` (256 MiB at 1024 x 131072), where it slices and updates 16-bit arrays in place.
  The TPU's rounding is :func:`_block`'s."""

  def traced(platform):
    def branch(*a):
      _PLATFORM.append(platform)
      try:
        return fn(*a)
      finally:
        _PLATFORM.pop()

    return branch

  return jax.lax.platform_dependent(
    *args, cpu=traced("cpu"), tpu=traced("tpu"), default=traced("other")
  )


def _as_bits(x):
  """16-bit floats as uint16 of the same bits (a bitcast) in XLA:CPU's branch, anything
  else unchanged.

  XLA:CPU has no bfloat16 or float16 dynamic-slice, dynamic-update-slice or transpose:
  it runs them on a float32 copy of the whole operand, which loop-invariant code motion
  then hoists (a float32 copy of ``w``, of ``h`` and of the weight gradient). On the
  integer bits they stay in place."""
  if _PLATFORM[-1] == "cpu" and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _from_bits(bits, dtype):
  return bits if bits.dtype == dtype else jax.lax.bitcast_convert_type(bits, dtype)


def _block(x, start, size, axis):
  """``x[start : start + size]`` along ``axis``, sliced from its bits (:func:`_as_bits`),
  behind an optimization barrier so that XLA converts the slice, not all of ``x`` hoisted
  out of the loop.

  In the TPU's branch a float32 slice is rounded to bfloat16's precision here
  (``reduce_precision``, round to nearest even: the rounding that the default matmul
  precision applies to a float32 operand, so the products are unchanged). Left to the
  product, the compiler converted all of ``w`` to bfloat16 once, outside the loops: an
  array of half ``w``'s bytes (256 MiB at 1024 x 131072, 0.125 of optax's temporary);
  rounded per chunk, no array of ``w``'s size is made. Under a higher matmul precision
  (``jax.default_matmul_precision``) nothing is rounded."""
  part = jax.lax.dynamic_slice_in_dim(_as_bits(x), start, size, axis=axis)
  return _operand(_from_bits(jax.lax.optimization_barrier(part), x.dtype))


def _operand(x):
  """``x`` as the TPU's default precision reads a float32 product operand, rounded where
  it is used: a chunk of ``w`` (:func:`_block`) or a block of ``h`` (left to the products,
  the compiler converted all of ``h`` to bfloat16 once as well, an array of half ``h``'s
  bytes); unchanged on other platforms and precisions."""
  if _PLATFORM[-1] == "tpu" and x.dtype == jnp.float32 and _default_precision():
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
  return x


def _default_precision() -> bool:
  """Whether float32 products run at the TPU's default precision (one bfloat16 pass)."""
  precision = getattr(jax.config, "jax_default_matmul_precision", None)
  return precision is None or str(precision).lower() in ("default", "bfloat16", "fastest")


def _transposed(x):
  """``x.T`` for a product: moved as its bits for 16-bit floats (:func:`_as_bits`), left
  to the product otherwise."""
  if _as_bits(x) is x:
    return x.T
  return _from_bits(jnp.transpose(_as_bits(x)), x.dtype)


def _compute_dtype(h, w):
  """float32 for bfloat16, float16 and float32 inputs; float64 for float64."""
  return _checks.compute_dtype(jnp.promote_types(h.dtype, w.dtype))


def _chunk_logits(h, w_cols, bias_cols, soft_cap):
  """``[N, chunk]`` logits of one chunk of columns in the compute dtype (and the tanh of
  the soft cap)."""
  dtype = _compute_dtype(h, w_cols)
  z = jnp.dot(h, w_cols, preferred_element_type=dtype)
  if bias_cols is not None:
    z = z + bias_cols.astype(dtype)
  t = None
  if soft_cap is not None:
    t = jnp.tanh(z / soft_cap)
    z = soft_cap * t
  return z, t


def _bias_cols(bias, start, size):
  return None if bias is None else jax.lax.dynamic_slice_in_dim(bias, start, size)


def _in_chunk(members, start, chunk):
  """``[N, chunk]`` bool: which of the chunk's columns are members, and ``[N, M]`` offsets."""
  offset = members - start
  inside = (members >= 0) & (offset >= 0) & (offset < chunk)
  if members.shape[1] <= 4:  # a comparison per member, fused into the mask's consumer
    columns = jnp.arange(chunk)[None, None, :]
    mask = jnp.any((offset[:, :, None] == columns) & inside[:, :, None], axis=1)
    return mask, inside, offset
  rows = jnp.arange(members.shape[0])[:, None]
  mask = jnp.zeros((members.shape[0], chunk), bool)
  mask = mask.at[rows, jnp.where(inside, offset, chunk)].set(True, mode="drop")
  return mask, inside, offset


def _logsumexp_pair(m1, s1, m2, s2):
  """Combines two (max, sum of exp(x - max)) pairs; empty sides have max -inf, sum 0."""
  m = jnp.maximum(m1, m2)
  safe = jnp.where(jnp.isinf(m), 0.0, m)
  return m, s1 * jnp.exp(m1 - safe) + s2 * jnp.exp(m2 - safe)


def _finish_lse(m, s):
  """log-sum-exp from (max, sum): -inf for an empty side, NaN kept."""
  return jnp.where(jnp.isinf(m), 0.0, m) + _log(s)


def _manual_axes(x) -> frozenset:
  """The ``shard_map`` axes over which ``x`` varies (empty outside ``shard_map``)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
  return frozenset(vma or ())


def _varying(x, axis_name, *like):
  """``x`` marked as varying over ``axis_name`` and over every ``shard_map`` axis that an
  array of ``like`` varies over: a scan carry that the loop body makes shard-dependent
  must start so. Tokens sharded on a data axis make every carry vary over it as well as
  over the vocabulary's axis."""
  axes = frozenset() if axis_name is None else frozenset([axis_name])
  for a in jax.tree.leaves(like):
    axes |= _manual_axes(a)
  if not axes:
    return x

  def cast(a):
    missing = tuple(sorted(axes - _manual_axes(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a

  return jax.tree.map(cast, x)


def _offset(axis_name, vocab):
  """The first global column id of this shard's ``vocab`` columns."""
  return 0 if axis_name is None else jax.lax.axis_index(axis_name) * vocab


def _stream(h, w, bias, members, chunk, token_chunk, soft_cap, axis_name):
  """``(a, b, unique)`` per token: logsumexp over S's members and over the rest of the
  vocabulary, and which entries of the padded member list count (valid, first of any
  duplicates). Blocks of ``token_chunk`` tokens each stream over the vocabulary."""
  vocab = w.shape[1]
  dtype = _compute_dtype(h, w)
  valid = members >= 0
  later = (members[:, :, None] == members[:, None, :]) & jnp.tril(
    jnp.ones((members.shape[1],) * 2, bool), -1
  )[None]
  unique = valid & ~jnp.any(later, axis=2)
  local = jnp.where(unique, members - _offset(axis_name, vocab), -1)

  def rows(h_rows, local_rows):
    h_rows = _operand(h_rows)

    def body(carry, start, size):
      m_out, s_out, member_logits = carry
      z, _ = _chunk_logits(
        h_rows, _block(w, start, size, 1), _bias_cols(bias, start, size), soft_cap
      )
      in_s, inside, at = _in_chunk(local_rows, start, size)
      picked = jnp.take_along_axis(z, jnp.clip(at, 0, size - 1), axis=1)
      member_logits = jnp.where(inside, picked, member_logits)
      out = jnp.where(in_s, -jnp.inf, z)
      top = jnp.max(out, axis=1)
      safe = jnp.where(jnp.isinf(top), 0.0, top)
      total = jnp.sum(jnp.exp(out - safe[:, None]), axis=1)
      return (*_logsumexp_pair(m_out, s_out, top, total), member_logits)

    count = h_rows.shape[0]
    init = _varying(
      (
        jnp.full(count, -jnp.inf, dtype),
        jnp.zeros(count, dtype),
        jnp.full(local_rows.shape, -jnp.inf, dtype),
      ),
      axis_name,
      h,
      w,
      bias,
      members,
    )
    return _sweep(body, init, vocab, chunk)

  contiguous = axis_name is not None  # inside shard_map (see _split_tokens)
  m_out, s_out, member_logits = _map_tokens(
    rows,
    [_split_tokens(x, token_chunk, contiguous) for x in (h, local)],
    (h.dtype, local.dtype),
    contiguous,
  )
  if axis_name is not None:
    top = jax.lax.pmax(jax.lax.stop_gradient(m_out), axis_name)
    safe = jnp.where(jnp.isinf(top), 0.0, top)
    s_out = jax.lax.psum(s_out * jnp.exp(m_out - safe), axis_name)
    m_out = top
    member_logits = jax.lax.pmax(member_logits, axis_name)  # -inf on the other shards
  b = _finish_lse(m_out, s_out)
  a = jax.nn.logsumexp(jnp.where(unique, member_logits, -jnp.inf), axis=1)
  a = jnp.where(jnp.any(members == BAD_ID, axis=1), jnp.nan, a)
  return a, b, unique


def _loss(a, b, z_loss, complement):
  own, other = (b, a) if complement else (a, b)
  loss = jax.nn.softplus(other - own)
  if z_loss:
    loss = loss + z_loss * jnp.square(jnp.logaddexp(a, b))
  return loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _fused(h, w, bias, members, complement, chunk, token_chunk, soft_cap, z_loss, axis_name):
  """Per-token loss of ``[N, D]`` ``h``, ``[D, V]`` ``w``, ``[V]`` bias (or None) and
  ``[N, M]`` int32 member ids (-1 unused); see the module docstring."""
  a, b, _ = _per_platform(
    lambda *x: _stream(*x, chunk, token_chunk, soft_cap, axis_name), h, w, bias, members
  )
  return _loss(a, b, z_loss, complement)


def _fused_fwd(h, w, bias, members, complement, chunk, token_chunk, soft_cap, z_loss, axis_name):
  a, b, unique = _per_platform(
    lambda *x: _stream(*x, chunk, token_chunk, soft_cap, axis_name), h, w, bias, members
  )
  return _loss(a, b, z_loss, complement), (h, w, bias, members, unique, a, b)


def _fused_bwd(complement, chunk, token_chunk, soft_cap, z_loss, axis_name, residuals, g):
  if axis_name is None:
    return _local_backward(complement, chunk, token_chunk, soft_cap, z_loss, residuals, g)
  return _streamed_backward(
    complement, chunk, token_chunk, soft_cap, z_loss, axis_name, residuals, g
  )


def _streamed_backward(complement, chunk, token_chunk, soft_cap, z_loss, axis_name, residuals, g):
  return _per_platform(
    lambda residuals, g: _backward(
      complement, chunk, token_chunk, soft_cap, z_loss, axis_name, residuals, g
    ),
    residuals,
    g,
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3, 4))
def _local_backward(complement, chunk, token_chunk, soft_cap, z_loss, residuals, g):
  """The streamed backward pass (no logits formed), with a derivative rule of its own: its
  derivatives (grad of grad, Hessian-vector products) are those of the same gradient
  written on the logits, :func:`_dense_backward`, whose loss is the flat partition
  kernel's with its exact second derivatives. Differentiating the gradient forms the
  ``[N, V]`` logits; the gradient itself does not."""
  return _streamed_backward(complement, chunk, token_chunk, soft_cap, z_loss, None, residuals, g)


@_local_backward.defjvp
def _local_backward_jvp(complement, chunk, token_chunk, soft_cap, z_loss, primals, tangents):
  residuals, g = primals
  out = _local_backward(complement, chunk, token_chunk, soft_cap, z_loss, residuals, g)
  h, w, bias, members = residuals[:4]
  dh, dw, dbias = tangents[0][:3]

  def dense(h, w, bias, g):
    return _dense_backward(complement, soft_cap, z_loss, members, h, w, bias, g)

  if bias is None:
    _, (th, tw, _) = jax.jvp(lambda h, w, g: dense(h, w, None, g), (h, w, g), (dh, dw, tangents[1]))
    tbias = None
  else:
    _, (th, tw, tbias) = jax.jvp(dense, (h, w, bias, g), (dh, dw, dbias, tangents[1]))
    tbias = tbias.astype(out[2].dtype)
  return out, (th.astype(out[0].dtype), tw.astype(out[1].dtype), tbias, None)


def _dense_backward(complement, soft_cap, z_loss, members, h, w, bias, g):
  """The gradient of the per-token loss in ``h``, ``w`` and ``bias``, on the dense logits
  and the flat partition kernel (for the derivatives of the streamed one)."""
  from jaxsoftmax.losses._partition import _partition_nll

  dtype = _compute_dtype(h, w)
  vocab = w.shape[1]
  rows = jnp.arange(members.shape[0])[:, None]
  in_set = (
    jnp.zeros((members.shape[0], vocab), bool)
    .at[rows, jnp.where(members >= 0, members, vocab)]
    .set(True, mode="drop")
  )

  def per_token(h, w, bias):
    z, _ = _chunk_logits(
      h.astype(dtype), w.astype(dtype), None if bias is None else bias.astype(dtype), soft_cap
    )
    loss = _partition_nll(z, in_set, complement)
    if z_loss:
      loss = loss + z_loss * jnp.square(jax.nn.logsumexp(z, axis=-1))
    return loss

  _, vjp = jax.vjp(per_token, h, w, bias)
  dh, dw, dbias = vjp(g.astype(dtype))
  return dh, dw, dbias


def _backward(complement, chunk, token_chunk, soft_cap, z_loss, axis_name, residuals, g):
  h, w, bias, members, unique, a, b = residuals
  vocab = w.shape[1]
  # A token with a zero cotangent (masked, ignored) or whose loss is +inf (its own
  # side has probability 0) gets exactly zero gradient.
  own = b if complement else a
  live = (g != 0) & (own != -jnp.inf)
  dtype = _compute_dtype(h, w)
  g = jnp.where(live, g, 0.0).astype(dtype)
  lse = jnp.logaddexp(a, b)
  s = _checks.sigmoid(jnp.where(live, (a - b) if complement else (b - a), 0.0))
  d_a = g * (s if complement else -s)  # d loss / d a; d loss / d b is its negative
  finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
  # dz_k = coef * exp(z_k - shift), with the side's logsumexp as the shift (so the
  # exponential is at most 1) and the z-loss term 2 z_loss lse p_k folded into the
  # coefficient as exp(side - lse): one exponential per logit.
  coef_a, coef_b = d_a, -d_a
  if z_loss:
    d_lse = g * 2.0 * z_loss * finite(lse)
    share = lambda side: jnp.where(side == -jnp.inf, 0.0, jnp.exp(side - lse))
    coef_a, coef_b = coef_a + d_lse * share(a), coef_b + d_lse * share(b)
  # Per token: what the logit gradient needs, laid out in blocks of tokens once, outside
  # the loop over the vocabulary.
  per_token = (
    h,
    coef_a,
    coef_b,
    finite(a),
    finite(b),
    live,
    jnp.where(unique, members - _offset(axis_name, vocab), -1),
  )
  contiguous = axis_name is not None  # inside shard_map (see _split_tokens)
  blocked = [_split_tokens(x, token_chunk, contiguous) for x in per_token]
  dtypes = [x.dtype for x in per_token]

  def columns(carry, start, size):
    """One chunk of columns: its weight and bias gradient, summed over the blocks of
    tokens in float32 and written once; each block's input gradient added to dh."""
    dh, dw, dbias = carry
    w_cols = _block(w, start, size, 1)
    w_cols_t = _transposed(w_cols)
    bias_cols = _bias_cols(bias, start, size)

    def rows(dh_rows, carry, h_rows, coef_a, coef_b, shift_a, shift_b, live, local):
      h_rows = _operand(h_rows)
      dw_cols, dbias_cols = carry
      z, t = _chunk_logits(h_rows, w_cols, bias_cols, soft_cap)
      in_s, _, _ = _in_chunk(local, start, size)
      dz = jnp.where(in_s, coef_a[:, None], coef_b[:, None]) * jnp.exp(
        z - jnp.where(in_s, shift_a[:, None], shift_b[:, None])
      )
      if soft_cap is not None:
        dz = dz * (1.0 - jnp.square(t))
      dz = jnp.where(live[:, None], dz, 0.0)
      # Low-precision h and w: dz enters each product in their dtype, as any
      # mixed-precision matmul input, and the products accumulate in float32.
      dh_rows = dh_rows + jnp.dot(dz.astype(w.dtype), w_cols_t, preferred_element_type=dtype)
      dw_cols = dw_cols + jnp.dot(
        _transposed(h_rows), dz.astype(h.dtype), preferred_element_type=dtype
      )
      if dbias_cols is not None:
        dbias_cols = dbias_cols + jnp.sum(dz, axis=0)
      return dh_rows, (dw_cols, dbias_cols)

    init = _varying(
      (jnp.zeros((w.shape[0], size), dtype), None if bias is None else jnp.zeros(size, dtype)),
      axis_name,
      *residuals,
      g,
    )
    dh, (dw_cols, dbias_cols) = _scan_tokens(rows, dh, init, blocked, dtypes, contiguous)
    # Written as bits: a 16-bit dw stays 16-bit (see _as_bits); the barrier keeps XLA
    # from moving the cast after the update.
    dw = jax.lax.dynamic_update_slice_in_dim(
      dw, jax.lax.optimization_barrier(_as_bits(dw_cols.astype(w.dtype))), start, axis=1
    )
    if dbias is not None:
      dbias = jax.lax.dynamic_update_slice_in_dim(
        dbias, dbias_cols.astype(dbias.dtype), start, axis=0
      )
    return dh, dw, dbias

  init = _varying(
    (
      _split_tokens(jnp.zeros(h.shape, dtype), token_chunk, contiguous),
      jnp.zeros(w.shape, _as_bits(jnp.zeros((), w.dtype)).dtype),
      None if bias is None else jnp.zeros(bias.shape, bias.dtype),
    ),
    axis_name,
    *residuals,
    g,
  )
  # The weight gradient is carried as bits from start to end (see _as_bits): one
  # 16-bit buffer, converted once after the loop.
  dh, dw, dbias = _sweep(columns, init, vocab, chunk)
  dw = _from_bits(dw, w.dtype)
  dh = _join_tokens(dh, dtype)
  if axis_name is not None:
    dh = jax.lax.psum(dh, axis_name)
  # An input that does not vary over a shard_map axis (w replicated over the data axis
  # while the tokens are split on it) gets its gradient summed over that axis: the
  # transpose of its implicit broadcast.
  dh, dw, dbias = (_summed_to(d, x) for d, x in ((dh, h), (dw, w), (dbias, bias)))
  return dh.astype(h.dtype), dw, dbias, None


def _summed_to(grad, x):
  """``grad`` summed over the ``shard_map`` axes it varies over and ``x`` does not."""
  if grad is None:
    return None
  extra = tuple(sorted(_manual_axes(grad) - _manual_axes(x)))
  return jax.lax.psum(grad, extra) if extra else grad


_fused.defvjp(_fused_fwd, _fused_bwd)
_fused = _checks.compiled(_fused, (4, 5, 6, 7, 8, 9))


DEFAULT_CHUNK = 2048
DEFAULT_TOKEN_CHUNK = 2048


def _check_chunk(name, value, allow_none=False):
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(
      f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}."
    )


def _check_params(h, w, bias, soft_cap, z_loss, vocab_chunk, token_chunk):
  h, w = jnp.asarray(h), jnp.asarray(w)
  for name, x in (("h", h), ("w", w)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a real floating array, got dtype {x.dtype}.")
  if h.ndim < 1:
    raise ValueError("h must have a feature axis (last axis), got a scalar.")
  if w.ndim != 2 or w.shape[0] != h.shape[-1] or w.shape[1] == 0:
    raise ValueError(
      f"w must be [D, V] with D = h.shape[-1] = {h.shape[-1]} and V >= 1, got shape {w.shape}."
    )
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (w.shape[1],) or not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(
        f"bias must be a floating [V] = [{w.shape[1]}] array, got {bias.dtype} {bias.shape}."
      )
  if soft_cap is not None and not (
    isinstance(soft_cap, (int, float)) and soft_cap > 0 and math.isfinite(soft_cap)
  ):
    raise ValueError(
      f"soft_cap must be a finite number > 0 or None (no capping), got {soft_cap!r}."
    )
  if not (isinstance(z_loss, (int, float)) and z_loss >= 0):
    raise ValueError(f"z_loss must be a number >= 0, got {z_loss!r}.")
  _check_chunk("vocab_chunk", vocab_chunk)
  _check_chunk("token_chunk", token_chunk, allow_none=True)
  return h, w, bias


def _check_where(where, batch_shape):
  if where is None:
    return None
  where = _checks.boolean_mask_for(
    where, batch_shape, f"the tokens' shape {batch_shape} (h's shape without its feature axis)"
  )
  return jnp.broadcast_to(where, batch_shape)


BAD_ID = -2  # every id of a token that had an id out of range (see _run)


def _check_members(members, batch_shape, vocab):
  """int32 ``[..., M]`` ids with -1 for padding; an id outside [-1, V) raises eagerly and
  gives NaN under a transformation (returned as the ``bad`` token mask)."""
  if not isinstance(members, jax.Array):  # (a tracer is a jax.Array)
    members = np.asarray(members)
  if members.dtype == jnp.bool_:
    raise TypeError(
      "negatives must be integer token ids [..., M] (-1 pads), got a boolean mask; for a "
      "mask over the vocabulary pass jnp.where(mask, jnp.arange(V), -1) (M = V), or the "
      "ids themselves."
    )
  if not jnp.issubdtype(members.dtype, jnp.integer):
    raise TypeError(
      f"negatives must be integers (token ids, -1 for padding), got dtype {members.dtype}."
    )
  if members.ndim < 1 or members.shape[:-1] != batch_shape:
    raise ValueError(
      f"negatives shape {members.shape} must be the tokens' shape {batch_shape} "
      f"plus one axis of token ids."
    )
  if vocab is not None and _checks.is_concrete(members):
    values = np.asarray(members)
    _checks.check_ids(values, vocab, "negatives")
    return jnp.asarray(values.astype(np.int32)), None
  members = jnp.asarray(members)
  bad = (members < -1) | ((members >= vocab) if vocab is not None else False)
  return members.astype(jnp.int32), jnp.any(bad, axis=-1)  # _run marks the bad rows


def _run(
  h,
  w,
  bias,
  members,
  bad,
  kept,
  complement,
  *,
  z_loss,
  soft_cap,
  vocab_chunk,
  token_chunk,
  vocab_axis_name,
  ignored=None,
):
  batch_shape = h.shape[:-1]
  n = int(np.prod(batch_shape))
  if bad is not None:
    # A token with an id out of range: its ids all BAD_ID, so that the kernel makes its
    # logsumexps NaN: NaN loss and a NaN gradient row for h (and so NaN in w's gradient),
    # as the flat losses give a NaN logit-gradient row.
    members = jnp.where(bad[..., None], BAD_ID, members)
  flat = _fused(
    h.reshape(n, h.shape[-1]),
    w,
    bias,
    members.reshape(n, members.shape[-1]),
    complement,
    vocab_chunk,
    n if token_chunk is None else token_chunk,
    None if soft_cap is None else float(soft_cap),
    float(z_loss),
    vocab_axis_name,
  )
  loss = flat.reshape(batch_shape)
  return _checks.finish(loss, kept, ignored)


def _label_loss(
  h,
  w,
  labels,
  bias,
  where,
  ignore_index,
  z_loss,
  soft_cap,
  vocab_chunk,
  token_chunk,
  vocab_axis_name,
  complement,
):
  h, w, bias = _check_params(h, w, bias, soft_cap, z_loss, vocab_chunk, token_chunk)
  batch_shape = h.shape[:-1]
  where = _check_where(where, batch_shape)
  labels_like = jax.ShapeDtypeStruct((*batch_shape, w.shape[1]), w.dtype)
  # Sharded, ids are global and the shard's V does not bound them: no range check.
  num_classes = np.iinfo(np.int32).max if vocab_axis_name is not None else w.shape[1]
  labels, ignored = _checks.as_labels(labels, labels_like, num_classes, ignore_index=ignore_index)
  return _run(
    h,
    w,
    bias,
    labels[..., None],
    labels < 0,
    where,
    complement,
    ignored=ignored,
    z_loss=z_loss,
    soft_cap=soft_cap,
    vocab_chunk=vocab_chunk,
    token_chunk=token_chunk,
    vocab_axis_name=vocab_axis_name,
  )


def _set_loss(
  h,
  w,
  members,
  bias,
  where,
  z_loss,
  soft_cap,
  vocab_chunk,
  token_chunk,
  vocab_axis_name,
  complement,
):
  h, w, bias = _check_params(h, w, bias, soft_cap, z_loss, vocab_chunk, token_chunk)
  batch_shape = h.shape[:-1]
  where = _check_where(where, batch_shape)
  vocab = None if vocab_axis_name is not None else w.shape[1]
  members, bad = _check_members(members, batch_shape, vocab)
  return _run(
    h,
    w,
    bias,
    members,
    bad,
    where,
    complement,
    z_loss=z_loss,
    soft_cap=soft_cap,
    vocab_chunk=vocab_chunk,
    token_chunk=token_chunk,
    vocab_axis_name=vocab_axis_name,
  )


_ARGS = """

  Args:
    h: ``[..., D]`` floating hidden states, one per token.
    w: ``[D, V]`` floating output weights (the vocabulary on the last axis).
    {third}
    bias: optional ``[V]`` output bias.
    where: optional boolean mask broadcastable to ``h.shape[:-1]``: tokens it excludes
      get loss 0 and a zero gradient.{ignore}
    z_loss: weight of the ``logsumexp(z)^2`` penalty added to each token's loss (PaLM's
      z-loss, 1e-4 there); 0 adds nothing.
    soft_cap: optional finite ``c > 0`` (``inf`` raises ``ValueError``; None caps
      nothing): the logits are ``c * tanh((h @ w + bias) / c)`` (Gemma 2's
      final-logit soft-capping, c = 30 there).
    vocab_chunk: columns of ``w`` per step of the stream (default {chunk}). V need not be
      a multiple of it.
    token_chunk: tokens per block (default {token_chunk}; None: all at once). Each block
      streams over the vocabulary, so the working memory is about
      ``3 * token_chunk * vocab_chunk`` floats besides the gradients, whatever the number
      of tokens N; N need not be a multiple of it. The blocks are strided, so under
      ``jit`` with ``h`` sharded on its token axis each device keeps its own rows.
    vocab_axis_name: inside ``shard_map`` with ``w`` (and ``bias``) sharded on V over this
      mesh axis: its name. Ids are then global: shard ``i`` holds columns
      ``i * V_local ..``; the logsumexps are combined across the axis.

  Returns:
    ``[...]`` float32 per-token losses (no reduction). Only reverse-mode differentiation
    is defined (``jax.custom_vjp``); the gradients have the dtypes of ``h``, ``w`` and
    ``bias``.
"""
_LABELS = (
  "labels: int ``[...]`` (``h.shape[:-1]``) token ids in ``[0, V)``; out of range "
  "raises eagerly and gives NaN under ``jit``."
)
_IGNORE = (
  "\n    ignore_index: optional label value (e.g. -100) marking padding tokens: loss 0 "
  "and a zero gradient."
)


def _doc(third, ignore=""):
  return _ARGS.format(
    third=third, ignore=ignore, chunk=DEFAULT_CHUNK, token_chunk=DEFAULT_TOKEN_CHUNK
  )


def fused_nll(
  h: ArrayLike,
  w: ArrayLike,
  labels: ArrayLike,
  *,
  bias: ArrayLike | None = None,
  where: ArrayLike | None = None,
  ignore_index: int | None = None,
  z_loss: float = 0.0,
  soft_cap: float | None = None,
  vocab_chunk: int = DEFAULT_CHUNK,
  token_chunk: int | None = DEFAULT_TOKEN_CHUNK,
  vocab_axis_name: str | None = None,
) -> jax.Array:
  """``nll(h @ w + bias, labels)`` without the ``[tokens, V]`` logits: ``-log p_label``,
  as ``softplus(logsumexp_{k != label} z_k - z_label)``, exact when the loss is tiny."""
  return _label_loss(
    h,
    w,
    labels,
    bias,
    where,
    ignore_index,
    z_loss,
    soft_cap,
    vocab_chunk,
    token_chunk,
    vocab_axis_name,
    complement=False,
  )


def fused_complement_nll(
  h: ArrayLike,
  w: ArrayLike,
  labels: ArrayLike,
  *,
  bias: ArrayLike | None = None,
  where: ArrayLike | None = None,
  ignore_index: int | None = None,
  z_loss: float = 0.0,
  soft_cap: float | None = None,
  vocab_chunk: int = DEFAULT_CHUNK,
  token_chunk: int | None = DEFAULT_TOKEN_CHUNK,
  vocab_axis_name: str | None = None,
) -> jax.Array:
  """``complement_nll(h @ w + bias, labels)`` without the logits: ``-log(1 - p_label)``
  ("the next token is not ``label``"), as ``softplus(z_label - logsumexp_{k != label}
  z_k)``: finite and exact after ``p_label`` rounds to 1."""
  return _label_loss(
    h,
    w,
    labels,
    bias,
    where,
    ignore_index,
    z_loss,
    soft_cap,
    vocab_chunk,
    token_chunk,
    vocab_axis_name,
    complement=True,
  )


def fused_set_nll(
  h: ArrayLike,
  w: ArrayLike,
  members: ArrayLike,
  *,
  bias: ArrayLike | None = None,
  where: ArrayLike | None = None,
  z_loss: float = 0.0,
  soft_cap: float | None = None,
  vocab_chunk: int = DEFAULT_CHUNK,
  token_chunk: int | None = DEFAULT_TOKEN_CHUNK,
  vocab_axis_name: str | None = None,
) -> jax.Array:
  """``-log P(S)`` for a padded list S of token ids per token (``set_nll`` on ``h @ w``):
  any token of S is right. Duplicates count once; an empty S gives +inf."""
  return _set_loss(
    h,
    w,
    members,
    bias,
    where,
    z_loss,
    soft_cap,
    vocab_chunk,
    token_chunk,
    vocab_axis_name,
    complement=False,
  )


def fused_complement_set_nll(
  h: ArrayLike,
  w: ArrayLike,
  negatives: ArrayLike,
  *,
  bias: ArrayLike | None = None,
  where: ArrayLike | None = None,
  z_loss: float = 0.0,
  soft_cap: float | None = None,
  vocab_chunk: int = DEFAULT_CHUNK,
  token_chunk: int | None = DEFAULT_TOKEN_CHUNK,
  vocab_axis_name: str | None = None,
) -> jax.Array:
  """``-log(1 - P(S))`` for a padded list S of wrong token ids per token
  (``complement_set_nll`` on ``h @ w``; token-level unlikelihood with S the previous
  context tokens). Duplicates count once; an empty S gives 0."""
  return _set_loss(
    h,
    w,
    negatives,
    bias,
    where,
    z_loss,
    soft_cap,
    vocab_chunk,
    token_chunk,
    vocab_axis_name,
    complement=True,
  )


fused_nll.__doc__ += _doc(_LABELS, _IGNORE)
fused_complement_nll.__doc__ += _doc(_LABELS, _IGNORE)
fused_set_nll.__doc__ += _doc(
  "members: int ``[..., M]`` token ids of the set S per token, -1 for padding."
)
fused_complement_set_nll.__doc__ += _doc(
  "negatives: int ``[..., M]`` wrong token ids per token, -1 for padding."
)
