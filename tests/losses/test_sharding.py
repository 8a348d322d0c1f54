"""Sharded inputs on 8 simulated CPU devices (set before JAX starts, in a subprocess)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxsoftmax import losses
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (64, 10)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    m = rng.random((64, 10)) < 0.3
    m[:, 0] = True
    q = rng.random((64, 10)).astype(np.float32)
    cases = [(losses.nll, y), (losses.complement_nll, y), (losses.negated_nll, y),
             (losses.set_nll, m), (losses.complement_set_nll, m),
             (losses.soft_cross_entropy, q), (losses.multilabel_softmax_cross_entropy, m),
             (losses.sigmoid_binary_cross_entropy, q)]
    for fn, aux in cases:
        f = jax.jit(jax.value_and_grad(lambda z, a: fn(z, a).sum()))
        zs, auxs = jax.device_put(z, rows), jax.device_put(aux, rows)
        assert len(zs.sharding.device_set) == 8
        value, grad = f(zs, auxs)
        assert len(grad.sharding.device_set) == 8, (fn.__name__, grad.sharding)
        v1, g1 = f(jnp.asarray(z), jnp.asarray(aux))
        np.testing.assert_allclose(value, v1, rtol=1e-5)
        np.testing.assert_allclose(grad, g1, rtol=1e-5, atol=1e-7)
        per_example = jax.jit(fn)(zs, auxs)
        assert per_example.sharding.is_equivalent_to(rows, per_example.ndim) or \\
            len(per_example.sharding.device_set) == 8
    print("sharded ok")
""")


def test_losses_on_sharded_inputs_match_single_device():
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
  )
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "sharded ok" in out.stdout
