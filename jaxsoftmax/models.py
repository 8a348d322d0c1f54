"""Flax NNX classifiers that return logits, for the losses in :mod:`jaxsoftmax.losses`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsoftmax.losses import hierarchical_log_softmax, tree_log_softmax
from jaxsoftmax.tree import ClassTree, Tree


class MLP(nnx.Module):
  """Flattens the input, then ReLU hidden layers and a linear layer of logits.

  Given a ``tree``, the output layer is a :class:`HierarchicalSoftmax` (a ``ClassTree``)
  or a :class:`TreeSoftmax` (a ``Tree`` of any depth) instead.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = MLP((8, 8), num_classes=10, hidden=(32,), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 8, 8))).shape
    (4, 10)
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (100, 100),
    tree: ClassTree | Tree | None = None,
    rngs: nnx.Rngs,
  ):
    if num_classes < 1 or any(h < 1 for h in hidden):
      raise ValueError(
        f"num_classes and hidden sizes must be positive, got {num_classes}, {tuple(hidden)}."
      )
    self.input_shape = tuple(input_shape)
    sizes = (math.prod(self.input_shape), *hidden)
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.head = make_head(sizes[-1], num_classes, tree, rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The last hidden layer's activations, the head's input."""
    x = x.reshape(*x.shape[: x.ndim - len(self.input_shape)], -1)
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return x

  def __call__(self, x: jax.Array):
    return self.head(self.features(x))

  def output_layer(self) -> tuple[jax.Array, jax.Array]:
    """The linear head's weights ``[D, K]`` and bias ``[K]``, for the fused losses."""
    return _linear_weights(self.head)


class CNN(nnx.Module):
  """Strided ReLU convolutions over a 1-D signal ``[L]`` or a 2-D image ``[H, W]``.

  Each layer halves the spatial size; a linear layer maps the flattened features to
  logits (a :class:`HierarchicalSoftmax`, given a ``tree``). With the defaults on a
  1-D input it is the MNIST-1D paper's CNN (three layers of 25 channels, kernel 5,
  stride 2).

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = CNN((40,), num_classes=10, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 40))).shape
    (4, 10)
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    channels: Sequence[int] = (25, 25, 25),
    kernel_size: int | None = None,
    tree: ClassTree | Tree | None = None,
    rngs: nnx.Rngs,
  ):
    self.input_shape = tuple(input_shape)
    rank = len(self.input_shape)
    if rank not in (1, 2):
      raise ValueError(f"CNN takes 1-D or 2-D inputs, got input shape {self.input_shape}.")
    kernel = kernel_size or (5 if rank == 1 else 3)
    sizes = (1, *channels)
    self.convs = nnx.List(
      [
        nnx.Conv(a, b, (kernel,) * rank, strides=2, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:])
      ]
    )
    spatial = self.input_shape
    for _ in channels:
      spatial = tuple(-(-s // 2) for s in spatial)  # SAME padding, stride 2
    self.head = make_head(math.prod(spatial) * sizes[-1], num_classes, tree, rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The flattened last convolution's activations, the head's input."""
    batch = x.shape[: x.ndim - len(self.input_shape)]
    x = x.reshape(-1, *self.input_shape, 1)
    for conv in self.convs:
      x = jax.nn.relu(conv_as_matmul(conv, x))
    return x.reshape(*batch, -1)

  def __call__(self, x: jax.Array):
    return self.head(self.features(x))

  def output_layer(self) -> tuple[jax.Array, jax.Array]:
    """The linear head's weights ``[D, K]`` and bias ``[K]``, for the fused losses."""
    return _linear_weights(self.head)


def make_head(
  in_features: int, num_classes: int, tree: ClassTree | Tree | None, rngs: nnx.Rngs
) -> nnx.Module:
  """A ``Linear`` layer of logits, a :class:`HierarchicalSoftmax` over a ``ClassTree``
  or a :class:`TreeSoftmax` over a ``Tree`` of any depth.

  With a class tree, the model's call returns ``(cluster_logits, within_logits)``; with
  a tree, the node logits ``[..., N, B]``; else the logits.
  """
  if tree is None:
    return nnx.Linear(in_features, num_classes, rngs=rngs)
  if tree.num_classes != num_classes:
    raise ValueError(
      f"the class tree has {tree.num_classes} classes, but the model has "
      f"{num_classes}: the tree needs one leaf per class."
    )
  if isinstance(tree, Tree):
    return TreeSoftmax(in_features, tree, rngs=rngs)
  return HierarchicalSoftmax(in_features, tree, rngs=rngs)


def _linear_weights(head: nnx.Module) -> tuple[jax.Array, jax.Array]:
  if not isinstance(head, nnx.Linear):
    raise TypeError(f"the fused losses need a linear output layer, not a {type(head).__name__}.")
  if head.bias is None:
    raise TypeError("the fused losses need a linear output layer with a bias (use_bias=True).")
  return head.kernel[...], head.bias[...]


def conv_as_matmul(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """``conv(x)`` for a SAME-padded ``nnx.Conv``, computed as patches times kernel.

  The same numbers as ``conv(x)`` up to rounding, but a matrix product over patches
  cut with strided slices: under ``jax.vmap`` over stacked parameters it stays a
  batched matrix product, where a vmapped convolution becomes a grouped one that
  XLA's CPU backend runs several times slower, most of all inside ``lax.scan``.
  """
  kernel = conv.kernel[...]  # [*window, C_in, C_out]
  window = kernel.shape[:-2]
  given = 1 if conv.strides is None else conv.strides  # nnx.Conv's None: stride 1
  strides = tuple(given) if isinstance(given, Sequence) else (given,) * len(window)
  spatial = x.shape[-len(window) - 1 : -1]
  out = [-(-n // s) for n, s in zip(spatial, strides)]
  pads = [(0, 0)] * (x.ndim - len(window) - 1)
  for n, k, s, o in zip(spatial, window, strides, out):
    total = max((o - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  x = jnp.pad(x, [*pads, (0, 0)])
  lead = (slice(None),) * (x.ndim - len(window) - 1)
  taps = [
    x[(*lead, *(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out, strides)))]
    for offset in itertools.product(*(range(k) for k in window))
  ]
  patches = jnp.concatenate(taps, axis=-1)  # [..., *out, prod(window) * C_in], window-major
  y = patches @ kernel.reshape(-1, kernel.shape[-1])
  return y + conv.bias[...] if conv.bias is not None else y


class HierarchicalSoftmax(nnx.Module):
  """A two-level softmax output layer: cluster logits and within-cluster logits.

  ``p(y = l) = p(c) * p(l | c)`` with ``c`` the cluster of ``l`` in ``tree``. The
  cluster layer is a ``Linear(in_features, C)``; each cluster ``c`` has its own
  ``[in_features, M]`` kernel and ``[M]`` bias (``M`` the largest cluster's size;
  the slots past a smaller cluster's size are never used).

  Calling the head computes every logit (O(K) per example), for prediction and
  :func:`~jaxsoftmax.losses.hierarchical_log_softmax`; :meth:`target_logits`
  computes only the label's cluster row (O(C + M) per example, O(sqrt K) for a
  balanced tree), which is all that :func:`~jaxsoftmax.losses.hierarchical_nll` and
  :func:`~jaxsoftmax.losses.hierarchical_complement_nll` need.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import hierarchical_nll
    >>> from jaxsoftmax.tree import balanced_tree
    >>> head = HierarchicalSoftmax(16, balanced_tree(100), rngs=nnx.Rngs(0))
    >>> x, y = jnp.ones((4, 16)), jnp.array([0, 5, 50, 99])
    >>> cluster_logits, row = head.target_logits(x, y)
    >>> cluster_logits.shape, row.shape
    ((4, 10), (4, 10))
    >>> head.log_probs(x).shape
    (4, 100)
    >>> bool(jnp.allclose(hierarchical_nll(cluster_logits, row, y, head.tree),
    ...                   -head.log_probs(x)[jnp.arange(4), y], rtol=1e-5))
    True
  """

  def __init__(self, in_features: int, tree: ClassTree, *, rngs: nnx.Rngs):
    if not isinstance(tree, ClassTree):
      raise TypeError(f"tree must be a jaxsoftmax.tree.ClassTree, got {type(tree).__name__}.")
    self.tree = tree
    self.clusters = nnx.Linear(in_features, tree.num_clusters, rngs=rngs)
    init = jax.nn.initializers.lecun_normal(batch_axis=0)
    self.kernel = nnx.Param(init(rngs.params(), (tree.num_clusters, in_features, tree.max_size)))
    self.bias = nnx.Param(jnp.zeros((tree.num_clusters, tree.max_size)))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cluster_logits [..., C], within_logits [..., C, M])`` for features ``[..., D]``."""
    within = jnp.einsum("...d,cdm->...cm", x, self.kernel[...]) + self.bias[...]
    return self.clusters(x), within

  def target_logits(self, x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cluster_logits [..., C], row [..., M])``: only the labels' cluster rows."""
    cluster = jnp.asarray(self.tree.cluster_of)[labels]
    row = jnp.einsum("...d,...dm->...m", x, self.kernel[...][cluster]) + self.bias[...][cluster]
    return self.clusters(x), row

  def log_probs(self, x: jax.Array) -> jax.Array:
    """Log-probabilities of all ``K`` classes, ``[..., K]``."""
    return hierarchical_log_softmax(*self(x), self.tree)


class TreeSoftmax(nnx.Module):
  """A tree-structured softmax output layer of any depth (:class:`~jaxsoftmax.tree.Tree`).

  Every internal node ``n`` has a ``[in_features, B]`` kernel and a ``[B]`` bias: its
  logits over its children. Calling the layer computes every node's logits, the
  ``[..., N, B]`` table (O(K B D) per example), for prediction and
  :func:`~jaxsoftmax.losses.tree_log_softmax`; :meth:`path_logits` computes only the
  nodes on the given classes' paths (O(L B D) per class, O(log K) for a balanced or
  Huffman tree), which is all the tree losses need.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.losses import tree_nll
    >>> from jaxsoftmax.tree import Tree
    >>> head = TreeSoftmax(16, Tree.balanced(100, 2), rngs=nnx.Rngs(0))
    >>> x, y = jnp.ones((4, 16)), jnp.array([0, 5, 50, 99])
    >>> head.path_logits(x, y).shape      # 7 levels of a binary tree over 100 classes
    (4, 7, 2)
    >>> paths = head.path_logits(x, y)
    >>> bool(jnp.allclose(tree_nll(paths, y, head.tree, layout="paths"),
    ...                   -head.log_probs(x)[jnp.arange(4), y], rtol=1e-5))
    True
  """

  def __init__(self, in_features: int, tree: Tree, *, rngs: nnx.Rngs):
    if not isinstance(tree, Tree):
      raise TypeError(f"tree must be a jaxsoftmax.tree.Tree, got {type(tree).__name__}.")
    self.tree = tree
    init = jax.nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)
    self.kernel = nnx.Param(init(rngs.params(), (tree.num_nodes, in_features, tree.branching)))
    self.bias = nnx.Param(jnp.zeros((tree.num_nodes, tree.branching)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """The node logits ``[..., N, B]`` for features ``[..., D]``."""
    return jnp.einsum("...d,ndb->...nb", x, self.kernel[...]) + self.bias[...]

  def path_logits(self, x: jax.Array, classes: jax.Array) -> jax.Array:
    """The logits of the nodes on each class's path: ``[..., L, B]`` for classes
    ``[...]`` (one per example of ``x [..., D]``), ``[..., M, L, B]`` for ``[..., M]``."""
    return tree_path_logits(x, self.kernel[...], self.bias[...], self.tree, classes)

  def log_probs(self, x: jax.Array) -> jax.Array:
    """Log-probabilities of all ``K`` classes, ``[..., K]``."""
    return tree_log_softmax(self(x), self.tree)


def tree_path_logits(
  x: jax.Array, kernel: jax.Array, bias: jax.Array, tree: Tree, classes: jax.Array
) -> jax.Array:
  """:meth:`TreeSoftmax.path_logits` on given weights: gathers each path's ``[L, D, B]``
  kernel rows (levels past a class's depth read the root's, which the losses ignore)."""
  nodes = jnp.maximum(jnp.asarray(tree.path_nodes)[jnp.maximum(classes, 0)], 0)
  x = x.reshape(*x.shape[:-1], *(1,) * (classes.ndim - x.ndim + 1), x.shape[-1])
  return jnp.einsum("...d,...ldb->...lb", x, kernel[nodes]) + bias[nodes]


class TransformerLM(nnx.Module):
  """A small decoder-only transformer: token and learned position embeddings, pre-norm
  blocks of causal multi-head attention and a ReLU MLP, a final layer norm.

  ``features(tokens)`` gives the last hidden states ``[..., T, D]``; ``output_layer()``
  gives the output weights ``w`` ``[D, V]`` and bias ``[V]``, for the fused losses
  (:func:`jaxsoftmax.losses.fused_nll` and the others), which never form the logits.
  Calling the model gives the logits ``[..., T, V]``; given a ``tree``, the output layer
  is a :class:`HierarchicalSoftmax` and calling gives its two sets of logits.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> lm = TransformerLM(vocab_size=100, max_length=16, width=32, depth=1, heads=2,
    ...                    rngs=nnx.Rngs(0))
    >>> lm(jnp.zeros((3, 16), jnp.int32)).shape
    (3, 16, 100)
  """

  def __init__(
    self,
    vocab_size: int,
    max_length: int,
    *,
    width: int = 64,
    depth: int = 2,
    heads: int = 4,
    tree: ClassTree | Tree | None = None,
    rngs: nnx.Rngs,
  ):
    if width % heads:
      raise ValueError(f"width ({width}) must be a multiple of heads ({heads}).")
    self.max_length = max_length
    self.embed = nnx.Embed(vocab_size, width, rngs=rngs)
    self.position = nnx.Embed(max_length, width, rngs=rngs)
    self.blocks = nnx.List([_Block(width, heads, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.out = make_head(width, vocab_size, tree, rngs)

  @property
  def head(self) -> nnx.Module:
    """The output layer (a ``Linear``, or a :class:`HierarchicalSoftmax` given a ``tree``)."""
    return self.out

  def features(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[-1]
    if t > self.max_length:
      raise ValueError(f"sequence length {t} is longer than max_length {self.max_length}.")
    x = self.embed(tokens) + self.position(jnp.arange(t))
    mask = nnx.make_causal_mask(jnp.ones(tokens.shape, bool))
    for block in self.blocks:
      x = block(x, mask)
    return self.norm(x)

  def output_layer(self) -> tuple[jax.Array, jax.Array]:
    return _linear_weights(self.out)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.out(self.features(tokens))


class _Block(nnx.Module):
  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.down(jax.nn.relu(self.up(self.norm2(x))))
