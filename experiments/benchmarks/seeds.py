"""Benchmark: seeds trained by one vmapped step against a Python loop over seeds.

Both sides call the same single-run :func:`jaxsoftmax_experiments.training.step`, jitted
once: the loop calls it once per seed per step, the vmapped side calls
``jax.jit(jax.vmap(step))`` once per step for all seeds. A third side scans ``--chunk``
vmapped steps per call, as the experiment loop does. Compile time is measured apart
(ahead-of-time lower and compile); the timed rounds interleave the sides with the
shared timer, and the median round is reported. Throughput counts seed-steps per
second.

    python -m experiments.benchmarks.seeds --seeds 8 --steps 100 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import numpy as np

from experiments.benchmarks import timer
from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import data, protocols, training

CASES = (("digits", "mlp"), ("mnist1d", "cnn"))
REGIME = "complement_likelihood"


def _setup(dataset_name, model, seeds, batch_size=128):
  c = config_lib.defaults()
  c.dataset, c.model, c.batch_size, c.num_seeds = dataset_name, model, batch_size, seeds
  config_lib.validate(c)
  ds = data.load(dataset_name)
  setup = training.make_setup(c, ds, regimes=(REGIME,), total_steps=1000, devices=jax.devices()[:1])
  y = np.asarray(ds.y_train)
  one = protocols.complementary(
    jax.random.key(0), y, np.arange(len(y)) < c.num_labeled, ds.num_classes
  )
  examples = jax.tree.map(lambda a: np.stack([a] * seeds), one)
  keys = jax.random.split(jax.random.key(1), seeds)[None]
  state = training.functions(setup).init(keys, jax.random.split(jax.random.key(2), seeds)[None])[0]
  return setup, one, examples, state, jax.numpy.asarray(ds.x_train)


def bench(
  dataset_name: str, model: str, seeds: int, batch_size: int, steps: int, rounds: int, chunk: int
) -> dict:
  """Compile seconds and seed-steps per second of the loop, vmap and vmap+scan sides."""
  setup, one, examples, state, x = _setup(dataset_name, model, seeds, batch_size)
  step = functools.partial(training.step, setup, REGIME)
  states = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(seeds)]
  compile_ = lambda fn, *args: timer.timed(lambda: jax.jit(fn).lower(*args).compile())
  single, single_compile = compile_(step, states[0], one, x)
  batched, batched_compile = compile_(jax.vmap(step, in_axes=(0, 0, None)), state, examples, x)

  def scan_fn(state, examples, x):
    return jax.lax.scan(
      lambda s, _: jax.vmap(step, in_axes=(0, 0, None))(s, examples, x), state, None, length=chunk
    )

  scanned, scanned_compile = compile_(scan_fn, state, examples, x)
  held = {"loop": states, "vmap": state, "vmap+scan": state}

  def loop():
    for _ in range(steps):
      held["loop"] = [single(s, one, x)[0] for s in held["loop"]]
    return held["loop"]

  def vmapped():
    for _ in range(steps):
      held["vmap"] = batched(held["vmap"], examples, x)[0]
    return held["vmap"]

  def scan():
    for _ in range(steps // chunk):
      held["vmap+scan"] = scanned(held["vmap+scan"], examples, x)[0]
    return held["vmap+scan"]

  times = timer.interleaved({"loop": loop, "vmap": vmapped, "vmap+scan": scan}, rounds)
  done = {"loop": steps, "vmap": steps, "vmap+scan": (steps // chunk) * chunk}
  throughput = {name: seeds * done[name] / float(np.median(t)) for name, t in times.items()}
  return {
    "compile": {"loop": single_compile, "vmap": batched_compile, "vmap+scan": scanned_compile},
    "throughput": throughput,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--steps", type=int, default=100, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--chunk", type=int, default=50, help="steps per scanned call")
  parser.add_argument("--batch-sizes", default="16,128", help="comma-separated")
  args = parser.parse_args(argv)
  print(
    f"{timer.machine()}; {args.seeds} seeds, {REGIME}; median of {args.rounds} "
    f"interleaved rounds of {args.steps} steps"
  )
  print()
  print(
    "| data, model, batch | loop: compile s, seed-steps/s | vmap: compile s, seed-steps/s "
    "| vmap+scan: compile s, seed-steps/s | vmap / loop | vmap+scan / loop |"
  )
  print("|---|---|---|---|---:|---:|")
  for (dataset_name, model), batch in itertools.product(
    CASES, [int(b) for b in args.batch_sizes.split(",")]
  ):
    r = bench(dataset_name, model, args.seeds, batch, args.steps, args.rounds, args.chunk)
    c, t = r["compile"], r["throughput"]
    cells = " | ".join(f"{c[k]:.2f}, {t[k]:,.0f}" for k in ("loop", "vmap", "vmap+scan"))
    print(
      f"| {dataset_name}, {model}, {batch} | {cells} | {t['vmap'] / t['loop']:.1f}x "
      f"| {t['vmap+scan'] / t['loop']:.1f}x |",
      flush=True,
    )


if __name__ == "__main__":
  main()
