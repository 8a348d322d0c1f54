"""The sequence losses: whole-answer likelihood and its exact complement.

Expected values: mpmath at 40 digits (probabilities as ratios of exponentials, each
answer's P the product of its tokens'), and the naive forms in float64.
"""

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxsoftmax import losses

mp.mp.dps = 40


def _mp_token_probs(z, tokens):
  """Each token's probability (mpf) from float logits ``z [T, V]``."""
  out = []
  for row, a in zip(np.asarray(z, np.float64), np.asarray(tokens)):
    e = [mp.exp(mp.mpf(float(v)) - mp.mpf(float(row.max()))) for v in row]
    out.append(e[int(a)] / mp.fsum(e))
  return out


def _mp_complement(z, tokens):
  """(-log(1 - P), d/dz) of one answer, from mpmath."""
  probs = _mp_token_probs(z, tokens)
  p = mp.fprod(probs)
  big_l = -mp.fsum(mp.log(q) for q in probs)
  loss = -mp.log1p(-p)  # log1p: 40 digits also when P is 1e-44
  slope = -1 / mp.expm1(big_l)
  grad = np.zeros(np.shape(z))
  for t, (row, a) in enumerate(zip(np.asarray(z, np.float64), np.asarray(tokens))):
    e = [mp.exp(mp.mpf(float(v)) - mp.mpf(float(row.max()))) for v in row]
    total = mp.fsum(e)
    for k in range(len(row)):
      # d(-log p_a)/dz_k = p_k - [k == a], with 1 - p_a as the sum of the others
      d = e[k] / total if k != a else -mp.fsum(e[j] for j in range(len(row)) if j != a) / total
      grad[t, k] = float(slope * d)
  return float(loss), grad, float(big_l), p


def _answer_with_nll(target, t=3, v=5, seed=0):
  """Logits [T, V] whose answer (tokens 0..) has -log P close to ``target``: each token's
  logit lead over the others set so that its -log p is target / T."""
  rng = np.random.default_rng(seed)
  z = rng.normal(0.0, 1.0, (t, v))
  tokens = rng.integers(0, v, t)
  per = target / t
  for i, a in enumerate(tokens):
    others = np.delete(z[i], a)
    lse = np.log(np.exp(others - others.max()).sum()) + others.max()
    # -log p_a = softplus(lse - z_a) = per  =>  z_a = lse - log(expm1(per))
    z[i, a] = lse - np.log(np.expm1(per))
  return z.astype(np.float32), tokens.astype(np.int32)


@pytest.mark.parametrize("target", [1e-8, 1e-5, 0.01, 0.5, 1.0, 5.0, 20.0, 60.0, 80.0])
def test_complement_value_and_gradient_match_mpmath_from_sure_to_unlikely(target):
  z, tokens = _answer_with_nll(target)
  loss, grad = jax.value_and_grad(
    lambda z: losses.sequence_complement_nll(z[None], tokens[None])[0]
  )(jnp.asarray(z))
  ref, ref_grad, big_l, _ = _mp_complement(z, tokens)
  # The loss's condition number in L is about L |slope| / loss: 1 at both ends, and the
  # token losses carry float32's error of L (relative, a few ulps).
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=2e-4, atol=1e-6 * np.abs(ref_grad).max())
  assert np.abs(grad).max() > 0  # never vanishes while float32 holds exp(-L)
  if target <= 1e-5:  # the textbook form: +inf once P rounds to 1, else far less exact
    naive = -jnp.log(1.0 - jnp.exp(-losses.sequence_nll(z[None], tokens[None])))
    assert naive[0] == np.inf or abs(float(naive[0]) - ref) > 10 * abs(float(loss) - ref)


def test_complement_matches_the_naive_form_in_float64_where_that_is_exact():
  # The naive -log(1 - P) and its gradient P / (1 - P) (onehot - softmax), in NumPy's
  # float64 for P from 1e-11 to 1e-6, where neither form loses anything.
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (4, 6, 7))
    tokens = rng.integers(0, 7, (4, 6))
    top = z.max(-1, keepdims=True)
    log_softmax = z - (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))
    p = np.exp(np.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0].sum(-1))
    ours = losses.sequence_complement_nll(jnp.asarray(z), jnp.asarray(tokens))
    np.testing.assert_allclose(ours, -np.log1p(-p), rtol=1e-12)
    onehot = np.eye(7)[tokens]
    naive_grad = (p / (1 - p))[:, None, None] * (onehot - np.exp(log_softmax))
    grad = jax.grad(lambda z: losses.sequence_complement_nll(z, jnp.asarray(tokens)).sum())
    np.testing.assert_allclose(grad(jnp.asarray(z)), naive_grad, rtol=1e-9, atol=1e-20)


def test_float64_reaches_l_100_with_a_non_zero_gradient():
  with jax.enable_x64(True):
    for target in (1e-8, 100.0):
      z, tokens = _answer_with_nll(target)
      z = jnp.asarray(z, jnp.float64)
      loss, grad = jax.value_and_grad(
        lambda z: losses.sequence_complement_nll(z[None], tokens[None])[0]
      )(z)
      ref, ref_grad, _, _ = _mp_complement(np.asarray(z), tokens)
      np.testing.assert_allclose(float(loss), ref, rtol=1e-9)
      np.testing.assert_allclose(grad, ref_grad, rtol=1e-7, atol=1e-12 * np.abs(ref_grad).max())
      assert np.abs(grad).max() > 0


def test_gradients_and_second_derivatives_match_finite_differences_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(0, 1, (2, 3, 4)))
    tokens = jnp.array([[0, 1, 2], [3, 3, 0]])
    answers = jnp.asarray(rng.normal(0, 1, (2, 3, 2, 4)))
    sets = jnp.array([[[0, 1], [1, 1], [0, 1]], [[2, 2], [3, 0], [1, 1]]])
    for fn, args in [
      (losses.sequence_nll, (z, tokens)),
      (losses.sequence_complement_nll, (z, tokens)),
      (losses.sequence_complement_set_nll, (answers, sets)),
    ]:
      check_grads(jax.jit(lambda z: fn(z, args[1])), (args[0],), order=2, modes=["rev"])


def test_the_set_version_counts_a_repeated_answer_once_and_skips_padding():
  rng = np.random.default_rng(5)
  z = jnp.asarray(rng.normal(0, 1, (1, 4, 3, 6)), jnp.float32)
  answers = jnp.array([[[1, 2, 3], [4, 0, 5], [1, 2, 3], [-1, -1, -1]]])  # a repeat, a pad
  z = z.at[:, 2].set(z[:, 0])  # the same answer scored by the same logits
  ours = losses.sequence_complement_set_nll(z, answers, where=answers >= 0)
  p = [mp.fprod(_mp_token_probs(z[0, j], answers[0, j])) for j in (0, 1)]
  np.testing.assert_allclose(float(ours[0]), float(-mp.log(1 - p[0] - p[1])), rtol=2e-6)
  # One distinct answer: the single-answer loss.
  np.testing.assert_allclose(
    losses.sequence_complement_set_nll(z[:, :1], answers[:, :1]),
    losses.sequence_complement_nll(z[:, 0], answers[:, 0]),
    rtol=1e-6,
  )
  # Every slot padding: no answer, loss 0, zero gradient.
  empty = jnp.full((1, 4, 3), -1)
  loss, grad = jax.value_and_grad(
    lambda z: losses.sequence_complement_set_nll(z, empty, where=empty >= 0).sum()
  )(z)
  assert loss == 0.0 and np.all(grad == 0)


def test_the_set_version_is_exact_when_one_answer_holds_nearly_all_the_mass():
  z, tokens = _answer_with_nll(1e-7, seed=2)
  other = np.array(tokens)
  other[0] = (other[0] + 1) % 5
  z2 = jnp.stack([jnp.asarray(z), jnp.asarray(z)])[None]
  both = jnp.stack([jnp.asarray(tokens), jnp.asarray(other)])[None]
  ours = losses.sequence_complement_set_nll(z2, both)
  p = [mp.fprod(_mp_token_probs(z, t)) for t in (tokens, other)]
  np.testing.assert_allclose(float(ours[0]), float(-mp.log(1 - p[0] - p[1])), rtol=1e-4)


def test_masks_padding_nan_and_low_precision():
  rng = np.random.default_rng(7)
  z = jnp.asarray(rng.normal(0, 1, (3, 5, 6)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 6, (3, 5)))
  mask = jnp.arange(5) < jnp.array([[5], [3], [1]])  # answers of 5, 3 and 1 tokens
  padded = jnp.where(mask, tokens, -100)
  a = losses.sequence_complement_nll(z, tokens, where=mask)
  b = losses.sequence_complement_nll(z, padded, ignore_index=-100)
  np.testing.assert_allclose(a, b, rtol=1e-7)
  np.testing.assert_allclose(
    a[1], losses.sequence_complement_nll(z[1:2, :3], tokens[1:2, :3])[0], rtol=1e-6
  )
  grad = jax.grad(lambda z: losses.sequence_complement_nll(z, tokens, where=mask).sum())(z)
  assert np.all(grad[1, 3:] == 0) and np.all(grad[2, 1:] == 0)
  # NaN in a kept token's logits: NaN out for that answer only, NaN gradient there.
  poisoned = z.at[0, 2, 4].set(jnp.nan)
  out = losses.sequence_complement_nll(poisoned, tokens)
  assert np.isnan(out[0]) and np.all(np.isfinite(out[1:]))
  grad = jax.grad(lambda z: losses.sequence_complement_nll(z, tokens).sum())(poisoned)
  assert np.isnan(grad[0]).any() and np.all(np.isfinite(grad[1:]))
  # bfloat16 logits compute in float32: the gradient comes back in bfloat16.
  low = z.astype(jnp.bfloat16)
  np.testing.assert_allclose(
    losses.sequence_complement_nll(low, tokens),
    losses.sequence_complement_nll(low.astype(jnp.float32), tokens),
    rtol=1e-6,
  )
  assert jax.grad(lambda z: losses.sequence_complement_nll(z, tokens).sum())(low).dtype == (
    jnp.bfloat16
  )


def test_transforms_and_checks():
  rng = np.random.default_rng(8)
  z = jnp.asarray(rng.normal(0, 1, (4, 3, 5)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 5, (4, 3)))
  eager = losses.sequence_complement_nll(z, tokens)
  np.testing.assert_allclose(jax.jit(losses.sequence_complement_nll)(z, tokens), eager, rtol=1e-6)
  np.testing.assert_allclose(
    jax.vmap(lambda a, b: losses.sequence_complement_nll(a[None], b[None])[0])(z, tokens),
    eager,
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="needs \\[..., T, V\\]"):
    losses.sequence_complement_nll(jnp.zeros(5), jnp.zeros((), jnp.int32))
  with pytest.raises(ValueError, match=r"labels\[1, 2\] = 5 is outside \[0, 5\)"):
    losses.sequence_complement_nll(z, tokens.at[1, 2].set(5))
  with pytest.raises(ValueError, match="where shape"):
    losses.sequence_complement_nll(z, tokens, where=jnp.ones((4, 2), bool))
  with pytest.raises(ValueError, match="needs \\[..., J, T, V\\]"):
    losses.sequence_complement_set_nll(z[0], tokens[0])


def test_the_fused_versions_equal_the_losses_of_the_logits():
  rng = np.random.default_rng(9)
  h = jnp.asarray(rng.normal(0, 1, (2, 3, 4, 8)), jnp.float32)  # [B, J, T, D]
  w = jnp.asarray(rng.normal(0, 0.5, (8, 11)), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 0.1, 11), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 11, (2, 3, 4)))
  mask = jnp.arange(4) < 3
  logits = h @ w + bias
  kw = dict(bias=bias, vocab_chunk=4)
  pairs = [
    (
      losses.fused_sequence_nll(h[:, 0], w, tokens[:, 0], where=mask, **kw),
      losses.sequence_nll(logits[:, 0], tokens[:, 0], where=mask),
    ),
    (
      losses.fused_sequence_complement_nll(h[:, 0], w, tokens[:, 0], **kw),
      losses.sequence_complement_nll(logits[:, 0], tokens[:, 0]),
    ),
    (
      losses.fused_sequence_complement_set_nll(h, w, tokens, where=mask, **kw),
      losses.sequence_complement_set_nll(logits, tokens, where=mask),
    ),
  ]
  for fused, flat in pairs:
    np.testing.assert_allclose(fused, flat, rtol=2e-5)
  g_fused = jax.grad(lambda h: losses.fused_sequence_complement_set_nll(h, w, tokens, **kw).sum())(
    h
  )
  g_flat = jax.grad(lambda h: losses.sequence_complement_set_nll(h @ w + bias, tokens).sum())(h)
  np.testing.assert_allclose(g_fused, g_flat, rtol=1e-4, atol=1e-6)
