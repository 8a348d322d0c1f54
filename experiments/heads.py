"""One interface for every output layer, so that training never asks which head it has.

A head answers four calls on a model (an ``MLP`` or ``CNN`` of :mod:`jaxsoftmax.models`):

- ``training_output(model, x, labels)``: what the losses need for these labels (the
  logits, or only the labels' cluster rows of a tree);
- ``nll(out, labels)``, ``set_nll(out, labels, wrong)`` and
  ``complement_nll(out, labels, wrong)``: per-example losses on that output
  (``wrong``: further wrong labels of each example, or None);
- ``largest_logit(out)``: the largest |logit| in it, for the divergence check;
- ``scores(model, x)``: per-class scores whose argmax is the prediction, and
  ``evaluation(model, x, y)``: those scores, the NLL of ``y`` and the largest |logit|.

Heads are frozen and hashable: they are part of the static training setup. A fused
large-vocabulary head joins by answering the same calls.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxsoftmax import losses
from jaxsoftmax.tree import ClassTree, balanced_tree


def _members(labels, wrong, num_classes):
  """A boolean ``[..., K]`` mask of ``labels`` and every ``wrong`` label >= 0."""
  every = jnp.concatenate([labels[..., None], wrong], axis=-1)
  return jnp.any(every[..., None] == jnp.arange(num_classes), axis=-2)


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
    return jnp.maximum(jnp.max(jnp.abs(cluster_logits)), jnp.max(jnp.where(valid, jnp.abs(within), 0.0)))

  def largest_logit(self, out):
    cluster_logits, rows, cluster = out
    return self._largest(cluster_logits, rows, jnp.asarray(self.tree.sizes)[cluster])

  def scores(self, model, x):
    return losses.hierarchical_log_softmax(*model(x), self.tree)

  def evaluation(self, model, x, y):
    cluster_logits, within = model(x)
    return (losses.hierarchical_log_softmax(cluster_logits, within, self.tree),
            losses.hierarchical_nll(cluster_logits, within, y, self.tree),
            self._largest(cluster_logits, within, jnp.asarray(self.tree.sizes)))


Head = SoftmaxHead | HierarchicalHead


def make_head(name: str, num_classes: int, num_clusters: int = 0) -> Head:
  """The head a config names: ``softmax``, or ``hierarchical`` over a balanced tree."""
  if name == "softmax":
    return SoftmaxHead(num_classes)
  if name == "hierarchical":
    return HierarchicalHead(balanced_tree(num_classes, num_clusters or None))
  raise ValueError(f"unknown head {name!r}; choose softmax or hierarchical.")


def tree_of(head: Head) -> ClassTree | None:
  """The class tree a model built for ``head`` needs (None for a flat head)."""
  return getattr(head, "tree", None)

