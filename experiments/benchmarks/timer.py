"""The one timer every benchmark uses, and the machine line every table starts with.

``interleaved`` calls each function once per round and rotates the order each round,
so every function follows every other equally often: on a CPU a call right after a
large one ran 1.3-1.45x slower, which a fixed order turns into a bias. The table
reports medians over rounds and ratios against a peer timed in the same rounds.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np


def interleaved(
  calls: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, np.ndarray]:
  """Seconds per call of each ``calls[name]()``, ``rounds`` calls each, order rotated.

  Each call's result is waited for (``jax.block_until_ready``) inside its timing.
  """
  names = list(calls)
  for _ in range(warmup):
    for name in names:
      jax.block_until_ready(calls[name]())
  times = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      jax.block_until_ready(calls[name]())
      times[name].append(time.perf_counter() - start)
  return {name: np.asarray(t) for name, t in times.items()}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
  """``(fn(), seconds)``, waiting for the result: for one-off costs such as compiling."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def cpu_model() -> str:
  """The host CPU's model name as ``lscpu`` reports it, and its core count."""
  name = platform.processor() or platform.machine()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        name = line.split(":", 1)[1].strip()
        break
  except (OSError, subprocess.SubprocessError):
    pass
  return f"{name}, {os.cpu_count()} cores"


def machine() -> str:
  """One line naming the software and hardware a table was measured on."""
  device = jax.devices()[0]
  kind = device.device_kind if device.platform != "cpu" else "cpu"
  return (
    f"jax {jax.__version__}, {device.platform} ({kind}), {jax.device_count()} device(s); "
    f"host {cpu_model()}"
  )
