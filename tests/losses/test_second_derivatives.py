"""Second derivatives of the label and set losses against mpmath (the issue's cases).

Expected values: ``tests/losses/reference.py``'s ``set_nll_hessian`` at 40 digits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxsoftmax import losses
from tests.losses import reference


def _reference(z, in_set):
  return np.array([[float(x) for x in row] for row in reference.set_nll_hessian(z, in_set)])


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_an_improbable_labels_hessian_row_is_not_zero(mode):
  # logits [20, 0, 0], label 1: the label's Hessian row is about 2e-9, was exactly 0.
  z = jnp.array([20.0, 0.0, 0.0])
  f = lambda z: losses.nll(z, 1)
  h = np.asarray((jax.jacrev(jax.grad(f)) if mode == "rev" else jax.hessian(f))(z))
  expected = _reference(np.asarray(z, np.float64), np.arange(3) == 1)
  np.testing.assert_allclose(h, expected, rtol=1e-6)
  assert abs(h[1, 1] - 2.0611536e-9) < 1e-15


@pytest.mark.parametrize(
  "fn, complement", [(losses.nll, False), (losses.complement_nll, True)], ids=["nll", "complement"]
)
def test_hessian_of_a_3x5_batch_matches_mpmath(fn, complement):
  # The shape and labels: the worst entry was 2.3e-3 off in relative terms.
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 5)).astype(np.float32)
  y = np.array([1, 0, 4])
  h = np.asarray(jax.jacrev(jax.grad(lambda z: fn(z, y).sum()))(jnp.asarray(z)))
  for i in range(3):
    in_set = np.arange(5) == y[i]
    expected = _reference(z[i].astype(np.float64), ~in_set if complement else in_set)
    np.testing.assert_allclose(h[i, :, i, :], expected, rtol=2e-6)


@pytest.mark.parametrize("gap", [0.0, 5.0, 10.0, 20.0, 30.0, 1e4])
@pytest.mark.parametrize("label", [0, 1])
def test_hessian_vector_products_from_probable_to_improbable_labels(gap, label):
  # jax.jvp of the gradient (a Hessian-vector product) and jax.vjp of it, against mpmath,
  # for nll, complement_nll and a two-member set, from gap 0 to 1e4.
  z = jnp.array([gap, 0.0, -1.0, 0.5], jnp.float32)
  v = jnp.array([0.3, -1.0, 2.0, 0.7], jnp.float32)
  members = jnp.array([label == 0, label == 1, False, True])
  for fn, aux, in_set in [
    (losses.nll, label, np.arange(4) == label),
    (losses.complement_nll, label, np.arange(4) != label),
    (losses.set_nll, members, np.asarray(members)),
    (losses.complement_set_nll, members, ~np.asarray(members)),
  ]:
    grad = jax.grad(lambda z: fn(z, aux))
    expected = _reference(np.asarray(z, np.float64), in_set) @ np.asarray(v, np.float64)
    scale = np.abs(_reference(np.asarray(z, np.float64), in_set)).max(axis=1) * np.abs(v).max()
    for hv in (jax.jvp(grad, (z,), (v,))[1], jax.vjp(grad, z)[1](v)[0]):
      np.testing.assert_array_less(np.abs(np.asarray(hv) - expected), 1e-5 * scale + 1e-37)


@pytest.mark.parametrize("z", [30.0, 20.0, -30.0])
def test_sigmoid_cross_entropys_second_derivative_in_the_tails(z):
  # d^2/dz^2 of the sigmoid cross-entropy is sigmoid(z) sigmoid(-z) (closed form, float64);
  # at z = 30 it was exactly 0 (jax.nn.sigmoid's derivative s (1 - s) with s rounded to 1).
  f = lambda z: losses.sigmoid_binary_cross_entropy(z[None], jnp.array([1.0]))[0]
  expected = 1.0 / (1.0 + np.exp(-z)) / (1.0 + np.exp(z))
  np.testing.assert_allclose(jax.grad(jax.grad(f))(jnp.float32(z)), expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
@pytest.mark.parametrize(
  "fn, complement",
  [(losses.fused_nll, False), (losses.fused_complement_nll, True)],
  ids=["fused_nll", "fused_complement_nll"],
)
def test_the_fused_losses_second_derivatives_match_mpmath_at_an_improbable_label(
  mode, fn, complement
):
  # Before: the streamed backward pass was differentiated as it is written, and at logits
  # [20, 0, 0] with label 1 (h = z, w = I) the label's Hessian row came out 8e6 ulps off
  # (reverse over reverse; 5e12 forward over reverse at larger gaps).
  z = jnp.array([[20.0, 0.0, 0.0]])
  f = lambda h: fn(h, jnp.eye(3), jnp.array([1]), vocab_chunk=2).sum()
  h = np.asarray((jax.jacrev(jax.grad(f)) if mode == "rev" else jax.hessian(f))(z))[0, :, 0, :]
  in_set = np.arange(3) == 1
  expected = _reference(np.asarray(z[0], np.float64), ~in_set if complement else in_set)
  np.testing.assert_allclose(h, expected, rtol=1e-5)


def test_the_fused_losses_hessians_in_h_w_and_bias_equal_the_flat_losses_on_their_logits():
  # With a bias and a soft cap, in every input at once: the fused loss's Hessian is the
  # flat loss's on cap * tanh((h @ w + bias) / cap), whose second derivatives are exact.
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 7)) * 2, jnp.float32)
  bias = jnp.asarray(rng.normal(size=7), jnp.float32)
  ids = jnp.array([[1, 4], [0, -1], [6, 2], [3, 3]])
  in_set = jnp.zeros((4, 7), bool).at[jnp.arange(4)[:, None], jnp.maximum(ids, 0)].set(True)
  in_set = in_set.at[1, 0].set(True)
  for fused, flat in [
    (losses.fused_set_nll, losses.set_nll),
    (losses.fused_complement_set_nll, losses.complement_set_nll),
  ]:

    def ours(params):
      h, w, bias = params
      return fused(h, w, ids, bias=bias, soft_cap=5.0, vocab_chunk=3).sum()

    def dense(params):
      h, w, bias = params
      return flat(5.0 * jnp.tanh((h @ w + bias) / 5.0), in_set).sum()

    for second in (jax.hessian, lambda f: jax.jacrev(jax.grad(f))):
      got, want = second(ours)((h, w, bias)), second(dense)((h, w, bias))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def _path_case(gap, rng):
  """Path logits ``[3, 2]`` whose every level favours (gap > 0) or disfavours the label's
  branch by ``|gap|``, and the branches."""
  branches = np.array([1, 0, 1])
  z = rng.normal(size=(3, 2))
  z[np.arange(3), branches] = z[np.arange(3), 1 - branches] + gap
  return z.astype(np.float32), branches


SECONDS = {"rev": lambda f: jax.jacrev(jax.grad(f)), "fwd": jax.hessian}


def _assert_path_hessian(f, z, branches, complement, picked=lambda h: h):
  """``f``'s Hessian both ways against mpmath's, each entry within 1e-5 of its row's size."""
  ref = reference.tree_path_hessian(z.astype(np.float64), branches, complement)
  ref = np.array([[float(x) for x in row] for row in ref])
  scale = np.abs(ref).max(axis=1, keepdims=True)
  for mode, second in SECONDS.items():
    h = np.asarray(picked(np.asarray(second(f)(jnp.asarray(z))))).reshape(ref.shape)
    assert np.all(np.abs(h - ref) <= 1e-5 * scale + 1e-37), (mode, h, ref)


@pytest.mark.parametrize("complement", [False, True], ids=["nll", "complement"])
def test_the_tree_losses_hessians_match_mpmath_from_probable_to_improbable_labels(complement):
  # Before: the tree's backward rule was differentiated as written, and at gap 20 the
  # Hessian of tree_nll was off by its whole size (relative error 1.0; 2e-4 at gap 5).
  from jaxsoftmax.tree import Tree

  tree = Tree.balanced(8, 2)
  fn = losses.tree_complement_nll if complement else losses.tree_nll
  for gap in (0.0, 5.0, 10.0, 20.0, 30.0, -5.0, -20.0):
    z, branches = _path_case(gap, np.random.default_rng(int(abs(gap)) + complement))
    label = int(np.flatnonzero((tree.path_branches[:, :3] == branches).all(-1))[0])
    f = lambda z: fn(z, label, tree, layout="paths")
    _assert_path_hessian(f, z, branches, complement)


@pytest.mark.parametrize("complement", [False, True], ids=["nll", "complement"])
def test_the_two_level_losses_hessians_match_mpmath(complement):
  # The two-level tree is a path of two nodes: the cluster, then the class in it.
  from jaxsoftmax.tree import balanced_tree

  tree = balanced_tree(4, 2)  # 2 clusters of 2
  fn = losses.hierarchical_complement_nll if complement else losses.hierarchical_nll
  for gap in (0.0, 10.0, 20.0, 30.0, -20.0):
    z, branches = _path_case(gap, np.random.default_rng(int(abs(gap)) + 7 * complement))
    z, branches = z[:2], branches[:2]
    label = int(branches[0] * 2 + branches[1])
    assert (tree.cluster_of[label], tree.slot_of[label]) == tuple(branches)
    f = lambda z: fn(z[0], z[1], label, tree)
    _assert_path_hessian(f, z, branches, complement)


@pytest.mark.parametrize("length", [1e-6, 1e-3, 0.5, 1.0, 10.0, 50.0])
def test_the_sequence_complements_second_derivative_in_l_both_ways(length):
  # d^2/dL^2 of -log(1 - exp(-L)) is exp(L) / expm1(L)^2. Before: jax.hessian (forward
  # over reverse) of sequence_complement_nll raised "can't apply forward-mode autodiff
  # (jvp) to a custom_vjp function" (its forward rule called the custom_vjp function).
  from jaxsoftmax.losses._sequence import _complement_of_nll

  x = jnp.float32(length)
  want = float(mpmath_second(length))
  for second in (jax.hessian, lambda f: jax.jacrev(jax.grad(f))):
    assert float(second(_complement_of_nll)(x)) == pytest.approx(want, rel=2e-6)
  z = jnp.zeros((2, 3, 4))
  tokens = jnp.array([[1, 2, 3], [0, 1, 2]])
  f = lambda z: losses.sequence_complement_nll(z, tokens).sum()
  np.testing.assert_allclose(jax.hessian(f)(z), jax.jacrev(jax.grad(f))(z), rtol=1e-6, atol=1e-9)


def mpmath_second(length):
  import mpmath as mp

  x = mp.mpf(float(np.float32(length)))
  return mp.exp(x) / mp.expm1(x) ** 2


@pytest.mark.parametrize("complement", [False, True], ids=["set", "complement_set"])
def test_the_tree_set_losses_hessians_match_mpmath_for_one_member(complement):
  # A set of one class is its label: the same Hessian, on the node table. Before: the set
  # rule was differentiated as written (softplus'' as s (1 - s)), and at gap -20 a row of
  # tree_set_nll's Hessian was off by twice its size.
  from jaxsoftmax.tree import Tree

  tree = Tree.balanced(8, 2)
  fn = losses.tree_complement_set_nll if complement else losses.tree_set_nll
  for gap in (0.0, 10.0, 20.0, 30.0, -20.0):
    z, branches = _path_case(gap, np.random.default_rng(3))
    label = int(np.flatnonzero((tree.path_branches[:, :3] == branches).all(-1))[0])
    nodes = np.asarray(tree.path_nodes[label][:3])
    table = np.zeros((len(tree.arity), 2), np.float32)
    table[nodes] = z
    f = lambda t: fn(t, jnp.array([label]), tree)
    ref_z = table[nodes]
    _assert_path_hessian(
      lambda t: f(jnp.asarray(table).at[nodes].set(t)),
      ref_z,
      branches,
      complement,
    )


def test_grad_of_grad_with_a_cotangent_that_is_the_loss_itself():
  # jax.test_util.check_grads at order 2 takes the loss's own value as the cotangent, so
  # the forward rule's value is differentiated too, not only the gradient: the losses
  # guide's notebook does this. Before its derivative rule (_sides_lse), the forward
  # rule's logsumexps, from a sweep behind the platform switch, raised (a symbolic zero
  # passed to a reshape) and, cut from the derivative, gave -0.158 for -0.311.
  z = jax.random.normal(jax.random.key(0), (5, 7)) * 4
  labels = jnp.array([0, 3, 6, 2, 2])
  mask = jax.nn.one_hot(labels, 7, dtype=bool) | (jnp.arange(7) == 1)
  for fn, target in (
    (losses.nll, labels),
    (losses.complement_nll, labels),
    (losses.set_nll, mask),
    (losses.complement_set_nll, mask),
  ):
    check_grads(
      lambda z, fn=fn, t=target: fn(z, t), (z,), order=2, modes=["rev"], eps=1e-2, atol=2e-2
    )
