"""High-precision references for the losses, in mpmath (40 significant digits).

Each reference takes one example as float64 numpy arrays (converted exactly) and
returns ``(loss, grad_logits)`` as mpmath numbers. They follow the definitions
(probabilities as ratios of exponentials) with every quantity formed as a sum of
positive terms, so they keep 40 digits in every regime, whatever the logit gap.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

mp.mp.dps = 40


def _masses(z, in_set):
  """Unnormalised masses exp(z_k - max z) (mpf), and the totals inside/outside S."""
  z = [mp.mpf(float(v)) for v in z]
  finite = [v for v in z if mp.isfinite(v)]
  top = max(finite)
  e = [mp.exp(v - top) if mp.isfinite(v) else mp.mpf(0) for v in z]
  e_in = mp.fsum(x for x, s in zip(e, in_set) if s)
  e_out = mp.fsum(x for x, s in zip(e, in_set) if not s)
  return z, e, e_in, e_out


def set_nll(z, in_set):
  """-log P(S): loss log(1 + E_out / E_in), gradient p_k - [k in S] p_k / P(S)."""
  z, e, e_in, e_out = _masses(z, in_set)
  total = e_in + e_out
  loss = mp.log1p(e_out / e_in)
  # p_k - p_k / P(S) = -p_k P(not S) / P(S) for k in S, with no cancellation.
  grad = [x / total if not s else -(x / total) * (e_out / e_in) for x, s in zip(e, in_set)]
  return loss, grad


def set_nll_hessian(z, in_set, with_scale=False):
  """Hessian of -log P(S) in the logits: (diag p - p p^T) - (diag q - q q^T), with q the
  softmax restricted to S; each entry from the closed form below, whose terms keep 40
  digits (no 1 - p is formed: it is the mass of the other classes).

  ``with_scale``: also the sum of the magnitudes of the two terms whose difference an
  entry is (its own magnitude where nothing cancels): the diagonal inside S is
  ``q_i Q (P - r (1 + P))``, a true difference, ill-conditioned where the two nearly
  cancel."""
  z, e, e_in, e_out = _masses(z, in_set)
  total = e_in + e_out
  k = len(z)
  p = [x / total for x in e]
  q = [x / e_in if s else mp.mpf(0) for x, s in zip(e, in_set)]
  big_p, big_q = e_in / total, e_out / total  # P(S), P(not S)
  h = [[mp.mpf(0)] * k for _ in range(k)]
  scale = [[None] * k for _ in range(k)]
  for i in range(k):
    for j in range(k):
      si, sj = in_set[i], in_set[j]
      if not si and not sj:  # p_i (delta - p_j): p_i (1 - p_i) on the diagonal
        rest = mp.fsum(p[m] for m in range(k) if m != i)
        h[i][j] = p[i] * rest if i == j else -p[i] * p[j]
      elif si and sj:  # p_i (delta - p_j) - q_i (delta - q_j), with p = P q on S
        if i == j:
          # p_i (1 - p_i) - q_i (1 - q_i) with 1 - p_i = Q + P (1 - q_i) and 1 - P^2 = Q (1 + P)
          rest_q = mp.fsum(q[m] for m in range(k) if m != i and in_set[m])
          h[i][j] = q[i] * big_q * (big_p - rest_q * (1 + big_p))
          scale[i][j] = q[i] * big_q * (big_p + rest_q * (1 + big_p))
        else:
          h[i][j] = q[i] * q[j] * big_q * (1 + big_p)
      else:  # one in S, one outside: -p_i p_j
        h[i][j] = -p[i] * p[j]
  if with_scale:
    return h, [
      [abs(h[i][j]) if sc is None else sc for j, sc in enumerate(row)]
      for i, row in enumerate(scale)
    ]
  return h


def nll(z, label):
  return set_nll(z, np.arange(len(z)) == label)


def sequence(z, tokens, complement):
  """-log P(answer) (or -log(1 - P)) of an answer ``tokens [T]`` under logits ``z [T, K]``,
  and the gradient ``[T, K]``: the tokens' nll gradients, times ``-1/expm1(L)`` for the
  complement."""
  losses_grads = [nll(row, a) for row, a in zip(z, tokens)]
  big_l = mp.fsum(loss for loss, _ in losses_grads)
  grad = [list(g) for _, g in losses_grads]
  if not complement:
    return big_l, [x for row in grad for x in row]
  loss = -mp.log1p(-mp.exp(-big_l))
  slope = -1 / mp.expm1(big_l)
  return loss, [slope * x for row in grad for x in row]


def complement_nll(z, label):
  return set_nll(z, np.arange(len(z)) != label)


def negated_nll(z, label):
  loss, grad = nll(z, label)
  return -loss, [-g for g in grad]


def complement_set_nll(z, members):
  return set_nll(z, ~np.asarray(members))


def soft_cross_entropy(z, q):
  """sum_k q_k (-log p_k) with -log p_k = log1p(sum_{i != k} exp(z_i - z_k))."""
  zs = [mp.mpf(float(v)) for v in z]
  qs = [mp.mpf(float(v)) for v in q]
  neg_log_p = [
    mp.log1p(mp.fsum(mp.exp(zi - zk) for i, zi in enumerate(zs) if i != k))
    for k, zk in enumerate(zs)
  ]
  loss = mp.fsum(qk * n for qk, n in zip(qs, neg_log_p) if qk != 0)
  total_q = mp.fsum(qs)
  grad = [total_q * mp.exp(-n) - qk for qk, n in zip(qs, neg_log_p)]
  return loss, grad


def multilabel_softmax_cross_entropy(z, label_mask):
  mask = np.asarray(label_mask, dtype=bool)
  q = [mp.mpf(1) / int(mask.sum()) if m else mp.mpf(0) for m in mask]
  return soft_cross_entropy(z, q)


def sigmoid_binary_cross_entropy(z, t):
  """Elementwise t softplus(-z) + (1 - t) softplus(z); summed, with its gradient."""
  softplus = lambda x: mp.log1p(mp.exp(x))
  sigmoid = lambda x: 1 / (1 + mp.exp(-x))
  zs = [mp.mpf(float(v)) for v in z]
  ts = [mp.mpf(float(v)) for v in t]
  losses = [ti * softplus(-zi) + (1 - ti) * softplus(zi) for zi, ti in zip(zs, ts)]
  grad = [(1 - ti) * sigmoid(zi) - ti * sigmoid(-zi) for zi, ti in zip(zs, ts)]
  return losses, grad


def scl_exp(z, label):
  """exp(p_l): dL/dz = exp(p_l) dp_l/dz with dp_l/dz = -p_l d(nll)/dz."""
  n, dn = nll(z, label)
  p = mp.exp(-n)
  return mp.exp(p), [-mp.exp(p) * p * g for g in dn]


def mcl_mae(z, members):
  """P(S) = exp(-set_nll)."""
  n, dn = set_nll(z, np.asarray(members))
  loss = mp.exp(-n)
  return loss, [-loss * g for g in dn]


def mcl_exp(z, members):
  """exp(-P(not S)), P(not S) = exp(-complement_set_nll)."""
  c, dc = complement_set_nll(z, members)
  q = mp.exp(-c)
  loss = mp.exp(-q)
  return loss, [loss * q * g for g in dc]


def pairwise_comparison(z, label):
  """sum_{k != l} sigmoid(z_l - z_k)."""
  zs = [mp.mpf(float(v)) for v in z]
  sigmoid = lambda x: 1 / (1 + mp.exp(-x))
  terms = [(k, zs[label] - zk) for k, zk in enumerate(zs) if k != label]
  loss = mp.fsum(sigmoid(t) for _, t in terms)
  slope = {k: sigmoid(t) * sigmoid(-t) for k, t in terms}
  grad = [mp.fsum(slope.values()) if k == label else -slope[k] for k in range(len(zs))]
  return loss, grad


def forward_uniform(z, label):
  """-log sum_{k != l} p_k / (K - 1) with the uniform transition matrix."""
  c, dc = complement_nll(z, label)
  return c + mp.log(len(z) - 1), dc


def condition_number(z, loss, grad) -> float:
  """Relative condition number of the loss in the logits: sum_k |z_k dl/dz_k| / |l|."""
  num = mp.fsum(abs(mp.mpf(float(zk)) * g) for zk, g in zip(z, grad) if mp.isfinite(zk))
  return float(num / abs(loss))


def hierarchical(u, row, cluster, slot, complement):
  """``-log p_l`` or ``-log(1 - p_l)`` for ``p_l = p(c) p(l | c)``, and its gradient.

  ``u`` are the cluster logits, ``row`` the label's cluster row (padding at -inf),
  ``cluster`` and ``slot`` the label's place in the tree. The gradient is over
  ``u`` then ``row``, concatenated. ``1 - p_l = (1 - p(c)) + p(c) (1 - p(l | c))``
  keeps every quantity a sum of positive terms.
  """
  _, e1, in1, out1 = _masses(u, np.arange(len(u)) == cluster)
  _, e2, in2, out2 = _masses(row, np.arange(len(row)) == slot)
  t1, t2 = in1 + out1, in2 + out2
  p_c, not_c, q, not_q = in1 / t1, out1 / t1, in2 / t2, out2 / t2
  if not complement:
    loss = mp.log1p(out1 / in1) + mp.log1p(out2 / in2)
    grad_u = [-not_c if k == cluster else x / t1 for k, x in enumerate(e1)]
    grad_row = [-not_q if j == slot else x / t2 for j, x in enumerate(e2)]
    return loss, grad_u + grad_row
  rest = not_c + p_c * not_q
  scale = p_c * q / rest  # d(-log(1 - p_l)) = dp_l / (1 - p_l), dp_l = p_l dlog p_l
  grad_u = [scale * not_c if k == cluster else -scale * x / t1 for k, x in enumerate(e1)]
  grad_row = [scale * not_q if j == slot else -scale * x / t2 for j, x in enumerate(e2)]
  # -log(rest) = log(1 + p_l / rest): no 1 - tiny rounding when p_l is far below 1e-40.
  return mp.log1p(scale), grad_u + grad_row


def tree_path(z, branches, complement):
  """``-log p_l`` or ``-log(1 - p_l)`` for ``p_l = prod_t q_t`` along a tree path, and
  the gradient over the path logits ``z`` (``[L, B]``, children past a node's arity at
  -inf), flattened. ``1 - p_l = sum_t (1 - q_t) prod_{s<t} q_s``: positive terms."""
  q, not_q, rows = [], [], []
  for t, b in enumerate(branches):
    _, e, e_in, e_out = _masses(z[t], np.arange(len(z[t])) == b)
    total = e_in + e_out
    q.append(e_in / total)
    not_q.append(e_out / total)
    rows.append((e, total, e_out, e_in))
  p = mp.fprod(q)
  nll_grad = []
  for (e, total, e_out, _), b in zip(rows, branches):
    nll_grad += [-(e_out / total) if j == b else x / total for j, x in enumerate(e)]
  if not complement:
    return mp.fsum(mp.log1p(e_out / e_in) for _, _, e_out, e_in in rows), nll_grad
  rest = mp.fsum(not_q[t] * mp.fprod(q[:t]) for t in range(len(q)))
  scale = p / rest  # d(-log(1 - p)) = -(p / (1 - p)) d(-log p)
  return mp.log1p(scale), [-scale * g for g in nll_grad]


def tree_path_hessian(z, branches, complement):
  """The Hessian over the flattened path logits ``z`` (``[L, B]``) of ``-log p_l`` (block
  diagonal: each node's :func:`set_nll_hessian` for its branch) or of ``-log(1 - p_l)``:
  ``f''(L) g g^T + f'(L) H_L`` with ``f(L) = -log(1 - exp(-L))``, ``f' = -p / (1 - p)``,
  ``f'' = p / (1 - p)^2``, ``g`` and ``H_L`` those of ``L = -log p_l``; ``1 - p_l`` as
  :func:`tree_path` forms it (positive terms)."""
  width = len(z[0])
  size = len(branches) * width
  h = [[mp.mpf(0)] * size for _ in range(size)]
  for t, b in enumerate(branches):
    block = set_nll_hessian(z[t], np.arange(width) == b)
    for i in range(width):
      for j in range(width):
        h[t * width + i][t * width + j] = block[i][j]
  if not complement:
    return h
  _, grad = tree_path(z, branches, False)
  q, not_q = [], []
  for t, b in enumerate(branches):
    _, _, e_in, e_out = _masses(z[t], np.arange(width) == b)
    q.append(e_in / (e_in + e_out))
    not_q.append(e_out / (e_in + e_out))
  p = mp.fprod(q)
  rest = mp.fsum(not_q[t] * mp.fprod(q[:t]) for t in range(len(q)))  # 1 - p
  first, second = -p / rest, p / rest**2
  return [[second * grad[i] * grad[j] + first * h[i][j] for j in range(size)] for i in range(size)]
