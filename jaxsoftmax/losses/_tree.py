r"""Losses through a tree of any depth: ``p(l) = prod_t q_t``, the branch probabilities
on the class's path (:class:`jaxsoftmax.tree.Tree`).

A model gives each internal node ``n`` logits over its children; the logits of the
nodes on a path are the ``[..., L, B]`` path logits (level ``t``: the ``t``-th node from
the root; its children past the node's arity, and the levels past the class's depth, are
ignored). With ``A_t = -log q_t = softplus(logsumexp_{j != b_t} z_tj - z_tb_t)``, the
flat kernel's exact form at each node,

    -log p(l)     = sum_t A_t                                        (non-negative terms)
    log(1 - p(l)) = logsumexp_t [log(1 - q_t) - sum_{s<t} A_s]        (leaving at level t)

since ``1 - q_1 q_2 ... q_L = (1 - q_1) + q_1 (1 - q_2) + ...``, a sum of positive terms
whose logs are exact (``log(1 - q_t) = -softplus(z_tb_t - logsumexp_{j != b_t} z_tj)``).
The complement ``-log(1 - p)`` takes that form while ``p > 1/2`` (exact as ``p -> 1``) and
``-log1p(-exp(-L))`` below (exact as ``p -> 0``): the two-level hierarchical loss's rule,
at any depth. The gradient at level ``t`` is ``(1 - q_t)`` times the node's direction
(its restricted softmax, -1 at the branch), times ``p / (1 - p)`` for the complement,
formed from logs so that no factor underflows alone. The cost is O(depth x branching)
per example, not O(K).

For a set ``S`` of classes (member ids), ``log P(S) = logsumexp_m(-L_m)`` over its
members and ``log P(not S) = logsumexp`` over the nodes on the members' paths (each
once) of ``log P(reach n) + log P(n's children off every member's path | n)``: both sums
of positive terms with exact logs, and ``-log P(S) = softplus(log P(not S) - log P(S))``
as in the flat kernel (``-log P(not S)`` swaps them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsoftmax.losses import _checks
from jaxsoftmax.losses._partition import (
  _partition_nll,
  _split_logsumexp,
  _split_logsumexp_value,
)
from jaxsoftmax.losses._sequence import _complement_of_nll
from jaxsoftmax.tree import Tree

_LOG2 = math.log(2.0)


# --- inputs ----------------------------------------------------------------------------


def _check_tree(tree):
  if not isinstance(tree, Tree):
    raise TypeError(f"tree must be a jaxsoftmax.tree.Tree, got {type(tree).__name__}.")


LAYOUTS = ("table", "paths")


def _layout(node_logits, tree, extra_axes, layout=None):
  """``(batch shape, is_table)``: the node logits are the full table ``[..., N, B]``
  (``layout="table"``) or path logits ``[..., (M,) L, B]`` (``layout="paths"``;
  ``extra_axes`` = 1 for a set's member axis). Without ``layout`` the shape decides where
  only one reading fits it; where both do (a tree whose node count equals its depth: a
  chain, Huffman of [5, 3, 2], two classes) the call is refused, naming ``layout``."""
  if layout is not None and layout not in LAYOUTS:
    raise ValueError(f"layout must be 'table' or 'paths' (or None), got {layout!r}.")
  n, width, depth = tree.num_nodes, tree.branching, tree.max_depth
  shape = node_logits.shape
  table = node_logits.ndim >= 2 and shape[-1] == width and shape[-2] == n
  paths = node_logits.ndim >= 2 + extra_axes and shape[-1] == width and shape[-2] == depth
  path = "[..., M, L, B]" if extra_axes else "[..., L, B]"
  if layout is None and table and paths:
    raise ValueError(
      f"node_logits has shape {shape}, which is both this tree's node table "
      f"[..., N={n}, B={width}] and its path logits {path} (L={depth}): say which with "
      "layout='table' or layout='paths'."
    )
  if table and layout in (None, "table"):
    return shape[:-2], True
  if paths and layout in (None, "paths"):
    return shape[: -2 - extra_axes], False
  wanted = {
    None: (
      f"the node table [..., N={n}, B={width}] or the path logits {path} with L={depth}, B={width}"
    ),
    "table": f"the node table [..., N={n}, B={width}] (layout='table')",
    "paths": f"the path logits {path} with L={depth}, B={width} (layout='paths')",
  }[layout]
  raise ValueError(f"node_logits has shape {shape}; for this tree it must be {wanted}.")


def _path_logits(node_logits, is_table, labels, tree):
  """``(z, branch, level_ok)``: ``[..., L, B]`` logits of the nodes on each label's path
  (children past a node's arity at -inf; levels past the depth a certain branch: logits
  ``[0, -inf, ...]``, branch 0), NaN for an invalid label (-1) or a NaN in the table."""
  safe = jnp.maximum(labels, 0)
  nodes = jnp.asarray(tree.path_nodes)[safe]
  branch = jnp.asarray(tree.path_branches)[safe]
  level_ok = nodes >= 0
  if is_table:
    z = jnp.take_along_axis(node_logits, jnp.maximum(nodes, 0)[..., None], axis=-2)  # [..., L, B]
    poisoned = jnp.any(jnp.isnan(node_logits), axis=(-2, -1))[..., None, None]
    z = z + jnp.where(poisoned, jnp.nan, 0.0).astype(z.dtype)
  else:
    z = node_logits
  arity = jnp.asarray(tree.arity)[jnp.maximum(nodes, 0)]
  column = jnp.arange(tree.branching)
  certain = jnp.where(column == 0, 0.0, -jnp.inf).astype(z.dtype)
  z = jnp.where(level_ok[..., None], jnp.where(column < arity[..., None], z, -jnp.inf), certain)
  # NaN is added, not selected: a select would pass no gradient, and a NaN loss would get
  # an exactly zero gradient row, which apply_if_finite-style guards cannot see.
  z = z + jnp.where((labels < 0)[..., None, None], jnp.nan, 0.0).astype(z.dtype)
  return z, jnp.where(level_ok, branch, 0), nodes, level_ok


def _inputs(node_logits, labels, tree, ignore_index, layout=None):
  """Checked node logits, their layout, int32 labels (-1 invalid) and the ignored mask."""
  _check_tree(tree)
  node_logits = _checks.as_logits(node_logits, name="node_logits")
  batch, is_table = _layout(node_logits, tree, 0, layout)
  labels, ignored = _checks.as_labels(
    labels,
    jax.ShapeDtypeStruct((*batch, tree.num_classes), node_logits.dtype),
    num_classes=tree.num_classes,
    ignore_index=ignore_index,
    logits_shape=node_logits.shape,
  )
  return node_logits, is_table, labels, ignored


# --- one label: -log p and -log(1 - p) -------------------------------------------------


def _path_loss(a, b, complement):
  """The loss from each level's branch logit ``a`` and rest logsumexp ``b``; also L and
  each level's log(1 - q)."""
  steps = jax.nn.softplus(b - a)  # A_t = -log q_t >= 0
  nll = jnp.sum(steps, axis=-1)
  log_leave = -jax.nn.softplus(a - b)  # log(1 - q_t)
  if not complement:
    return nll, nll, log_leave
  # log P(reach level t) = -sum_{s<t} A_s, summed forwards (no cancellation).
  reach = -jnp.concatenate([jnp.zeros_like(steps[..., :1]), jnp.cumsum(steps[..., :-1], -1)], -1)
  log_rest = jax.nn.logsumexp(log_leave + reach, axis=-1)  # log(1 - p)
  small = -jnp.log1p(-jnp.exp(-nll))  # exact once p <= 1/2
  return jnp.where(nll > _LOG2, small, -log_rest), nll, log_leave


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _label_loss(z, branch, complement):
  """The value alone, from ``jax.nn.logsumexp``; the forward rule keeps the exponentials."""
  a, b = _split_logsumexp_value(z, branch)
  return _path_loss(a, b, complement)[0]


def _label_loss_fwd(z, branch, complement):
  a, b, e, _, total = _split_logsumexp(z, branch)
  loss, nll, log_leave = _path_loss(a, b, complement)
  return loss, (z, e, total, branch, nll, loss, log_leave)


def _direction(e, total, branch):
  """d(-log q)/dz divided by (1 - q): the node's restricted softmax, -1 at the branch."""
  is_branch = branch[..., None] == jnp.arange(e.shape[-1])
  return jnp.where(is_branch, -1.0, e / jnp.where(total > 0, total, 1.0)[..., None])


def _label_loss_bwd(complement, residuals, g):
  return _label_gradient(complement, residuals[0], residuals[1:], g), None


def _exact_label_value(z, branch, complement):
  """The label loss as a sum over the path's nodes of the partition kernel's ``-log q_t``
  (``-log(1 - exp(-L))`` of it for the complement): the same value, written with the
  kernels whose own derivatives are exact, for the gradient's derivative rule."""
  nll = jnp.sum(_partition_nll(z, branch, False), axis=-1)
  return _complement_of_nll(nll) if complement else nll


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _label_gradient(complement, z, residuals, g):
  """The gradient from the forward rule's exponentials; its own derivatives (grad of grad,
  Hessian-vector products) are those of :func:`_exact_label_value`'s gradient."""
  e, total, branch, nll, loss, log_leave = residuals
  if complement:
    # d(-log(1 - p)) = -(p / (1 - p)) dL, with dA_t = (1 - q_t) direction_t: weight
    # p (1 - q_t) / (1 - p) in [0, 1], from logs.
    weight = -jnp.exp((loss - nll)[..., None] + log_leave)
    dead = ~jnp.isfinite(loss) | (nll == jnp.inf)  # p is exactly 1 or 0
  else:
    weight = jnp.exp(log_leave)
    dead = nll == jnp.inf  # p is exactly 0
  weight = jnp.where((dead & ~jnp.isnan(nll))[..., None], 0.0, weight)
  grad = weight[..., None] * _direction(e, total, branch)
  return _checks.zero_where_no_cotangent(g[..., None, None], grad)


@_label_gradient.defjvp
def _label_gradient_jvp(complement, primals, tangents):
  z, residuals, g = primals
  dz, _, dg = tangents
  branch = residuals[2]

  def exact(z, g):
    _, vjp = jax.vjp(lambda z: _exact_label_value(z, branch, complement), z)
    return _checks.zero_where_no_cotangent(g[..., None, None], vjp(g)[0])

  out = _label_gradient(complement, z, residuals, g)
  return out, jax.jvp(exact, (z, g), (dz, dg))[1].astype(out.dtype)


_label_loss.defvjp(_label_loss_fwd, _label_loss_bwd)


def _label(node_logits, labels, tree, ignore_index, complement, layout=None):
  node_logits, is_table, labels, ignored = _inputs(node_logits, labels, tree, ignore_index, layout)
  return _label_body(node_logits, labels, ignored, tree, is_table, complement)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _label_body(node_logits, labels, ignored, tree, is_table, complement):
  """The label losses past their checks, as one program (eagerly too)."""
  z, branch, _, _ = _path_logits(node_logits, is_table, labels, tree)
  return _checks.finish(_label_loss(z, branch, complement), None, ignored)


def tree_nll(
  node_logits: ArrayLike,
  labels: ArrayLike,
  tree: Tree,
  *,
  ignore_index: int | None = None,
  layout: str | None = None,
) -> jax.Array:
  r"""Negative log-likelihood of the label through a tree, ``-sum_t log q_t`` on its path.

  Args:
    node_logits: the node table ``[..., N, B]`` (every internal node's logits over its
      children, nodes in the tree's order), or the label's path logits ``[..., L, B]``
      (what a tree head computes, at O(L B D) per example); children past a node's
      arity and levels past the label's depth are ignored.
    labels: ``[...]`` integer classes in ``[0, K)``. Eagerly, a label out of range
      raises ``ValueError``; under ``jit`` that example's loss is NaN.
    tree: the :class:`~jaxsoftmax.tree.Tree` (static).
    ignore_index: a label value that marks padding (e.g. -100): those examples have
      loss 0 and a zero gradient, eagerly and under ``jit``.
    layout: ``"table"`` or ``"paths"``: which of the two ``node_logits`` holds. Without
      it the shape decides, and a shape that fits both (a tree whose node count equals
      its depth) raises ``ValueError``.

  Returns:
    ``[...]`` per-example losses, no reduction: a sum of non-negative per-node losses,
    so exact to float32 precision in both tails; +inf with a zero gradient where a
    branch on the path has probability exactly 0. Equal to ``-``:func:`tree_log_softmax`
    at the label.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.tree import Tree
    >>> tree = Tree.balanced(4, branching=2)    # root -> {0, 1}, {2, 3}
    >>> z = jnp.array([[[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]]])
    >>> print(tree_nll(z, jnp.array([2]), tree))  # -log(1/2 * sigmoid(3))
    [0.7417]

  Reference: F. Morin and Y. Bengio, "Hierarchical probabilistic neural network language
  model", AISTATS 2005; T. Mikolov et al., "Distributed representations of words and
  phrases and their compositionality", NeurIPS 2013 (the Huffman tree).
  """
  return _label(node_logits, labels, tree, ignore_index, False, layout)


def tree_complement_nll(
  node_logits: ArrayLike,
  labels: ArrayLike,
  tree: Tree,
  *,
  ignore_index: int | None = None,
  layout: str | None = None,
) -> jax.Array:
  r"""Complement likelihood of a negative example through a tree, ``-log(1 - p(l))``.

  .. math::
    1 - p_l = \sum_t (1 - q_t) \prod_{s<t} q_s

  (leaving the path at level ``t``): every term from exact logs, so the loss keeps its
  precision as ``p_l -> 1``, where ``-log(1 - exp(-tree_nll))`` is inf, and as
  ``p_l -> 0``. Its gradient is ``p_l / (1 - p_l)`` times that of ``-tree_nll``,
  formed without dividing two underflowed numbers.

  Args:
    node_logits: the node table ``[..., N, B]`` or the label's path logits ``[..., L, B]``.
    labels: ``[...]`` integer classes in ``[0, K)`` (the classes the examples are not).
    tree: the :class:`~jaxsoftmax.tree.Tree` (static).
    ignore_index: a label value that marks padding: loss 0, zero gradient.
    layout: ``"table"`` or ``"paths"``, as for :func:`tree_nll`.

  Returns:
    ``[...]`` per-example losses, >= 0; +inf with a zero gradient only where ``p_l`` is
    exactly 1.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.tree import Tree
    >>> tree = Tree.balanced(4, branching=2)
    >>> z = jnp.array([[[30.0, 0.0], [25.0, 0.0], [0.0, 0.0]]])  # p(0) = 1 - 1.4e-11
    >>> print(tree_complement_nll(z, jnp.array([0]), tree))
    [24.9933]
  """
  return _label(node_logits, labels, tree, ignore_index, True, layout)


# --- a set of classes: -log P(S) and -log P(not S) -------------------------------------


def _safe_logsumexp(x, axis):
  """logsumexp whose gradient is 0, not NaN, where every term is -inf."""
  top = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  total = jnp.sum(jnp.exp(x - top), axis=axis)
  empty = total == 0
  return jnp.where(empty, -jnp.inf, jnp.squeeze(top, axis) + jnp.log(jnp.where(empty, 1.0, total)))


def _set_logs(z, branch, on_paths, first, member_ok):
  """``(log P(S), log P(not S))`` from the members' path logits ``[..., M, L, B]``."""
  a, b = _split_logsumexp(z, branch)[:2]
  steps = jax.nn.softplus(b - a)  # [..., M, L]
  log_in = _safe_logsumexp(jnp.where(member_ok, -jnp.sum(steps, -1), -jnp.inf), axis=-1)
  reach = -jnp.concatenate([jnp.zeros_like(steps[..., :1]), jnp.cumsum(steps[..., :-1], -1)], -1)
  inside, outside = _split_logsumexp(z, on_paths)[:2]  # children on / off the paths
  leave = -jax.nn.softplus(inside - outside)  # log P(off the paths | node)
  log_out = _safe_logsumexp(
    jnp.where(first, reach + leave, -jnp.inf).reshape(
      *first.shape[:-2], math.prod(first.shape[-2:])
    ),
    axis=-1,
  )
  # An empty set: P(not S) = 1 (no member's path to leave).
  return log_in, jnp.where(jnp.any(member_ok, axis=-1), log_out, 0.0)


def _set_value(z, branch, on_paths, first, member_ok, complement):
  log_in, log_out = _set_logs(z, branch, on_paths, first, member_ok)
  return jax.nn.softplus(log_in - log_out) if complement else jax.nn.softplus(log_out - log_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _set_loss(z, branch, on_paths, first, member_ok, complement):
  return _set_value(z, branch, on_paths, first, member_ok, complement)


def _set_loss_fwd(z, branch, on_paths, first, member_ok, complement):
  loss = _set_value(z, branch, on_paths, first, member_ok, complement)
  return loss, (z, branch, on_paths, first, member_ok, loss)


def _set_loss_bwd(complement, residuals, g):
  return (_set_gradient(complement, residuals, g), None, None, None, None)


def _exact_logsumexp(x):
  """``logsumexp(x)`` over the last axis as ``x_j + nll(x, j)`` at the largest entry ``j``:
  the value of :func:`_safe_logsumexp` (``-inf`` for an empty row), whose derivatives
  are the partition kernel's (the second, ``diag(p) - p p^T``, with no ``1 - p`` formed)."""
  empty = jnp.all(x == -jnp.inf, axis=-1)
  safe = jnp.where(empty[..., None], 0.0, x)
  top = jnp.argmax(safe, axis=-1)
  value = jnp.take_along_axis(safe, top[..., None], axis=-1)[..., 0] + _partition_nll(
    safe, top.astype(jnp.int32), False
  )
  return jnp.where(empty, -jnp.inf, value)


def _exact_set_value(z, branch, on_paths, first, member_ok, complement):
  """:func:`_set_value` written with the partition kernel at every node, in the two
  logsumexps and in the last ``softplus`` (as ``-log softmax`` of ``(log P(S), log P(not
  S))``): the same value, whose own derivatives are exact, for the gradient's rule."""
  steps = _partition_nll(z, jnp.maximum(branch, 0).astype(jnp.int32), False)  # -log q_t
  log_in = _exact_logsumexp(jnp.where(member_ok, -jnp.sum(steps, -1), -jnp.inf))
  reach = -jnp.concatenate([jnp.zeros_like(steps[..., :1]), jnp.cumsum(steps[..., :-1], -1)], -1)
  leave = -_partition_nll(z, on_paths, True)  # log P(off the paths | node)
  log_out = _exact_logsumexp(
    jnp.where(first, reach + leave, -jnp.inf).reshape(
      *first.shape[:-2], math.prod(first.shape[-2:])
    )
  )
  log_out = jnp.where(jnp.any(member_ok, axis=-1), log_out, 0.0)
  both = jnp.stack([log_in, log_out], axis=-1)
  return _partition_nll(both, jnp.full(log_in.shape, int(complement), jnp.int32), False)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _set_gradient(complement, residuals, g):
  """The derivative of the log-domain forward, recomputed from the path logits (every
  factor a softmax weight, sigmoid or exponential of an exact log), with the kernels'
  rules: zero where the loss is +inf (P exactly 0), zero where the cotangent is. Its own
  derivatives are those of :func:`_exact_set_value`'s gradient."""
  z, branch, on_paths, first, member_ok, loss = residuals
  _, vjp = jax.vjp(lambda z: _set_value(z, branch, on_paths, first, member_ok, complement), z)
  (grad,) = vjp(jnp.ones_like(loss))
  dead = (loss == jnp.inf)[..., None, None, None]
  grad = jnp.where(dead, 0.0, grad)
  return _checks.zero_where_no_cotangent(g[..., None, None, None], grad)


@_set_gradient.defjvp
def _set_gradient_jvp(complement, primals, tangents):
  residuals, g = primals
  z, branch, on_paths, first, member_ok, loss = residuals
  dz, dg = tangents[0][0], tangents[1]
  dead = (loss == jnp.inf)[..., None, None, None]

  def exact(z, g):
    value = lambda z: _exact_set_value(z, branch, on_paths, first, member_ok, complement)
    _, vjp = jax.vjp(value, z)
    grad = jnp.where(dead, 0.0, vjp(jnp.ones_like(loss))[0])
    return _checks.zero_where_no_cotangent(g[..., None, None, None], grad)

  out = _set_gradient(complement, residuals, g)
  return out, jax.jvp(exact, (z, g), (dz, dg))[1].astype(out.dtype)


_set_loss.defvjp(_set_loss_fwd, _set_loss_bwd)


def _set(node_logits, members, tree, ignore_index, complement, layout=None):
  _check_tree(tree)
  node_logits = _checks.as_logits(node_logits, name="node_logits")
  batch, is_table = _layout(node_logits, tree, 1, layout)
  if jnp.ndim(members) != len(batch) + 1:
    raise ValueError(
      f"members has shape {jnp.shape(members)}; with node_logits {node_logits.shape} it must "
      f"be {(*batch, 'M')}: class ids, -1 for an unused slot."
    )
  if not is_table and jnp.shape(members)[-1] != node_logits.shape[-3]:
    raise ValueError(
      f"members has {jnp.shape(members)[-1]} slots but the path logits "
      f"{node_logits.shape} have {node_logits.shape[-3]} paths."
    )
  _checks.check_ignore_index(ignore_index)  # before it is a static argument of _set_body
  unused = int(ignore_index) if ignore_index is not None else -1
  if not isinstance(members, jax.Array):  # checked before JAX casts it: 2**40 wraps to 0
    members = np.asarray(members)
  if not jnp.issubdtype(members.dtype, jnp.integer):
    if members.dtype == jnp.bool_:
      raise TypeError(
        "members must be integer class ids [..., M] (-1 pads), got a boolean mask; for a "
        "mask over the K classes pass jnp.where(mask, jnp.arange(K), -1) (M = K)."
      )
    raise TypeError(f"members must be integer class ids, got dtype {members.dtype}.")
  if _checks.is_concrete(members):
    values = np.asarray(members)
    bad = (values != unused) & ((values < 0) | (values >= tree.num_classes))
    if bad.any():
      where = _checks.index_str(tuple(int(i) for i in np.argwhere(bad)[0]))
      raise ValueError(
        f"members{where} = {values[tuple(np.argwhere(bad)[0])]} is outside "
        f"[0, {tree.num_classes}) (unused slots are {unused})."
      )
    members = jnp.asarray(values.astype(np.int32))
  return _set_body(
    node_logits, members, tree, is_table, unused, ignore_index is not None, complement
  )


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _set_body(node_logits, members, tree, is_table, unused, ignoring, complement):
  """The set losses past their checks, as one program (eagerly too)."""
  slot_ok = members != unused
  labels, _ = _checks.as_labels(
    jnp.where(slot_ok, members, 0),
    jax.ShapeDtypeStruct((*members.shape, tree.num_classes), node_logits.dtype),
    num_classes=tree.num_classes,
    logits_shape=node_logits.shape,
  )
  table = node_logits[..., None, :, :] if is_table else node_logits
  z, branch, nodes, level_ok = _path_logits(table, is_table, labels, tree)
  # A repeated member counts once; an unused slot is no member.
  m = members.shape[-1]
  earlier = jnp.tril(jnp.ones((m, m), bool), -1)  # [m, m'] m' < m
  same = members[..., :, None] == members[..., None, :]
  member_ok = slot_ok & ~jnp.any(same & earlier & slot_ok[..., None, :], axis=-1)
  live = level_ok & member_ok[..., None]  # [..., M, L]
  # The node at (m, t) is also at (m', t) for another member m' sharing that prefix.
  shared = (nodes[..., :, None, :] == nodes[..., None, :, :]) & live[..., None, :, :]
  shared &= live[..., :, None, :]  # [..., M, M', L]
  first = live & ~jnp.any(shared & earlier[..., None], axis=-2)
  taken = branch[..., None, :, :, None] == jnp.arange(tree.branching)  # [..., 1, M', L, B]
  on_paths = jnp.any(shared[..., None] & taken, axis=-3)  # [..., M, L, B]
  loss = _set_loss(z, branch, on_paths, first, member_ok, complement)
  ignored = jnp.all(~slot_ok, axis=-1) if ignoring else None
  return _checks.finish(loss, None, ignored)


def tree_set_nll(
  node_logits: ArrayLike,
  members: ArrayLike,
  tree: Tree,
  *,
  ignore_index: int | None = None,
  layout: str | None = None,
) -> jax.Array:
  r"""``-log P(y in S)`` through a tree, for a set ``S`` of classes given by member ids.

  .. math::
    -\log P(S) = \operatorname{softplus}\big(\log P(\lnot S) - \log P(S)\big)

  with ``log P(S)`` the logsumexp of the members' path log-likelihoods and
  ``log P(not S)`` the logsumexp, over the nodes on the members' paths (each once), of
  the log-probability of reaching the node and leaving it by a child on no member's
  path. Exact in both tails, as the flat :func:`~jaxsoftmax.losses.set_nll`; the cost is
  O(M^2 L + M L B) per example for ``M`` member slots.

  Args:
    node_logits: the node table ``[..., N, B]``, or the members' path logits
      ``[..., M, L, B]``.
    members: ``[..., M]`` integer class ids; -1 (or ``ignore_index``) marks an unused
      slot; a repeated id counts once.
    tree: the :class:`~jaxsoftmax.tree.Tree` (static).
    ignore_index: the id of an unused slot, -1 by default; an example whose slots are
      all unused has loss 0 and a zero gradient when it is given.
    layout: ``"table"`` or ``"paths"``, as for :func:`tree_nll`.

  Returns:
    ``[...]`` per-example losses; +inf with a zero gradient for an empty set (without
    ``ignore_index``) or a set of probability exactly 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.tree import Tree
    >>> tree = Tree.balanced(4, branching=2)
    >>> z = jnp.zeros((1, 3, 2))              # every class 1/4
    >>> print(tree_set_nll(z, jnp.array([[0, 3, -1]]), tree))  # -log(1/2)
    [0.6931]
  """
  return _set(node_logits, members, tree, ignore_index, False, layout)


def tree_complement_set_nll(
  node_logits: ArrayLike,
  members: ArrayLike,
  tree: Tree,
  *,
  ignore_index: int | None = None,
  layout: str | None = None,
) -> jax.Array:
  r"""``-log P(y not in S)`` through a tree: the complement likelihood of a set of
  negative classes (for example the previous tokens of unlikelihood training).

  The same two logsumexps as :func:`tree_set_nll`, swapped:
  ``softplus(log P(S) - log P(not S))``; exact as ``P(S) -> 1`` and ``-> 0``.

  Args:
    node_logits: the node table ``[..., N, B]``, or the members' path logits
      ``[..., M, L, B]``.
    members: ``[..., M]`` integer class ids; -1 (or ``ignore_index``) marks an unused slot.
    tree: the :class:`~jaxsoftmax.tree.Tree` (static).
    ignore_index: the id of an unused slot, -1 by default.
    layout: ``"table"`` or ``"paths"``, as for :func:`tree_nll`.

  Returns:
    ``[...]`` per-example losses; 0 for an empty set, +inf with a zero gradient where
    ``P(S)`` is exactly 1.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.tree import Tree
    >>> tree = Tree.balanced(4, branching=2)
    >>> z = jnp.zeros((1, 3, 2))
    >>> print(tree_complement_set_nll(z, jnp.array([[0, 1, 2]]), tree))  # -log(1/4)
    [1.3863]
  """
  return _set(node_logits, members, tree, ignore_index, True, layout)


def tree_log_softmax(node_logits: ArrayLike, tree: Tree) -> jax.Array:
  """The log-probability of every class, the sum of its path's branch log-softmaxes.

  This is the flat distribution the tree implies, ``[..., K]``: its ``-log`` at a label
  equals :func:`tree_nll`. It costs O(N B + K) per example (a top-down sweep, one level
  at a time); use it to predict and evaluate, and the losses to train.

  Args:
    node_logits: the node table ``[..., N, B]``.
    tree: the :class:`~jaxsoftmax.tree.Tree` (static).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxsoftmax.tree import Tree
    >>> tree = Tree.from_parents([3, 3, 4, 4, -1], num_classes=3)
    >>> print(jnp.exp(tree_log_softmax(jnp.zeros((2, 2)), tree)))
    [0.25 0.25 0.5 ]
  """
  _check_tree(tree)
  node_logits = _checks.as_logits(node_logits, name="node_logits")
  if node_logits.ndim < 2 or node_logits.shape[-2:] != (tree.num_nodes, tree.branching):
    raise ValueError(
      f"node_logits has shape {node_logits.shape}; it must be the node table "
      f"[..., N={tree.num_nodes}, B={tree.branching}]."
    )
  return _log_softmax(node_logits, tree)


@functools.partial(jax.jit, static_argnums=1)
def _log_softmax(node_logits, tree):
  """:func:`tree_log_softmax` past its checks, one program per tree (a level's sweep is
  a handful of operations, and a deep tree has many levels)."""
  valid = jnp.arange(tree.branching) < jnp.asarray(tree.arity)[:, None]
  log_q = jax.nn.log_softmax(jnp.where(valid, node_logits, -jnp.inf), axis=-1, where=valid)
  # log P(reach node), top-down one level at a time: O(N B + K) per example, not O(K L).
  reach = jnp.zeros(log_q.shape[:-1], log_q.dtype)
  for level in tree.levels():
    parent, branch = tree.node_parent[level], tree.node_branch[level]
    reach = reach.at[..., level].set(reach[..., parent] + log_q[..., parent, branch])
  return reach[..., tree.class_parent] + log_q[..., tree.class_parent, tree.class_branch]
