"""Trees of any depth and the losses through them: the builders' paths and depths, the
losses against the flat losses of the distribution a tree implies (float64) and against
mpmath in both tails, gradients, sets, edge cases and bad input."""

import itertools

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxsoftmax import losses
from jaxsoftmax.losses import (
  tree_complement_nll,
  tree_complement_set_nll,
  tree_log_softmax,
  tree_nll,
  tree_set_nll,
)
from jaxsoftmax.tree import ClassTree, Tree
from tests.losses import accuracy as accuracy_losses

mp.mp.dps = 40
EPS32 = float(np.finfo(np.float32).eps)

# --- the builders ------------------------------------------------------------------------


def _walk(tree, k):
  """The node reached by following class k's path from the root: must be k itself."""
  node = tree.num_classes  # the root, internal node 0
  for t in range(tree.depth[k]):
    assert node - tree.num_classes == tree.path_nodes[k, t]
    node = tree.children[tree.path_nodes[k, t], tree.path_branches[k, t]]
  return node


def _check_paths(tree):
  for k in range(tree.num_classes):
    assert _walk(tree, k) == k
  assert np.all(tree.path_nodes[:, 0] == 0)  # every path starts at the root
  assert (tree.children >= 0).sum() == tree.num_classes + tree.num_nodes - 1  # each once
  assert np.all(tree.arity == (tree.children >= 0).sum(1))


@pytest.mark.parametrize(
  "k, b", [(1, 2), (2, 2), (5, 2), (8, 2), (10, 4), (1000, 2), (1000, 3), (4096, 8)]
)
def test_balanced_tree_depths_are_floor_or_ceil_of_log_b_k(k, b):
  tree = Tree.balanced(k, b)
  _check_paths(tree)
  if k > 1:
    exact = np.log(k) / np.log(b)
    assert tree.depth.max() == int(np.ceil(exact - 1e-9))
    assert tree.depth.min() >= int(np.floor(exact + 1e-9)) - (0 if b == 2 else 1)
  assert tree.branching == min(b, max(k, 1)) or k == 1


def test_balanced_binary_tree_of_five_by_hand():
  tree = Tree.balanced(5, 2)
  # root -> {0, 1, 2} {3, 4}; {0, 1, 2} -> {0, 1} {2}: drawn by hand.
  assert tree.depth.tolist() == [3, 3, 2, 2, 2]
  assert tree.children.tolist() == [[6, 7], [8, 2], [3, 4], [0, 1]]


@pytest.mark.parametrize(
  "freq, b, depths",
  [
    # Cormen et al., "Introduction to Algorithms" (3rd ed.), fig. 16.4: codeword lengths.
    ([45, 13, 12, 16, 9, 5], 2, [1, 3, 3, 3, 4, 4]),
    # By hand: five equal weights, ternary: merge {0, 1, 2}, then {3, 4, that node}.
    ([1, 1, 1, 1, 1], 3, [2, 2, 2, 1, 1]),
    # By hand: ternary with four classes needs one placeholder: merge {pad, 3, 2}
    # (weights 0, 1, 2), then {that node, 1, 0}.
    ([8, 4, 2, 1], 3, [1, 1, 2, 2]),
    ([1.0], 2, [1]),
    ([0.0, 0.0, 5.0], 2, [2, 2, 1]),
  ],
)
def test_huffman_code_lengths_on_hand_made_tables(freq, b, depths):
  tree = Tree.huffman(freq, b)
  _check_paths(tree)
  assert tree.depth.tolist() == depths


def test_huffman_expected_depth_is_the_least_of_all_binary_trees_drawn():
  # Cormen et al.: the optimal cost of fig. 16.4 is 224 (thousand bits).
  freq = np.array([45, 13, 12, 16, 9, 5])
  assert int((Tree.huffman(freq).depth * freq).sum()) == 224
  assert int((Tree.balanced(6).depth * freq).sum()) > 224
  rng = np.random.default_rng(0)
  zipf = 1.0 / np.arange(1, 513)
  huffman = (Tree.huffman(zipf).depth * zipf).sum() / zipf.sum()
  # Shannon: the expected code length is within one bit above the entropy.
  p = zipf / zipf.sum()
  entropy = -(p * np.log2(p)).sum()
  assert entropy <= huffman < entropy + 1
  for _ in range(5):
    other = Tree.huffman(rng.permutation(zipf))  # a tree optimal for other frequencies
    assert (other.depth * zipf).sum() / zipf.sum() >= huffman


def test_from_parents_renumbers_internal_nodes_breadth_first():
  # A taxonomy: root 9 -> {animal 7, plant 8}; animal -> {0 cat, 1 dog, bird 6};
  # bird -> {2, 3}; plant -> {4, 5}. Internal ids given out of order on purpose.
  parents = [7, 7, 6, 6, 8, 8, 7, 9, 9, -1]
  tree = Tree.from_parents(parents, num_classes=6)
  _check_paths(tree)
  assert tree.num_nodes == 4 and tree.branching == 3 and tree.max_depth == 3
  assert tree.depth.tolist() == [2, 2, 3, 3, 2, 2]
  assert tree.children[0].tolist() == [6 + 1, 6 + 2, -1]  # root -> animal, plant
  assert tree == Tree.from_parents(np.array(parents), 6) and hash(tree) == hash(
    Tree.from_parents(parents, 6)
  )
  assert tree != Tree.balanced(6, 3)


@pytest.mark.parametrize(
  "parents, k, message",
  [
    ([2, 2, -1, -1], 2, r"one root \(parent -1\); parents has 2"),
    ([2, 2, 3, 2], 2, r"one root \(parent -1\); parents has 0"),
    ([1, 2, -1], 2, r"parents\[0\] = 1 is not an internal node"),
    ([3, 3, -1, -1, 3], 2, "one root"),
    ([2, 2, -1, 4, 3], 2, "node 3 is not reachable from the root"),
    ([2, 2, -1, 2], 2, "internal node 3 has no children"),
    ([2, 9, -1], 2, r"parents\[1\] = 9 is not an internal node"),
    ([-1, 1], 1, "node 0 is a class and cannot be the root"),
    ([0.0, -1.0], 1, "1-D integer array"),
    ([-1], 1, "at least one internal node"),
  ],
)
def test_bad_parents_are_a_value_error_naming_the_problem(parents, k, message):
  with pytest.raises(ValueError, match=message):
    Tree.from_parents(parents, k)


def test_bad_builders_are_named():
  with pytest.raises(ValueError, match="branching must be at least 2, got 1"):
    Tree.balanced(4, 1)
  with pytest.raises(ValueError, match="num_classes must be positive"):
    Tree.balanced(0)
  with pytest.raises(ValueError, match=r"frequencies\[1\] = -1.0: frequencies must be finite"):
    Tree.huffman([1, -1])
  with pytest.raises(ValueError, match=r"frequencies\[0\] = nan"):
    Tree.huffman([np.nan, 1])
  with pytest.raises(ValueError, match="non-empty 1-D"):
    Tree.huffman([])
  with pytest.raises(ValueError, match="node 0 is reached twice"):
    Tree(2, np.array([[0, 0]]))


# --- the flat distribution a tree implies -----------------------------------------------

TREES = {
  "binary": Tree.balanced(7, 2),
  "ternary": Tree.balanced(10, 3),
  "huffman": Tree.huffman([30, 1, 2, 9, 4, 4, 1, 12]),
  "taxonomy": Tree.from_parents([7, 7, 6, 6, 8, 8, 7, 9, 9, -1], 6),
  "two-level": Tree.from_class_tree(ClassTree.from_clusters([2, 0, 1, 0, 2, 2, 1])),
  "chain": Tree.from_parents([3, 4, 5, 4, 5, -1], 3),
}


def _log_probs64(table, tree):
  """log p_k in float64 numpy, from the definition: a product of node softmaxes."""
  table = np.asarray(table, np.float64)
  valid = np.arange(tree.branching) < tree.arity[:, None]
  z = np.where(valid, table, -np.inf)
  log_q = z - (
    np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) + z.max(-1, keepdims=True)
  )
  out = np.zeros(table.shape[:-2] + (tree.num_classes,))
  for k in range(tree.num_classes):
    for t in range(tree.depth[k]):
      out[..., k] += log_q[..., tree.path_nodes[k, t], tree.path_branches[k, t]]
  return out


def _draw(tree, n, seed, scale=2.0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  table = rng.normal(0, scale, (n, tree.num_nodes, tree.branching)).astype(dtype)
  return table, rng.integers(0, tree.num_classes, n)


def _members(rng, n, k, m=3):
  members = rng.integers(-1, k, (n, m))
  members[:, 0] = rng.integers(0, k, n)  # never empty
  return members


def _mask(members, k):
  return np.stack([np.isin(np.arange(k), row[row >= 0]) for row in members])


@pytest.mark.parametrize("name", sorted(TREES))
def test_equal_to_the_flat_losses_of_the_implied_distribution(name):
  tree = TREES[name]
  table, y = _draw(tree, 8, seed=1, scale=3.0)
  members = _members(np.random.default_rng(2), 8, tree.num_classes)
  members[1] = [members[1, 0], members[1, 0], -1]  # a repeated member counts once
  mask = _mask(members, tree.num_classes)
  if mask.all(-1).any():
    pytest.skip("a full set")  # not drawn by these seeds
  with jax.enable_x64(True):
    table = jnp.asarray(table)
    np.testing.assert_allclose(
      tree_log_softmax(table, tree), _log_probs64(table, tree), rtol=1e-12, atol=1e-12
    )
    flat_z = lambda t: tree_log_softmax(t, tree)
    cases = [
      (tree_nll, losses.nll, y, y),
      (tree_complement_nll, losses.complement_nll, y, y),
      (tree_set_nll, losses.set_nll, members, mask),
      (tree_complement_set_nll, losses.complement_set_nll, members, mask),
    ]

    @jax.jit
    def both(table):
      """Per-example values and gradients of ours and of the flat losses on z(table)."""
      out = []
      for ours, flat, target, flat_target in cases:
        mine = lambda t: ours(t, target, tree, layout="table")
        theirs = lambda t: flat(flat_z(t), flat_target)
        out.append(
          (
            mine(table),
            theirs(table),
            jax.grad(lambda t: mine(t).sum())(table),
            jax.grad(lambda t: theirs(t).sum())(table),
          )
        )
      return out

    for (ours, *_), (v_ours, v_flat, g_ours, g_flat) in zip(cases, both(table)):
      np.testing.assert_allclose(v_ours, v_flat, rtol=1e-11, err_msg=ours.__name__)
      # Children past a node's arity carry no probability and get no gradient.
      np.testing.assert_allclose(g_ours, g_flat, rtol=1e-9, atol=1e-12, err_msg=ours.__name__)


def test_one_member_sets_equal_the_label_losses():
  tree = TREES["huffman"]
  table, y = _draw(tree, 6, seed=3, dtype=np.float32)
  np.testing.assert_allclose(
    tree_set_nll(table, y[:, None], tree), tree_nll(table, y, tree), rtol=4e-6
  )
  np.testing.assert_allclose(
    tree_complement_set_nll(table, y[:, None], tree), tree_complement_nll(table, y, tree), rtol=4e-6
  )


def test_path_input_equals_the_table_in_value_and_gradient():
  tree = TREES["taxonomy"]
  table, y = _draw(tree, 5, seed=4, dtype=np.float32)
  paths = table[np.arange(5)[:, None], np.maximum(tree.path_nodes[y], 0)]  # [5, L, B]
  for fn in (tree_nll, tree_complement_nll):
    np.testing.assert_array_equal(fn(table, y, tree), fn(paths, y, tree))
    g_table = jax.grad(lambda t: fn(t, y, tree).sum())(table)
    g_paths = jax.grad(lambda p: fn(p, y, tree).sum())(paths)
    scattered = np.zeros_like(table)
    for i in range(5):
      for t in range(tree.depth[y[i]]):
        scattered[i, tree.path_nodes[y[i], t]] += g_paths[i, t]
    np.testing.assert_allclose(g_table, scattered, rtol=1e-6, atol=1e-9)
    # Levels past a label's depth are never read.
    past = np.arange(tree.max_depth)[None, :] >= tree.depth[y][:, None]
    assert np.all(np.asarray(g_paths)[past] == 0.0)
  members = np.array([[0, 2, -1], [4, 5, 1], [3, -1, -1], [1, 0, 2], [5, 5, 4]])
  member_paths = table[np.arange(5)[:, None, None], np.maximum(tree.path_nodes[members], 0)]
  for fn in (tree_set_nll, tree_complement_set_nll):
    np.testing.assert_allclose(fn(table, members, tree), fn(member_paths, members, tree), rtol=1e-6)


# --- both tails, against mpmath ----------------------------------------------------------


def _mp_losses(table, tree, members):
  """-log P(S) and -log(1 - P(S)) at 40 digits: P of every class as a product of
  exactly computed node softmaxes, 1 - P(S) as the sum of the other classes' P."""
  p = []
  for k in range(tree.num_classes):
    prob = mp.mpf(1)
    for t in range(tree.depth[k]):
      node, branch = tree.path_nodes[k, t], tree.path_branches[k, t]
      z = [
        v if isinstance(v, mp.mpf) else mp.mpf(float(v)) for v in table[node, : tree.arity[node]]
      ]
      top = max(z)
      e = [mp.exp(v - top) for v in z]
      prob *= e[branch] / mp.fsum(e)
    p.append(prob)
  inside = mp.fsum(p[k] for k in set(members))
  outside = mp.fsum(p[k] for k in range(tree.num_classes) if k not in set(members))
  return -mp.log(inside), -mp.log(outside)


def _mp_grad(table, tree, members, complement):
  """The gradient by mpmath's numerical differentiation at 40 digits."""
  out = np.zeros(table.shape)
  for node, j in itertools.product(range(tree.num_nodes), range(tree.branching)):
    if j >= tree.arity[node]:
      continue

    def f(x, node=node, j=j):
      t = np.array(table, dtype=object)
      t[node, j] = x
      return _mp_losses(t, tree, members)[int(complement)]

    out[node, j] = float(mp.diff(f, mp.mpf(float(table[node, j]))))
  return out


def _tail_table(tree, label, gap, seed=0):
  """Every branch on the label's path leads the node's other children by ``gap``."""
  rng = np.random.default_rng(seed)
  table = rng.normal(0, 1, (tree.num_nodes, tree.branching)).astype(np.float32)
  for t in range(tree.depth[label]):
    node, branch = tree.path_nodes[label, t], tree.path_branches[label, t]
    others = np.delete(table[node, : tree.arity[node]], branch)
    table[node, branch] = others.max() + gap
  return table


@pytest.mark.parametrize("complement", [False, True], ids=["nll", "complement"])
@pytest.mark.parametrize("regime", accuracy_losses.TREE_REGIMES)
def test_float32_value_within_ulps_times_condition_number(regime, complement):
  """Expected values: mpmath at 40 digits (reference.tree_path), binary trees of
  2, 16, 64 and 300 classes, every level of the label's path shifted by the regime."""
  rows = np.concatenate(
    [accuracy_losses.measure_tree(regime, 12, k, complement, seed=k) for k in (2, 16, 64, 300)]
  )
  # A complement loss about a tiny p_l underflows float32 for most far gaps (to -1e4).
  assert len(rows) >= 0.3 * 12 * 4
  assert rows[:, 0].max() <= 4.0, rows[rows[:, 0].argmax()]


@pytest.mark.parametrize("gap", [40.0, 12.0, 0.0, -12.0, -40.0])
@pytest.mark.parametrize("complement", [False, True], ids=["nll", "complement"])
def test_label_losses_match_mpmath_in_both_tails(gap, complement):
  # p(label) from 1 - 1e-17 (gap 40 at three levels) to 1e-52 (gap -40).
  tree = Tree.huffman([1, 2, 3, 5, 8, 13, 21, 34])
  label = 0  # the deepest class: seven levels
  table = _tail_table(tree, label, gap)
  fn = tree_complement_nll if complement else tree_nll
  loss, grad = jax.value_and_grad(lambda t: fn(t, label, tree, layout="table"))(table)
  refs = _mp_losses(table, tree, [label])
  ref, ref_grad = refs[int(complement)], _mp_grad(table, tree, [label], complement)
  # 4 ulps per unit of (1 + condition number); the complement about a tiny p is exp(-L),
  # whose condition number is L = -log p (84 at gap -12).
  cond = float(refs[0]) if complement else 1.0
  np.testing.assert_allclose(float(loss), float(ref), rtol=4 * EPS32 * (1 + cond))
  assert np.isfinite(grad).all()
  # Components below float32's smallest normal number (1e-50 at gap -40) may flush to 0.
  tiny = np.finfo(np.float32).tiny
  np.testing.assert_allclose(
    grad, ref_grad, rtol=1e-4, atol=max(1e-6 * np.abs(ref_grad).max(), tiny)
  )
  assert np.all((grad != 0) | (np.abs(ref_grad) < tiny))  # no gradient vanishes that should not
  if complement and gap == 40.0:
    # The naive form is inf where the exact loss is about 40.
    assert -jnp.log1p(-jnp.exp(-tree_nll(table, label, tree, layout="table"))) == jnp.inf


@pytest.mark.parametrize("gap", [30.0, 0.0, -30.0])
@pytest.mark.parametrize("complement", [False, True], ids=["set", "complement_set"])
def test_set_losses_match_mpmath_in_both_tails(gap, complement):
  tree = Tree.balanced(9, 3)
  members = [0, 1, 2]  # the root's first subtree, exactly
  rng = np.random.default_rng(1)
  table = rng.normal(0, 1, (tree.num_nodes, tree.branching)).astype(np.float32)
  node, branch = tree.path_nodes[0, 0], tree.path_branches[0, 0]
  table[node, branch] = np.delete(table[node], branch).max() + gap
  fn = tree_complement_set_nll if complement else tree_set_nll
  loss, grad = jax.value_and_grad(lambda t: fn(t, jnp.array(members), tree))(table)
  ref = _mp_losses(table, tree, members)[int(complement)]
  ref_grad = _mp_grad(table, tree, members, complement)
  np.testing.assert_allclose(float(loss), float(ref), rtol=4e-6)
  scale = np.abs(ref_grad).max()
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6 * scale)


def test_complement_confidently_wrong_keeps_an_order_one_gradient():
  tree = Tree.balanced(1024, 2)  # ten levels
  table = _tail_table(tree, 0, 30.0)  # 1 - p(0) ~ 1e-13
  loss, grad = jax.value_and_grad(lambda t: tree_complement_nll(t, 0, tree))(table)
  assert 25.0 < loss < 35.0
  # The weights p (1 - q_t) / (1 - p) over the path's levels sum to 1 (they are the
  # shares of 1 - p leaving at each level).
  path = tree.path_nodes[0]
  on_branch = grad[path, tree.path_branches[0]]
  np.testing.assert_allclose(on_branch.sum(), 1.0, rtol=1e-5)


# --- transforms, edge cases, bad input ---------------------------------------------------


def test_reverse_mode_gradients_in_float64():
  tree = TREES["taxonomy"]
  table, y = _draw(tree, 4, seed=5, scale=1.0)
  members = np.array([[0, 2, -1], [4, 5, 1], [3, 3, -1], [1, 0, 2]])
  with jax.enable_x64(True):
    table = jnp.asarray(table)
    for fn, target in (
      (tree_nll, y),
      (tree_complement_nll, y),
      (tree_set_nll, members),
      (tree_complement_set_nll, members),
    ):
      check_grads(jax.jit(lambda t: fn(t, target, tree)), (table,), order=1, modes=("rev",))


def test_composes_with_jit_and_vmap():
  tree = TREES["huffman"]
  table, y = _draw(tree, 6, seed=6, dtype=np.float32)
  for fn in (tree_nll, tree_complement_nll):
    eager = fn(table, y, tree)
    np.testing.assert_allclose(jax.jit(fn, static_argnums=2)(table, y, tree), eager, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda a, b: fn(a, b, tree))(table, y), eager, rtol=1e-6)
  members = _members(np.random.default_rng(7), 6, tree.num_classes)
  for fn in (tree_set_nll, tree_complement_set_nll):
    eager = fn(table, members, tree)
    np.testing.assert_allclose(
      jax.vmap(lambda a, b: fn(a, b, tree))(table, members), eager, rtol=1e-6
    )


def _value_and_grad(fn, tree, **kwargs):
  return jax.jit(jax.value_and_grad(lambda t, y: fn(t, y, tree, **kwargs).sum()))


def test_edge_cases_follow_the_flat_conventions():
  one = Tree.balanced(1)
  table = jnp.zeros((1, 1, 1))
  assert tree_nll(table, jnp.array([0]), one, layout="table")[0] == 0.0
  loss, grad = _value_and_grad(tree_complement_nll, one, layout="table")(table, jnp.array([0]))
  assert loss == jnp.inf and np.all(grad == 0)
  tree = Tree.balanced(4, 2)
  table = jnp.zeros((1, 3, 2)).at[0, 0, 0].set(-jnp.inf)  # classes 0, 1 unreachable
  loss, grad = _value_and_grad(tree_nll, tree)(table, jnp.array([0]))
  assert loss == jnp.inf and np.all(grad == 0)
  assert tree_complement_nll(table, jnp.array([0]), tree)[0] == 0.0
  loss, grad = _value_and_grad(tree_set_nll, tree)(table, jnp.array([[0, 1]]))
  assert loss == jnp.inf and np.all(grad == 0)
  # NaN anywhere in the table: that example's loss and gradient are NaN; others untouched.
  table = jnp.zeros((2, 3, 2)).at[0, 2, 1].set(jnp.nan)
  out = jax.jit(lambda t, y: tree_nll(t, y, tree))(table, jnp.array([3, 3]))
  assert np.isnan(out[0]) and out[1] == pytest.approx(np.log(4))
  # ignore_index: loss 0 and a zero gradient; a masked NaN example poisons nothing.
  loss, grad = _value_and_grad(tree_nll, tree, ignore_index=-100)(table, jnp.array([-100, 3]))
  assert loss == pytest.approx(np.log(4)) and np.all(grad[0] == 0) and np.isfinite(grad).all()
  # Under jit an out-of-range label is NaN for its example only.
  out = jax.jit(lambda y: tree_nll(jnp.zeros((2, 3, 2)), y, tree))(jnp.array([1, 7]))
  assert np.isfinite(out[0]) and np.isnan(out[1])
  # The empty set and the full set.
  z = jnp.zeros((1, 3, 2))
  sets = jax.jit(lambda m: (tree_set_nll(z, m, tree), tree_complement_set_nll(z, m, tree)))
  assert sets(jnp.array([[-1, -1, -1, -1]]))[0][0] == jnp.inf
  assert sets(jnp.array([[-1, -1, -1, -1]]))[1][0] == 0.0
  assert sets(jnp.array([[0, 1, 2, 3]]))[0][0] == 0.0


def test_bad_input_is_named():
  tree = Tree.balanced(10, 3)  # N = 5 nodes (10 -> 4, 3, 3; 4 -> 2, 1, 1), B = 3, L = 3
  table = jnp.zeros((2, 5, 3))
  with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside \[0, 10\)"):
    tree_nll(table, jnp.array([0, 10]), tree)
  with pytest.raises(
    ValueError,
    match=r"node table \[..., N=5, B=3\] or the path logits "
    r"\[..., L, B\] with L=3, B=3",
  ):
    tree_nll(jnp.zeros((2, 6, 3)), jnp.array([0, 1]), tree)
  with pytest.raises(TypeError, match="tree must be a jaxsoftmax.tree.Tree, got ClassTree"):
    tree_nll(table, jnp.array([0, 1]), ClassTree.from_clusters([0, 1]))
  with pytest.raises(TypeError, match="node_logits must be a real floating array"):
    tree_nll(jnp.zeros((2, 5, 3), int), jnp.array([0, 1]), tree)
  with pytest.raises(ValueError, match=r"members has shape \(2,\)"):
    tree_set_nll(table, jnp.array([0, 1]), tree)
  with pytest.raises(ValueError, match=r"members\[0, 1\] = 12 is outside \[0, 10\)"):
    tree_set_nll(table, jnp.array([[0, 12], [1, 2]]), tree)
  with pytest.raises(ValueError, match=r"node table \[..., N=5, B=3\]"):
    tree_log_softmax(jnp.zeros((4, 3)), tree)


# --- the edges: layouts said, ids checked, NaN seen, sizes refused ---------------

# Trees whose node count equals their depth: the node table and the path logits have the
# same shape, and reading one for the other gave wrong numbers or a members-shape error.
COINCIDING = {
  "chain": Tree.from_parents([3, 4, 4, -1, 3], num_classes=3),
  "huffman_5_3_2": Tree.huffman([5, 3, 2]),
  "two_classes": Tree.balanced(2, 2),
  "three_classes_branching_3": Tree.balanced(3, 3),
}


@pytest.mark.parametrize("name", list(COINCIDING))
def test_a_layout_both_readings_fit_is_refused_until_said(name):
  tree = COINCIDING[name]
  assert tree.num_nodes == tree.max_depth
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(4, tree.num_nodes, tree.branching)), jnp.float32)
  labels = jnp.arange(4) % tree.num_classes
  with pytest.raises(ValueError, match="say which with layout='table' or layout='paths'"):
    tree_nll(table, labels, tree)
  expected = -tree_log_softmax(table, tree)[jnp.arange(4), labels]
  np.testing.assert_allclose(tree_nll(table, labels, tree, layout="table"), expected, rtol=1e-6)
  # The path logits of each label: the table's rows on its path (the tree head's form).
  paths = table[jnp.arange(4)[:, None], jnp.maximum(jnp.asarray(tree.path_nodes)[labels], 0)]
  np.testing.assert_allclose(tree_nll(paths, labels, tree, layout="paths"), expected, rtol=1e-6)
  # The set losses: a table [B, N, B'] with members [B, M], and paths [B, M, L, B'].
  members = jnp.stack([labels, (labels + 1) % tree.num_classes], axis=1)
  by_table = tree_set_nll(table, members, tree, layout="table")
  member_paths = table[
    jnp.arange(4)[:, None, None], jnp.maximum(jnp.asarray(tree.path_nodes)[members], 0)
  ]
  by_paths = tree_set_nll(member_paths, members, tree, layout="paths")
  np.testing.assert_allclose(by_table, by_paths, rtol=1e-6)
  with pytest.raises(ValueError, match="layout must be 'table' or 'paths'"):
    tree_nll(table, labels, tree, layout="nodes")


def test_member_ids_that_would_wrap_are_refused_eagerly():
  # Before: an int64 id of 2**40 was cast to int32 (0) first and gave a finite loss.
  tree = Tree.balanced(4, 2)
  z = jnp.zeros((1, 3, 2))
  for fn in (tree_set_nll, tree_complement_set_nll):
    with pytest.raises(ValueError, match=r"members\[0, 0\] = 1099511627776 is outside"):
      fn(z, np.array([[2**40, 1]], np.int64), tree)


@pytest.mark.parametrize(
  "fn, aux",
  [
    (tree_nll, [0]),
    (tree_complement_nll, [0]),
    (tree_set_nll, [[0, 2]]),
    (tree_complement_set_nll, [[0, 2]]),
  ],
  ids=lambda v: getattr(v, "__name__", ""),
)
def test_a_nan_on_the_path_gives_a_nan_gradient_row(fn, aux):
  # Before: a NaN loss with an exactly zero gradient row, which guards such as
  # optax.apply_if_finite read as a clean step.
  tree = Tree.balanced(4, 2)
  z = jnp.zeros((2, 3, 2)).at[0, 0, 0].set(jnp.nan)  # the root: on every path of example 0
  aux = jnp.asarray(aux * 2)
  loss, grad = jax.value_and_grad(lambda t: fn(t, aux, tree).sum())(z)
  assert np.isnan(loss) and np.isnan(grad[0]).any() and np.isfinite(grad[1]).all()
  out_of_range = jnp.full_like(aux[:1], 7)
  grad = jax.grad(lambda t: jax.jit(lambda t, y: fn(t, y, tree))(t, out_of_range).sum())(z[1:])
  assert np.isnan(grad).any()


def test_sizes_are_capped_or_refused_not_truncated():
  # Before: Tree.balanced(10, 10**9) and huffman(..., 10**9) died of MemoryError, and
  # 3.7, '3' and 2.5 were truncated silently; an empty batch raised ZeroDivisionError.
  wide = Tree.balanced(10, 10**9)
  assert wide.branching == 10 and wide.num_nodes == 1
  assert Tree.huffman([3, 1, 2], 10**9).branching == 3
  for bad in (3.7, "3", 2.5, True):
    with pytest.raises(TypeError, match="must be an integer"):
      Tree.balanced(10, bad)
    with pytest.raises(TypeError, match="must be an integer"):
      Tree.balanced(bad, 2)
  with pytest.raises(TypeError, match="branching must be an integer"):
    Tree.huffman([1, 2], 2.5)
  tree = Tree.balanced(4, 2)
  for fn in (tree_set_nll, tree_complement_set_nll):
    assert fn(jnp.zeros((0, 3, 2)), np.zeros((0, 2), np.int32), tree).shape == (0,)


def test_the_tree_head_refuses_one_class_by_name():
  from jaxsoftmax_experiments.heads import make_head

  with pytest.raises(ValueError, match="the tree head needs at least 2 classes, got 1"):
    make_head("tree", 1)
