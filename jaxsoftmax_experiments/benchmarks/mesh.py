"""Training throughput of the default experiment on 1, 2, 4 and 8 devices of one mesh.

Times ``Trainer.train`` (a compiled scan of vmapped steps for all runs of the
default experiment, ``configs/feedback_digits.py``) on the first N devices, with the
mesh of :func:`jaxsoftmax_experiments.experiment.make_mesh`: its 15 runs give a runs axis of 1
and each run's batch split over the N devices; with 8 seeds (24 runs) the runs are
split instead. It reports steps per second,
the ratio to one device measured in the same process, compile time, and how many
programs XLA compiled during the timed calls (0: no step recompiles).

On a CPU it simulates 8 devices (``--xla_force_host_platform_device_count=8``, set
before JAX starts); they share the machine's cores, so there the figure that matters
is that the ratio does not collapse and nothing recompiles. On GPUs the devices are
real. Run:

    python -m jaxsoftmax_experiments.benchmarks.mesh [--calls 5] [--steps 100]
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Simulated CPU devices (ignored by GPU and TPU backends); only before JAX starts.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxsoftmax_experiments import config as config_lib  # noqa: E402
from jaxsoftmax_experiments import data, experiment, protocols  # noqa: E402
from jaxsoftmax_experiments.train import Trainer  # noqa: E402


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_events: list[str] = []
jax.monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: _events.append(name))


def compiles_since(start: int) -> int:
  """XLA compilations since ``len(_events)`` was ``start``."""
  return sum(name == COMPILE_EVENT for name in _events[start:])


def bench(config, dataset, devices, calls: int, steps: int):
  """Returns (mesh shape, compile seconds, median seconds per step, programs compiled
  during the timed calls)."""
  runs = experiment.num_runs(config)
  trainer = Trainer(config, dataset, steps * (calls + 1), experiment.make_mesh(config, devices))
  keys = jax.random.split(jax.random.key(0), runs)
  state = trainer.init(keys, keys)
  y = jnp.asarray(dataset.y_train)
  examples = jax.tree.map(lambda a: jnp.stack([a] * runs), protocols.supervised(y))
  regimes = jnp.repeat(jnp.arange(3, dtype=jnp.int32), runs // 3)
  start = time.perf_counter()
  state, stats = trainer.train(state, examples, regimes, steps)
  jax.block_until_ready(stats)
  compile_seconds = time.perf_counter() - start
  times, mark = [], len(_events)
  for _ in range(calls):
    start = time.perf_counter()
    state, stats = trainer.train(state, examples, regimes, steps)
    jax.block_until_ready(stats)
    times.append(time.perf_counter() - start)
  return (dict(trainer.mesh.shape), compile_seconds, float(np.median(times)) / steps,
          compiles_since(mark))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calls", type=int, default=5, help="timed calls per device count")
  parser.add_argument("--steps", type=int, default=100, help="steps per call (one scan)")
  args = parser.parse_args(argv)
  config = config_lib.defaults()  # configs/feedback_digits.py's experiment
  dataset = data.load(config.dataset)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, {device.platform}: {device.device_kind}, "
        f"{jax.device_count()} devices, {os.cpu_count()} host cores; configs/feedback_digits.py, "
        f"batch {config.batch_size}; median of {args.calls} calls of {args.steps} steps")
  print()
  print("| runs | devices | mesh (runs x batch) | compile s | ms per step | steps/s "
        "| ratio to 1 device | compiled while timed |")
  print("|---:|---:|---|---:|---:|---:|---:|---:|")
  # 5 seeds (15 runs: the batch is split) and 8 seeds (24 runs: the runs are split).
  for seeds in (config.num_seeds, 8):
    config.num_seeds = seeds
    base = None
    for n in (1, 2, 4, 8):
      if n > jax.device_count():
        break
      shape, compile_seconds, per_step, programs = bench(
          config, dataset, jax.devices()[:n], args.calls, args.steps)
      base = base or per_step
      print(f"| {experiment.num_runs(config)} | {n} | {shape['runs']} x {shape['batch']} "
            f"| {compile_seconds:.2f} | {per_step * 1e3:.2f} | {1 / per_step:.0f} "
            f"| {base / per_step:.2f} | {programs} |")


if __name__ == "__main__":
  main()
