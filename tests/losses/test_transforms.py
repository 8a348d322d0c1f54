"""Every loss composes with jit, vmap, grad of grad, checkpoint and scan; dtype policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _batch(make_aux, shape=(6, 5), seed=0):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.normal(0, 2, shape), jnp.float32)
  return z, jnp.asarray(make_aux(rng, shape))


def test_jit_equals_eager(loss_case):
  _, fn, make_aux = loss_case
  z, aux = _batch(make_aux)
  np.testing.assert_allclose(jax.jit(fn)(z, aux), fn(z, aux), rtol=1e-6)


def test_vmap_over_examples_equals_batched_call(loss_case):
  _, fn, make_aux = loss_case
  z, aux = _batch(make_aux)
  np.testing.assert_allclose(jax.vmap(fn)(z, aux), fn(z, aux), rtol=1e-6)
  g_vmap = jax.vmap(jax.grad(lambda z, a: fn(z, a).sum()))(z, aux)
  g_batch = jax.grad(lambda z: fn(z, aux).sum())(z)
  np.testing.assert_allclose(g_vmap, g_batch, rtol=1e-6, atol=1e-7)


def test_vmap_over_parameters(loss_case):
  _, fn, make_aux = loss_case
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32)  # 4 parameter sets
  aux = jnp.asarray(make_aux(rng, (8, 5)))
  loss = lambda w: fn(x @ w, aux).mean()
  per_w = jax.vmap(jax.value_and_grad(loss))(weights)
  for i in range(4):
    value, grad = jax.value_and_grad(loss)(weights[i])
    np.testing.assert_allclose(per_w[0][i], value, rtol=1e-6)
    np.testing.assert_allclose(per_w[1][i], grad, rtol=1e-5, atol=1e-7)


def test_grad_of_grad_is_finite_and_symmetric(loss_case):
  _, fn, make_aux = loss_case
  with jax.enable_x64(True):
    z, aux = _batch(make_aux, shape=(5,))
    z = z.astype(jnp.float64)
    aux = aux.astype(jnp.float64) if jnp.issubdtype(aux.dtype, jnp.floating) else aux
    hessian = jax.jacrev(jax.grad(lambda z: fn(z, aux).sum()))(z)
    assert np.all(np.isfinite(hessian))
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-12)


def test_checkpoint_and_scan(loss_case):
  _, fn, make_aux = loss_case
  z, aux = _batch(make_aux, shape=(6, 5))
  total = lambda z: fn(z, aux).sum()
  np.testing.assert_allclose(jax.grad(jax.checkpoint(total))(z), jax.grad(total)(z), rtol=1e-6)

  def scanned(z):  # sum over three chunks of two examples, in a scan
    def body(carry, chunk):
      return carry + fn(*chunk).sum(), None

    chunks = (z.reshape(3, 2, *z.shape[1:]), aux.reshape(3, 2, *aux.shape[1:]))
    return jax.lax.scan(body, jnp.float32(0.0), chunks)[0]

  np.testing.assert_allclose(scanned(z), total(z), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(scanned)(z), jax.grad(total)(z), rtol=1e-5, atol=1e-7)


def test_forward_mode_is_a_clear_type_error(loss_case):
  _, fn, make_aux = loss_case
  z, aux = _batch(make_aux)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda z: fn(z, aux), (z,), (z,))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_computes_in_float32(loss_case, dtype):
  _, fn, make_aux = loss_case
  z, aux = _batch(make_aux)
  low = z.astype(dtype)
  loss, grad = jax.value_and_grad(lambda z: fn(z, aux).sum())(low)
  assert loss.dtype == jnp.float32 and grad.dtype == dtype
  # The value is the float32 loss of the rounded logits, not a bf16 computation.
  np.testing.assert_allclose(fn(low, aux), fn(low.astype(jnp.float32), aux), rtol=0)
  # So is the gradient: the float32 gradient of the rounded logits, rounded once (a kernel
  # that reads 16-bit logits as they are rebuilds the same float32 exponentials).
  want = jax.grad(lambda z: fn(z, aux).sum())(low.astype(jnp.float32)).astype(dtype)
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(want, np.float32))


def test_float64_computes_in_float64(loss_case):
  _, fn, make_aux = loss_case
  with jax.enable_x64(True):
    z, aux = _batch(make_aux)
    z = z.astype(jnp.float64)
    loss, grad = jax.value_and_grad(lambda z: fn(z, aux).sum())(z)
    assert loss.dtype == jnp.float64 and grad.dtype == jnp.float64


def _programs_lowered(fn):
  """How many programs JAX lowers to run ``fn()`` (each eager operation is one)."""
  from jax import monitoring

  events = []
  listener = lambda event, duration, **kw: events.append(event)
  monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.block_until_ready(fn())
  finally:
    monitoring.unregister_event_duration_listener(listener)
  return events.count("/jax/core/compile/jaxpr_to_mlir_module_duration")


def test_an_eager_call_is_one_program_not_one_per_operation():
  # Before: complement_nll on a new shape dispatched and compiled each of its operations
  # (29 programs, 1.0 s), its eager value_and_grad 37; tree_log_softmax on a deep tree
  # several per level (13 s at 32768 classes).
  from jaxsoftmax import losses
  from jaxsoftmax.tree import Tree

  z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 37)), jnp.float32)
  y = jnp.array([0, 5, 36])
  assert _programs_lowered(lambda: losses.complement_nll(z, y)) <= 2
  grad = jax.value_and_grad(lambda z: losses.complement_nll(z, y).sum())
  assert _programs_lowered(lambda: grad(z)) <= 6
  tree = Tree.huffman(1.0 / np.arange(1, 41))  # 39 internal nodes in 7 levels
  nodes = jnp.zeros((2, tree.num_nodes, 2))
  assert tree.max_depth == 7
  assert _programs_lowered(lambda: losses.tree_log_softmax(nodes, tree)) <= 2
