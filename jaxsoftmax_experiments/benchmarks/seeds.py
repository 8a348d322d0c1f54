"""Benchmark: seeds trained by one vmapped step against a Python loop over seeds.

Both sides call the same single-run :meth:`jaxsoftmax_experiments.train.Trainer.step`, jitted
once: the loop calls it once per seed per step, the vmapped side calls
``jax.jit(jax.vmap(step))`` once per step for all seeds. A third row scans
``--chunk`` vmapped steps per call, as :func:`jaxsoftmax_experiments.experiment.run_experiment`
does. Compile time is measured separately (ahead-of-time lower and compile); the
timed steps alternate between the sides in rounds so that both see the same machine
load, and the median round is reported. Throughput counts seed-steps per second.

    python -m jaxsoftmax_experiments.benchmarks.seeds --seeds 8 --steps 100 --rounds 5
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp

from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import data, protocols
from jaxsoftmax_experiments.train import REGIME_IDS, Trainer

CASES = (("digits", "mlp"), ("mnist1d", "cnn"))


def _setup(dataset_name, model, seeds, batch_size=128):
  c = config_lib.defaults()
  c.dataset, c.model, c.batch_size = dataset_name, model, batch_size
  config_lib.validate(c)
  ds = data.load(dataset_name)
  trainer = Trainer(c, ds, 1000)
  y = jnp.asarray(ds.y_train)
  labeled = jnp.arange(len(y)) < c.num_labeled
  one = protocols.complementary(jax.random.key(0), y, labeled, ds.num_classes)
  examples = jax.tree.map(lambda a: jnp.stack([a] * seeds), one)
  regimes = jnp.full(seeds, REGIME_IDS["complement_likelihood"])
  keys = jax.random.split(jax.random.key(1), seeds)
  state = trainer.init(keys, jax.random.split(jax.random.key(2), seeds))
  return trainer, one, examples, regimes, state


def _compile(fn, *args):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def bench(dataset_name: str, model: str, seeds: int, batch_size: int, steps: int, rounds: int,
          chunk: int) -> dict:
  """Compile seconds and seed-steps per second of the loop, vmap and vmap+scan sides."""
  trainer, one, examples, regimes, state = _setup(dataset_name, model, seeds, batch_size)
  x = trainer.x_train
  states = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(seeds)]
  regime = regimes[0]
  single, single_compile = _compile(trainer.step, states[0], one, regime, x)
  batched, batched_compile = _compile(jax.vmap(trainer.step, in_axes=(0, 0, 0, None)),
                                      state, examples, regimes, x)
  scanned, scanned_compile = _compile(lambda *a: trainer.train_steps(*a, length=chunk),
                                      state, examples, regimes, x)

  def loop():
    nonlocal states
    for _ in range(steps):
      states = [single(s, one, regime, x)[0] for s in states]
    jax.block_until_ready(states)

  def vmapped():
    nonlocal state
    for _ in range(steps):
      state = batched(state, examples, regimes, x)[0]
    jax.block_until_ready(state)

  scan_state = state
  def scan():
    nonlocal scan_state
    for _ in range(steps // chunk):
      scan_state = scanned(scan_state, examples, regimes, x)[0]
    jax.block_until_ready(scan_state)

  sides = {"loop": loop, "vmap": vmapped, "vmap+scan": scan}
  times = {name: [] for name in sides}
  for fn in sides.values():  # warm-up: first executions allocate buffers
    fn()
  for _ in range(rounds):
    for name, fn in sides.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  done = {"loop": steps, "vmap": steps, "vmap+scan": (steps // chunk) * chunk}
  throughput = {name: seeds * done[name] / statistics.median(t) for name, t in times.items()}
  return {"compile": {"loop": single_compile, "vmap": batched_compile, "vmap+scan": scanned_compile},
          "throughput": throughput}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--steps", type=int, default=100, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--chunk", type=int, default=50, help="steps per scanned call")
  parser.add_argument("--batch-sizes", default="16,128", help="comma-separated")
  args = parser.parse_args(argv)
  print(f"{args.seeds} seeds, complement_likelihood, on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}); median of {args.rounds} rounds of {args.steps} steps")
  print()
  print("| data, model, batch | loop: compile s, seed-steps/s | vmap: compile s, seed-steps/s "
        "| vmap+scan: compile s, seed-steps/s | vmap / loop | vmap+scan / loop |")
  print("|---|---|---|---|---:|---:|")
  for (dataset_name, model), batch in itertools.product(
      CASES, [int(b) for b in args.batch_sizes.split(",")]):
    r = bench(dataset_name, model, args.seeds, batch, args.steps, args.rounds, args.chunk)
    c, t = r["compile"], r["throughput"]
    cells = " | ".join(f"{c[k]:.2f}, {t[k]:,.0f}" for k in ("loop", "vmap", "vmap+scan"))
    print(f"| {dataset_name}, {model}, {batch} | {cells} | {t['vmap'] / t['loop']:.1f}x "
          f"| {t['vmap+scan'] / t['loop']:.1f}x |", flush=True)


if __name__ == "__main__":
  main()
