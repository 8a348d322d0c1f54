"""Validation and normalisation of loss inputs, shared by every public loss.

The public wrappers call these before the custom-VJP kernels, so the kernels only
ever see floating logits in their compute dtype, class masks as booleans and labels
as int32 with every invalid label replaced by -1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def is_concrete(x) -> bool:
  """True when ``x`` holds values now (not a tracer under jit, vmap or grad)."""
  return not isinstance(x, jax.core.Tracer)


def index_str(index: tuple[int, ...]) -> str:
  """Formats an array position for an error message: ``[3, 1]``, or '' for a scalar."""
  return f"[{', '.join(map(str, index))}]" if index else ""


def as_logits(logits: ArrayLike, *, name: str = "logits", keep_dtype: bool = False) -> jax.Array:
  """Returns logits as an array in their compute dtype.

  float32 and float64 compute in their own precision; bfloat16 and float16 compute
  in float32 (the cast's VJP returns the gradient in the input's dtype). A kernel that
  converts inside its own fused operations (``keep_dtype=True``) gets them as they are,
  so that no float32 copy of the logits is materialised.
  """
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(
      f"{name} must be a real floating array, got dtype {logits.dtype}; "
      f"cast it with {name}.astype(jnp.float32)."
    )
  if logits.ndim == 0:
    raise ValueError(f"{name} must have a class axis (last axis), got a scalar.")
  if logits.shape[-1] == 0:
    raise ValueError(f"{name} has shape {logits.shape}: the class axis is empty.")
  return logits if keep_dtype else logits.astype(compute_dtype(logits.dtype))


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype a kernel computes in for inputs of ``dtype``: float32 for 16-bit floats,
  float32 and float64 their own."""
  return jnp.promote_types(dtype, jnp.float32)


def is_low_precision(dtype) -> bool:
  return dtype in _LOW_PRECISION


def as_labels(
  labels: ArrayLike,
  logits: jax.Array,
  num_classes: int | None = None,
  *,
  ignore_index: int | None = None,
  logits_shape: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """Returns ``(labels, ignored)``: int32 labels with every invalid label replaced by -1.

  ``K`` is ``num_classes`` when given (a hierarchical head, whose logits are not
  one per class), else the logits' last axis; labels have shape ``logits.shape[:-1]``
  (``logits_shape`` names the caller's layout in the error message).

  Labels equal to ``ignore_index`` are padding: ``ignored`` marks them (None when
  ``ignore_index`` is None) and they come back as label 0, so the kernels see a
  valid label; the caller zeroes their loss.

  Eagerly, a label outside ``[0, K)`` raises a ValueError naming the first one
  and its position. The check reads the values before any cast, so an int64 or
  uint64 label of 2**31 or more never wraps into range when JAX holds 32-bit
  integers. Under a transformation the values are unknown at trace time, so the
  kernels turn the -1 into NaN for that example only.
  """
  if not isinstance(labels, jax.Array):  # (a tracer is a jax.Array)
    labels = np.asarray(labels)  # a NumPy array or Python int: check before JAX casts it
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got dtype {labels.dtype}.")
  if labels.shape != logits.shape[:-1]:
    shown = logits.shape if logits_shape is None else logits_shape
    raise ValueError(
      f"labels shape {labels.shape} does not match logits shape {shown}: "
      f"labels must have the logits' shape without the class axis, {logits.shape[:-1]}."
    )
  check_ignore_index(ignore_index)
  if num_classes is None:
    num_classes = logits.shape[-1]
  if is_concrete(labels):
    values = np.asarray(labels)
    bad = (values < 0) | (values >= num_classes)
    if ignore_index is not None:
      bad &= values != ignore_index
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
        f"labels{index_str(where)} = {values[where]} is outside [0, {num_classes}) "
        f"({int(bad.sum())} of {values.size} labels are out of range)."
      )
    # In range (or ignored) now, so int32 holds every value; ignored ones become 0. Done on
    # the host: eagerly, no operation is compiled for it.
    if ignore_index is None and isinstance(labels, jax.Array) and labels.dtype == jnp.int32:
      return labels, None  # already valid int32 on its devices, with its sharding
    ignored = None if ignore_index is None else values == ignore_index
    values = np.where(ignored, 0, values) if ignored is not None else values
    labels = jnp.asarray(values.astype(np.int32))
    return labels, None if ignored is None else jnp.asarray(ignored)
  ignored = None
  if ignore_index is not None:
    info = jnp.iinfo(labels.dtype)
    if info.min <= ignore_index <= info.max:
      ignored = labels == jnp.asarray(ignore_index, labels.dtype)
    else:  # no label of this dtype can equal it
      ignored = jnp.zeros(labels.shape, bool)
  # Compare in the labels' own dtype so that no cast can wrap a bad label into range.
  valid = labels >= 0
  if num_classes <= jnp.iinfo(labels.dtype).max:
    valid &= labels < jnp.asarray(num_classes, labels.dtype)
  labels = jnp.where(valid, labels, -1).astype(jnp.int32)
  if ignored is not None:
    labels = jnp.where(ignored, 0, labels)
  return labels, ignored


def check_ignore_index(ignore_index) -> None:
  """A padding label value is an int or None (a static value: it selects the examples)."""
  if ignore_index is not None and not isinstance(ignore_index, (int, np.integer)):
    raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}.")


def as_class_mask(mask: ArrayLike, logits: jax.Array, *, name: str) -> jax.Array:
  """Returns a boolean mask of the logits' shape, one entry per class."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
      f"{name} must be a boolean mask, got dtype {mask.dtype}; "
      f"pass {name}.astype(bool) for a 0/1 array."
    )
  if mask.shape != logits.shape:
    raise ValueError(f"{name} shape {mask.shape} does not match logits shape {logits.shape}.")
  return mask


def as_members(
  members: ArrayLike, logits: jax.Array, axes: tuple[int, ...], *, name: str = "members"
) -> tuple[jax.Array, jax.Array | None]:
  """A set given either way, as ``(mask, bad)``: the boolean mask over the classes with
  the class axes last (flattened), and, for ids, which examples hold an id out of range.

  ``members`` is a boolean mask of the logits' shape, or integer class ids ``[..., M]``
  (the logits' shape without the class axes, plus one axis of ids; -1 pads), the form
  the fused and tree set losses take. Eagerly an id outside ``[-1, K)`` raises; under a
  transformation it makes that example's loss and gradient NaN (``bad``).
  """
  if not isinstance(members, jax.Array):
    members = np.asarray(members)
  if members.dtype == jnp.bool_:
    return move_to_last(as_class_mask(members, logits, name=name), axes), None
  if not jnp.issubdtype(members.dtype, jnp.integer):
    raise TypeError(
      f"{name} must be a boolean mask over the classes or integer class ids (-1 pads), "
      f"got dtype {members.dtype}."
    )
  batch_shape = tuple(n for a, n in enumerate(logits.shape) if a not in axes)
  if members.ndim != len(batch_shape) + 1 or members.shape[:-1] != batch_shape:
    raise ValueError(
      f"{name} shape {members.shape}: class ids must have the logits' shape without the "
      f"class axis, {batch_shape}, plus one axis of ids (or give a boolean mask of the "
      f"logits' shape {logits.shape})."
    )
  num_classes = math.prod(logits.shape[a] for a in axes)
  bad = None
  if is_concrete(members):
    values = np.asarray(members)
    check_ids(values, num_classes, name)
    ids = jnp.asarray(values.astype(np.int32))
  else:
    bad = jnp.any((members < -1) | (members >= num_classes), axis=-1)
    ids = jnp.asarray(members).astype(jnp.int32)
  mask = jnp.any(ids[..., None] == jnp.arange(num_classes, dtype=jnp.int32), axis=-2)
  return mask, bad


def check_ids(values: np.ndarray, limit: int, name: str) -> None:
  """Raises a ValueError naming the first id outside ``[-1, limit)`` (-1 pads)."""
  wrong = (values < -1) | (values >= limit)
  if wrong.any():
    at = tuple(int(i) for i in np.argwhere(wrong)[0])
    raise ValueError(
      f"{name}{index_str(at)} = {values[at]} is outside [0, {limit}) (and is not the padding -1)."
    )


def as_targets(targets: ArrayLike, logits: jax.Array) -> jax.Array:
  """Returns floating targets of the logits' shape in the logits' compute dtype."""
  targets = jnp.asarray(targets)
  if not jnp.issubdtype(targets.dtype, jnp.floating):
    raise TypeError(f"targets must be a real floating array, got dtype {targets.dtype}.")
  if targets.shape != logits.shape:
    raise ValueError(f"targets shape {targets.shape} does not match logits shape {logits.shape}.")
  return targets.astype(compute_dtype(logits.dtype))


def class_axis(axis: int | tuple[int, ...], logits: jax.Array) -> tuple[int, ...]:
  """Returns the class axes as non-negative indices into the logits' axes, or raises.

  ``axis`` is one axis or, as in optax, a tuple of axes whose entries together are the
  classes (flattened in the order given; a label is a flat index into them).
  """
  axes = axis if isinstance(axis, tuple) else (axis,)
  if not axes or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in axes):
    raise TypeError(
      f"axis must be an int or a non-empty tuple of ints (the class axes), got {axis!r}."
    )
  for a in axes:
    if not -logits.ndim <= a < logits.ndim:
      raise ValueError(f"axis {a} is out of range for logits of shape {logits.shape}.")
  canonical = tuple(int(a) % logits.ndim for a in axes)
  if len(set(canonical)) != len(canonical):
    raise ValueError(f"axis {axis!r} names an axis twice.")
  return canonical


def move_to_last(x: jax.Array, axes: int | tuple[int, ...]) -> jax.Array:
  """Moves the class axes of ``x`` to the end and flattens them into one (row-major in
  the order given, as optax does); a no-op for the last axis alone."""
  axes = axes if isinstance(axes, tuple) else (axes,)
  if axes == (x.ndim - 1,):
    return x
  batch = tuple(a for a in range(x.ndim) if a not in axes)
  x = jnp.transpose(x, batch + axes)
  return x.reshape(x.shape[: len(batch)] + (-1,))


def boolean_mask_for(where: ArrayLike, shape: tuple[int, ...], target: str) -> jax.Array:
  """``where`` as a boolean array that broadcasts to ``shape``, or a TypeError or
  ValueError naming ``target`` (e.g. "logits shape (4, 10)")."""
  where = _boolean(where)
  if not _broadcasts(where.shape, shape):
    raise ValueError(f"where shape {where.shape} does not broadcast to {target}.")
  return where


def _boolean(where: ArrayLike) -> jax.Array:
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
  return where


def _broadcasts(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
  try:
    return jnp.broadcast_shapes(shape, to) == tuple(to)
  except ValueError:
    return False


def as_where(
  where: ArrayLike | None, logits: jax.Array, axes: int | tuple[int, ...]
) -> jax.Array | None:
  """Checks ``where`` against the caller's logits by optax's rule and moves its class
  axes to the end (flattened, like the logits').

  ``logits`` is in the caller's layout, ``axes`` its class axes (from
  :func:`class_axis`). A mask with as many dimensions as the logits is elementwise and
  broadcasts to their shape (``[1, K]`` masks classes in every example). A mask with
  fewer is per example (``[batch]`` in optax's words): it broadcasts to the logits'
  shape without the class axes and is expanded there, so it stays one flag per example.
  """
  if where is None:
    return None
  where = _boolean(where)
  axes = axes if isinstance(axes, tuple) else (axes,)
  batch_shape = tuple(n for a, n in enumerate(logits.shape) if a not in axes)
  if where.ndim == logits.ndim and _broadcasts(where.shape, logits.shape):
    return move_to_last(where, axes)
  if where.ndim < logits.ndim and _broadcasts(where.shape, batch_shape):
    where = where.reshape((1,) * (len(batch_shape) - where.ndim) + where.shape)
    return jnp.expand_dims(where, sorted(axes)).reshape(batch_shape + (1,))
  raise ValueError(
    f"where shape {where.shape} does not broadcast to logits shape {logits.shape} by "
    f"either of optax's readings: elementwise, a mask with the logits' {logits.ndim} "
    f"dimensions that broadcasts to {logits.shape} (e.g. [1, K] for a mask over classes); "
    f"or per example, a mask with fewer dimensions that broadcasts to the logits' shape "
    f"without the class axis, {batch_shape}."
  )


def apply_where(logits: jax.Array, where: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """Gives excluded classes a logit of -inf (probability 0); returns ``(logits, kept)``.

  ``where`` comes from :func:`as_where`. ``kept`` marks the examples with at least
  one admissible class (None without ``where``); as in optax, the others get loss 0
  (see :func:`finish`). The select passes no gradient to excluded entries, so they
  get exactly zero.
  """
  if where is None:
    return logits, None
  return jnp.where(where, logits, -jnp.inf), jnp.any(where, axis=-1)


def finish(loss: jax.Array, kept: jax.Array | None, ignored: jax.Array | None = None) -> jax.Array:
  """Loss 0 (and, through the kernels' zero-cotangent rule, gradient 0) for the
  examples ``where`` excludes entirely and for those ``ignore_index`` marks."""
  if ignored is not None:
    kept = ~ignored if kept is None else kept & ~ignored
  if kept is None:
    return loss
  return jnp.where(kept, loss, jnp.zeros((), loss.dtype))


def zero_where_no_cotangent(g: jax.Array, grad: jax.Array) -> jax.Array:
  """``g * grad``, exactly 0 wherever the cotangent ``g`` is 0, whatever ``grad`` holds.

  A masked example (``jnp.where(mask, loss, 0)``, ``loss * mask``, ``ignore_index``)
  receives a zero cotangent; its own gradient may be NaN or inf (a padding label, a
  padded row of garbage logits), and ``0 * nan`` would poison every parameter.
  """
  return jnp.where(g == 0, jnp.zeros((), grad.dtype), g * grad)


@jax.custom_jvp
def sigmoid(x: jax.Array) -> jax.Array:
  """``jax.nn.sigmoid`` whose derivative is ``sigmoid(x) sigmoid(-x)``, exact in both
  tails; ``jax.nn.sigmoid``'s is ``s (1 - s)``, exactly 0 once ``s`` rounds to 1
  (``x > 17`` in float32), so a backward rule that uses it had inexact second
  derivatives."""
  return jax.nn.sigmoid(x)


@sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return sigmoid(x), jax.nn.sigmoid(x) * jax.nn.sigmoid(-x) * dx


def compiled(kernel, static_argnums: tuple[int, ...] = ()):
  """A ``custom_vjp`` kernel under ``jax.jit`` (its non-differentiable arguments static).

  Called eagerly (from a notebook, or under an eager ``jax.grad``), the kernel then runs
  as one compiled program for its value and one for its gradient, instead of dispatching
  and compiling each of its operations alone; under an outer ``jit`` it is inlined.
  """
  return jax.jit(kernel, static_argnums=static_argnums)
