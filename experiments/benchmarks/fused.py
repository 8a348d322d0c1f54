"""The fused losses against optax on ``h @ w``: compiled temporary memory and time.

Each row is one loss under ``jax.jit(jax.value_and_grad(..., argnums=(0, 1)))`` of its
sum, with respect to ``h`` ``[N, D]`` and ``w`` ``[D, V]``:

- ``optax``: ``optax.softmax_cross_entropy_with_integer_labels(h @ w, labels)``, the peer;
- ``complement_nll (unfused)``: :func:`jaxsoftmax.losses.complement_nll` on ``h @ w``;
- ``fused_nll``, ``fused_complement_nll``, ``fused_complement_set_nll`` (4 negatives per
  token): the fused losses, streaming ``--chunk`` columns at a time;
- in float32, ``floor: the 4 products alone``: the four ``N x D x V`` matrix products
  (chunked) a fused loss that recomputes the logits performs, and nothing else.

Memory is XLA's compiled ``temp_size_in_bytes`` (the buffers besides inputs and outputs);
time is the median of ``--rounds`` interleaved calls
(:func:`experiments.benchmarks.timer.interleaved`). Ratios are to optax in the
same run.

    python -m experiments.benchmarks.fused [--sizes 8192,1024,32768 4096,1024,131072]
        [--dtypes float32 bfloat16] [--rounds 3] [--chunk 2048] [--token-chunk 2048]
        [--memory-only]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmarks import timer
from jaxsoftmax import losses
from jaxsoftmax.losses._fused import DEFAULT_CHUNK, DEFAULT_TOKEN_CHUNK

FLOOR = "floor: the 4 products alone"


def _products(h, w, chunk):
  """The matrix products a fused loss that recomputes the logits cannot avoid, and
  nothing else: the logits once forward, and per chunk of columns in the backward pass
  the logits again, ``dz @ w_c.T`` and ``h.T @ dz`` (with ``dz`` the logits themselves).
  Its time is a floor for the fused losses."""
  n, v = h.shape[0], w.shape[1]
  starts = jnp.arange(v // chunk) * chunk
  columns = lambda start: jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)
  total, _ = jax.lax.scan(
    lambda t, s: (t + jnp.sum(h @ columns(s), axis=1), None), jnp.zeros(n, h.dtype), starts
  )

  def backward(carry, start):
    dh, dw = carry
    w_c = columns(start)
    dz = h @ w_c
    return (dh + dz @ w_c.T, jax.lax.dynamic_update_slice_in_dim(dw, h.T @ dz, start, axis=1)), None

  (dh, dw), _ = jax.lax.scan(
    backward, (jnp.zeros_like(h) + total[:, None], jnp.zeros_like(w)), starts
  )
  return jnp.sum(total), (dh, dw)


def _calls(n, d, v, dtype, chunk, token_chunk):
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
  labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  negatives = jnp.asarray(rng.integers(0, v, (n, 4)), jnp.int32)
  chunks = dict(vocab_chunk=chunk, token_chunk=token_chunk)
  fns = {
    "optax": lambda h, w: optax.softmax_cross_entropy_with_integer_labels(h @ w, labels),
    "complement_nll (unfused)": lambda h, w: losses.complement_nll(h @ w, labels),
    "fused_nll": lambda h, w: losses.fused_nll(h, w, labels, **chunks),
    "fused_complement_nll": lambda h, w: losses.fused_complement_nll(h, w, labels, **chunks),
    "fused_complement_set_nll": lambda h, w: losses.fused_complement_set_nll(
      h, w, negatives, **chunks
    ),
  }
  steps = {
    name: jax.value_and_grad(
      lambda h, w, fn=fn: jnp.sum(fn(h, w).astype(jnp.float32)), argnums=(0, 1)
    )
    for name, fn in fns.items()
  }
  if dtype == jnp.float32 and v % chunk == 0:
    steps[FLOOR] = functools.partial(_products, chunk=chunk)
  out = {}
  for name, step in steps.items():
    compiled = jax.jit(step).lower(h, w).compile()
    out[name] = (compiled.memory_analysis().temp_size_in_bytes, functools.partial(compiled, h, w))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--sizes", nargs="+", default=["8192,1024,32768", "4096,1024,131072"], help="N,D,V triples"
  )
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="vocab_chunk")
  parser.add_argument(
    "--token-chunk",
    default=str(DEFAULT_TOKEN_CHUNK),
    help="token_chunk (an int, or none for all tokens at once)",
  )
  parser.add_argument("--memory-only", action="store_true", help="compile, do not time")
  args = parser.parse_args(argv)
  token_chunk = None if args.token_chunk.lower() == "none" else int(args.token_chunk)
  print(
    f"{timer.machine()}; vocab_chunk {args.chunk}, token_chunk {token_chunk}; "
    f"jit(value_and_grad) w.r.t. h and w"
  )
  print()
  print("| N, D, V | dtype | loss | temp MiB | ratio to optax | seconds | ratio to optax |")
  print("|---|---|---|---:|---:|---:|---:|")
  for size in args.sizes:
    n, d, v = (int(x) for x in size.split(","))
    for dtype in args.dtypes:
      calls = _calls(n, d, v, jnp.dtype(dtype), args.chunk, token_chunk)
      times = (
        {}
        if args.memory_only
        else timer.interleaved({k: c for k, (_, c) in calls.items()}, args.rounds)
      )
      base_mem = calls["optax"][0]
      base_time = float(np.median(times["optax"])) if times else None
      for name, (mem, _) in calls.items():
        t = (
          f"{np.median(times[name]):.2f} | {np.median(times[name]) / base_time:.2f}"
          if times
          else "- | -"
        )
        print(
          f"| {n}, {d}, {v} | {dtype} | {name} | {mem / 2**20:.0f} | {mem / base_mem:.3f} | {t} |",
          flush=True,
        )


if __name__ == "__main__":
  main()
