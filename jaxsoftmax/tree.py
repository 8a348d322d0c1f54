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
  # Derived from cluster_of by __post_init__.
  slot_of: np.ndarray = dataclasses.field(init=False, repr=False)
  sizes: np.ndarray = dataclasses.field(init=False, repr=False)
  members: np.ndarray = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    cluster_of = np.asarray(self.cluster_of)
    if cluster_of.ndim != 1 or cluster_of.size == 0:
      raise ValueError(
        "cluster_of must be a non-empty 1-D array (class -> cluster), got shape "
        f"{cluster_of.shape}."
      )
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
        f"({int(bad.sum())} class(es) have an out-of-range cluster id)."
      )
    sizes = np.bincount(cluster_of, minlength=num_clusters)
    if (sizes == 0).any():
      empty = np.flatnonzero(sizes == 0)
      raise ValueError(
        f"cluster {int(empty[0])} is empty ({empty.size} of {num_clusters} clusters "
        f"have no class): every cluster needs at least one class."
      )
    cluster_of = cluster_of.astype(np.int32)
    order = np.argsort(cluster_of, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot_of = np.empty_like(cluster_of)
    slot_of[order] = np.arange(cluster_of.size) - starts[cluster_of[order]]
    members = np.full((num_clusters, int(sizes.max())), -1, np.int32)
    members[cluster_of, slot_of] = np.arange(cluster_of.size, dtype=np.int32)
    for name, value in (
      ("cluster_of", cluster_of),
      ("slot_of", slot_of),
      ("sizes", sizes.astype(np.int32)),
      ("members", members),
    ):
      value.setflags(write=False)
      object.__setattr__(self, name, value)
    object.__setattr__(self, "num_clusters", num_clusters)

  @classmethod
  def from_clusters(
    cls, cluster_of: ArrayLike, num_clusters: int | None = None, *, num_classes: int | None = None
  ) -> ClassTree:
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
        f"it needs one cluster id per class, shape ({num_classes},)."
      )
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
    return (
      isinstance(other, ClassTree)
      and self.num_clusters == other.num_clusters
      and np.array_equal(self.cluster_of, other.cluster_of)
    )

  def __hash__(self):
    return hash((self.num_clusters, self.cluster_of.tobytes()))

  def __repr__(self):
    return (
      f"ClassTree(num_classes={self.num_classes}, num_clusters={self.num_clusters}, "
      f"max_size={self.max_size})"
    )


def _count(name: str, value, minimum: int) -> int:
  """``value`` as an int of at least ``minimum``: a float (3.7, 2.5), a string ('3') or a
  bool is refused by name, never truncated."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an integer, got {value!r}.")
  if value < minimum:
    what = "positive" if minimum == 1 else f"at least {minimum}"
    raise ValueError(f"{name} must be {what}, got {value}.")
  return int(value)


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
      f"more clusters than classes leaves some empty."
    )
  cluster_of = np.arange(num_classes, dtype=np.int64) * num_clusters // num_classes
  return ClassTree(cluster_of, num_clusters)


# --- trees of any depth --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Tree:
  """A rooted tree whose leaves are the classes: hierarchical softmax of any depth.

  Every internal node holds a softmax over its children; a class's probability is the
  product of the branch probabilities on its path from the root. Nodes are numbered in
  one space: the classes (leaves) are ``0 .. K-1`` and the internal nodes ``K .. K+N-1``;
  the internal nodes are renumbered breadth-first from the root (internal node ``0`` is
  the root), so a model's node logits are a ``[..., N, B]`` table in that order. The
  two-level :class:`ClassTree` is the depth-2 case (:meth:`from_class_tree`); it keeps
  its own ``[C]`` + ``[C, M]`` layout and losses.

  Build one with :meth:`from_parents` (a taxonomy), :meth:`balanced` (a balanced b-ary
  tree) or :meth:`huffman` (word2vec's, from class frequencies). The arrays are numpy
  (static under ``jit``): close over a tree or pass it as a static argument. Trees
  compare and hash by their children table.

  Attributes:
    num_classes: ``K``, the number of leaves.
    children: ``[N, B]`` int32, each internal node's children in the one node space
      (a class ``k`` is ``k``, internal node ``n`` is ``K + n``), -1 past its arity.
    arity: ``[N]`` int32, the number of children of each internal node (>= 1).
    path_nodes: ``[K, L]`` int32, the internal nodes from the root to each class, -1
      past its depth (``L`` the largest depth).
    path_branches: ``[K, L]`` int32, the child taken at each of those nodes, -1 past
      the depth.
    depth: ``[K]`` int32, the number of internal nodes on each class's path.
    node_parent, node_branch: ``[N]`` int32, each internal node's parent (an internal
      node; -1 at the root) and the child slot it fills there.
    class_parent, class_branch: ``[K]`` int32, the same for each class.

  Example:
    >>> tree = Tree.balanced(5, branching=2)
    >>> tree.num_nodes, tree.branching, tree.depth.tolist()
    (4, 2, [3, 3, 2, 2, 2])
    >>> tree.path_nodes[0].tolist(), tree.path_branches[0].tolist()
    ([0, 1, 3], [0, 0, 0])
  """

  num_classes: int
  children: np.ndarray
  # Derived from children by __post_init__.
  arity: np.ndarray = dataclasses.field(init=False, repr=False)
  path_nodes: np.ndarray = dataclasses.field(init=False, repr=False)
  path_branches: np.ndarray = dataclasses.field(init=False, repr=False)
  depth: np.ndarray = dataclasses.field(init=False, repr=False)
  node_parent: np.ndarray = dataclasses.field(init=False, repr=False)
  node_branch: np.ndarray = dataclasses.field(init=False, repr=False)
  class_parent: np.ndarray = dataclasses.field(init=False, repr=False)
  class_branch: np.ndarray = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    k = int(self.num_classes)
    if k < 1:
      raise ValueError(f"num_classes must be positive, got {k}.")
    children = np.asarray(self.children)
    if children.ndim != 2 or children.shape[0] < 1 or not np.issubdtype(children.dtype, np.integer):
      raise ValueError(
        f"children must be a [N, B] integer table with N >= 1, got shape "
        f"{children.shape} and dtype {children.dtype}."
      )
    n = children.shape[0]
    arity = (children >= 0).sum(axis=1)
    if (arity == 0).any():
      raise ValueError(f"internal node {int(np.argmin(arity))} has no children.")
    if (children >= k + n).any():
      raise ValueError(f"children holds node {int(children.max())}, outside [0, {k + n}).")
    # Walk from the root (internal node 0) down: every node reached once, every class.
    path_nodes = [None] * k
    path_branches = [None] * k
    seen = np.zeros(k + n, bool)
    seen[k] = True
    stack = [(0, [], [])]
    while stack:
      node, nodes, branches = stack.pop()
      for b, child in enumerate(children[node]):
        if child < 0:
          continue
        if seen[child]:
          raise ValueError(f"node {int(child)} is reached twice: the children table is not a tree.")
        seen[child] = True
        if child < k:
          path_nodes[child], path_branches[child] = nodes + [node], branches + [b]
        else:
          stack.append((int(child) - k, nodes + [node], branches + [b]))
    if not seen.all():
      missing = int(np.argmin(seen))
      what = f"class {missing}" if missing < k else f"internal node {missing - k}"
      raise ValueError(f"{what} is not reachable from the root.")
    depth = np.array([len(p) for p in path_nodes], np.int32)
    width = int(depth.max())
    nodes_table = np.full((k, width), -1, np.int32)
    branch_table = np.full((k, width), -1, np.int32)
    for c in range(k):
      nodes_table[c, : depth[c]] = path_nodes[c]
      branch_table[c, : depth[c]] = path_branches[c]
    # Each node's parent and branch: internal nodes (-1 at the root) and classes.
    node_parent = np.full(n, -1, np.int32)
    node_branch = np.full(n, -1, np.int32)
    rows, slots = np.nonzero(children >= 0)
    kids = children[rows, slots]
    inner = kids >= k
    node_parent[kids[inner] - k], node_branch[kids[inner] - k] = rows[inner], slots[inner]
    class_parent = nodes_table[np.arange(k), depth - 1]
    class_branch = branch_table[np.arange(k), depth - 1]
    for name, value in (
      ("children", children.astype(np.int32)),
      ("arity", arity.astype(np.int32)),
      ("path_nodes", nodes_table),
      ("path_branches", branch_table),
      ("depth", depth),
      ("node_parent", node_parent),
      ("node_branch", node_branch),
      ("class_parent", class_parent),
      ("class_branch", class_branch),
    ):
      value.setflags(write=False)
      object.__setattr__(self, name, value)
    object.__setattr__(self, "num_classes", k)

  @classmethod
  def from_parents(cls, parents: ArrayLike, num_classes: int) -> Tree:
    """A tree from each node's parent: a taxonomy.

    Args:
      parents: ``[K + N]`` integer parent of every node: the classes first (nodes
        ``0 .. K-1``), then the internal nodes (``K ..``); the root's parent is -1.
        A node's children keep the order of their ids.
      num_classes: ``K``.

    Raises:
      ValueError: for no root or several, a parent that is a class or out of range, a
        cycle, or an internal node without children.

    Example:
      >>> # classes 0, 1 under node 3; class 2 and node 3 under the root, node 4
      >>> tree = Tree.from_parents([3, 3, 4, 4, -1], num_classes=3)
      >>> tree.depth.tolist(), tree.children.tolist()
      ([2, 2, 1], [[2, 4], [0, 1]])
    """
    parents = np.asarray(parents)
    k = int(num_classes)
    if parents.ndim != 1 or not np.issubdtype(parents.dtype, np.integer):
      raise ValueError(
        f"parents must be a 1-D integer array (node -> parent), got shape "
        f"{parents.shape} and dtype {parents.dtype}."
      )
    if not 1 <= k < parents.size:
      raise ValueError(
        f"parents has {parents.size} nodes: it needs the {k} classes and at "
        f"least one internal node (the root)."
      )
    total = parents.size
    roots = np.flatnonzero(parents == -1)
    if roots.size != 1:
      raise ValueError(f"a tree has one root (parent -1); parents has {roots.size}.")
    if roots[0] < k:
      raise ValueError(f"node {int(roots[0])} is a class and cannot be the root.")
    bad = (parents != -1) & ((parents < k) | (parents >= total))
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(
        f"parents[{i}] = {int(parents[i])} is not an internal node: parents "
        f"must be in [{k}, {total}) (classes are leaves)."
      )
    # Breadth-first from the root: internal nodes renumbered in that order.
    kids: list[list[int]] = [[] for _ in range(total)]
    for node, parent in enumerate(parents):
      if parent >= 0:
        kids[parent].append(node)
    order, seen = [int(roots[0])], {int(roots[0])}
    for node in order:
      for child in kids[node]:
        if child >= k:
          if child in seen:
            raise ValueError(f"node {child} is reached twice: parents holds a cycle.")
          seen.add(child)
          order.append(child)
    if len(order) != total - k:
      lost = sorted(set(range(k, total)) - seen)[0]
      raise ValueError(f"node {lost} is not reachable from the root: parents holds a cycle.")
    index = {node: i for i, node in enumerate(order)}
    width = max(len(kids[node]) for node in order)
    children = np.full((len(order), width), -1, np.int64)
    for i, node in enumerate(order):
      if not kids[node]:
        raise ValueError(f"internal node {node} has no children.")
      children[i, : len(kids[node])] = [c if c < k else k + index[c] for c in kids[node]]
    return cls(k, children)

  @classmethod
  def balanced(cls, num_classes: int, branching: int = 2) -> Tree:
    """Consecutive classes split into ``branching`` near-equal groups, recursively.

    Every class's depth is ``floor`` or ``ceil`` of ``log_branching(K)``; a node's
    subtrees differ in size by at most 1. A branching above K is K (one node over every
    class); a count that is not an integer is refused, never truncated.

    Example:
      >>> Tree.balanced(8, branching=2).depth.tolist()
      [3, 3, 3, 3, 3, 3, 3, 3]
      >>> tree = Tree.balanced(10, branching=4)
      >>> tree.arity.tolist(), tree.depth.tolist()
      ([4, 3, 3, 2, 2], [2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    """
    k = _count("num_classes", num_classes, 1)
    # No node has more than K children: a larger branching is K (one level, the flat
    # softmax), not a table of 10**9 columns.
    b = min(_count("branching", branching, 2), max(k, 2))
    if k == 1:
      return cls(1, np.zeros((1, 1), np.int64))
    # Breadth-first over ranges [lo, hi) of classes: a range of one class is a leaf.
    rows, queue = [], [(0, k)]
    for lo, hi in queue:
      size = hi - lo
      parts = min(b, size)
      q, r = divmod(size, parts)  # the first r groups one class larger
      bounds = lo + np.concatenate([[0], np.cumsum([q + 1] * r + [q] * (parts - r))])
      row = []
      for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop - start == 1:
          row.append(int(start))
        else:
          row.append(k + len(queue))
          queue.append((int(start), int(stop)))
      rows.append(row)
    children = np.full((len(rows), b), -1, np.int64)
    for i, row in enumerate(rows):
      children[i, : len(row)] = row
    return cls(k, children)

  @classmethod
  def huffman(cls, frequencies: ArrayLike, branching: int = 2) -> Tree:
    """The Huffman tree of class frequencies (word2vec's hierarchical softmax).

    Frequent classes get short paths: the expected depth ``sum_k f_k depth_k / sum f``
    is the least over all trees of this branching. Ties go to the class or node made
    first, so the tree is deterministic. A b-ary tree merges ``b`` nodes at a time
    (after padding with zero-frequency placeholders that take no slot).

    Args:
      frequencies: ``[K]`` non-negative counts or frequencies of the classes.
      branching: children per internal node, >= 2.

    Example:
      >>> # Cormen et al., "Introduction to Algorithms", Huffman codes (fig. 16.4)
      >>> tree = Tree.huffman([45, 13, 12, 16, 9, 5])
      >>> tree.depth.tolist()
      [1, 3, 3, 3, 4, 4]
    """
    import heapq

    freq = np.asarray(frequencies, np.float64)
    if freq.ndim != 1 or freq.size == 0:
      raise ValueError(f"frequencies must be a non-empty 1-D array, got shape {freq.shape}.")
    if not np.isfinite(freq).all() or (freq < 0).any():
      i = int(np.argmax(~np.isfinite(freq) | (freq < 0)))
      raise ValueError(f"frequencies[{i}] = {freq[i]}: frequencies must be finite and >= 0.")
    k = freq.size
    b = min(_count("branching", branching, 2), max(k, 2))  # at most K children, as balanced
    if k == 1:
      return cls(1, np.zeros((1, 1), np.int64))
    # Placeholders (id None) so that every merge takes b nodes: (K - 1) % (b - 1) == 0.
    pad = (-(k - 1)) % (b - 1)
    heap: list[tuple[float, int, int | None]] = [(0.0, -1 - i, None) for i in range(pad)]
    heap += [(float(f), i, i) for i, f in enumerate(freq)]
    heapq.heapify(heap)
    merged: list[
      list[int]
    ] = []  # children of each internal node, in the order made (the root last)
    while len(heap) > 1:
      group = [heapq.heappop(heap) for _ in range(b)]
      merged.append([node for _, _, node in group if node is not None])
      heapq.heappush(heap, (sum(f for f, _, _ in group), k + len(merged) - 1, -len(merged)))
    # Internal node j (made j-th) is id -1-j in the heap entries above.
    n = len(merged)
    parents = np.full(k + n, -1, np.int64)
    for j, kids in enumerate(merged):
      for child in kids:
        parents[child if child >= 0 else k + (-1 - child)] = k + j
    return cls.from_parents(parents, k)

  @classmethod
  def from_class_tree(cls, tree: ClassTree) -> Tree:
    """The depth-2 tree of a :class:`ClassTree`: the root over the clusters, each
    cluster over its classes. Its node logits are the cluster logits (row 0) and the
    within-cluster table (rows 1..C), padded to ``max(C, M)`` columns."""
    k, c = tree.num_classes, tree.num_clusters
    parents = np.concatenate(
      [k + 1 + tree.cluster_of.astype(np.int64), [-1], np.full(c, k, np.int64)]
    )
    return cls.from_parents(parents, k)

  def levels(self) -> list[np.ndarray]:
    """The internal nodes below the root, level by level from the top: each level's
    parents are in the levels before it (for a top-down sweep of the tree)."""
    node_depth = np.zeros(self.num_nodes, np.int64)
    for n in range(1, self.num_nodes):  # breadth-first: a parent before its children
      node_depth[n] = node_depth[self.node_parent[n]] + 1
    return [np.flatnonzero(node_depth == d) for d in range(1, int(node_depth.max()) + 1)]

  @property
  def num_nodes(self) -> int:
    """``N``, the number of internal nodes (rows of the node logits)."""
    return int(self.children.shape[0])

  @property
  def branching(self) -> int:
    """``B``, the largest arity (columns of the node logits)."""
    return int(self.children.shape[1])

  @property
  def max_depth(self) -> int:
    """``L``, the longest path (rows of a class's path logits)."""
    return int(self.path_nodes.shape[1])

  def __eq__(self, other):
    return (
      isinstance(other, Tree)
      and self.num_classes == other.num_classes
      and np.array_equal(self.children, other.children)
    )

  def __hash__(self):
    return hash((self.num_classes, self.children.shape, self.children.tobytes()))

  def __repr__(self):
    return (
      f"Tree(num_classes={self.num_classes}, num_nodes={self.num_nodes}, "
      f"branching={self.branching}, max_depth={self.max_depth})"
    )
