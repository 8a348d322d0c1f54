"""Two-level class trees for hierarchical softmax: every class belongs to one cluster.

A tree of ``K`` classes in ``C`` clusters stores, for each class, its cluster and its
slot inside the cluster. The within-cluster logits of a model are laid out as a
``[C, M]`` table, ``M`` the largest cluster's size; the slots past a smaller cluster's
size are padding and never carry probability.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax.typing import ArrayLike


@dataclasses.dataclass(frozen=True, eq=False)
class ClassTree:
  """Which cluster each class belongs to, and where inside it.

  Build one with :meth:`from_clusters` or :func:`balanced_tree`; the constructor
  checks its arguments the same way. The arrays are numpy (static under ``jit``):
  close over a tree or pass it as a static argument. Trees compare and hash by
  their class -> cluster array.

  Attributes:
    cluster_of: ``[K]`` int32, the cluster of each class.
    slot_of: ``[K]`` int32, each class's position inside its cluster (classes keep
      their order within a cluster).
    sizes: ``[C]`` int32, the number of classes per cluster (all >= 1).
    members: ``[C, M]`` int32, the classes of each cluster by slot, -1 past its size.

  Example:
    >>> tree = ClassTree.from_clusters([0, 0, 1, 2, 1])
    >>> tree.num_classes, tree.num_clusters, tree.max_size
    (5, 3, 2)
    >>> tree.members.tolist()
    [[0, 1], [2, 4], [3, -1]]
  """

  cluster_of: np.ndarray
  num_clusters: int

  def __post_init__(self):
    cluster_of = np.asarray(self.cluster_of)
    if cluster_of.ndim != 1 or cluster_of.size == 0:
      raise ValueError(
          f"cluster_of must be a non-empty 1-D array (class -> cluster), got shape {cluster_of.shape}.")
    if not np.issubdtype(cluster_of.dtype, np.integer):
      raise ValueError(f"cluster_of must hold integer cluster ids, got dtype {cluster_of.dtype}.")
    num_clusters = int(self.num_clusters)
    if num_clusters < 1:
      raise ValueError(f"num_clusters must be positive, got {num_clusters}.")
    bad = (cluster_of < 0) | (cluster_of >= num_clusters)
    if bad.any():
      k = int(np.argmax(bad))
      raise ValueError(
          f"cluster_of[{k}] = {cluster_of[k]} is outside [0, {num_clusters}) "
          f"({int(bad.sum())} class(es) have an out-of-range cluster id).")
    sizes = np.bincount(cluster_of, minlength=num_clusters)
    if (sizes == 0).any():
      empty = np.flatnonzero(sizes == 0)
      raise ValueError(
          f"cluster {int(empty[0])} is empty ({empty.size} of {num_clusters} clusters "
          f"have no class): every cluster needs at least one class.")
    cluster_of = cluster_of.astype(np.int32)
    order = np.argsort(cluster_of, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot_of = np.empty_like(cluster_of)
    slot_of[order] = np.arange(cluster_of.size) - starts[cluster_of[order]]
    members = np.full((num_clusters, int(sizes.max())), -1, np.int32)
    members[cluster_of, slot_of] = np.arange(cluster_of.size, dtype=np.int32)
    for name, value in (("cluster_of", cluster_of), ("slot_of", slot_of),
                        ("sizes", sizes.astype(np.int32)), ("members", members)):
      value.setflags(write=False)
      object.__setattr__(self, name, value)
    object.__setattr__(self, "num_clusters", num_clusters)

  @classmethod
  def from_clusters(cls, cluster_of: ArrayLike, num_clusters: int | None = None,
                    *, num_classes: int | None = None) -> ClassTree:
    """A tree from each class's cluster id.

    Args:
      cluster_of: ``[K]`` integer cluster ids in ``[0, num_clusters)``.
      num_clusters: the number of clusters; by default ``max(cluster_of) + 1``.
      num_classes: if given, ``len(cluster_of)`` must equal it.

    Raises:
      ValueError: for a wrong length, an out-of-range id or an empty cluster.
    """
    cluster_of = np.asarray(cluster_of)
    if num_classes is not None and (cluster_of.ndim != 1 or len(cluster_of) != num_classes):
      raise ValueError(
          f"cluster_of has shape {cluster_of.shape}, but the model has {num_classes} classes: "
          f"it needs one cluster id per class, shape ({num_classes},).")
    if num_clusters is None:
      num_clusters = int(cluster_of.max()) + 1 if cluster_of.size else 1
    return cls(cluster_of, num_clusters)

  @property
  def num_classes(self) -> int:
    return int(self.cluster_of.size)

  @property
  def max_size(self) -> int:
    """``M``, the largest cluster's size: the width of the within-cluster table."""
    return int(self.members.shape[1])

  def __eq__(self, other):
    return (isinstance(other, ClassTree) and self.num_clusters == other.num_clusters
            and np.array_equal(self.cluster_of, other.cluster_of))

  def __hash__(self):
    return hash((self.num_clusters, self.cluster_of.tobytes()))

  def __repr__(self):
    return (f"ClassTree(num_classes={self.num_classes}, num_clusters={self.num_clusters}, "
            f"max_size={self.max_size})")


def balanced_tree(num_classes: int, num_clusters: int | None = None) -> ClassTree:
  """Consecutive classes in ``num_clusters`` clusters whose sizes differ by at most 1.

  Args:
    num_classes: ``K >= 1``.
    num_clusters: ``C`` in ``[1, K]``; by default ``ceil(sqrt(K))``, which makes both
      the cluster layer and every cluster about ``sqrt(K)`` wide.

  Example:
    >>> tree = balanced_tree(10)
    >>> tree.num_clusters, tree.sizes.tolist()
    (4, [3, 2, 3, 2])
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  if num_clusters is None:
    num_clusters = math.isqrt(num_classes - 1) + 1  # ceil(sqrt(K))
  if not 1 <= num_clusters <= num_classes:
    raise ValueError(
        f"num_clusters must be in [1, num_classes={num_classes}], got {num_clusters}: "
        f"more clusters than classes leaves some empty.")
  cluster_of = np.arange(num_classes, dtype=np.int64) * num_clusters // num_classes
  return ClassTree(cluster_of, num_clusters)
