"""What a run of the default experiment costs: regime groups, compilations and the cache.

1. Regime groups. Each group of runs computes only its own regime's loss, so 3 regimes
   x 5 seeds should cost about what 15 seeds of one regime cost, and every regime of
   the table (``jaxsoftmax-table``) x 5 seeds about 4 times as much. The benchmark
   times one compiled call of ``--steps`` training steps for each layout, interleaved
   (:func:`experiments.benchmarks.timer.interleaved`), and gives each
   layout's cost per run and step as a ratio to the three-regime one.
2. Compilations. It runs the default config (``feedback_digits``) through the loop in
   this process and counts XLA compilations and their seconds
   (``jax.monitoring``), without the persistent cache.
3. The persistent cache. It runs the command line twice in subprocesses with a fresh
   cache folder (the second run with ``--overwrite``) and reports each one's wall time.

    python -m experiments.benchmarks.training [--steps 100] [--rounds 10]
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from experiments.benchmarks import timer
from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import data, loop, parallel, protocols, training
from jaxsoftmax_experiments import regimes as regimes_lib
from jaxsoftmax_experiments.configs import feedback_digits

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_events: list[tuple[str, float]] = []
jax.monitoring.register_event_duration_secs_listener(
  lambda name, secs, **kw: _events.append((name, secs))
)

LAYOUTS = {  # name -> (regimes, seeds per regime)
  "3 regimes x 5 seeds": (("positive_only", "negated_gradient", "complement_likelihood"), 5),
  "positive_only x 15": (("positive_only",), 15),
  "negated_gradient x 15": (("negated_gradient",), 15),
  "complement_likelihood x 15": (("complement_likelihood",), 15),
  "every regime x 5 seeds": (tuple(regimes_lib.NAMES), 5),
}


def regime_cost(steps: int, rounds: int) -> dict[str, float]:
  """Median seconds per training step and run of each layout, timed in the same rounds,
  on uniformly drawn wrong labels (whose transition matrix ``forward`` needs)."""
  c = feedback_digits.get_config().copy_and_resolve_references()
  c.protocol = "uniform"
  ds = data.load(c.dataset)
  y = np.asarray(ds.y_train)
  calls = {}
  for name, (regimes, seeds) in LAYOUTS.items():
    c.num_seeds = seeds
    setup = training.make_setup(c, ds, regimes=regimes, total_steps=c.steps)
    fns = training.functions(setup)
    keys = jax.random.split(jax.random.key(0), len(regimes) * seeds).reshape(len(regimes), seeds)
    state = fns.init(keys, keys)
    one = protocols.complementary(
      jax.random.key(1), y, np.arange(len(y)) < c.num_labeled, ds.num_classes
    )
    one = one._replace(reference=np.full(y.shape, -np.log(ds.num_classes), np.float32))  # npo
    examples = (jax.tree.map(lambda a: np.stack([a] * seeds), one),) * len(regimes)
    examples = parallel.put(examples, parallel.run_sharding(setup.mesh))
    x = parallel.put(ds.x_train, parallel.replicated(setup.mesh))
    compiled = fns.train.lower(state, examples, x, length=steps).compile()
    calls[name] = functools.partial(compiled, state, examples, x)
  times = timer.interleaved(calls, rounds)
  return {
    name: float(np.median(t)) / steps / (len(LAYOUTS[name][0]) * LAYOUTS[name][1])
    for name, t in times.items()
  }


def compilations() -> tuple[int, float, float]:
  """(programs compiled, their seconds, wall seconds) of a first run of the default config."""
  c = feedback_digits.get_config()
  config_lib.validate(c)
  start, mark = time.perf_counter(), len(_events)
  ds = data.load(c.dataset)
  plan = loop.make_plan(c, ds)
  for state in loop.run(plan):
    parallel.fetch(loop.light(state))
  jax.block_until_ready(state)
  wall = time.perf_counter() - start
  compiled = [secs for name, secs in _events[mark:] if name == COMPILE_EVENT]
  return len(compiled), float(sum(compiled)), wall


def cached_reruns() -> tuple[float, float]:
  """Wall seconds of the command line's first run and of a rerun, with a fresh cache."""
  with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as workdir:
    command = [
      sys.executable,
      "-m",
      "jaxsoftmax_experiments.run",
      "--config=feedback_digits",
      f"--workdir={workdir}",
      f"--compilation_cache={cache}",
      "--progress=false",
      "--overwrite",
    ]
    walls = []
    for _ in range(2):
      start = time.perf_counter()
      subprocess.run(command, check=True, capture_output=True)
      walls.append(time.perf_counter() - start)
  return walls[0], walls[1]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100, help="steps per timed call")
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args(argv)
  print(f"{timer.machine()}; feedback_digits (MLP 100-100, batch 128)")
  print()
  cost = regime_cost(args.steps, args.rounds)
  base = cost["3 regimes x 5 seeds"]
  print(f"Training step, median of {args.rounds} interleaved calls of {args.steps} steps:")
  print()
  print("| layout | runs | ms per step and run | ratio to 3 regimes x 5 seeds |")
  print("|---|---:|---:|---:|")
  for name, seconds in cost.items():
    runs = len(LAYOUTS[name][0]) * LAYOUTS[name][1]
    print(f"| {name} | {runs} | {seconds * 1e3:.3f} | {seconds / base:.2f} |")
  print()
  count, compile_seconds, wall = compilations()
  print(
    f"A first run of feedback_digits in one process (no persistent cache): {count} XLA "
    f"compilations taking {compile_seconds:.1f} s of {wall:.1f} s."
  )
  first, again = cached_reruns()
  print(
    f"The command line with a fresh compilation cache: {first:.1f} s; the same run again "
    f"(--overwrite, cache filled): {again:.1f} s."
  )


if __name__ == "__main__":
  main()
