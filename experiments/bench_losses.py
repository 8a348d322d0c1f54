"""Times jit(value_and_grad) of nll and complement_nll against optax's cross-entropy.

The three functions run interleaved in one process (one call of each per round),
and the table reports the median over rounds, the ratio to optax measured in the
same run, and the compiled program's memory (``memory_analysis()``). Run:

    python -m experiments.bench_losses [--rounds 30]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsoftmax import losses

SHAPES = ((8192, 16), (1024, 32768), (64, 262144))

FUNCTIONS = {
    "optax softmax_cross_entropy_with_integer_labels": optax.softmax_cross_entropy_with_integer_labels,
    "nll": losses.nll,
    "complement_nll": losses.complement_nll,
}


def _compiled(fn, logits, labels):
  step = jax.jit(jax.value_and_grad(lambda z, y: jnp.sum(fn(z, y))))
  return step.lower(logits, labels).compile()


def _memory(compiled) -> str:
  stats = compiled.memory_analysis()
  if stats is None:
    return "n/a"
  temp = stats.temp_size_in_bytes
  out = stats.output_size_in_bytes
  return f"{temp / 2**20:.1f} + {out / 2**20:.1f}"


def bench(shape, rounds: int, seed: int = 0):
  """Returns {name: (median seconds, memory string)} for one shape."""
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(0, 3, shape), jnp.float32)
  labels = jnp.asarray(rng.integers(0, shape[1], shape[0]), jnp.int32)
  compiled = {name: _compiled(fn, logits, labels) for name, fn in FUNCTIONS.items()}
  for c in compiled.values():  # warm up
    jax.block_until_ready(c(logits, labels))
  times = {name: [] for name in compiled}
  for _ in range(rounds):
    for name, c in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(c(logits, labels))
      times[name].append(time.perf_counter() - start)
  return {name: (float(np.median(t)), _memory(compiled[name])) for name, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=30)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, optax {optax.__version__}, {device.platform}: "
        f"{device.device_kind}, {jax.device_count()} device(s); host {platform.processor() or platform.machine()}, "
        f"median of {args.rounds} interleaved rounds, float32")
  print()
  print("| shape | function | median ms | ratio to optax | temp + output MiB |")
  print("|---|---|---:|---:|---:|")
  optax_name = next(iter(FUNCTIONS))
  for shape in SHAPES:
    results = bench(shape, args.rounds)
    base = results[optax_name][0]
    for name, (seconds, memory) in results.items():
      label = "optax CE" if name == optax_name else name
      print(f"| {shape[0]}x{shape[1]} | {label} | {seconds * 1e3:.2f} | {seconds / base:.2f} | {memory} |")


if __name__ == "__main__":
  main()
