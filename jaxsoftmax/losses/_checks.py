"""Validation and normalisation of loss inputs, shared by every public loss.

The public wrappers call these before the custom-VJP kernels, so the kernels only
ever see floating logits in their compute dtype, class masks as booleans and labels
as int32 with every invalid label replaced by -1.
"""

from __future__ import annotations

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


def as_logits(logits: ArrayLike, *, name: str = "logits") -> jax.Array:
  """Returns logits as an array in their compute dtype.

  float32 and float64 compute in their own precision; bfloat16 and float16 compute
  in float32 (the cast's VJP returns the gradient in the input's dtype).
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
  if logits.dtype in _LOW_PRECISION:
    logits = logits.astype(jnp.float32)
  return logits


def as_labels(labels: ArrayLike, logits: jax.Array, num_classes: int | None = None) -> jax.Array:
  """Returns int32 labels with every label outside ``[0, K)`` replaced by -1.

  ``K`` is ``num_classes`` when given (a hierarchical head, whose logits are not
  one per class), else the logits' last axis; labels have shape ``logits.shape[:-1]``.

  Eagerly, a label outside ``[0, K)`` raises a ValueError naming the first one
  and its position. Under a transformation the values are unknown at trace time,
  so the kernels turn the -1 into NaN for that example only.
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got dtype {labels.dtype}.")
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f"labels shape {labels.shape} does not match logits shape {logits.shape}: "
        f"labels must have shape logits.shape[:-1] = {logits.shape[:-1]}."
    )
  if num_classes is None:
    num_classes = logits.shape[-1]
  if is_concrete(labels):
    values = np.asarray(labels)
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f"labels{index_str(where)} = {values[where]} is outside [0, {num_classes}) "
          f"({int(bad.sum())} of {values.size} labels are out of range)."
      )
  # Compare in the labels' own dtype so that no cast can wrap a bad label into range.
  valid = labels >= 0
  if num_classes <= jnp.iinfo(labels.dtype).max:
    valid &= labels < jnp.asarray(num_classes, labels.dtype)
  return jnp.where(valid, labels, -1).astype(jnp.int32)


def as_class_mask(mask: ArrayLike, logits: jax.Array, *, name: str) -> jax.Array:
  """Returns a boolean mask of the logits' shape, one entry per class."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
        f"{name} must be a boolean mask, got dtype {mask.dtype}; "
        f"pass {name}.astype(bool) for a 0/1 array."
    )
  if mask.shape != logits.shape:
    raise ValueError(
        f"{name} shape {mask.shape} does not match logits shape {logits.shape}."
    )
  return mask


def as_targets(targets: ArrayLike, logits: jax.Array) -> jax.Array:
  """Returns floating targets of the logits' shape in the logits' compute dtype."""
  targets = jnp.asarray(targets)
  if not jnp.issubdtype(targets.dtype, jnp.floating):
    raise TypeError(f"targets must be a real floating array, got dtype {targets.dtype}.")
  if targets.shape != logits.shape:
    raise ValueError(
        f"targets shape {targets.shape} does not match logits shape {logits.shape}."
    )
  return targets.astype(logits.dtype)


def apply_where(logits: jax.Array, where: ArrayLike | None) -> jax.Array:
  """Gives the classes that ``where`` excludes a logit of -inf (probability 0).

  The select passes no gradient to excluded entries, so they get exactly zero.
  """
  if where is None:
    return logits
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
  try:
    shape = jnp.broadcast_shapes(where.shape, logits.shape)
  except ValueError:
    shape = None
  if shape != logits.shape:
    raise ValueError(
        f"where shape {where.shape} does not broadcast to logits shape {logits.shape}."
    )
  return jnp.where(where, logits, -jnp.inf)
