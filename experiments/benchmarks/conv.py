"""Benchmark: a vmapped CNN train step with ``nnx.Conv`` against ``conv_as_matmul``.

The MNIST-1D CNN's three strided convolutions (25 channels, kernel 5, batch 128,
length 40), stacked for ``--seeds`` seeds: the gradient of a squared loss and an SGD
update, vmapped over the seeds, once per call and ``--chunk`` times inside
``lax.scan``. Under ``vmap`` an ``nnx.Conv`` with stacked kernels becomes a grouped
convolution; :func:`jaxsoftmax.models.conv_as_matmul` stays a batched matrix product.
The sides alternate in rounds; the median round is reported.

    python -m experiments.benchmarks.conv --seeds 8 --rounds 5
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks import timer
from jaxsoftmax.models import conv_as_matmul


def _convs(key):
  rngs = nnx.Rngs(key)
  return nnx.List([nnx.Conv(a, 25, (5,), strides=2, rngs=rngs) for a in (1, 25, 25)])


def _step(apply, graphdef, params, x):
  def loss(params):
    h = x
    for conv in nnx.merge(graphdef, params):
      h = jax.nn.relu(apply(conv, h))
    return jnp.mean(h**2)

  grads = jax.grad(loss)(params)
  return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)


def bench(seeds: int, chunk: int, rounds: int) -> dict[str, dict[str, float]]:
  """Milliseconds per vmapped step of each convolution, called per step and in a scan."""
  graphdef = nnx.graphdef(_convs(0))
  params = jax.vmap(lambda k: nnx.state(_convs(k)))(jax.random.split(jax.random.key(0), seeds))
  x = jax.random.normal(jax.random.key(1), (128, 40, 1))
  applies = {"nnx.Conv": lambda conv, h: conv(h), "conv_as_matmul": conv_as_matmul}
  calls = {}
  for name, apply in applies.items():
    step = jax.vmap(lambda p, apply=apply: _step(apply, graphdef, p, x))
    scan = lambda p, step=step: jax.lax.scan(lambda c, _: (step(c), None), p, None, length=chunk)[0]
    calls[name, "per call"] = (jax.jit(step), 1)
    calls[name, "in scan"] = (jax.jit(scan), chunk)

  def run(fn, steps):
    out = params
    for _ in range(chunk // steps):
      out = fn(out)
    return out

  times = timer.interleaved(
    {key: (lambda fn=fn, steps=steps: run(fn, steps)) for key, (fn, steps) in calls.items()}, rounds
  )
  result: dict[str, dict[str, float]] = {}
  for (name, how), t in times.items():
    result.setdefault(name, {})[how] = float(np.median(t)) * 1e3 / chunk
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--chunk", type=int, default=50, help="steps per scanned call")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  r = bench(args.seeds, args.chunk, args.rounds)
  print(
    f"{timer.machine()}; {args.seeds} seeds, batch 128; median of {args.rounds} interleaved "
    f"rounds of {args.chunk} steps, ms per vmapped step"
  )
  print()
  print("| convolution | per call | in lax.scan | scan / per call |")
  print("|---|---:|---:|---:|")
  for name, t in r.items():
    print(
      f"| {name} | {t['per call']:.2f} | {t['in scan']:.2f} | {t['in scan'] / t['per call']:.2f}x |"
    )
  ratio = r["nnx.Conv"]["in scan"] / r["conv_as_matmul"]["in scan"]
  print()
  print(f"In lax.scan, nnx.Conv takes {ratio:.1f}x the time of conv_as_matmul.")


if __name__ == "__main__":
  main()
