"""Training throughput of the default experiment on 1, 2, 4 and 8 devices of one mesh.

Times the training function of :mod:`jaxsoftmax_experiments.training` (a compiled scan
of vmapped steps for all runs of the default experiment, ``feedback_digits``: three
regime groups) on the first N devices, with the mesh of
:func:`jaxsoftmax_experiments.parallel.make_mesh`: 5 seeds per group give a runs axis
of 1 and each run's batch split over the N devices; with 8 seeds per group the runs
are split instead. It reports steps per second,
the ratio to one device measured in the same process, compile time, and how many
programs XLA compiled during the timed calls (0: no step recompiles).

On a CPU it simulates 8 devices (``--xla_force_host_platform_device_count=8``, set
before JAX starts); they share the machine's cores, so there the figure that matters
is that the ratio does not collapse and nothing recompiles. On GPUs the devices are
real. Run:

    python -m experiments.benchmarks.mesh [--calls 5] [--steps 100]
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Simulated CPU devices (ignored by GPU and TPU backends); only before JAX starts.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks import timer  # noqa: E402
from jaxsoftmax_experiments import config as config_lib  # noqa: E402
from jaxsoftmax_experiments import data, parallel, protocols, training  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_events: list[str] = []
jax.monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: _events.append(name))


def compiles_since(start: int) -> int:
  """XLA compilations since ``len(_events)`` was ``start``."""
  return sum(name == COMPILE_EVENT for name in _events[start:])


def bench(config, dataset, devices, calls: int, steps: int):
  """Returns (mesh shape, compile seconds, median seconds per step, programs compiled
  during the timed calls)."""
  regimes = tuple(config.regimes)
  setup = training.make_setup(
    config, dataset, regimes=regimes, total_steps=steps * (calls + 1), devices=devices
  )
  fns = training.functions(setup)
  keys = jax.random.split(jax.random.key(0), len(regimes) * config.num_seeds)
  state = fns.init(keys.reshape(len(regimes), -1), keys.reshape(len(regimes), -1))
  one = protocols.supervised(np.asarray(dataset.y_train))
  examples = parallel.put(
    (jax.tree.map(lambda a: np.stack([a] * config.num_seeds), one),) * len(regimes),
    parallel.run_sharding(setup.mesh),
  )
  x = parallel.put(dataset.x_train, parallel.replicated(setup.mesh))
  (state, _), compile_seconds = timer.timed(lambda: fns.train(state, examples, x, length=steps))
  times, mark = [], len(_events)
  for _ in range(calls):
    (state, _), seconds = timer.timed(lambda: fns.train(state, examples, x, length=steps))
    times.append(seconds)
  return (
    dict(setup.mesh.shape),
    compile_seconds,
    float(np.median(times)) / steps,
    compiles_since(mark),
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calls", type=int, default=5, help="timed calls per device count")
  parser.add_argument("--steps", type=int, default=100, help="steps per call (one scan)")
  args = parser.parse_args(argv)
  config = config_lib.defaults()  # feedback_digits's experiment
  dataset = data.load(config.dataset)
  print(
    f"{timer.machine()}; feedback_digits, batch {config.batch_size}; median of "
    f"{args.calls} calls of {args.steps} steps"
  )
  print()
  print(
    "| runs | devices | mesh (runs x batch) | compile s | ms per step | steps/s "
    "| ratio to 1 device | compiled while timed |"
  )
  print("|---:|---:|---|---:|---:|---:|---:|---:|")
  # 5 seeds (15 runs: the batch is split) and 8 seeds (24 runs: the runs are split).
  for seeds in (config.num_seeds, 8):
    config.num_seeds = seeds
    base = None
    for n in (1, 2, 4, 8):
      if n > jax.device_count():
        break
      shape, compile_seconds, per_step, programs = bench(
        config, dataset, jax.devices()[:n], args.calls, args.steps
      )
      base = base or per_step
      print(
        f"| {len(config.regimes) * seeds} | {n} | {shape['runs']} x {shape['batch']} "
        f"| {compile_seconds:.2f} | {per_step * 1e3:.2f} | {1 / per_step:.0f} "
        f"| {base / per_step:.2f} | {programs} |"
      )


if __name__ == "__main__":
  main()
