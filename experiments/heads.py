"""One interface for every output layer, so that training never asks which head it has.

A head answers these calls on a model (an ``MLP``, ``CNN`` or ``TransformerLM`` of
:mod:`jaxsoftmax.models`; labels may have any leading shape, ``[B]`` for a classifier,
``[B, T]`` for a language model's tokens):

- ``training_output(model, x, labels)``: what the losses need for these labels (the
  logits, or only the labels' cluster rows of a tree);
- ``nll(out, labels)``, ``set_nll(out, labels, wrong)`` and
  ``complement_nll(out, labels, wrong)``: per-example losses on that output
  (``wrong``: further wrong labels of each example, or None);
- ``largest_logit(out)``: the largest ``|logit|`` in it, for the divergence check;
- ``scores(model, x)``: per-class scores whose argmax is the prediction, and
  ``evaluation(model, x, y)``: those scores, the NLL of ``y`` and the largest ``|logit|``.

Sets of wrong labels are ids ``[..., M]`` padded with -1; a head that needs a mask builds
it by one scatter (:func:`id_mask`). Heads are frozen and hashable: they are part of the
static training setup.

- :class:`SoftmaxHead`: the logits and the flat losses.
- :class:`HierarchicalHead`: a two-level class tree; training computes only the labels'
  cluster rows; one wrong label per example.
- :class:`FusedHead`: the fused linear + loss of :mod:`jaxsoftmax.losses`
  (``fused_nll`` and the others), streamed over chunks of classes: training never forms
  the ``[..., K]`` logits. Its ``largest_logit`` is an upper bound read without forming
  them, ``max_k (max_i |h_i| |w_k| + |b_k|)`` (Cauchy-Schwarz), so the divergence rule
  fires no later than on the logits themselves.
- :class:`TreeHead`: a tree of any depth (balanced or Huffman); training computes only
  the nodes on the labels' paths; sets of wrong labels through the tree's set losses.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from jaxsoftmax_experiments import _deferred

if TYPE_CHECKING:
  from jaxsoftmax.tree import ClassTree, Tree

jnp = _deferred.module("jax.numpy")
losses = _deferred.module("jaxsoftmax.losses")
models = _deferred.module("jaxsoftmax.models")
tree_lib = _deferred.module("jaxsoftmax.tree")


def id_mask(ids, num_classes: int):
  """The ``[..., K]`` boolean mask of padded id lists ``[..., M]`` (-1 unused), written by
  one scatter (no ``[..., M, K]`` comparison).

  Example:
    >>> id_mask(jnp.array([[1, -1, 3, 1], [-1, -1, -1, -1]]), 5).astype(int).tolist()
    [[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]]
  """
  flat = ids.reshape(-1, ids.shape[-1])
  rows = jnp.arange(flat.shape[0])[:, None]
  mask = (
    jnp.zeros((flat.shape[0], num_classes), bool)
    .at[rows, jnp.where(flat < 0, num_classes, flat)]
    .set(True, mode="drop")
  )
  return mask.reshape(*ids.shape[:-1], num_classes)


def _ids(labels, wrong):
  """``labels`` (a label < 0 is none) and the further ``wrong`` ids as one id list."""
  return jnp.concatenate([labels[..., None], wrong], axis=-1)


def _members(labels, wrong, num_classes):
  """A boolean ``[..., K]`` mask of ``labels`` and every ``wrong`` label >= 0."""
  return id_mask(_ids(labels, wrong), num_classes)


@dataclasses.dataclass(frozen=True)
class SoftmaxHead:
  """A linear layer of logits with the flat losses."""

  num_classes: int

  def training_output(self, model, x, labels):
    del labels
    return model(x)

  def nll(self, out, labels):
    return losses.nll(out, labels)

  def complement_nll(self, out, labels, wrong=None):
    if wrong is None:
      return losses.complement_nll(out, labels)
    return losses.complement_set_nll(out, _members(labels, wrong, self.num_classes))

  def set_nll(self, out, labels, wrong=None):
    """``-log P(labels and wrong)``: the NLL of the example's label, or of its set."""
    if wrong is None:
      return losses.nll(out, labels)
    return losses.set_nll(out, _members(labels, wrong, self.num_classes))

  def flat_loss(self, name, out, labels, **kwargs):
    """A loss of :mod:`jaxsoftmax.losses` on the logits and one label per example."""
    return getattr(losses, name)(out, labels, **kwargs)

  def set_loss(self, name, out, labels, wrong=None):
    """A set loss of :mod:`jaxsoftmax.losses` on the label and the further wrong labels."""
    if wrong is None:
      wrong = jnp.full((*labels.shape, 0), -1, labels.dtype)
    return getattr(losses, name)(out, _members(labels, wrong, self.num_classes))

  def largest_logit(self, out):
    return jnp.max(jnp.abs(out))

  def scores(self, model, x):
    return model(x)

  def evaluation(self, model, x, y):
    out = model(x)
    return out, losses.nll(out, y), self.largest_logit(out)


@dataclasses.dataclass(frozen=True)
class HierarchicalHead:
  """A two-level class tree: training computes only the labels' cluster rows."""

  tree: ClassTree

  def training_output(self, model, x, labels):
    cluster_logits, rows = model.head.target_logits(model.features(x), labels)
    return cluster_logits, rows, jnp.asarray(self.tree.cluster_of)[labels]

  def nll(self, out, labels):
    return losses.hierarchical_nll(out[0], out[1], labels, self.tree)

  def complement_nll(self, out, labels, wrong=None):
    if wrong is not None:
      raise ValueError("the hierarchical head takes one wrong label per example, not sets.")
    return losses.hierarchical_complement_nll(out[0], out[1], labels, self.tree)

  def set_nll(self, out, labels, wrong=None):
    if wrong is not None:
      raise ValueError("the hierarchical head takes one wrong label per example, not sets.")
    return self.nll(out, labels)

  def _largest(self, cluster_logits, within, sizes):
    valid = jnp.arange(self.tree.max_size) < sizes[..., None]
    return jnp.maximum(
      jnp.max(jnp.abs(cluster_logits)), jnp.max(jnp.where(valid, jnp.abs(within), 0.0))
    )

  def largest_logit(self, out):
    cluster_logits, rows, cluster = out
    return self._largest(cluster_logits, rows, jnp.asarray(self.tree.sizes)[cluster])

  def scores(self, model, x):
    return losses.hierarchical_log_softmax(*model(x), self.tree)

  def evaluation(self, model, x, y):
    cluster_logits, within = model(x)
    return (
      losses.hierarchical_log_softmax(cluster_logits, within, self.tree),
      losses.hierarchical_nll(cluster_logits, within, y, self.tree),
      self._largest(cluster_logits, within, jnp.asarray(self.tree.sizes)),
    )


@dataclasses.dataclass(frozen=True)
class FusedHead(SoftmaxHead):
  """The fused losses on the features and the output layer's weights: training never
  forms the logits (evaluation does, as :class:`SoftmaxHead`)."""

  vocab_chunk: int = 512

  def training_output(self, model, x, labels):
    del labels
    w, b = model.output_layer()
    return model.features(x), w, b

  def _kw(self, out):
    return dict(bias=out[2], vocab_chunk=self.vocab_chunk)

  def nll(self, out, labels):
    return losses.fused_nll(out[0], out[1], labels, **self._kw(out))

  def complement_nll(self, out, labels, wrong=None):
    if wrong is None:
      return losses.fused_complement_nll(out[0], out[1], labels, **self._kw(out))
    return losses.fused_complement_set_nll(out[0], out[1], _ids(labels, wrong), **self._kw(out))

  def set_nll(self, out, labels, wrong=None):
    """``-log P(labels and wrong)``; an empty set gives 0 (its loss is masked out)."""
    if wrong is None:
      return self.nll(out, labels)
    ids = _ids(labels, wrong)
    return losses.fused_set_nll(out[0], out[1], ids, where=jnp.any(ids >= 0, -1), **self._kw(out))

  def flat_loss(self, name, out, labels, **kwargs):
    raise ValueError(f"{name} needs the logits, which the fused head never forms.")

  set_loss = flat_loss

  def evaluation(self, model, x, y):
    out = model(x)
    return out, losses.nll(out, y), jnp.max(jnp.abs(out))

  def largest_logit(self, out):
    h, w, b = out
    largest_h = jnp.max(jnp.linalg.norm(h.astype(jnp.float32), axis=-1))
    column = jnp.linalg.norm(w.astype(jnp.float32), axis=0)
    return jnp.max(largest_h * column + jnp.abs(b.astype(jnp.float32)))


@dataclasses.dataclass(frozen=True)
class TreeHead:
  """A tree of any depth (:class:`jaxsoftmax.tree.Tree`): training computes only the
  logits of the nodes on the labels' (and the wrong labels') paths, O(depth) per label.

  Its training output is the features and the output layer's weights, as the fused
  head's; its ``largest_logit`` is the bound ``max_i |h_i| max_{n,b} |w_nb| + max |b|``
  (Cauchy-Schwarz), so the divergence rule fires no later than on the logits."""

  tree: Tree

  def training_output(self, model, x, labels):
    del labels
    layer = _output_module(model)
    return model.features(x), layer.kernel[...], layer.bias[...]

  def _paths(self, out, classes):
    return models.tree_path_logits(*out, self.tree, classes)

  def nll(self, out, labels):
    return losses.tree_nll(self._paths(out, labels), labels, self.tree, layout="paths")

  def complement_nll(self, out, labels, wrong=None):
    if wrong is None:
      return losses.tree_complement_nll(self._paths(out, labels), labels, self.tree, layout="paths")
    ids = _ids(labels, wrong)
    return losses.tree_complement_set_nll(
      self._paths(out, ids), ids, self.tree, ignore_index=-1, layout="paths"
    )

  def set_nll(self, out, labels, wrong=None):
    """``-log P(labels and wrong)``; an empty set gives 0 (its loss is masked out)."""
    if wrong is None:
      return self.nll(out, labels)
    ids = _ids(labels, wrong)
    return losses.tree_set_nll(
      self._paths(out, ids), ids, self.tree, ignore_index=-1, layout="paths"
    )

  def flat_loss(self, name, out, labels, **kwargs):
    raise ValueError(f"{name} needs the logits, which the tree head never forms.")

  set_loss = flat_loss

  def largest_logit(self, out):
    h, kernel, bias = out
    largest_h = jnp.max(jnp.linalg.norm(h.astype(jnp.float32), axis=-1))
    column = jnp.linalg.norm(kernel.astype(jnp.float32), axis=1)  # [N, B]
    return jnp.max(largest_h * column + jnp.abs(bias.astype(jnp.float32)))

  def scores(self, model, x):
    return losses.tree_log_softmax(model(x), self.tree)

  def evaluation(self, model, x, y):
    table = model(x)
    valid = jnp.arange(self.tree.branching) < jnp.asarray(self.tree.arity)[:, None]
    return (
      losses.tree_log_softmax(table, self.tree),
      losses.tree_nll(table, y, self.tree, layout="table"),
      jnp.max(jnp.where(valid, jnp.abs(table), 0.0)),
    )


def _output_module(model):
  """The model's output layer: ``head`` of an MLP or CNN, ``out`` of a TransformerLM."""
  return model.head if hasattr(model, "head") else model.out


Head = SoftmaxHead | HierarchicalHead | FusedHead | TreeHead
NAMES = ("softmax", "hierarchical", "fused", "tree")
TREES = ("huffman", "balanced")


def make_head(
  name: str,
  num_classes: int,
  num_clusters: int = 0,
  vocab_chunk: int = 512,
  *,
  tree: str = "balanced",
  branching: int = 2,
  frequencies: np.ndarray | None = None,
) -> Head:
  """The head a config names: ``softmax``, ``hierarchical`` over a balanced tree,
  ``fused`` (chunks of ``vocab_chunk`` classes), or ``tree``: a ``balanced`` or
  ``huffman`` tree of ``branching`` children per node (Huffman from ``frequencies``,
  the class counts of the training data)."""
  if name == "tree":
    if num_classes < 2:
      raise ValueError(
        f"the tree head needs at least 2 classes, got {num_classes}: with one class its "
        "probability is 1 whatever the model does, so there is nothing to train."
      )
    if tree == "huffman":
      if frequencies is None or len(frequencies) != num_classes:
        raise ValueError(f"a Huffman tree needs the frequencies of the {num_classes} classes.")
      return TreeHead(tree_lib.Tree.huffman(frequencies, branching))
    if tree == "balanced":
      return TreeHead(tree_lib.Tree.balanced(num_classes, branching))
    raise ValueError(f"unknown tree {tree!r}; choose one of {', '.join(TREES)}.")
  if name == "softmax":
    return SoftmaxHead(num_classes)
  if name == "hierarchical":
    return HierarchicalHead(tree_lib.balanced_tree(num_classes, num_clusters or None))
  if name == "fused":
    return FusedHead(num_classes, vocab_chunk)
  raise ValueError(f"unknown head {name!r}; choose one of {', '.join(NAMES)}.")


def tree_of(head: Head) -> ClassTree | Tree | None:
  """The class tree a model built for ``head`` needs (None for a flat head)."""
  return getattr(head, "tree", None)
