"""Class trees and the hierarchical losses: accuracy in both tails, the flat distribution
they imply, gradients, cost per example and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxsoftmax import losses
from jaxsoftmax.losses import (
  hierarchical_complement_nll,
  hierarchical_log_softmax,
  hierarchical_nll,
)
from jaxsoftmax.tree import ClassTree, balanced_tree
from tests.losses import accuracy as accuracy_losses
from tests.losses import reference

EPS32 = np.finfo(np.float32).eps


# --- trees -------------------------------------------------------------------


@pytest.mark.parametrize(
  "k, clusters, largest",
  [
    # ceil(sqrt(K)) clusters, sizes K / C rounded: hand-computed.
    (1, 1, 1),
    (2, 2, 1),
    (10, 4, 3),
    (1024, 32, 32),
    (1000, 32, 32),
    (262144, 512, 512),
  ],
)
def test_balanced_tree_has_about_sqrt_k_clusters_of_near_equal_size(k, clusters, largest):
  tree = balanced_tree(k)
  assert (tree.num_classes, tree.num_clusters, tree.max_size) == (k, clusters, largest)
  assert tree.sizes.sum() == k and tree.sizes.max() - tree.sizes.min() <= 1
  assert np.all(np.diff(tree.cluster_of) >= 0)  # consecutive classes share clusters


def test_tree_tables_are_consistent():
  rng = np.random.default_rng(0)
  cluster_of = rng.permutation(np.arange(20) % 6)
  tree = ClassTree.from_clusters(cluster_of)
  assert tree.num_clusters == 6
  np.testing.assert_array_equal(tree.members[tree.cluster_of, tree.slot_of], np.arange(20))
  np.testing.assert_array_equal(tree.sizes, np.bincount(cluster_of))
  assert (tree.members >= 0).sum() == 20
  same = ClassTree.from_clusters(cluster_of.tolist())
  assert tree == same and hash(tree) == hash(same)  # usable as a static jit argument
  assert tree != balanced_tree(20, 6)


@pytest.mark.parametrize(
  "args, kwargs, message",
  [
    (([0, 1, 1],), {"num_classes": 4}, r"cluster_of has shape \(3,\), but the model has 4 classes"),
    (([0, 1, 3],), {"num_clusters": 3}, r"cluster_of\[2\] = 3 is outside \[0, 3\)"),
    (([0, -1, 1],), {}, r"cluster_of\[1\] = -1 is outside"),
    (([0, 2, 2],), {}, r"cluster 1 is empty \(1 of 3 clusters"),
    (([0, 0],), {"num_clusters": 3}, r"cluster 1 is empty \(2 of 3"),
    (([0.0, 1.0],), {}, "integer cluster ids"),
    (([[0, 1]],), {}, r"1-D array .* got shape \(1, 2\)"),
  ],
)
def test_bad_tree_is_a_value_error_at_construction(args, kwargs, message):
  with pytest.raises(ValueError, match=message):
    ClassTree.from_clusters(*args, **kwargs)


def test_bad_balanced_tree():
  with pytest.raises(ValueError, match=r"num_clusters must be in \[1, num_classes=5\], got 6"):
    balanced_tree(5, 6)
  with pytest.raises(ValueError, match="num_classes must be positive"):
    balanced_tree(0)


# --- accuracy ----------------------------------------------------------------


@pytest.mark.parametrize("complement", [False, True], ids=["nll", "complement"])
@pytest.mark.parametrize("regime", sorted(accuracy_losses.HIERARCHICAL_REGIMES))
def test_float32_value_within_ulps_times_condition_number(regime, complement):
  """Expected values: mpmath at 40 digits (reference.hierarchical)."""
  rows = np.concatenate(
    [
      accuracy_losses.measure_hierarchical(regime, 12, k, complement, seed=k)
      for k in (2, 16, 64, 300)
    ]
  )
  # A complement loss about p_l underflows float32 for most far gaps (up to -1e4).
  assert len(rows) >= 0.3 * 12 * 4
  assert rows[:, 0].max() <= 4.0, rows[rows[:, 0].argmax()]


def _tail_example(cluster_gap, within_gap, k=16):
  """Class 0's cluster and class 0 inside it shifted by the gaps; the label is 0."""
  tree = balanced_tree(k)
  rng = np.random.default_rng(0)
  u = rng.normal(0, 1, tree.num_clusters).astype(np.float32)
  w = rng.normal(0, 1, (tree.num_clusters, tree.max_size)).astype(np.float32)
  u[0] = u[1:].max() + cluster_gap
  w[0, 0] = w[0, 1 : tree.sizes[0]].max() + within_gap
  return tree, u, w


@pytest.mark.parametrize("complement", [False, True], ids=["nll", "complement"])
@pytest.mark.parametrize(
  "gaps", [(30.0, 30.0), (60.0, 5.0), (0.0, 0.0), (-30.0, 2.0), (3.0, -60.0)]
)
def test_gradient_matches_mpmath_in_both_tails(gaps, complement):
  """Expected gradient: mpmath at 40 digits; no component vanishes or overflows."""
  tree, u, w = _tail_example(*gaps)
  fn = hierarchical_complement_nll if complement else hierarchical_nll
  g_u, g_w = jax.grad(lambda u, w: fn(u, w, 0, tree), argnums=(0, 1))(u, w)
  row = np.where(np.arange(tree.max_size) < tree.sizes[0], w[0], -np.inf)
  _, ref = reference.hierarchical(u.astype(np.float64), row.astype(np.float64), 0, 0, complement)
  ref = np.array([float(x) for x in ref])
  ours = np.concatenate([g_u, g_w[0]])
  scale = np.abs(ref).max()
  assert scale > 0
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * scale)
  np.testing.assert_array_equal(g_w[1:], 0.0)  # other clusters' rows are never touched


def test_complement_confidently_wrong_keeps_an_order_one_gradient():
  # p_l = 1 - ~1e-26: log(1 - exp(-nll)) is inf here, and 1 - p_l underflows in the
  # linear domain; the exact loss is -log(1 - p_l) ~ 60 (mpmath in the test above).
  tree, u, w = _tail_example(60.0, 60.0)
  naive = -jnp.log1p(-jnp.exp(-hierarchical_nll(u, w, 0, tree)))
  loss, (g_u, g_w) = jax.value_and_grad(
    lambda u, w: hierarchical_complement_nll(u, w, 0, tree), argnums=(0, 1)
  )(u, w)
  assert naive == jnp.inf
  assert 55.0 < loss < 65.0
  assert np.isfinite(g_u).all() and np.isfinite(g_w).all()
  # d/du_c of -log(1 - p_l) is p_l (1 - p(c)) / (1 - p_l) = about 1/2 here (equal gaps).
  assert 0.3 < float(g_u[0]) < 0.7 and 0.3 < float(g_w[0, 0]) < 0.7


# --- the flat distribution the tree implies -----------------------------------


def _draw(tree, n, seed, scale=2.0, dtype=np.float32):
  """Random cluster logits [n, C], within-cluster tables [n, C, M] and labels [n]."""
  rng = np.random.default_rng(seed)
  u = rng.normal(0, scale, (n, tree.num_clusters)).astype(dtype)
  w = rng.normal(0, scale, (n, tree.num_clusters, tree.max_size)).astype(dtype)
  return u, w, rng.integers(0, tree.num_classes, n)


def _flat_logits(u, w, tree):
  """z_k = u_c + w_{c,s} - logsumexp(w_c) in float64: softmax(z) is the tree's p."""
  u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
  valid = tree.members >= 0
  lse = np.log(np.where(valid, np.exp(w - w.max(-1, keepdims=True)), 0).sum(-1)) + w.max(-1)
  c, s = tree.cluster_of, tree.slot_of
  return u[..., c] + w[..., c, s] - lse[..., c]


@pytest.mark.parametrize(
  "cluster_of",
  [
    balanced_tree(10).cluster_of,
    np.array([2, 0, 1, 0, 2, 2, 1]),
    np.zeros(5, int),
    np.arange(6),
  ],
  ids=["balanced", "unordered", "one-cluster", "singletons"],
)
def test_equal_to_the_flat_losses_of_the_implied_distribution(cluster_of):
  tree = ClassTree.from_clusters(cluster_of)
  u, w, y = _draw(tree, 8, seed=1, scale=3.0, dtype=np.float64)
  with jax.enable_x64(True):
    u, w, y = jnp.asarray(u), jnp.asarray(w), jnp.asarray(y)
    z = jnp.asarray(_flat_logits(u, w, tree))

    @jax.jit
    def both(u, w, y):
      """Values and gradients of ours and of the flat losses on z(u, w)."""
      flat_z = lambda u, w: _flat_logits_jnp(u, w, tree)
      out = {
        "log_softmax": (hierarchical_log_softmax(u, w, tree), jax.nn.log_softmax(flat_z(u, w)))
      }
      for name, ours, flat in (
        ("nll", hierarchical_nll, losses.nll),
        ("complement", hierarchical_complement_nll, losses.complement_nll),
      ):
        out[name] = jax.value_and_grad(lambda u, w: ours(u, w, y, tree).sum(), argnums=(0, 1))(u, w)
        out[name + " flat"] = jax.value_and_grad(
          lambda u, w: flat(flat_z(u, w), y).sum(), argnums=(0, 1)
        )(u, w)
        out[name + " values"] = (ours(u, w, y, tree), flat(flat_z(u, w), y))
      return out

    out = both(u, w, y)
    # The definition, computed independently in numpy, and the jnp version agree.
    np.testing.assert_allclose(out["log_softmax"][1], jax.nn.log_softmax(z), rtol=1e-12)
    np.testing.assert_allclose(out["log_softmax"][0], out["log_softmax"][1], rtol=1e-12)
    np.testing.assert_allclose(jnp.exp(out["log_softmax"][0]).sum(-1), 1.0, rtol=1e-12)
    for name in ("nll", "complement"):
      np.testing.assert_allclose(*out[name + " values"], rtol=1e-12)
      (v_ours, g_ours), (v_flat, g_flat) = out[name], out[name + " flat"]
      np.testing.assert_allclose(v_ours, v_flat, rtol=1e-12)
      for a, b in zip(g_ours, g_flat):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def _flat_logits_jnp(u, w, tree):
  valid = jnp.asarray(tree.members >= 0)
  lse = jax.nn.logsumexp(jnp.where(valid, w, -jnp.inf), axis=-1)
  c, s = tree.cluster_of, tree.slot_of
  return u[..., c] + w[..., c, s] - lse[..., c]


def test_row_input_equals_full_table_in_value_and_gradient():
  tree = balanced_tree(30)
  u, w, y = _draw(tree, 5, seed=2)
  rows = w[np.arange(5), tree.cluster_of[y]]
  for fn in (hierarchical_nll, hierarchical_complement_nll):
    np.testing.assert_array_equal(fn(u, w, y, tree), fn(u, rows, y, tree))
    g_full = jax.grad(lambda u, w: fn(u, w, y, tree).sum(), argnums=(0, 1))(u, w)
    g_rows = jax.grad(lambda u, r: fn(u, r, y, tree).sum(), argnums=(0, 1))(u, rows)
    np.testing.assert_array_equal(g_full[0], g_rows[0])
    np.testing.assert_array_equal(g_full[1][np.arange(5), tree.cluster_of[y]], g_rows[1])
    # Padding slots past a cluster's size carry no probability and get no gradient.
    padding = tree.members[tree.cluster_of[y]] < 0
    assert np.all(np.asarray(g_rows[1])[padding] == 0.0)


def test_reverse_mode_gradients_in_float64():
  tree = ClassTree.from_clusters([0, 1, 1, 2, 2, 2])
  u, w, _ = _draw(tree, 4, seed=3, scale=1.0, dtype=np.float64)
  with jax.enable_x64(True):
    u, w, y = jnp.asarray(u), jnp.asarray(w), jnp.array([0, 2, 5, 3])
    for fn in (hierarchical_nll, hierarchical_complement_nll):
      check_grads(jax.jit(lambda u, w: fn(u, w, y, tree)), (u, w), order=1, modes=("rev",))


def test_composes_with_jit_and_vmap():
  tree = balanced_tree(12)
  u, w, y = _draw(tree, 6, seed=4)
  for fn in (hierarchical_nll, hierarchical_complement_nll):
    eager = fn(u, w, y, tree)
    jitted = jax.jit(fn, static_argnums=3)(u, w, y, tree)
    mapped = jax.vmap(lambda a, b, c: fn(a, b, c, tree))(u, w, y)
    np.testing.assert_allclose(jitted, eager, rtol=2 * EPS32)
    np.testing.assert_allclose(mapped, eager, rtol=2 * EPS32)


def test_edge_cases_follow_the_flat_conventions():
  one = ClassTree.from_clusters([0])
  u, w = jnp.zeros((1, 1)), jnp.zeros((1, 1, 1))
  # One class: p = 1, nll 0, complement +inf, both with a zero gradient.
  assert hierarchical_nll(u, w, [0], one)[0] == 0.0
  loss, grads = jax.value_and_grad(
    lambda u, w: hierarchical_complement_nll(u, w, [0], one).sum(), argnums=(0, 1)
  )(u, w)
  assert loss == jnp.inf and all(np.all(g == 0) for g in grads)
  # The label's cluster at -inf: nll +inf with zero gradient, complement 0.
  tree = balanced_tree(4)
  u = jnp.array([[-jnp.inf, 0.0]])
  w = jnp.zeros((1, 2, 2))
  loss, grad = jax.value_and_grad(lambda u: hierarchical_nll(u, w, [0], tree).sum())(u)
  assert loss == jnp.inf and np.all(grad == 0)
  assert hierarchical_complement_nll(u, w, [0], tree)[0] == 0.0
  # Under jit an out-of-range label gives NaN for its example only.
  out = jax.jit(lambda y: hierarchical_nll(jnp.zeros((2, 2)), jnp.zeros((2, 2, 2)), y, tree))(
    jnp.array([1, 7])
  )
  assert np.isfinite(out[0]) and np.isnan(out[1])


def test_bad_input_is_named():
  tree = balanced_tree(10)
  u, w = jnp.zeros((2, 4)), jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside \[0, 10\)"):
    hierarchical_nll(u, w, jnp.array([0, 10]), tree)
  with pytest.raises(
    ValueError, match="cluster_logits has 5 entries on its last axis, but the tree has 4"
  ):
    hierarchical_nll(jnp.zeros((2, 5)), w, jnp.array([0, 1]), tree)
  with pytest.raises(
    ValueError, match=r"within_logits has shape \(2, 4\); .* \(2, 4, 3\) or .* \(2, 3\)"
  ):
    hierarchical_complement_nll(u, jnp.zeros((2, 4)), jnp.array([0, 1]), tree)
  with pytest.raises(TypeError, match="tree must be a jaxsoftmax.tree.ClassTree, got ndarray"):
    hierarchical_nll(u, w, jnp.array([0, 1]), np.arange(10) // 3)
  with pytest.raises(TypeError, match="cluster_logits must be a real floating array"):
    hierarchical_nll(jnp.zeros((2, 4), int), w, jnp.array([0, 1]), tree)
  with pytest.raises(
    ValueError, match=r"do not fit the tree: they need last axes \(4,\) and \(4, 3\)"
  ):
    hierarchical_log_softmax(u, jnp.zeros((2, 4, 4)), tree)


# --- cost: the training loss touches only the label's cluster ------------------


def _training_flops(k, hierarchical, dim=32, batch=8):
  """Compiled flops of value_and_grad of the loss through an output layer of K classes."""
  x = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  if hierarchical:
    tree = balanced_tree(k)
    params = (
      jax.ShapeDtypeStruct((dim, tree.num_clusters), jnp.float32),
      jax.ShapeDtypeStruct((tree.num_clusters, dim, tree.max_size), jnp.float32),
    )

    def loss(params, x, y):
      cluster_w, kernel = params
      rows = jnp.einsum("bd,bdm->bm", x, kernel[jnp.asarray(tree.cluster_of)[y]])
      return hierarchical_nll(x @ cluster_w, rows, y, tree).sum()
  else:
    params = jax.ShapeDtypeStruct((dim, k), jnp.float32)

    def loss(params, x, y):
      return losses.nll(x @ params, y).sum()

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x, y).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis["flops"]


def test_training_loss_flops_grow_as_sqrt_k_not_k():
  # K x16 (1024 -> 16384): the flat loss's flops grow ~16x, the balanced tree's ~4x.
  flat = _training_flops(16384, False) / _training_flops(1024, False)
  tree = _training_flops(16384, True) / _training_flops(1024, True)
  assert flat > 12.0
  assert tree < 6.0
