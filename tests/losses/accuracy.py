"""Measures the float32 accuracy of every loss against the mpmath references.

For each loss and regime it draws random examples, evaluates the loss in float32
under ``jax.jit`` and reports the relative error in units of float32 epsilon
(ulps), divided by ``1 + condition number`` (the error a backward-stable
computation is allowed). Run:

    python -m tests.losses.accuracy [--cases 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsoftmax import losses
from jaxsoftmax.tree import Tree, balanced_tree
from tests.losses import reference

EPS32 = float(np.finfo(np.float32).eps)
# XLA flushes float32 subnormals to zero, so smaller losses are reported as 0.
TINY32 = float(np.finfo(np.float32).tiny)

# The logit gap of the target set over the best class outside it, per regime.
REGIMES = {
  "p(S) -> 1": lambda rng, n: rng.uniform(10.0, 80.0, n),
  "middle": lambda rng, n: rng.uniform(-5.0, 5.0, n),
  "p(S) -> 0": lambda rng, n: -np.exp(rng.uniform(np.log(10.0), np.log(1e4), n)),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One loss: how to call it on a batch and on one example of the reference."""

  name: str
  ours: Callable  # (logits [N, K] float32, aux [N, ...]) -> [N] or [N, K]
  ref: Callable  # (z [K] float64, aux row) -> (loss, grad)
  aux: str  # "label", "mask" or "soft"


CASES = (
  Case("nll", losses.nll, reference.nll, "label"),
  Case("complement_nll", losses.complement_nll, reference.complement_nll, "label"),
  Case("negated_nll", losses.negated_nll, reference.negated_nll, "label"),
  Case("set_nll", losses.set_nll, reference.set_nll, "mask"),
  Case("complement_set_nll", losses.complement_set_nll, reference.complement_set_nll, "mask"),
  Case("soft_cross_entropy", losses.soft_cross_entropy, reference.soft_cross_entropy, "soft"),
  Case(
    "multilabel_softmax_cross_entropy",
    losses.multilabel_softmax_cross_entropy,
    reference.multilabel_softmax_cross_entropy,
    "mask",
  ),
  Case("scl_exp", losses.scl_exp, reference.scl_exp, "label"),
  Case("pairwise_comparison", losses.pairwise_comparison, reference.pairwise_comparison, "label"),
  Case(
    "forward_nll (uniform T)",
    lambda z, y: losses.forward_nll(z, y, (1.0 - jnp.eye(z.shape[-1])) / (z.shape[-1] - 1)),
    reference.forward_uniform,
    "label",
  ),
  Case("mcl_mae", losses.mcl_mae, reference.mcl_mae, "mask"),
  Case("mcl_exp", losses.mcl_exp, reference.mcl_exp, "mask"),
)


def _fused(fn, chunk=7):
  """A fused loss on ``h = z``, ``w = I`` (``h @ w`` is then exactly ``z``), streamed in
  chunks of 7 columns (no K here is a multiple of 7)."""

  def call(z, aux):
    eye = jnp.eye(z.shape[-1], dtype=z.dtype)
    if aux.dtype == jnp.bool_:  # a set: its padded list of ids
      aux = jnp.where(aux, jnp.arange(z.shape[-1]), -1)
    return fn(z, eye, aux, vocab_chunk=chunk)

  return call


CASES += (
  Case("fused_nll", _fused(losses.fused_nll), reference.nll, "label"),
  Case(
    "fused_complement_nll", _fused(losses.fused_complement_nll), reference.complement_nll, "label"
  ),
  Case("fused_set_nll", _fused(losses.fused_set_nll), reference.set_nll, "mask"),
  Case(
    "fused_complement_set_nll",
    _fused(losses.fused_complement_set_nll),
    reference.complement_set_nll,
    "mask",
  ),
)
# Losses on a negative example: small when the labelled class (or set) is unlikely.
NEGATIVE = (
  "complement_nll",
  "complement_set_nll",
  "scl_exp",
  "pairwise_comparison",
  "forward_nll (uniform T)",
  "mcl_exp",
  "fused_complement_nll",
  "fused_complement_set_nll",
)


def draw(rng, case: Case, regime: str, n: int, k: int):
  """Random float32 logits with the target set shifted by the regime's gap."""
  z = rng.normal(0.0, 3.0, (n, k)).astype(np.float32)
  in_set = np.zeros((n, k), bool)
  if case.aux == "mask":
    sizes = rng.integers(1, k, n)
    for i, s in enumerate(sizes):
      in_set[i, rng.choice(k, s, replace=False)] = True
  else:
    in_set[np.arange(n), rng.integers(0, k, n)] = True
  # The complement losses are small when the *labelled* class is unlikely.
  target_in = ~in_set if case.name in NEGATIVE else in_set
  gap = REGIMES[regime](rng, n)
  best_out = np.where(target_in, -np.inf, z).max(axis=1)
  top_in = np.where(target_in, z, -np.inf).max(axis=1)
  z = np.where(target_in, z + (best_out + gap - top_in)[:, None], z).astype(np.float32)
  if case.aux == "label":
    aux = np.argmax(in_set, axis=1)
  elif case.aux == "mask":
    aux = in_set
  else:  # label smoothing 0.01 around one class
    aux = (0.99 * in_set + 0.01 / k).astype(np.float32)
  return z, aux


def _add_row(rows, ours, loss, grad, z) -> None:
  """Appends (ulps / (1 + cond), ulps, cond) for one value; skips losses below float32's tiny."""
  if abs(loss) < TINY32:
    return
  cond = reference.condition_number(z, loss, grad)
  ulps = float(abs((ours - loss) / loss)) / EPS32
  rows.append((ulps / (1.0 + cond), ulps, cond))


def measure(case: Case, regime: str, n: int, k: int, seed: int = 0):
  """Returns rows (ulps / (1 + cond), ulps, cond) for one loss, regime and K."""
  rng = np.random.default_rng(seed)
  z, aux = draw(rng, case, regime, n, k)
  ours = np.asarray(jax.jit(case.ours)(jnp.asarray(z), jnp.asarray(aux)), np.float64)
  rows = []
  for i in range(n):
    loss, grad = case.ref(z[i].astype(np.float64), aux[i])
    _add_row(rows, ours[i], loss, grad, z[i])
  return np.array(rows).reshape(-1, 3)


def measure_sigmoid(n: int, seed: int = 0):
  """The same rows for sigmoid_binary_cross_entropy, logits spread over +-90."""
  rng = np.random.default_rng(seed)
  z = rng.uniform(-90.0, 90.0, (n, 4)).astype(np.float32)
  t = rng.choice(np.array([0.0, 1.0, 0.3], np.float32), (n, 4))
  ours = np.asarray(jax.jit(losses.sigmoid_binary_cross_entropy)(z, t), np.float64)
  rows = []
  for i in range(n):
    ref_losses, ref_grads = reference.sigmoid_binary_cross_entropy(z[i], t[i])
    for j, (loss, grad) in enumerate(zip(ref_losses, ref_grads)):
      _add_row(rows, ours[i, j], loss, [grad], [z[i, j]])
  return np.array(rows).reshape(-1, 3)


def _far_and_middle(rng, n):
  """One level's gap far below its rivals, the other's anywhere in the middle."""
  far, middle = REGIMES["p(S) -> 0"](rng, n), REGIMES["middle"](rng, n)
  swap = rng.random(n) < 0.5
  return np.where(swap, middle, far), np.where(swap, far, middle)


# (cluster gap, within-cluster gap) of the label over the best other entry; the
# regimes are named by p_l = p(y = label) for both losses.
HIERARCHICAL_REGIMES = {
  "p_l -> 1": lambda rng, n: (REGIMES["p(S) -> 1"](rng, n), REGIMES["p(S) -> 1"](rng, n)),
  "middle": lambda rng, n: (REGIMES["middle"](rng, n), REGIMES["middle"](rng, n)),
  "p_l -> 0": _far_and_middle,
}


def measure_hierarchical(regime: str, n: int, k: int, complement: bool, seed: int = 0):
  """The same rows for hierarchical_nll or hierarchical_complement_nll.

  A balanced tree of ``k`` classes; each example's label is shifted by the regime's
  gaps at both levels (its cluster among the clusters, itself inside its cluster).
  """
  rng = np.random.default_rng(seed)
  tree = balanced_tree(k)
  u = rng.normal(0.0, 3.0, (n, tree.num_clusters))
  w = rng.normal(0.0, 3.0, (n, tree.num_clusters, tree.max_size))
  labels = rng.integers(0, k, n)
  cluster, slot = tree.cluster_of[labels], tree.slot_of[labels]
  rows_w = np.where(
    np.arange(tree.max_size) < tree.sizes[cluster][:, None], w[np.arange(n), cluster], -np.inf
  )
  gap_u, gap_w = HIERARCHICAL_REGIMES[regime](rng, n)
  for values, index, gap in ((u, cluster, gap_u), (rows_w, slot, gap_w)):
    others = values.copy()
    others[np.arange(n), index] = -np.inf
    best = others.max(axis=1)
    values[np.arange(n), index] = np.where(np.isfinite(best), best + gap, 0.0)
  u, rows_w = u.astype(np.float32), rows_w.astype(np.float32)
  fn = losses.hierarchical_complement_nll if complement else losses.hierarchical_nll
  ours = np.asarray(
    jax.jit(fn, static_argnums=3)(u, rows_w, labels.astype(np.int32), tree), np.float64
  )
  rows = []
  for i in range(n):
    loss, grad = reference.hierarchical(
      u[i].astype(np.float64), rows_w[i].astype(np.float64), cluster[i], slot[i], complement
    )
    _add_row(rows, ours[i], loss, grad, np.concatenate([u[i], rows_w[i]]))
  return np.array(rows).reshape(-1, 3)


def measure_tree(regime: str, n: int, k: int, complement: bool, seed: int = 0):
  """The same rows for tree_nll or tree_complement_nll on a balanced binary tree of
  ``k`` classes: every level of the label's path shifted by a gap of the regime (for
  p_l -> 0, one level far below and the others in the middle)."""
  rng = np.random.default_rng(seed)
  tree = Tree.balanced(k, 2)
  labels = rng.integers(0, k, n)
  depth, branches = tree.depth[labels], tree.path_branches[labels]
  z = rng.normal(0.0, 3.0, (n, tree.max_depth, 2))
  gaps = np.stack(
    [
      REGIMES["middle" if regime == "middle" else "p(S) -> 1"](rng, n)
      for _ in range(tree.max_depth)
    ],
    axis=1,
  )
  if regime == "p_l -> 0":
    gaps = np.stack([REGIMES["middle"](rng, n) for _ in range(tree.max_depth)], axis=1)
    far = rng.integers(0, depth)
    gaps[np.arange(n), far] = REGIMES["p(S) -> 0"](rng, n)
  rows_n = np.arange(n)[:, None]
  levels = np.arange(tree.max_depth)[None, :]
  safe = np.maximum(branches, 0)
  other = z[rows_n, levels, 1 - safe]
  z[rows_n, levels, safe] = other + gaps
  z = z.astype(np.float32)
  fn = losses.tree_complement_nll if complement else losses.tree_nll
  paths = jax.jit(lambda z, y: fn(z, y, tree, layout="paths"))
  ours = np.asarray(paths(z, labels.astype(np.int32)), np.float64)
  rows = []
  for i in range(n):
    path = z[i, : depth[i]].astype(np.float64)
    loss, grad = reference.tree_path(path, branches[i, : depth[i]], complement)
    _add_row(rows, ours[i], loss, grad, path.ravel())
  return np.array(rows).reshape(-1, 3)


TREE_REGIMES = ("p_l -> 1", "middle", "p_l -> 0")

# The sequence losses: answers of T tokens whose probability P is near 1, moderate or
# near 0 (the total -log P drawn per regime, split over the tokens).
SEQUENCE_REGIMES = {
  "P -> 1": lambda rng, n: np.exp(rng.uniform(np.log(1e-7), np.log(1e-2), n)),
  "middle": lambda rng, n: rng.uniform(0.1, 5.0, n),
  "P -> 0": lambda rng, n: rng.uniform(10.0, 80.0, n),
}
SEQUENCE_CASES = (
  ("sequence_nll", losses.sequence_nll, False),
  ("sequence_complement_nll", losses.sequence_complement_nll, True),
)


def measure_sequence(regime: str, n: int, k: int, complement: bool, seed: int = 0, t: int = 4):
  """Rows (ulps / (1 + cond), ulps, cond) for a sequence loss on ``n`` answers of ``t``
  tokens over ``k`` classes, each answer's -log P drawn from the regime and split evenly
  over its tokens (each token's logit set so that its -log p is that share)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(0.0, 3.0, (n, t, k))
  tokens = rng.integers(0, k, (n, t))
  shares = SEQUENCE_REGIMES[regime](rng, n)[:, None] / t
  rows_n, steps = np.arange(n)[:, None], np.arange(t)[None, :]
  others = z.copy()
  others[rows_n, steps, tokens] = -np.inf
  top = others.max(-1)
  lse = top + np.log(np.exp(others - top[..., None]).sum(-1))
  z[rows_n, steps, tokens] = lse - np.log(np.expm1(shares))  # -log p_token = share
  z = z.astype(np.float32)
  fn = losses.sequence_complement_nll if complement else losses.sequence_nll
  ours = np.asarray(jax.jit(fn)(jnp.asarray(z), jnp.asarray(tokens)), np.float64)
  rows = []
  for i in range(n):
    loss, grad = reference.sequence(z[i].astype(np.float64), tokens[i], complement)
    _add_row(rows, ours[i], loss, grad, z[i].ravel())
  return np.array(rows).reshape(-1, 3)


# The losses whose second derivatives are measured, on the draws of the first-derivative
# table: the label and set losses of the partition kernel, and the fused ones (whose
# streamed gradient differentiates as the same gradient on the logits).
HESSIAN_CASES = tuple(
  case
  for case in CASES
  if case.name
  in (
    "nll",
    "complement_nll",
    "negated_nll",
    "set_nll",
    "complement_set_nll",
    "fused_nll",
    "fused_complement_nll",
    "fused_set_nll",
    "fused_complement_set_nll",
  )
)


def _hessian_reference(case, z, aux):
  """The mpmath Hessian of one example (reference.set_nll_hessian on the loss's event)
  and each entry's scale (the magnitudes of the terms it is the difference of)."""
  in_set = np.arange(len(z)) == aux if case.aux == "label" else np.asarray(aux)
  event = ~in_set if case.name in NEGATIVE else in_set
  h, scale = reference.set_nll_hessian(z, event, with_scale=True)
  return ([[-x for x in row] for row in h] if case.name == "negated_nll" else h), scale


@functools.cache
def _hessian_program(case: Case, mode: str):
  """One jitted program per loss and mode, so that the regimes (same shapes) share its
  tracing and compilation: a lambda made per call compiled each of them again."""
  single = lambda z, a: case.ours(z[None], a[None])[0]
  second = jax.jacrev(jax.grad(single)) if mode == "rev" else jax.hessian(single)
  return jax.jit(jax.vmap(second))


def measure_hessian(case: Case, regime: str, n: int, k: int, seed: int = 0, mode: str = "rev"):
  """Rows (ulps / (1 + cond), ulps, cond) for every Hessian entry of one loss.

  ``mode`` "rev" is ``jax.jacrev(jax.grad)`` (reverse over reverse), "fwd" is
  ``jax.hessian`` (forward over reverse, the Hessian-vector products of ``jax.jvp``).
  ``cond`` bounds the entry's relative condition number in the logits: each entry is a
  product of probabilities ``exp(z_k - logsumexp z)``, whose relative sensitivity to a
  relative change of the logits is at most ``2 max |z|`` per factor, and an entry that is
  a difference of two such terms (the diagonal inside S) is amplified by how much they
  cancel: ``cond = (1 + 4 max|z|) * (|term 1| + |term 2|) / |entry| - 1``. Entries below
  ``tiny / eps`` (1e-31) are left out: the rule forms them as products of factors
  whose own products fall below float32's normal range, where XLA flushes to zero.
  """
  rng = np.random.default_rng(seed)
  z, aux = draw(rng, case, regime, n, k)
  ours = np.asarray(_hessian_program(case, mode)(jnp.asarray(z), jnp.asarray(aux)), np.float64)
  rows = []
  for i in range(n):
    ref, scale = _hessian_reference(case, z[i].astype(np.float64), aux[i])
    spread = 4.0 * float(np.abs(z[i]).max())
    for a in range(k):
      for b in range(k):
        value = ref[a][b]
        if abs(value) < TINY32 / EPS32:  # formed from factors whose products leave float32's range
          continue
        # An entry that is a difference of two terms is as ill-conditioned as they cancel.
        cond = float(scale[a][b] / abs(value)) * (1.0 + spread) - 1.0
        ulps = float(abs((ours[i, a, b] - value) / value)) / EPS32
        rows.append((ulps / (1.0 + cond), ulps, cond))
  return np.array(rows).reshape(-1, 3)


def _report(cells, rows) -> float:
  """Prints one table row (its label cells, then the rows' count, worst ratio, worst ulps
  and median condition); returns its worst ratio (0 for no rows)."""
  label = " | ".join(cells)
  if not len(rows):  # every value below float32's tiny (a few cases, far gaps)
    print(f"| {label} | 0 | | | |")
    return 0.0
  print(
    f"| {label} | {len(rows)} | {rows[:, 0].max():.2f} "
    f"| {rows[:, 1].max():.1f} | {np.median(rows[:, 2]):.3g} |"
  )
  return float(rows[:, 0].max())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", type=int, default=40, help="examples per loss, regime and K")
  parser.add_argument("--classes", type=int, nargs="+", default=[2, 16, 64])
  args = parser.parse_args(argv)
  print(
    f"float32 relative error against mpmath (40 digits), {args.cases} examples "
    f"per loss, regime and K in {args.classes}; ulps of eps = {EPS32:.3g}"
  )
  print()
  print("| loss | regime | examples | worst ulps / (1 + cond) | worst ulps | median cond |")
  print("|---|---|---:|---:|---:|---:|")
  worst = 0.0
  for case in CASES:
    for regime in REGIMES:
      rows = np.concatenate([measure(case, regime, args.cases, k, seed=k) for k in args.classes])
      worst = max(worst, _report((case.name, regime), rows))
  rows = measure_sigmoid(args.cases * len(args.classes))
  worst = max(worst, _report(("sigmoid_binary_cross_entropy", "z in [-90, 90]"), rows))
  trees = (
    ("hierarchical", "balanced tree", HIERARCHICAL_REGIMES, measure_hierarchical),
    ("tree", "binary tree", TREE_REGIMES, measure_tree),
  )
  for prefix, shape, regimes, measure_fn in trees:
    for complement in (False, True):
      name = f"{prefix}_complement_nll" if complement else f"{prefix}_nll"
      for regime in regimes:
        rows = np.concatenate(
          [measure_fn(regime, args.cases, k, complement, seed=k) for k in args.classes]
        )
        worst = max(worst, _report((f"{name} ({shape})", regime), rows))
  for name, _, complement in SEQUENCE_CASES:
    for regime in SEQUENCE_REGIMES:
      rows = np.concatenate(
        [measure_sequence(regime, args.cases, k, complement, seed=k) for k in args.classes]
      )
      worst = max(worst, _report((f"{name} (answers of 4 tokens)", regime), rows))
  print()
  print(f"worst case over all losses: {worst:.2f} ulps per unit of (1 + condition number)")
  print()
  print(
    "Second derivatives: every Hessian entry against mpmath's, reverse over reverse "
    "(jax.jacrev(jax.grad)) and forward over reverse (jax.hessian); cond = (1 + 4 max|z|) "
    "x the cancellation of the entry's two terms, minus 1, a bound on its relative "
    "condition number; entries of magnitude 1e-31 or more"
  )
  print()
  print("| loss | regime | mode | entries | worst ulps / (1 + cond) | worst ulps | median cond |")
  print("|---|---|---|---:|---:|---:|---:|")
  worst_second = 0.0
  for case in HESSIAN_CASES:
    for regime in REGIMES:
      for mode in ("rev", "fwd"):
        rows = np.concatenate(
          [measure_hessian(case, regime, args.cases, k, seed=k, mode=mode) for k in args.classes]
        )
        worst_second = max(worst_second, _report((case.name, regime, mode), rows))
  print()
  print(f"worst second derivative: {worst_second:.2f} ulps per unit of (1 + cond)")


if __name__ == "__main__":
  main()
