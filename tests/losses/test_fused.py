"""The fused linear + softmax-family losses: equal to the unfused losses on ``h @ w + bias``,
exact against mpmath, safe in training loops, and never holding ``[N, V]`` logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxsoftmax import losses
from tests.losses import accuracy as accuracy_losses

FUSED = {  # fused loss -> (unfused loss, takes a set)
  "fused_nll": (losses.nll, False),
  "fused_complement_nll": (losses.complement_nll, False),
  "fused_set_nll": (losses.set_nll, True),
  "fused_complement_set_nll": (losses.complement_set_nll, True),
}
N, D, V = 37, 16, 101  # V prime: no chunk size below divides it


def _problem(seed=0, scale=2.0, n=N, d=D, v=V, m=4):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * scale / np.sqrt(d), jnp.float32)
  bias = jnp.asarray(rng.normal(size=v), jnp.float32)
  labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  ids = rng.integers(0, v, (n, m))
  ids[:, -1] = ids[:, 0]  # a duplicate id counts once
  ids[rng.random((n, m)) < 0.3] = -1  # padding
  ids[:, 0] = rng.integers(0, v, n)  # never empty
  return h, w, bias, labels, jnp.asarray(ids, jnp.int32)


def _mask(ids, v):
  return (
    jnp.zeros((*ids.shape[:-1], v), bool)
    .at[jnp.arange(ids.shape[0])[:, None], jnp.where(ids < 0, v, ids)]
    .set(True, mode="drop")
  )


def _pair(name, h, w, bias, labels, ids, **kw):
  """(fused, unfused) as functions of (h, w, bias)."""
  unfused, takes_set = FUSED[name]
  target = ids if takes_set else labels
  ref_target = _mask(ids, w.shape[1]) if takes_set else labels
  fused = lambda h, w, b: getattr(losses, name)(h, w, target, bias=b, **kw)
  return fused, lambda h, w, b: unfused(h @ w + b, ref_target)


@pytest.mark.parametrize("name", sorted(FUSED))
# 37 tokens in blocks of at most 10: 4 strided blocks of 9 and 1 left; or all at once.
@pytest.mark.parametrize("chunk, token_chunk", [(7, 10), (4096, None)])
def test_equals_the_unfused_loss_on_the_logits_with_gradients(name, chunk, token_chunk):
  h, w, bias, labels, ids = _problem()
  fused, unfused = _pair(name, h, w, bias, labels, ids, vocab_chunk=chunk, token_chunk=token_chunk)
  # Expected: the library's unfused loss of h @ w + bias (exact, tests/losses/test_partition.py).
  np.testing.assert_allclose(jax.jit(fused)(h, w, bias), unfused(h, w, bias), rtol=2e-5)
  got = jax.jit(jax.grad(lambda *a: fused(*a).sum(), (0, 1, 2)))(h, w, bias)
  want = jax.grad(lambda *a: unfused(*a).sum(), (0, 1, 2))(h, w, bias)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


def test_tokens_left_after_the_strided_blocks_are_blocked_again():
  # 37 tokens in blocks of at most 3: 13 strided blocks of 2 and 11 left, which take 4
  # strided blocks of 2 and 3 left. Expected: the unfused loss, in value and gradients.
  h, w, bias, labels, ids = _problem()
  fused, unfused = _pair("fused_nll", h, w, bias, labels, ids, vocab_chunk=50, token_chunk=3)
  np.testing.assert_allclose(jax.jit(fused)(h, w, bias), unfused(h, w, bias), rtol=2e-5)
  got = jax.jit(jax.grad(lambda *a: fused(*a).sum(), (0, 1, 2)))(h, w, bias)
  want = jax.grad(lambda *a: unfused(*a).sum(), (0, 1, 2))(h, w, bias)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


@pytest.mark.parametrize("name", sorted(FUSED))
def test_float32_accuracy_against_mpmath_in_every_regime(name, assert_accurate):
  # Gaps of the target over the rest up to 1e4, K in (2, 16, 64), chunks of 7 columns.
  case = next(c for c in accuracy_losses.CASES if c.name == name)
  for regime in accuracy_losses.REGIMES:
    assert_accurate(case, regime, 20)


def test_complement_stays_finite_where_the_per_token_log_probability_rounds_to_zero():
  # p_label = 1 - 1e-30: nll rounds to 0 in float32, so -log(1 - exp(-nll)) is inf.
  # Expected: log(1 + exp(z_l - b)) = 69.08 for z_l - b = 69.08 (math.log(1e30)).
  h = jnp.array([[1.0]])
  w = jnp.array([[0.0, 69.07755279]])  # logits [0, 69.08]: the label leads by log(1e30)
  nll = losses.fused_nll(h, w, jnp.array([1]))[0]
  assert float(nll) < 1e-29 and float(nll) > 0  # exp(-69.08) = 1e-30, not 0
  with np.errstate(divide="ignore"):
    assert np.isinf(-np.log1p(-np.exp(-np.float32(nll))))  # what the per-token route gives
  np.testing.assert_allclose(losses.fused_complement_nll(h, w, jnp.array([1])), 69.07755, rtol=1e-6)


def test_padded_columns_never_enter_a_logsumexp():
  # V = 5 in chunks of 4: the second chunk starts at column 1 and masks columns 1-3.
  # Large logits in the overlap would be counted twice if they were not masked.
  h = jnp.ones((1, 1))
  w = jnp.array([[0.0, 30.0, 30.0, 30.0, 0.0]])
  for chunk in (1, 2, 3, 4, 5):
    np.testing.assert_allclose(
      losses.fused_nll(h, w, jnp.array([0]), vocab_chunk=chunk),
      losses.nll(h @ w, jnp.array([0])),
      rtol=1e-6,
    )


@pytest.mark.parametrize("scale", [5.0, 40.0, 160.0, 640.0])
def test_bfloat16_gradients_match_a_float32_reference(scale):
  # |logit| up to `scale`: logits in float32 from bfloat16 h and w, the weight gradient
  # from one float32 product per chunk. Reference: the unfused loss on the same bfloat16
  # values upcast to float32.
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(64, 32)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(32, 1000)) * scale / np.sqrt(32) / 4, jnp.bfloat16)
  # Half the labels are each token's top class (p_l near 1: the complement loss is
  # large there), half are drawn at random (mostly far below the top).
  top = jnp.argmax(h.astype(jnp.float32) @ w.astype(jnp.float32), axis=-1)
  labels = jnp.where(jnp.arange(64) % 2 == 0, top, rng.integers(0, 1000, 64)).astype(jnp.int32)
  for fused, unfused in (
    (losses.fused_nll, losses.nll),
    (losses.fused_complement_nll, losses.complement_nll),
  ):
    got = jax.jit(
      jax.grad(lambda h, w: fused(h, w, labels, vocab_chunk=96, token_chunk=24).sum(), (0, 1))
    )(h, w)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
    want = jax.jit(jax.grad(lambda h, w: unfused(h @ w, labels).sum(), (0, 1)))(
      h.astype(jnp.float32), w.astype(jnp.float32)
    )
    for g, r in zip(got, want):
      err = jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max()
      assert float(err) < 2**-7, (fused.__name__, scale, float(err))  # bfloat16 rounding
    value = jax.jit(lambda h, w: fused(h, w, labels, vocab_chunk=96))(h, w)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(
      value, unfused(h.astype(jnp.float32) @ w.astype(jnp.float32), labels), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
  "name, order",
  [
    ("fused_nll", 2),
    ("fused_complement_set_nll", 2),
    ("fused_complement_nll", 1),
    ("fused_set_nll", 1),
  ],
)
def test_check_grads_in_float64(name, order):
  # The four share one kernel (a label is a set of one, a complement swaps the sides):
  # second order on one label and one set loss.
  with jax.enable_x64(True):
    h, w, bias, labels, ids = _problem(n=4, d=3, v=11)
    h, w, bias = (x.astype(jnp.float64) for x in (h, w, bias))
    fused, _ = _pair(name, h, w, bias, labels, ids, vocab_chunk=4)
    check_grads(jax.jit(fused), (h, w, bias), order=order, modes=["rev"])


@pytest.mark.parametrize("name", ["fused_nll", "fused_complement_set_nll"])
def test_vmap_equals_a_loop_and_leading_axes_are_kept(name):
  h, w, bias, labels, ids = _problem()
  takes_set = FUSED[name][1]
  fn = getattr(losses, name)
  target = ids if takes_set else labels
  hb = jnp.stack([h, 2 * h, -h]).reshape(3, N, D)
  one = jax.jit(lambda x: fn(x, w, target, bias=bias, vocab_chunk=16))
  batched = jax.jit(jax.vmap(one))(hb)
  for i in range(3):
    np.testing.assert_allclose(batched[i], one(hb[i]), rtol=1e-6)
  # [2, N/... ] leading axes: the same per-token values, reshaped.
  h2, t2 = h[:36].reshape(4, 9, D), target[:36].reshape(4, 9, *target.shape[1:])
  np.testing.assert_allclose(
    fn(h2, w, t2, bias=bias).reshape(-1), fn(h[:36], w, target[:36], bias=bias), rtol=1e-6
  )


def test_where_and_ignore_index_give_loss_and_gradient_zero():
  h, w, bias, labels, _ = _problem()
  padded = labels.at[::3].set(-100)
  mask = padded != -100
  fn = jax.jit(lambda h, w: losses.fused_nll(h, w, padded, ignore_index=-100, vocab_chunk=16))
  value = fn(h, w)
  assert np.all(np.asarray(value)[::3] == 0)
  gh, gw = jax.jit(jax.grad(lambda h, w: fn(h, w).sum(), (0, 1)))(h, w)
  assert np.all(np.asarray(gh)[::3] == 0)
  # Expected: the unfused loss on the kept tokens alone.
  want = jax.grad(lambda w: losses.nll(h[mask] @ w, labels[mask]).sum())(w)
  np.testing.assert_allclose(gw, want, rtol=1e-4, atol=1e-6)
  masked = lambda h: losses.fused_complement_nll(h, w, labels, where=mask)
  got, g = jax.jit(lambda h: (masked(h), jax.grad(lambda h: masked(h).sum())(h)))(h)
  np.testing.assert_array_equal(np.asarray(got)[~np.asarray(mask)], 0.0)
  assert np.all(np.asarray(g)[~np.asarray(mask)] == 0)


def test_z_loss_adds_the_squared_logsumexp_and_its_gradient():
  h, w, bias, labels, _ = _problem()
  for fn, unfused in (
    (losses.fused_nll, losses.nll),
    (losses.fused_complement_nll, losses.complement_nll),
  ):
    fused = lambda h, w: fn(h, w, labels, bias=bias, z_loss=1e-2, vocab_chunk=16)
    # Expected: PaLM's z-loss, 1e-2 * logsumexp(z)^2, added to the unfused loss.
    ref = lambda h, w: (
      unfused(h @ w + bias, labels) + 1e-2 * jnp.square(jax.nn.logsumexp(h @ w + bias, axis=-1))
    )
    np.testing.assert_allclose(jax.jit(fused)(h, w), ref(h, w), rtol=1e-5)
    for g, r in zip(
      jax.jit(jax.grad(lambda *a: fused(*a).sum(), (0, 1)))(h, w),
      jax.grad(lambda *a: ref(*a).sum(), (0, 1))(h, w),
    ):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["fused_complement_nll", "fused_set_nll"])
def test_soft_cap_is_the_unfused_loss_of_capped_logits(name):
  h, w, bias, labels, ids = _problem(scale=20.0)
  fused, _ = _pair(name, h, w, bias, labels, ids, soft_cap=5.0, vocab_chunk=16)
  unfused, takes_set = FUSED[name]
  target = _mask(ids, V) if takes_set else labels
  # Expected: Gemma 2's capping c * tanh(z / c) before the unfused loss.
  ref = lambda h, w, b: unfused(5.0 * jnp.tanh((h @ w + b) / 5.0), target)
  np.testing.assert_allclose(fused(h, w, bias), ref(h, w, bias), rtol=2e-5)
  for g, r in zip(
    jax.grad(lambda *a: fused(*a).sum(), (0, 1, 2))(h, w, bias),
    jax.grad(lambda *a: ref(*a).sum(), (0, 1, 2))(h, w, bias),
  ):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


def test_empty_sets_follow_the_unfused_losses():
  h, w, bias, _, _ = _problem(n=2)
  empty = jnp.full((2, 3), -1, jnp.int32)
  assert np.all(np.isinf(jax.jit(losses.fused_set_nll)(h, w, empty)))
  np.testing.assert_array_equal(jax.jit(losses.fused_complement_set_nll)(h, w, empty), 0.0)
  g = jax.jit(jax.grad(lambda h: losses.fused_set_nll(h, w, empty).sum()))(h)
  np.testing.assert_array_equal(g, 0.0)  # +inf loss: zero gradient, as set_nll


def test_no_logits_sized_buffer_in_the_compiled_training_step():
  n, d, v = 1024, 32, 16384  # [N, V] float32 would be 64 MiB
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)
  step = jax.jit(
    jax.grad(lambda h, w, y: losses.fused_complement_nll(h, w, y, vocab_chunk=512).sum(), (0, 1))
  )
  temp = step.lower(h, w, y).compile().memory_analysis().temp_size_in_bytes
  # Expected: a few [N, chunk] float32 buffers (2 MiB each) and the [D, V] gradient.
  assert temp < n * v * 4 / 4, temp


def test_blocks_of_tokens_keep_the_working_memory_independent_of_the_token_count():
  d, v = 32, 4096

  def temp(n, dtype=jnp.float32):
    h = jax.ShapeDtypeStruct((n, d), dtype)
    w = jax.ShapeDtypeStruct((d, v), dtype)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    step = jax.jit(
      jax.grad(
        lambda h, w, y: losses.fused_nll(h, w, y, vocab_chunk=512, token_chunk=256).sum(), (0, 1)
      )
    )
    compiled = step.lower(h, w, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()

  (small, _), (large, _) = temp(1024), temp(8192)
  # 7168 more tokens: their [N, D] input gradient (0.9 MiB in float32), not 7168 more rows
  # of each [tokens, chunk] buffer (14 MiB for one).
  assert large - small < 7168 * 512 * 4 / 4, (small, large)
  # bfloat16: no float32 copy of w or of its gradient (XLA:CPU slices and updates 16-bit
  # floats on float32 copies unless given their bits).
  _, text = temp(1024, jnp.bfloat16)
  assert f"f32[{d},{v}]" not in text


@pytest.mark.parametrize(
  "bad, message",
  [
    (dict(labels=np.array([0, 101])), r"labels\[1\] = 101 is outside \[0, 101\)"),
    (dict(w=np.zeros((3, 101), np.float32)), r"w must be \[D, V\] with D = h.shape\[-1\] = 16"),
    (dict(bias=np.zeros(100, np.float32)), r"bias must be a floating \[V\] = \[101\]"),
    (dict(where=np.ones(3, bool)), r"where shape \(3,\) does not broadcast"),
    (dict(vocab_chunk=0), r"vocab_chunk must be an int >= 1"),
    (dict(token_chunk=2.5), r"token_chunk must be an int >= 1 or None"),
    (dict(soft_cap=-1.0), r"soft_cap must be a finite number > 0"),
    (dict(soft_cap=float("inf")), r"soft_cap must be a finite number > 0"),
  ],
)
def test_bad_input_is_a_clear_error(bad, message):
  h, w, bias, labels, _ = _problem(n=2)
  args = dict(labels=labels, w=w, bias=bias)
  args.update(bad)
  kw = {k: v for k, v in args.items() if k not in ("labels", "w")}
  with pytest.raises((ValueError, TypeError), match=message):
    losses.fused_nll(h, args["w"], args["labels"], **kw)


def test_bad_negative_ids_raise_eagerly_and_give_nan_under_jit():
  h, w, _, _, ids = _problem(n=3)
  bad = ids.at[1, 0].set(V)
  with pytest.raises(ValueError, match=r"negatives\[1, 0\] = 101 is outside \[0, 101\)"):
    losses.fused_complement_set_nll(h, w, np.asarray(bad))
  got = jax.jit(losses.fused_complement_set_nll)(h, w, bad)
  assert np.isnan(got[1]) and np.all(np.isfinite(np.asarray(got)[[0, 2]]))
