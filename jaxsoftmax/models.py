"""Flax NNX classifiers that return logits, for the losses in :mod:`jaxsoftmax.losses`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """Flattens the input, then ReLU hidden layers and a linear layer of logits.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = MLP((8, 8), num_classes=10, hidden=(32,), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 8, 8))).shape
    (4, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               hidden: Sequence[int] = (100, 100), rngs: nnx.Rngs):
    if num_classes < 1 or any(h < 1 for h in hidden):
      raise ValueError(f"num_classes and hidden sizes must be positive, got {num_classes}, {tuple(hidden)}.")
    self.input_shape = tuple(input_shape)
    sizes = (math.prod(self.input_shape), *hidden)
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(*x.shape[: x.ndim - len(self.input_shape)], -1)
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.head(x)


class CNN(nnx.Module):
  """Strided ReLU convolutions over a 1-D signal ``[L]`` or a 2-D image ``[H, W]``.

  Each layer halves the spatial size; a linear layer maps the flattened features to
  logits. With the defaults on a 1-D input it is the MNIST-1D paper's CNN (three
  layers of 25 channels, kernel 5, stride 2).

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = CNN((40,), num_classes=10, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 40))).shape
    (4, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               channels: Sequence[int] = (25, 25, 25), kernel_size: int | None = None,
               rngs: nnx.Rngs):
    self.input_shape = tuple(input_shape)
    rank = len(self.input_shape)
    if rank not in (1, 2):
      raise ValueError(f"CNN takes 1-D or 2-D inputs, got input shape {self.input_shape}.")
    kernel = kernel_size or (5 if rank == 1 else 3)
    sizes = (1, *channels)
    self.convs = nnx.List([
        nnx.Conv(a, b, (kernel,) * rank, strides=2, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:])
    ])
    spatial = self.input_shape
    for _ in channels:
      spatial = tuple(-(-s // 2) for s in spatial)  # SAME padding, stride 2
    self.head = nnx.Linear(math.prod(spatial) * sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch = x.shape[: x.ndim - len(self.input_shape)]
    x = x.reshape(-1, *self.input_shape, 1)
    for conv in self.convs:
      x = jax.nn.relu(conv_as_matmul(conv, x))
    return self.head(x.reshape(*batch, -1))


def conv_as_matmul(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """``conv(x)`` for a SAME-padded ``nnx.Conv``, computed as patches times kernel.

  The same numbers as ``conv(x)`` up to rounding, but a matrix product over patches
  cut with strided slices: under ``jax.vmap`` over stacked parameters it stays a
  batched matrix product, where a vmapped convolution becomes a grouped one that
  XLA's CPU backend runs several times slower, most of all inside ``lax.scan``.
  """
  kernel = conv.kernel[...]                      # [*window, C_in, C_out]
  window = kernel.shape[:-2]
  strides = conv.strides if isinstance(conv.strides, Sequence) else (conv.strides,) * len(window)
  spatial = x.shape[-len(window) - 1:-1]
  out = [-(-n // s) for n, s in zip(spatial, strides)]
  pads = [(0, 0)] * (x.ndim - len(window) - 1)
  for n, k, s, o in zip(spatial, window, strides, out):
    total = max((o - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  x = jnp.pad(x, [*pads, (0, 0)])
  lead = (slice(None),) * (x.ndim - len(window) - 1)
  taps = [x[(*lead, *(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out, strides)))]
          for offset in itertools.product(*(range(k) for k in window))]
  patches = jnp.concatenate(taps, axis=-1)       # [..., *out, prod(window) * C_in], window-major
  y = patches @ kernel.reshape(-1, kernel.shape[-1])
  return y + conv.bias[...] if conv.bias is not None else y
